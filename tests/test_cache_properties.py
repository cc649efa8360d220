"""Property tests of the sink_window cache: random streams of frames and queries under random cache
settings, with the cache invariants checked after every drain."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine_helpers import frame_bank, steered, streaming_mask_oracle
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.live.ledger import Ledger, Segment
from liveserve.engine.live.session import Session

WORDS = "what is the man holding now and where does he go".split()


@pytest.fixture(scope="module")
def mixed_model(tiny_model):
    return steered(tiny_model, interval_bias=8.0, eos_bias=7.8)


@pytest.fixture(scope="module")
def bank(mixed_model):
    return frame_bank(mixed_model, 8, seed=5)


ops = st.lists(st.tuples(st.one_of(st.just("frame"), st.tuples(st.just("query"), st.integers(1, 5))),
                         st.sampled_from([0.0, 0.25, 0.5])),  # (op, time step): timestamps never go back
               min_size=4, max_size=40)


@st.composite
def cache_configs(draw):
    window = draw(st.integers(1, 5))
    return CacheConfig(policy="sink_window", positions=draw(st.sampled_from(["contiguous", "original"])),
                       window_frames=window, evict_frames=draw(st.integers(1, window)),
                       text_window_tokens=draw(st.integers(0, 40)))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=ops, cache=cache_configs(), max_new_tokens=st.integers(1, 3), threshold=st.floats(0.3, 0.7))
def test_sink_window_invariants_hold_after_every_step(mixed_model, bank, stream, cache, max_new_tokens, threshold):
    model = mixed_model
    session = Session(model, SessionConfig(threshold=threshold, max_new_tokens=max_new_tokens, cache=cache))
    session.trace = []
    max_tokens, frame_tokens, interval = session.cache.max_tokens, model.layout.num_tokens, model.template.interval_id
    original = cache.positions == "original"
    sink = None  # keys of the prefix segment after the previous drain
    pinned_lengths: list[int] = []
    fed: dict[int, int] = {}  # original position -> token id fed there, or -(k + 1) for a token of frame k
    keys_at: dict[int, torch.Tensor] = {}  # original position -> that token's keys when first seen in the cache
    closers: set[int] = set()  # where a frame step fed what closes the previous item ("," or a reply's eos)
    t, frames_pushed, traced, frames_done = 0.0, 0, 0, 0
    for op, step in stream:
        t += step
        if op == "frame":
            session.push_frame(t, bank[frames_pushed % len(bank)])
            frames_pushed += 1
        else:
            session.push_query(t, " ".join(WORDS[: op[1]]) + "?")
        list(session.process())

        segments, n = session.ledger.segments, session.cache.length
        assert n == session.ledger.num_tokens <= max_tokens and session.cache.max_tokens == max_tokens
        counted = Ledger(segments)  # the running totals equal a count from scratch
        assert (session.ledger.frames, session.ledger.free_text_tokens) == (counted.frames, counted.free_text_tokens)
        assert session.ledger.num_tokens == counted.num_tokens
        assert segments[0].kind == "prefix" and all(s.kind != "prefix" for s in segments[1:])
        keys = session.cache.kv()[0].transpose(1, 2)  # [layers, kv_heads, tokens, dim]
        if sink is not None:  # the sink is never evicted or re-rotated (it may grow: a first query's reply)
            assert segments[0].length >= sink.shape[2] and torch.equal(keys[:, :, : sink.shape[2]], sink)
        sink = keys[:, :, : segments[0].length].clone()
        assert all(s.length in (frame_tokens, frame_tokens + 1) for s in segments if s.kind == "frame")
        # at most window_frames, except that the newest frame (owing its ",") never goes: 2 kept at window 1
        assert session.ledger.count("frame") <= max(cache.window_frames, 2)
        pinned = [s.length for s in segments if s.pinned]
        assert len(pinned_lengths) <= len(pinned) <= 1  # the pinned first instruction stays, growing only
        assert all(now >= before for now, before in zip(pinned, pinned_lengths))
        pinned_lengths = pinned
        positions = session.cache.positions[:n]
        assert int(positions.max()) < model.max_positions
        if not original:
            assert torch.equal(positions, torch.arange(n))
            continue
        assert bool((positions[1:] > positions[:-1]).all())
        for tr in session.trace[traced:]:
            frame_ids = [-(frames_done + 1)] * tr.num_frame_tokens
            fed.update(zip(tr.positions.tolist(), list(tr.ids) + frame_ids))
            frames_done += tr.num_frame_tokens > 0
            if tr.num_frame_tokens and tr.ids and int(tr.positions[0]) > 0:
                closers.add(int(tr.positions[0]))
        traced = len(session.trace)
        content, at, kept_frames = [fed[p] for p in positions.tolist()], 0, []
        for seg in segments:  # the ledger agrees with what the cache holds, segment by segment
            part, at = content[at: at + seg.length], at + seg.length
            if seg.kind == "frame":
                assert part[:frame_tokens] == [part[0]] * frame_tokens and part[0] < 0
                assert part[frame_tokens:] in ([], [interval])
                kept_frames.append(-part[0] - 1)
            else:
                assert min(part) >= 0
        assert kept_frames == list(range(frames_done - len(kept_frames), frames_done))  # the newest frames
        kept = set(positions.tolist())
        assert all(p - 1 in kept for p in closers & kept)  # a closer never outlives what it closes
        for i, p in enumerate(positions.tolist()):  # kept keys are never touched, only moved
            assert torch.equal(keys[:, :, i], keys_at.setdefault(p, keys[:, :, i].clone()))

    fed_total = sum(tr.embeds.shape[0] for tr in session.trace)
    event(f"{cache.positions}, evicted: {session.cache.length < fed_total}, replies: {session.responses > 0}")
    if original:
        expected = streaming_mask_oracle(model, session.trace)
        torch.testing.assert_close(torch.stack([tr.logits for tr in session.trace]), expected, atol=1e-4, rtol=1e-4)


def test_plan_eviction_and_evict_on_a_hand_built_ledger():
    ledger = Ledger([Segment("prefix", 5), Segment("frame", 11), Segment("text", 6, pinned=True),
                     Segment("frame", 11), Segment("text", 7), Segment("frame", 11), Segment("text", 4),
                     Segment("frame", 10)])  # cache offsets 0, 5, 16, 22, 33, 40, 51, 55; 65 tokens

    def sink_window(window, evict, text):
        return CacheConfig(policy="sink_window", window_frames=window, evict_frames=evict, text_window_tokens=text)

    config = sink_window(3, 2, 5)
    assert ledger.plan_eviction(CacheConfig(), incoming_frames=1) is None  # full policy
    assert ledger.plan_eviction(sink_window(5, 1, 11), incoming_frames=1) is None
    # 4 frames + 1 incoming > 3: evict max(excess 2, evict_frames 2) oldest; the unpinned text (7 + 4 = 11
    # tokens > 5) loses its oldest turn; the pinned turn stays
    assert ledger.plan_eviction(config, incoming_frames=1) == [1, 3, 4]
    assert ledger.plan_eviction(sink_window(3, 3, 11), incoming_frames=1) == [1, 3, 5]
    assert ledger.plan_eviction(sink_window(5, 1, 3), incoming_frames=0) == [4]  # the newest turn always stays
    # the newest 5 segments (from offset 22) are protected: of the frames and turn it wants, only frame 1 may go
    assert ledger.plan_eviction(config, incoming_frames=1, protect=5) == [1]
    assert ledger.plan_eviction(config, incoming_frames=1, protect=7) is None  # only the prefix is older
    keep = ledger.evict([1, 3, 4])
    expected = torch.cat([torch.arange(0, 5), torch.arange(16, 22), torch.arange(40, 65)])
    assert torch.equal(keep, expected)
    assert [(s.kind, s.length, s.pinned) for s in ledger.segments] == [
        ("prefix", 5, False), ("text", 6, True), ("frame", 11, False), ("text", 4, False), ("frame", 10, False)]
    assert ledger.num_tokens == keep.numel() == 36
    assert ledger.plan_eviction(config, incoming_frames=1) is None  # 2 frames + 1 fit; 4 text tokens fit
