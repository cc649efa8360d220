"""Disaggregated reply roles: a Decision session (replies="external") hands replies out and appends them;
a Reaction session (replies="on_request") writes replies only when asked. Both must leave their caches
exactly as an inline session's would be, so a split deployment decides and speaks like one model."""

from __future__ import annotations

import pytest
from engine_helpers import frame_bank, steered
from liveserve.config import EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import FrameDecision, ReplyRequested, ResponseDone, ResponseStarted
from liveserve.engine.session import Session, SessionError


@pytest.fixture(scope="module")
def chatty(tiny_model):
    """Fires often, with replies of a few tokens."""
    return steered(tiny_model, interval_bias=-1.0, eos_bias=-1.0)


@pytest.fixture(scope="module")
def frames(tiny_model):
    return frame_bank(tiny_model, 10, seed=3)


def run(session: Session, pushes) -> list:
    events = []
    for push in pushes:
        push(session)
        events += list(session.process())
    return events


def first_reply(model, frames):
    """An inline session's first proactive reply: (frame index it fired at, its text, events up to it)."""
    inline = Session(model, SessionConfig(max_new_tokens=6))
    for i, features in enumerate(frames):
        inline.push_frame(i * 0.5, features)
        events = list(inline.process())
        done = [e for e in events if isinstance(e, ResponseDone)]
        if done:
            assert done[0].text, "the steered model should reply with some text"
            return i, done[0].text, inline
    pytest.fail("the steered model never fired")


def test_a_reaction_session_answers_a_trigger_exactly_as_an_inline_session_replies(chatty, frames):
    index, text, _ = first_reply(chatty, frames)
    reaction = Session(chatty, SessionConfig(max_new_tokens=6, replies="on_request"))
    for i in range(index + 1):
        reaction.push_frame(i * 0.5, frames[i])
    events = list(reaction.process())
    assert not any(isinstance(e, (ResponseStarted, ReplyRequested)) for e in events)  # never speaks unasked
    assert all(not e.fired for e in events if isinstance(e, FrameDecision))
    reaction.push_respond(index * 0.5)
    events = list(reaction.process())
    assert isinstance(events[0], ResponseStarted) and events[0].trigger == "proactive"
    assert events[-1].text == text


def test_a_decision_session_keeps_deciding_while_its_reply_is_written_elsewhere(chatty, frames):
    index, text, inline = first_reply(chatty, frames)
    decision = Session(chatty, SessionConfig(max_new_tokens=6, replies="external"))
    decision.trace = []
    for i in range(index + 1):
        decision.push_frame(i * 0.5, frames[i])
    events = list(decision.process())
    requested = [e for e in events if isinstance(e, ReplyRequested)]
    assert len(requested) == 1 and requested[0].trigger == "proactive" and requested[0].frame_index == index
    assert decision.awaiting_reply

    # Frames keep being decided meanwhile, and nothing fires a second reply.
    later = Session(chatty, SessionConfig(max_new_tokens=6, replies="external"))
    for i in range(index + 1):
        later.push_frame(i * 0.5, frames[i])
    list(later.process())
    for i in range(index + 1, len(frames)):
        later.push_frame(i * 0.5, frames[i])
    events = list(later.process())
    decided = [e for e in events if isinstance(e, FrameDecision)]
    assert len(decided) == len(frames) - index - 1 and not any(e.fired for e in decided)
    assert not any(isinstance(e, ReplyRequested) for e in events)

    # The written reply lands in the cache exactly as the inline session's own reply did: the next frame's
    # decision matches the inline session's to float noise.
    decision.push_reply(text)
    assert list(decision.process()) == []
    assert not decision.awaiting_reply and decision.responses == 1
    nxt = index + 1
    inline.push_frame(nxt * 0.5, frames[nxt])
    decision.push_frame(nxt * 0.5, frames[nxt])
    want = [e for e in inline.process() if isinstance(e, FrameDecision)][0]
    got = [e for e in decision.process() if isinstance(e, FrameDecision)][0]
    assert got.p_silent == pytest.approx(want.p_silent, abs=1e-5)
    assert got.cache_tokens == want.cache_tokens and got.token_id == want.token_id


def test_queries_wait_for_the_reply_in_progress_and_an_empty_reply_resumes_firing(chatty, frames):
    index, _, _ = first_reply(chatty, frames)
    decision = Session(chatty, SessionConfig(max_new_tokens=6, replies="external"))
    for i in range(index + 1):
        decision.push_frame(i * 0.5, frames[i])
    list(decision.process())
    decision.push_query(index * 0.5 + 0.1, "what now")
    decision.push_frame(index * 0.5 + 0.5, frames[index + 1])
    events = list(decision.process())
    assert [type(e) for e in events] == [FrameDecision]  # the query is held back
    decision.push_reply("")  # the writer failed: nothing appended, the held query goes next
    events = list(decision.process())
    assert [(type(e), e.trigger, e.query) for e in events] == [(ReplyRequested, "query", "what now")]


def test_reply_role_errors_are_specific(chatty, frames):
    inline = Session(chatty, SessionConfig())
    with pytest.raises(SessionError, match="no reply was requested"):
        inline.push_reply("hello")
    with pytest.raises(SessionError, match="needs replies='on_request'"):
        inline.push_respond(0.0)
    with pytest.raises(SessionError, match="at least one frame"):
        Session(chatty, SessionConfig(replies="on_request")).push_respond(0.0)
    with pytest.raises(ValueError, match="replies must be one of"):
        SessionConfig(replies="sometimes")


def test_the_batched_engine_reports_a_query_handed_out_before_any_frame(chatty, frames):
    engine = BatchEngine(chatty, EngineConfig(pool=PoolConfig(budget_tokens=20_000, max_session_tokens=2000),
                                              scheduler=SchedulerConfig(max_lag_s=None)))
    engine.open("d", SessionConfig(replies="external"))
    engine.push_query("d", 0.0, "describe the scene")
    events = engine.run_until_idle()
    assert [(sid, type(e)) for sid, e in events] == [("d", ReplyRequested)]
    engine.push_frame("d", 0.5, frames[0])
    engine.push_reply("d", "a red square")
    events = engine.run_until_idle()
    assert isinstance(events[0][1], FrameDecision)  # the reply was appended first, then the frame stepped
    assert engine.session("d").responses == 1
    engine.shutdown()


def test_a_decisions_only_session_reports_firing_but_reads_the_stream_as_if_silent(chatty, frames):
    only = Session(chatty, SessionConfig(replies="none"))
    reader = Session(chatty, SessionConfig(replies="on_request"))  # never fires: "," between all frames
    for i, features in enumerate(frames):
        only.push_frame(i * 0.5, features)
        reader.push_frame(i * 0.5, features)
    got, want = list(only.process()), list(reader.process())
    assert all(isinstance(e, FrameDecision) for e in got) and any(e.fired for e in got)
    assert [e.p_silent for e in got] == pytest.approx([e.p_silent for e in want], abs=1e-5)
    with pytest.raises(SessionError, match="decisions only"):
        only.push_query(9.0, "anyone there?")
