"""A session rebuilt elsewhere (its Decision replica died or drained) from its frames and turns must go on
deciding as the original would have: the restored cache holds what the original's held, so the next
decisions agree with it to float precision."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import frame_bank, steered
from liveserve.config import SessionConfig
from liveserve.engine.events import FrameDecision, ReplyRequested
from liveserve.engine.inputs import AwaitedReply, RestoredFrame, RestoredTurn
from liveserve.engine.live.session import Session, SessionError

EXTERNAL = SessionConfig(max_new_tokens=6, replies="external")


@pytest.fixture(scope="module")
def chatty(tiny_model):
    return steered(tiny_model, interval_bias=-1.0, eos_bias=-1.0)


@pytest.fixture(scope="module")
def frames(tiny_model):
    return frame_bank(tiny_model, 14, seed=5)


def decisions(events) -> list[FrameDecision]:
    return [e for e in events if isinstance(e, FrameDecision)]


def original_with_a_reply(model, frames, upto: int, reply: str = "a red square"):
    """An external Decision session over frames[:upto]: its first trigger gets `reply`. Returns the
    session, the restore items that describe it, and the trigger."""
    session = Session(model, EXTERNAL)
    items, trigger = [], None
    for i in range(upto):
        session.push_frame(i * 0.5, frames[i], frame_id=i)
        events = list(session.process())
        items.append(RestoredFrame(i * 0.5, i, frames[i]))
        for event in events:
            if isinstance(event, ReplyRequested) and trigger is None:
                trigger = event
        if trigger is not None and session.awaiting_reply and i == trigger.frame_index + 2:
            session.push_reply(reply)  # lands after two tentative frames, which are replayed behind it
            list(session.process())
    assert trigger is not None, "the steered model should fire within the frames"
    position = next(n for n, item in enumerate(items) if item.timestamp > trigger.timestamp)
    items.insert(position, RestoredTurn(trigger.timestamp, trigger.query, reply))
    return session, items, trigger


def test_a_restored_session_decides_the_next_frames_as_the_original_does(chatty, frames):
    original, items, _ = original_with_a_reply(chatty, frames, 10)
    restored = Session(chatty, EXTERNAL)
    restored.restore(items)
    assert list(restored.process()) == []  # putting back what was decided reports nothing
    assert restored.frames_restored == 10 and restored.frames_decided == 0 and restored.responses == 0
    assert restored.cache.length == original.cache.length
    for i in range(10, 14):
        original.push_frame(i * 0.5, frames[i], frame_id=i)
        restored.push_frame(i * 0.5, frames[i], frame_id=i)
        a, b = decisions(original.process()), decisions(restored.process())
        assert [d.frame_index for d in a] == [d.frame_index for d in b] == [i]
        assert b[0].p_silent == pytest.approx(a[0].p_silent, abs=1e-5)
        assert b[0].action == a[0].action or original.awaiting_reply


@pytest.mark.parametrize("early", [False, True, "racing"],
                         ids=["after-the-restore", "before-the-restore-is-stepped", "as-the-restore-takes-it"])
def test_a_reply_in_flight_when_the_session_moved_lands_at_its_trigger(chatty, frames, early):
    """The original asked for a reply, then its replica died; the reply arrives at the new replica, before
    or after the new replica has stepped the restored frames, or (racing: from the serving thread) just as
    the engine's thread takes the awaited reply off the restored items."""
    original = Session(chatty, EXTERNAL)
    items, trigger = [], None
    for i in range(14):
        original.push_frame(i * 0.5, frames[i], frame_id=i)
        events = list(original.process())
        items.append(RestoredFrame(i * 0.5, i, frames[i]))
        trigger = trigger or next((e for e in events if isinstance(e, ReplyRequested)), None)
        if trigger is not None:
            break
    assert trigger is not None
    restored = Session(chatty, EXTERNAL)
    restored.restore([*items, AwaitedReply(trigger.timestamp, trigger.query)])
    assert restored.awaiting_reply
    nxt = len(items)
    if early == "racing":
        await_reply = restored._replies.await_reply  # the reply role remembers the trigger

        def reply_arrives_first(*args):
            restored._replies.await_reply = await_reply  # once: later triggers are the session's own
            restored.push_reply("it moved")
            await_reply(*args)

        restored._replies.await_reply = reply_arrives_first
        original.push_reply("it moved")
        list(restored.process())
        assert not restored.awaiting_reply  # taken, not refused: the frames are not held behind it
        early = True
    elif early:
        original.push_reply("it moved")
        restored.push_reply("it moved")
    else:
        list(restored.process())
        assert restored.awaiting_reply
        for session in (original, restored):  # a tentative frame meanwhile, then the reply
            session.push_frame(nxt * 0.5, frames[nxt], frame_id=nxt)
            list(session.process())
            session.push_reply("it moved")
    for session in (original, restored):
        list(session.process())
        assert not session.awaiting_reply
        if early:
            session.push_frame(nxt * 0.5, frames[nxt], frame_id=nxt)
            list(session.process())
    assert restored.cache.length == original.cache.length
    for session in (original, restored):
        session.push_frame((nxt + 1) * 0.5, frames[nxt + 1], frame_id=nxt + 1)
    a, b = decisions(original.process()), decisions(restored.process())
    assert b[0].p_silent == pytest.approx(a[0].p_silent, abs=1e-5)


