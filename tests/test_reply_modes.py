"""Disaggregated reply roles: a Decision session (replies="external") hands replies out and appends them;
a Reaction session (replies="on_request") writes replies only when asked. Both must leave their caches
exactly as an inline session's would be, so a split deployment decides and speaks like one model: a
Decision session puts a reply back right after its trigger and replays the frames it decided meanwhile."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import pytest
import torch

from engine_helpers import frame_bank, steered
from liveserve.config import CacheConfig, EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import (FrameDecision, FramesDropped, ReplyRequested, ResponseDelta, ResponseDone,
                                     ResponseStarted)
from liveserve.engine.live.session import Session, SessionError, cache_limit


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

    # Frames keep being decided meanwhile, and nothing fires a second reply: a frame that would fire is
    # reported as suppressed.
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
    interval = chatty.template.interval_id
    assert [e.action for e in decided] == ["suppressed" if e.token_id != interval else "silent" for e in decided]
    assert "suppressed" in {e.action for e in decided}  # the chatty model wants to speak

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
    decision.push_reply("")  # the writer failed: nothing appended or replayed, the held query goes next
    events = list(decision.process())
    assert [(type(e), e.trigger, e.query) for e in events] == [(ReplyRequested, "query", "what now")]
    assert decision.frames_replayed == 0 and events[0].frame_index == index + 1


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
    assert events[0][1].frame_index == -1  # no frame decided yet
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


# ---- an external reply goes back right after its trigger ----------------------------------------------

FOLLOWING = 3  # silent frames after the fire: two decided while the reply is written, one after it lands


@pytest.fixture(scope="module")
def calm(tiny_model):
    """P(silent) around 0.8: whether a frame fires depends on the frame and the threshold."""
    return steered(tiny_model, interval_bias=8.0, eos_bias=4.0)


@pytest.fixture(scope="module")
def bank(calm):
    return frame_bank(calm, 8, seed=0)


def decisions(events) -> list[FrameDecision]:
    return [e for e in events if isinstance(e, FrameDecision)]


def written_back_exactly(template, events) -> bool:
    """Whether a reply's text encodes to the tokens the model wrote (push_reply feeds the encoding)."""
    done = events[-1]
    tokens = [t for e in events if isinstance(e, ResponseDelta) for t in e.token_ids]
    return (isinstance(done, ResponseDone) and bool(done.text) and template.encode(done.text) == tokens
            and len(tokens) + (done.finish_reason == "eos") == done.num_tokens)


@dataclass(frozen=True)
class FireThenSilence:
    """An inline stream that is silent before frame `at` (>= 1), fires there with `reply`, then stays silent
    on the FOLLOWING frames (the last of `frames`)."""

    config: SessionConfig
    frames: list[torch.Tensor]
    at: int
    reply: str


@functools.cache
def fire_then_silence(model, bank: tuple[torch.Tensor, ...], config: SessionConfig) -> FireThenSilence:
    """Search frame orders and thresholds, deterministically, for such a stream under `config`. Its replies
    are sampled (seeded; decisions are not): this model's greedy replies are interval tokens only."""
    for threshold in (0.82, 0.81, 0.83):
        for seed in range(40):
            order = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))
            case = _fire_then_silence(model, replace(config, threshold=threshold), [bank[i] for i in order])
            if case is not None:
                return case
    pytest.fail("no frame order and threshold fire once and then stay silent")


def _fire_then_silence(model, config: SessionConfig, frames: list[torch.Tensor]) -> FireThenSilence | None:
    session, at, reply = Session(model, config), None, ""
    for i, features in enumerate(frames):
        session.push_frame(i * 0.5, features)
        events = list(session.process())
        if events[0].fired:
            if at is not None or i == 0 or not written_back_exactly(model.template, events):
                return None
            at, reply = i, events[-1].text
        elif at is not None and i == at + FOLLOWING:
            return FireThenSilence(config, frames[: i + 1], at, reply)
    return None


class Lone:
    """A session stepped alone, on a pool of its own."""

    def __init__(self, model, config: SessionConfig) -> None:
        self.session = Session(model, config)

    def push(self, timestamp: float, features: torch.Tensor) -> None:
        self.session.push_frame(timestamp, features)

    def reply(self, text: str) -> None:
        self.session.push_reply(text)

    def run(self) -> list:
        return list(self.session.process())


class Pooled(Lone):
    """The same session in a BatchEngine: its cache is a PagedCache in the engine's pool."""

    def __init__(self, model, config: SessionConfig) -> None:
        self.engine = BatchEngine(model, EngineConfig(
            pool=PoolConfig(budget_tokens=4096, block_size=4, max_session_tokens=2048),
            scheduler=SchedulerConfig(max_lag_s=None)))
        self.session = self.engine.open("d", config)

    def push(self, timestamp: float, features: torch.Tensor) -> None:
        self.engine.push_frame("d", timestamp, features)

    def reply(self, text: str) -> None:
        self.engine.push_reply("d", text)

    def run(self) -> list:
        return [event for _, event in self.engine.run_until_idle()]


def cached(session: Session) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values [layers, tokens, kv_heads, head_dim] and positions of every cached token."""
    keys, values = session.cache.kv()
    return keys, values, session.cache.kept_positions()


def assert_same_cache(got: Session, want: Session) -> None:
    segments = [[(s.kind, s.length, s.pinned) for s in session.ledger.segments] for session in (got, want)]
    assert segments[0] == segments[1] and got.cache.length == want.cache.length
    (keys, values, positions), (want_keys, want_values, want_positions) = cached(got), cached(want)
    assert torch.equal(positions, want_positions)
    torch.testing.assert_close(keys, want_keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, want_values, atol=1e-5, rtol=1e-5)


CACHES = {
    "full": CacheConfig(),
    "full-original": CacheConfig(positions="original"),
    # window 1: the frame before the trigger is evicted while the reply is awaited (the inline session evicts
    # it just before its reply), and one tentative frame is the cap
    "sink-window-1": CacheConfig(policy="sink_window", window_frames=1, evict_frames=1),
    "sink-window-1-original": CacheConfig(policy="sink_window", window_frames=1, evict_frames=1, positions="original"),
}


@pytest.mark.parametrize("driver", [Lone, Pooled])
@pytest.mark.parametrize("cache", CACHES.values(), ids=CACHES.keys())
def test_an_external_reply_leaves_the_cache_an_inline_reply_would(calm, bank, driver, cache):
    """Fire at frame k, two frames decided while the reply is written, the reply lands, one more frame: the
    decisions after the reply and the whole cache equal an inline session's."""
    case = fire_then_silence(calm, tuple(bank), SessionConfig(max_new_tokens=6, temperature=1.0, seed=1, cache=cache))
    at, frames = case.at, case.frames
    inline = Session(calm, case.config)
    want = []
    for i, features in enumerate(frames):
        inline.push_frame(i * 0.5, features)
        want += decisions(inline.process())

    external = driver(calm, replace(case.config, replies="external"))
    session = external.session
    for i in range(at + 1):
        external.push(i * 0.5, frames[i])
    requested = [e for e in external.run() if isinstance(e, ReplyRequested)]
    assert [(e.trigger, e.frame_index) for e in requested] == [("proactive", at)]
    frames_at_trigger = session.ledger.count("frame")
    for i in range(at + 1, at + FOLLOWING):
        external.push(i * 0.5, frames[i])
    tentative = min(FOLLOWING - 1, max(1, cache.window_frames // 2))  # decided now; the rest wait for the reply
    assert [d.frame_index for d in decisions(external.run())] == list(range(at + 1, at + 1 + tentative))
    assert session.backlog == FOLLOWING - 1 - tentative and session.awaiting_reply
    if cache.policy == "sink_window":
        assert session.ledger.count("frame") == frames_at_trigger  # the oldest frame made room meanwhile

    external.reply(case.reply)
    after = decisions(external.run())
    external.push((len(frames) - 1) * 0.5, frames[-1])
    after += decisions(external.run())
    assert session.frames_replayed == tentative and session.responses == 1 and not session.awaiting_reply
    assert [d.frame_index for d in after] == list(range(at + 1 + tentative, len(frames)))
    for got, expected in zip(after, want[at + 1 + tentative:], strict=True):
        assert got.p_silent == pytest.approx(expected.p_silent, abs=1e-5)
        assert (got.token_id, got.action, got.cache_tokens) == (expected.token_id, expected.action,
                                                                 expected.cache_tokens)
    assert_same_cache(session, inline)


def test_a_first_query_handed_out_before_any_frame_goes_back_before_the_frames(calm, bank):
    """The trigger before any frame: the rollback empties the cache, and the reply opens the stream as an
    inline session's does."""
    for seed in range(20):
        config = SessionConfig(threshold=0.5, max_new_tokens=6, temperature=1.0, seed=seed)
        inline = Session(calm, config)
        inline.push_query(0.0, "what is on the table")
        events = list(inline.process())
        if written_back_exactly(calm.template, events):
            break
    else:
        pytest.fail("no seed writes a reply that encodes back to its tokens")
    for i in range(3):
        inline.push_frame(i * 0.5, bank[i])
    want = decisions(inline.process())
    assert not any(d.fired for d in want)

    external = Session(calm, replace(config, replies="external"))
    external.push_query(0.0, "what is on the table")
    assert [e.frame_index for e in external.process()] == [-1]  # ReplyRequested, no frame decided yet
    for i in range(3):
        external.push_frame(i * 0.5, bank[i])
    assert len(decisions(external.process())) == 3
    external.push_reply(events[-1].text)
    assert list(external.process()) == [] and external.frames_replayed == 3
    assert_same_cache(external, inline)


@pytest.mark.parametrize("window,evict", [(1, 1), (2, 1), (4, 1), (4, 4), (5, 5)])
def test_frames_past_the_cap_wait_for_the_reply_and_the_cache_stays_within_its_reservation(tiny_model, window, evict):
    """At most window // 2 frames are decided while a reply is written; the rest wait for it. Older frames
    make room meanwhile, never the trigger's segment or a tentative frame, so the cache stays within what
    the pool reserved for it, through repeated replies and evictions."""
    silent = steered(tiny_model, interval_bias=100.0)  # never fires: queries trigger the replies
    bank = frame_bank(silent, 8)
    # original positions name every token for good, so the protected ones can be followed
    cache = CacheConfig(policy="sink_window", positions="original", window_frames=window, evict_frames=evict,
                        text_window_tokens=12)
    config = SessionConfig(max_new_tokens=5, max_query_tokens=8, replies="external", cache=cache)
    session, limit, cap = Session(silent, config), cache_limit(silent, config), max(1, window // 2)
    peak, t, protected, seen = 0, 0.0, set(), set()

    def drain() -> list:
        nonlocal peak, protected, seen
        events = []
        while (step := session.step_alone()) is not None:
            events += step
            positions = set(session.cache.kept_positions().tolist())
            if any(isinstance(e, ReplyRequested) for e in step):  # the trigger's segment (none before any frame)
                newest = session.ledger.segments[-1].length if session.ledger.segments else 0
                protected = set(session.cache.kept_positions()[session.cache.length - newest:].tolist())
            elif session.awaiting_reply:  # a tentative frame, and the "," that joined it
                protected |= positions - seen
                assert protected <= positions
            seen = positions
            peak = max(peak, session.cache.length)
            assert session.cache.length == session.ledger.num_tokens
            assert session.ledger.count("frame") <= max(window, 2)  # the newest frame owes its ","
        return events

    for cycle in range(4):
        before = window - 1 + cycle  # different fills of the window at the trigger
        for _ in range(before):
            t += 0.5
            session.push_frame(t, bank[int(t * 2) % len(bank)])
        session.push_query(t + 0.1, "what now?")
        assert [type(e) for e in drain()] == [FrameDecision] * before + [ReplyRequested]
        for _ in range(cap + 2):
            t += 0.5
            session.push_frame(t, bank[int(t * 2) % len(bank)])
        tentative = decisions(drain())
        assert len(tentative) == cap and session.holding_frames and session.backlog == 2
        replayed = session.frames_replayed
        session.push_reply(("red", "a red square moves to the left")[cycle % 2])  # ends by eos, or at the cap
        held = drain()
        assert [type(e) for e in held] == [FrameDecision, FrameDecision] and not session.holding_frames
        assert held[0].frame_index == tentative[-1].frame_index + 1
        assert session.frames_replayed == replayed + cap
    assert peak <= limit == session.cache.max_tokens


def test_an_empty_reply_leaves_the_frames_in_place_and_firing_resumes(chatty, frames):
    decision = Session(chatty, SessionConfig(max_new_tokens=6, replies="external"))
    reader = Session(chatty, SessionConfig(replies="on_request"))  # never fires: "," between all frames
    for i in range(3):
        decision.push_frame(i * 0.5, frames[i])
        reader.push_frame(i * 0.5, frames[i])
    events = list(decision.process())
    list(reader.process())
    assert [type(e) for e in events] == [FrameDecision, ReplyRequested, FrameDecision, FrameDecision]
    decision.push_reply("")  # the writer failed
    assert list(decision.process()) == [] and decision.frames_replayed == 0 and decision.responses == 0
    assert_same_cache(decision, reader)  # as if the trigger frame had been silent
    decision.push_frame(1.5, frames[3])
    events = list(decision.process())
    assert events[0].fired and isinstance(events[1], ReplyRequested) and events[1].frame_index == 3


def test_a_query_during_a_reply_is_answered_after_it_and_the_replayed_frames(chatty, frames):
    decision = Session(chatty, SessionConfig(max_new_tokens=6, replies="external"))
    decision.push_frame(0.0, frames[0])
    assert isinstance(list(decision.process())[-1], ReplyRequested)
    decision.push_frame(0.5, frames[1])
    decision.push_query(0.7, "what now")
    decision.push_frame(1.0, frames[2])
    assert [e.action for e in decision.process()] == ["suppressed", "suppressed"]  # the query waits
    decision.push_reply("a red square")
    seen = [(e, decision.frames_replayed, [s.kind for s in decision.ledger.segments]) for e in decision.process()]
    assert len(seen) == 1
    request, replayed, segments = seen[0]
    assert isinstance(request, ReplyRequested)
    assert (request.trigger, request.query, request.frame_index) == ("query", "what now", 2)  # the last decided
    assert replayed == 2 and segments[-4:] == ["frame", "text", "frame", "frame"]  # frame 0, reply, frames 1, 2
    decision.push_reply("nothing much")
    assert list(decision.process()) == [] and decision.ledger.segments[-1].kind == "text"
    assert decision.frames_replayed == 2 and decision.responses == 2  # no frame was decided during the query's reply


def test_frame_ids_given_by_the_caller_come_back_on_decisions_and_drops(chatty, frames):
    session = Session(chatty, SessionConfig(replies="none"))
    session.push_frame(0.0, frames[0], frame_id=41)
    session.push_frame(0.5, frames[1], frame_id=42)
    session.push_frame(0.5, frames[2], frame_id=43)  # the same time as the frame before
    session.push_frame(1.0, frames[3])  # by default: how many frames were pushed before
    assert [e.frame_index for e in session.process()] == [41, 42, 43, 3]
    with pytest.raises(SessionError, match="frame_id must be an integer >= 0"):
        session.push_frame(1.5, frames[4], frame_id=-1)

    engine = BatchEngine(chatty, EngineConfig(pool=PoolConfig(budget_tokens=20_000, max_session_tokens=2000),
                                              scheduler=SchedulerConfig(max_lag_s=0.4)))
    engine.open("d", SessionConfig(replies="none"))
    for i, (timestamp, frame_id) in enumerate([(0.0, 7), (0.5, 8), (0.5, 9), (1.0, 10)]):
        engine.push_frame("d", timestamp, frames[i], frame_id=frame_id)
    events = [event for _, event in engine.run_until_idle()]
    assert [type(e) for e in events] == [FramesDropped, FrameDecision]
    assert events[0].timestamps == (0.0, 0.5, 0.5) and events[0].frame_ids == (7, 8, 9)
    assert events[1].frame_index == 10
    engine.shutdown()