def test_a_reply_arriving_while_a_restored_turn_is_written_waits_for_its_trigger(chatty, frames):
    """The batched engine plans a restored turn, then runs the forward: a reply reaching the session from
    the serving thread meanwhile belongs to the awaited trigger after that turn, not to the turn."""
    items = [RestoredFrame(i * 0.5, i, frames[i]) for i in range(4)]
    items.insert(2, RestoredTurn(0.5, None, "a red square"))  # a proactive reply after frame 1
    items.append(AwaitedReply(1.5, None))  # the reply being written when the session moved
    reference, restored = Session(chatty, EXTERNAL), Session(chatty, EXTERNAL)
    reference.restore(items)
    list(reference.process())
    reference.push_reply("it moved")
    restored.restore(items)
    plan_turn = restored.stream.plan_turn  # plans a restored turn's step (and a written reply's)

    def reply_arrives_meanwhile(*args):
        planned = plan_turn(*args)
        restored.stream.plan_turn = plan_turn  # once: only the restored turn's step is raced
        restored.push_reply("it moved")
        return planned

    restored.stream.plan_turn = reply_arrives_meanwhile
    list(restored.process())
    list(reference.process())
    assert not restored.awaiting_reply and not reference.awaiting_reply
    assert restored.cache.length == reference.cache.length
    for session in (reference, restored):
        session.push_frame(2.0, frames[4], frame_id=4)
    a, b = decisions(reference.process()), decisions(restored.process())
    assert b[0].p_silent == pytest.approx(a[0].p_silent, abs=1e-5)


def test_restore_refuses_what_it_cannot_put_back(tiny_model, frames):
    session = Session(tiny_model, EXTERNAL)
    with pytest.raises(SessionError, match="stream order"):
        session.restore([RestoredFrame(1.0, 0, frames[0]), RestoredFrame(0.5, 1, frames[1])])
    with pytest.raises(SessionError, match="shape"):
        session.restore([RestoredFrame(0.0, 0, torch.zeros(3, 3))])
    with pytest.raises(SessionError, match="last"):
        session.restore([AwaitedReply(0.0, "q?"), RestoredFrame(0.5, 0, frames[0])])
    session.push_frame(0.0, frames[0])
    with pytest.raises(SessionError, match="before any other input"):
        session.restore([RestoredFrame(0.5, 1, frames[1])])


def test_new_frames_must_follow_the_restored_ones(tiny_model, frames):
    session = Session(tiny_model, EXTERNAL)
    session.restore([RestoredFrame(0.0, 0, frames[0]), RestoredFrame(0.5, 1, frames[1])])
    with pytest.raises(SessionError, match="backwards"):
        session.push_frame(0.2, frames[2])
    session.push_frame(1.0, frames[2])  # its id defaults to the next after the restored ones
    (decision,) = decisions(session.process())
    assert decision.frame_index == 2 and session.frames_restored == 2 and session.frames_decided == 1


def test_a_query_turn_restores_without_frames(tiny_model, frames):
    """A client resuming on another gateway has no frames left to restore, only its conversation."""
    session = Session(tiny_model, EXTERNAL)
    session.restore([RestoredTurn(0.0, "what is on screen?", "a blue circle"),
                     RestoredTurn(0.5, None, "dropped: nothing came before it")])
    list(session.process())
    assert session.cache.length > 0 and session.responses == 0
    session.push_frame(1.0, frames[0])
    assert len(decisions(session.process())) == 1


def test_the_registry_turns_go_back_after_the_frames_up_to_their_time(frames):
    from liveserve.services.wire.contracts import FrameFeatures, Restore
    from liveserve.services.decision.recovery import restore_items

    history = [{"t": 0.0, "role": "assistant", "text": "before the window"},
               {"t": 1.0, "role": "user", "text": "what is it?"}, {"t": 1.0, "role": "assistant", "text": "a cube"},
               {"t": 1.5, "role": "assistant", "text": "it moves"},
               {"t": 2.0, "role": "user", "text": "unanswered (its reply failed)"},
               {"t": 2.5, "role": "user", "text": "still being answered"}]
    kept = tuple(FrameFeatures("s", 0, i, i * 0.5, frames[i]) for i in (2, 3, 4, 5))  # 1.0 s .. 2.5 s
    items = restore_items(Restore(kept, AwaitedReply(2.5, "still being answered")), history)
    described = [(type(item).__name__, item.timestamp) for item in items]
    assert described == [("RestoredFrame", 1.0), ("RestoredTurn", 1.0), ("RestoredFrame", 1.5),
                         ("RestoredTurn", 1.5), ("RestoredFrame", 2.0), ("RestoredFrame", 2.5),
                         ("AwaitedReply", 2.5)]
    assert items[1].query == "what is it?" and items[1].reply == "a cube" and items[3].query is None
    # No frames left (resumed on another gateway): the latest turns only.
    only_turns = restore_items(Restore(()), history)
    assert [item.reply for item in only_turns] == ["before the window", "a cube", "it moves"]
