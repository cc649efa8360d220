"""The batched engine: isolation (batched == alone), pool budget and reuse, admission, fairness and lag."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine_helpers import frame_bank, steered
from liveserve.config import CacheConfig, EngineConfig, PerceptionConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import FrameDecision, FramesDropped, ResponseDone, SessionFailed
from liveserve.engine.kv_pool import KVPool, PoolFullError
from liveserve.engine.live.session import Session, SessionError, cache_limit

TIMING_FIELDS = {"lag_s", "ttft_s", "duration_s"}
WORDS = "what is the man holding now and where does he go".split()


@pytest.fixture(scope="module")
def mixed_model(tiny_model):
    """Sharpened attention (larger q/k weights) so that any token seen by the wrong query moves the logits
    well past float noise; steered to a mix of silent frames, replies and reply lengths."""
    model = steered(tiny_model, interval_bias=8.0, eos_bias=7.8)
    with torch.no_grad():
        for layer in model.lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def bank(mixed_model):
    return frame_bank(mixed_model, 8, seed=5)


def comparable(event) -> dict:
    return {"type": type(event).__name__,
            **{f: getattr(event, f) for f in event.__slots__ if f not in TIMING_FIELDS}}


def assert_same_events(batched: list, alone: list) -> None:
    assert [e["type"] for e in batched] == [e["type"] for e in alone]
    for got, want in zip(batched, alone):
        for field, value in want.items():
            if isinstance(value, float):
                assert got[field] == pytest.approx(value, abs=1e-4), (field, got, want)
            else:
                assert got[field] == value, (field, got, want)


def no_drops(**pool) -> EngineConfig:
    return EngineConfig(pool=PoolConfig(**pool), scheduler=SchedulerConfig(max_lag_s=None, max_queued_frames=10_000))


session_configs = st.builds(
    lambda threshold, max_new, policy, positions, window: SessionConfig(
        threshold=threshold, max_new_tokens=max_new,
        cache=CacheConfig(policy=policy, positions=positions, window_frames=window, evict_frames=min(2, window),
                          text_window_tokens=30)),
    threshold=st.floats(0.3, 0.8), max_new=st.integers(1, 4), policy=st.sampled_from(["full", "sink_window"]),
    positions=st.sampled_from(["contiguous", "original"]), window=st.integers(1, 4))

# A script over up to 4 sessions: join, push a frame, push a query, run one engine step, leave.
script_ops = st.lists(st.one_of(
    st.tuples(st.just("open"), st.integers(0, 3), session_configs),
    st.tuples(st.just("frame"), st.integers(0, 3), st.sampled_from([0.0, 0.5])),
    st.tuples(st.just("frame"), st.integers(0, 3), st.sampled_from([0.0, 0.5])),
    st.tuples(st.just("query"), st.integers(0, 3), st.integers(1, 4)),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("close"), st.integers(0, 3)),
), min_size=5, max_size=45)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(session_configs, min_size=2, max_size=4), script=script_ops,
       block_size=st.sampled_from([1, 4, 16]))
def test_batched_sessions_equal_sessions_run_alone(mixed_model, bank, first, script, block_size):
    """Random interleavings of sessions joining, streaming, querying, replying and leaving: each session's
    decisions and replies in the batched engine equal the same inputs run through a Session alone."""
    engine = BatchEngine(mixed_model, no_drops(budget_tokens=64_000, block_size=block_size, max_session_tokens=4000))
    inputs: dict[str, list] = {}  # session id -> its pushes and the engine steps that ran it, in order
    configs: dict[str, SessionConfig] = {}
    batched: dict[str, list] = {}
    clock: dict[str, float] = {}
    finished: list[str] = []
    traces: dict[str, list] = {}
    generation, widest_step = 0, 0

    def record(events):
        nonlocal widest_step
        widest_step = max(widest_step, len(engine.last_batch))
        for sid in engine.last_batch:
            inputs[sid].append(("step", None, None))
        for sid, item in events:
            batched[sid].append(comparable(item))

    def leave(sid):
        while engine.session(sid).backlog or engine.session(sid).ready():
            record(engine.step())
        traces[sid] = engine.session(sid).trace
        engine.close(sid)
        finished.append(sid)

    open_ids: dict[int, str] = {}
    script = [("open", slot, config) for slot, config in enumerate(first)] + script
    for op in script:
        kind, slot = op[0], op[1]
        sid = open_ids.get(slot)
        if kind == "open" and sid is None:
            sid = open_ids[slot] = f"s{slot}-{generation}"
            generation += 1
            engine.open(sid, op[2]).trace = []
            configs[sid], inputs[sid], batched[sid], clock[sid] = op[2], [], [], 0.0
        elif kind == "frame" and sid is not None:
            clock[sid] += op[2]
            frame = bank[len(inputs[sid]) % len(bank)]
            engine.push_frame(sid, clock[sid], frame)
            inputs[sid].append(("frame", clock[sid], frame))
        elif kind == "query" and sid is not None:
            text = " ".join(WORDS[: op[2]])
            engine.push_query(sid, clock[sid], text)
            inputs[sid].append(("query", clock[sid], text))
        elif kind == "step":
            for _ in range(slot):
                record(engine.step())
        elif kind == "close" and sid is not None:
            leave(open_ids.pop(slot))
    for sid in list(open_ids.values()):
        leave(sid)
    assert engine.pool.reserved_blocks == 0 and engine.pool.used_blocks == 0  # every block came back

    for sid in finished:
        # Replay alone: the same pushes, and one solo step wherever the engine stepped this session, so
        # both see the same queue at every step (a query pushed before or after a frame is decided differs).
        alone = Session(mixed_model, configs[sid], sid)
        alone.trace = []
        events = []
        for kind, timestamp, payload in inputs[sid]:
            if kind == "step":
                events.extend(alone.step_alone())
            else:
                (alone.push_frame if kind == "frame" else alone.push_query)(timestamp, payload)
        assert alone.step_alone() is None
        batched_logits = [t.logits for t in traces[sid]]
        assert len(batched_logits) == len(alone.trace)
        if alone.trace:
            torch.testing.assert_close(torch.stack(batched_logits), torch.stack([t.logits for t in alone.trace]),
                                       atol=2e-5, rtol=0)
        assert_same_events(batched[sid], [comparable(e) for e in events])
        event(f"replies: {min(sum(isinstance(e, ResponseDone) for e in events), 3)}+")
    event(f"sessions: {len(finished)}, most sessions in one step: {widest_step}")
    engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True], ids=["in-the-step", "own-thread"])
def test_pixels_are_encoded_in_batches_and_match_encoding_alone(mixed_model, overlap, monkeypatch):
    """Inline (the CPU default) or on a thread of its own overlapping the LM steps (the CUDA default, forced
    here): batches of every session's frames, and the same events as a session alone."""
    frames = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(6)]
    config = SessionConfig(threshold=0.5, max_new_tokens=3)
    engine = BatchEngine(mixed_model, EngineConfig(pool=PoolConfig(budget_tokens=20_000, max_session_tokens=2000),
                                                   scheduler=SchedulerConfig(max_lag_s=None),
                                                   perception=PerceptionConfig(max_batch_size=8, max_wait_ms=50,
                                                                               overlap=overlap)))
    encoded_on = set()
    encode = mixed_model.encode_frames

    def encode_frames(pixels):
        encoded_on.add(threading.current_thread().name)
        return encode(pixels)

    monkeypatch.setattr(mixed_model, "encode_frames", encode_frames)
    for k in range(4):
        engine.open(f"s{k}", config)
    for i, frame in enumerate(frames):
        for k in range(4):
            engine.push_frame(f"s{k}", i * 0.5, frame)
    events = engine.run_until_idle()
    monkeypatch.undo()
    assert encoded_on == ({"perception"} if overlap else {threading.current_thread().name})
    stats = engine.stats()
    assert stats.perception_frames == 24 and stats.perception_batches < 24  # frames of all sessions together
    alone = Session(mixed_model, config)
    for i, frame in enumerate(frames):
        alone.push_frame(i * 0.5, frame)
    want = [comparable(e) for e in alone.process()]
    for k in range(4):
        assert_same_events([comparable(e) for sid, e in events if sid == f"s{k}"], want)
    engine.shutdown()


def test_pool_never_exceeds_budget_and_reuses_freed_blocks(mixed_model, bank):
    config = SessionConfig(cache=CacheConfig(policy="sink_window", window_frames=3, evict_frames=1,
                                             text_window_tokens=20), max_new_tokens=3, max_query_tokens=8)
    per_session = cache_limit(mixed_model, config)
    engine = BatchEngine(mixed_model, no_drops(budget_tokens=2 * per_session + 16, block_size=16))
    pool = engine.pool
    a, b = engine.open("a", config), engine.open("b", config)
    with pytest.raises(PoolFullError, match="unreserved"):
        engine.open("c", config)  # a third reservation does not fit: refused, nothing allocated
    assert pool.num_caches == 2
    for i in range(40):
        for sid in ("a", "b"):
            engine.push_frame(sid, i * 0.5, bank[i % len(bank)])
        engine.run_until_idle()
        assert pool.used_blocks <= pool.num_blocks
        assert pool.used_blocks <= pool.reserved_blocks <= pool.num_blocks  # in use never beyond what was promised
        assert a.cache.length <= a.cache.max_tokens and b.cache.length <= b.cache.max_tokens
    blocks_of_a = set(a.cache.blocks)
    assert blocks_of_a and not blocks_of_a & set(b.cache.blocks)
    engine.close("a")
    c = engine.open("c", config)  # admitted now, into a's memory
    engine.push_frame("c", 0.0, bank[0])
    engine.run_until_idle()
    assert not set(c.cache.blocks) & set(b.cache.blocks)  # never a neighbour's block
    assert set(c.cache.blocks) & blocks_of_a
    engine.shutdown()


def test_neighbours_are_not_corrupted_when_a_session_leaves_or_fails(mixed_model, bank):
    """b's cache must be bit-identical whether or not a neighbour grows, fails and leaves beside it."""
    config = SessionConfig(threshold=0.5, max_new_tokens=2, cache=CacheConfig(policy="sink_window", window_frames=3,
                                                                              evict_frames=1))
    engine = BatchEngine(mixed_model, no_drops(budget_tokens=8000, max_session_tokens=60))
    engine.open("a", SessionConfig(threshold=0.5, max_new_tokens=2))  # full policy, capped at 60: fails soon
    b = engine.open("b", config)
    failed = []
    for i in range(8):
        for sid in ("a", "b"):
            try:
                engine.push_frame(sid, i * 0.5, bank[i % len(bank)])
            except SessionError as exc:
                assert sid == "a" and "session failed" in str(exc)
        failed += [e for sid, e in engine.run_until_idle() if isinstance(e, SessionFailed)]
    assert len(failed) == 1 and failed[0].code == "cache_full" and "limit of 60" in failed[0].message
    alone = Session(mixed_model, config)
    for i in range(8):
        alone.push_frame(i * 0.5, bank[i % len(bank)])
    list(alone.process())
    n = b.cache.length
    assert n == alone.cache.length
    torch.testing.assert_close(b.cache.kv()[0], alone.cache.kv()[0], atol=1e-5, rtol=0)
    engine.shutdown()


def test_lagging_sessions_drop_old_frames_and_every_session_progresses(mixed_model, bank):
    """More load than capacity: 6 sessions, at most 2 per step. Every session keeps deciding frames, drops are
    reported per session, and a lagging session keeps the newest frames."""
    silent = steered(mixed_model, interval_bias=100.0)
    engine = BatchEngine(silent, EngineConfig(pool=PoolConfig(budget_tokens=40_000, max_session_tokens=3000),
                                              scheduler=SchedulerConfig(max_batch_sessions=2, max_lag_s=1.0)))
    ids = [f"s{k}" for k in range(6)]
    for sid in ids:
        engine.open(sid)
    decided = {sid: [] for sid in ids}
    dropped = {sid: [] for sid in ids}
    for i in range(30):  # a frame per session every tick, but only one step per tick
        for sid in ids:
            engine.push_frame(sid, i * 0.5, bank[i % len(bank)])
        for sid, item in engine.step():
            if isinstance(item, FrameDecision):
                decided[sid].append(item.timestamp)
            elif isinstance(item, FramesDropped):
                assert "behind" in item.reason
                dropped[sid].extend(item.timestamps)
    for sid in ids:
        assert len(decided[sid]) >= 8, decided  # 30 steps x 2 slots over 6 sessions: ~10 each
        assert dropped[sid], dropped
        assert not set(decided[sid]) & set(dropped[sid])
        assert decided[sid] == sorted(decided[sid])
        # keeps up: within max_lag_s plus one turn of the 3-step rotation of the newest frame (14.5 s)
        assert decided[sid][-1] >= 29 * 0.5 - 1.0 - 1.5 - 1e-9
        backlog = engine.session(sid).backlog
        assert backlog <= 3  # at most max_lag_s of stream (1 s at 2 fps) plus the newest frame
    counts = [len(decided[sid]) for sid in ids]
    assert max(counts) - min(counts) <= 1  # fair: least recently served goes first
    engine.shutdown()


def test_token_budget_splits_a_step_without_starving_anyone(mixed_model, bank):
    engine = BatchEngine(mixed_model, EngineConfig(
        pool=PoolConfig(budget_tokens=20_000, max_session_tokens=2000),
        scheduler=SchedulerConfig(max_batch_tokens=30, max_lag_s=None)))
    for sid in ("a", "b", "c"):
        engine.open(sid, SessionConfig(threshold=0.0))
        engine.push_frame(sid, 0.0, bank[0])
    first = engine.scheduler.schedule(engine.sessions)
    assert len(first.sessions) == 1  # a first frame carries the system prompt: one per step fits the budget
    engine.run_until_idle()
    assert all(s.frames_decided == 1 for s in engine.sessions)
    engine.shutdown()


def test_admission_and_input_errors_are_specific(mixed_model):
    engine = BatchEngine(mixed_model, no_drops(budget_tokens=4000))
    engine.open("a", SessionConfig(cache=CacheConfig(policy="sink_window", window_frames=4, evict_frames=2)))
    with pytest.raises(SessionError, match="already open"):
        engine.open("a")
    with pytest.raises(PoolFullError, match="needs up to"):
        engine.open("b")  # a full-policy session reserves the model's whole context without a cap
    with pytest.raises(SessionError, match="unknown session 'zz'"):
        engine.push_frame("zz", 0.0, torch.zeros(10, mixed_model.vision_hidden_size))
    with pytest.raises(SessionError, match="bad frame image|cannot decode"):
        engine.push_frame("a", 0.0, b"not an image")
    with pytest.raises(SessionError, match="unknown session"):
        engine.close("zz")
    engine.shutdown()


def test_pool_rejects_a_budget_below_one_block():
    with pytest.raises(ValueError, match="less than one block"):
        KVPool(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu", budget_tokens=8,
               block_size=16)


def test_truncating_a_paged_cache_returns_the_blocks_past_it_and_moves_nothing():
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu", budget_tokens=64,
                  block_size=4)
    cache = pool.open_cache(32)
    cache.reserve(10)
    pool.keys[:, cache.slots(0, 10)] = torch.arange(10.0).view(1, 10, 1, 1).expand(1, 10, 1, 2)
    cache.commit(torch.arange(10))
    assert pool.used_blocks == 3
    cache.truncate(5)  # two blocks still hold tokens 0..4; the third goes back
    assert (cache.length, len(cache.blocks), pool.used_blocks) == (5, 2, 2)
    assert pool.keys[0, cache.slots(0, 5), 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert cache.kept_positions().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot truncate a cache of 5 tokens to 6"):
        cache.truncate(6)
    cache.truncate(0)
    assert pool.used_blocks == 0 and pool.reserved_blocks == 8  # the reservation stays with the session


def test_replies_of_several_sessions_share_forwards(mixed_model, bank):
    talkative = steered(mixed_model, interval_bias=-100.0, eos_bias=-100.0)  # every frame fires a full reply
    engine = BatchEngine(talkative, no_drops(budget_tokens=20_000, max_session_tokens=2000))
    for sid in ("a", "b", "c"):
        engine.open(sid, SessionConfig(max_new_tokens=5))
        engine.push_frame(sid, 0.0, bank[0])
    events = engine.run_until_idle()
    done = [e for _, e in events if isinstance(e, ResponseDone)]
    assert len(done) == 3 and all(e.num_tokens == 5 for e in done)
    # 1 frame step + 1 prompt step + 4 more tokens, for all three sessions at once
    assert engine.steps == 6
    engine.shutdown()


def test_frame_encoder_batches_waits_for_company_and_skips_dropped_frames(tiny_model):
    from liveserve.engine.perception import BatchedFrameEncoder

    encoder = BatchedFrameEncoder(tiny_model, PerceptionConfig(max_batch_size=3, max_wait_ms=60_000))
    size = tiny_model.frame_size
    pixels = [torch.full((3, size, size), 40 * i, dtype=torch.uint8) for i in range(5)]
    futures = [encoder.submit(p) for p in pixels[:2]]
    assert encoder.worth_waiting() > 1.0  # two of three: worth waiting for a third
    futures.append(encoder.submit(pixels[2]))
    assert encoder.worth_waiting() == 0.0  # a full batch goes now
    futures += [encoder.submit(p) for p in pixels[3:]]
    futures[3].cancel()  # a frame dropped by its lagging session
    assert encoder.encode_waiting() == 4
    assert encoder.stats.batches == 2 and encoder.stats.max_batch == 3
    alone = tiny_model.encode_frames(torch.stack(pixels))
    for i in (0, 1, 2, 4):
        torch.testing.assert_close(futures[i].result(), alone[i], atol=1e-5, rtol=1e-5)
    late = encoder.submit(pixels[0])
    encoder.close()
    with pytest.raises(RuntimeError, match="closed before this frame was encoded"):
        late.result()


def test_a_frame_that_fails_to_encode_fails_only_its_session(mixed_model, monkeypatch):
    engine = BatchEngine(mixed_model, no_drops(budget_tokens=20_000, max_session_tokens=2000))
    for sid in ("a", "b"):
        engine.open(sid, SessionConfig(threshold=0.0))
    size = mixed_model.frame_size
    engine.push_frame("b", 0.0, torch.zeros(10, mixed_model.vision_hidden_size))  # features: no encoding
    real_encode = mixed_model.encode_frames
    monkeypatch.setattr(mixed_model, "encode_frames", lambda pixels: (_ for _ in ()).throw(RuntimeError("tower down")))
    engine.push_frame("a", 0.0, torch.zeros(3, size, size, dtype=torch.uint8))
    events = engine.run_until_idle()
    failed = [(sid, e) for sid, e in events if isinstance(e, SessionFailed)]
    assert failed == [("a", SessionFailed("internal", "RuntimeError: tower down"))]
    assert [sid for sid, e in events if isinstance(e, FrameDecision)] == ["b"]
    monkeypatch.setattr(mixed_model, "encode_frames", real_encode)
    engine.push_frame("b", 0.5, torch.zeros(3, size, size, dtype=torch.uint8))  # b goes on, encoding again
    assert [type(e).__name__ for _, e in engine.run_until_idle()] == ["FrameDecision"]
    with pytest.raises(SessionError, match="session failed: RuntimeError: tower down"):
        engine.push_frame("a", 1.0, torch.zeros(10, mixed_model.vision_hidden_size))
    engine.shutdown()


HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def test_a_step_reads_its_results_back_from_the_device_once(mixed_model, bank, monkeypatch):
    """Every `float(t)`, `int(t)`, `.item()` of a device tensor waits for the device: a step of many
    sessions reads what they all need (decisions, greedy reply tokens) in one copy, not one per session,
    and sends its attention indices in one copy too. On the CPU nothing waits, so the step's
    tensor-to-host conversions and its uploads are counted instead."""
    engine = BatchEngine(mixed_model, no_drops())
    deciding = SessionConfig(replies="external", threshold=0.9)
    for sid in ("a", "b", "c"):
        engine.open(sid, deciding)
    engine.open("writer", SessionConfig(replies="on_request", max_new_tokens=4))
    for i in range(2):
        for sid in ("a", "b", "c", "writer"):
            engine.push_frame(sid, i * 0.5, bank[i])
        engine.run_until_idle()
    for sid in ("a", "b", "c"):
        engine.push_frame(sid, 1.0, bank[2])
    engine.push_respond("writer", 0.5)  # its reply's prompt and first token share the step
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    from liveserve.engine import kv_pool

    uploads = []
    upload = kv_pool.upload
    monkeypatch.setattr(kv_pool, "upload", lambda values, device: uploads.append(len(values)) or upload(values, device))
    tokens = sum(session.next_step_tokens() for session in engine.sessions)
    events = engine.step()
    monkeypatch.undo()
    assert len(engine.last_batch) == 4
    assert sum(isinstance(event, FrameDecision) for _, event in events) == 3
    assert reads == ["cpu", "tolist"]  # one copy of the step's summary, then host lists
    # One copy for the whole step's integers: the attention indices, every token's position and, of the
    # packed tokens, each text id and where each embedding row goes; one for the frames' host features.
    features = 3 * mixed_model.layout.num_tokens * mixed_model.vision_hidden_size  # a, b and c's frames
    assert len(uploads) == 2 and uploads[0] > 2 * tokens and uploads[1] == features
    engine.shutdown()


def _traced_run(model, bank, attention: str, block_size: int):
    """Four sessions of different lengths (ragged steps, evictions in the window, replies written inline)
    through one engine: each session's logits at every step, and its events."""
    engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=12_288, block_size=block_size),
                                             attention=attention,
                                             scheduler=SchedulerConfig(max_lag_s=None, max_queued_frames=10_000)))
    config = SessionConfig(threshold=0.5, max_new_tokens=3,
                           cache=CacheConfig(policy="sink_window", window_frames=4, evict_frames=2))
    for k in range(4):
        engine.open(f"s{k}", config).trace = []
        for i in range(14 - 3 * k):
            engine.push_frame(f"s{k}", i * 0.5, bank[(i + k) % len(bank)])
    events = engine.run_until_idle()
    logits = {s.session_id: torch.stack([t.logits for t in s.trace]) for s in engine.sessions}
    engine.shutdown()
    return logits, [(sid, comparable(event)) for sid, event in events]


@pytest.mark.parametrize("block_size", [16, 32])
def test_flex_attention_over_the_pool_in_place_matches_sdpa(mixed_model, bank, block_size):
    """FlexAttention reads the pool where it lies (no gather), with GQA, ragged sessions mid-eviction and
    replies in the same steps: the same logits as the SDPA reference, and so the same events."""
    assert mixed_model.lm.config.num_key_value_heads < mixed_model.lm.config.num_attention_heads  # GQA
    reference, reference_events = _traced_run(mixed_model, bank, "sdpa", block_size)
    flex, flex_events = _traced_run(mixed_model, bank, "flex", block_size)
    assert [sid for sid, _ in flex_events] == [sid for sid, _ in reference_events]
    assert_same_events([event for _, event in flex_events], [event for _, event in reference_events])
    assert any(event["type"] == "ResponseDone" for _, event in flex_events)  # replies shared the steps
    for sid, logits in reference.items():
        torch.testing.assert_close(flex[sid], logits, atol=1e-4, rtol=1e-4)


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    """flash_attn_varlen_func's contract in plain torch: session i's queries q[cu_q[i]:cu_q[i+1]] over its
    keys k[cu_k[i]:cu_k[i+1]], causal aligned bottom-right, GQA by head groups."""
    assert causal and max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = []
    for i in range(cu_q.numel() - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        out.append(_bottom_right_attention(qi, ki, vi, softmax_scale))
    return torch.cat(out)


def _bottom_right_attention(q, k, v, scale):
    """q [n, heads, dim] over k/v [m, kv_heads, dim]: query j sees keys 0 .. m - n + j."""
    n, m = q.shape[0], k.shape[0]
    mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


class _PagedPrefillReference:
    """FlashInfer's BatchPrefillWithPagedKVCacheWrapper as its docs define it (NHD pages, causal bottom-right),
    in plain torch: checks that the engine describes its pool the way FlashInfer reads it."""

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, heads, kv_heads, dim, page_size, *, causal,
             sm_scale, q_data_type, kv_data_type):
        assert causal and all(t.device.type == "cpu" for t in (qo_indptr, kv_indptr, last_page_len))
        assert kv_indices.dtype == torch.int32 and kv_indptr[-1] == kv_indices.numel()
        self.planned = (qo_indptr, kv_indptr, kv_indices, last_page_len, page_size, sm_scale)

    def run(self, q, pages):
        qo_indptr, kv_indptr, kv_indices, last_page_len, page_size, scale = self.planned
        key_pages, value_pages = pages
        out = []
        for i in range(qo_indptr.numel() - 1):
            own = kv_indices[kv_indptr[i]:kv_indptr[i + 1]].long()
            length = (own.numel() - 1) * page_size + int(last_page_len[i])
            k = key_pages[own].flatten(0, 1)[:length]
            v = value_pages[own].flatten(0, 1)[:length]
            out.append(_bottom_right_attention(q[qo_indptr[i]:qo_indptr[i + 1]], k, v, scale))
        return torch.cat(out)


def _kernel_on_cpu(name: str):
    """The engine's flash or flashinfer kernel with its library call replaced by the reference above: the
    layout the engine plans for it (cumulative lengths, gathered slots; page tables and last-page lengths)
    runs on the CPU. The libraries themselves run in tests/test_gpu.py."""
    from liveserve.engine.kernels.flash import FlashKernel
    from liveserve.engine.kernels.flashinfer import FlashInferKernel

    def build(pool):
        kernel = object.__new__(FlashKernel if name == "flash" else FlashInferKernel)
        kernel.pool = pool
        if name == "flash":
            kernel.varlen = _varlen_reference
        else:
            kernel.wrapper = _PagedPrefillReference()
        return kernel

    return build


@pytest.mark.parametrize("name", ["flash", "flashinfer"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_kernels_layouts_match_sdpa(mixed_model, bank, block_size, name, monkeypatch):
    """What the engine hands flash-attn (keys back to back, cumulative lengths) and FlashInfer (the pool's
    blocks as pages, page offsets, last-page lengths) describes each session's cache exactly: with the
    kernels' contracts written in torch, the same logits as SDPA through ragged steps, evictions and replies."""
    reference, reference_events = _traced_run(mixed_model, bank, "sdpa", block_size)
    build = _kernel_on_cpu(name)
    monkeypatch.setattr("liveserve.engine.batch.select_kernel", lambda requested, pool: build(pool))
    got, got_events = _traced_run(mixed_model, bank, "auto", block_size)
    assert_same_events([event for _, event in got_events], [event for _, event in reference_events])
    for sid, logits in reference.items():
        torch.testing.assert_close(got[sid], logits, atol=1e-4, rtol=1e-4)


def test_auto_falls_back_when_an_installed_kernel_fails_to_start(mixed_model, monkeypatch, caplog):
    import sys

    from liveserve.engine.kernels import select_kernel
    from liveserve.engine.kernels.flashinfer import FlashInferKernel

    monkeypatch.setattr(FlashInferKernel, "unavailable", staticmethod(lambda pool: None))  # "installed"
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # ... but its import fails
    pool = KVPool.for_model(mixed_model, PoolConfig(budget_tokens=1024))
    assert select_kernel("auto", pool).name == "sdpa"
    assert "attention kernel flashinfer is installed but failed to start (ModuleNotFoundError" in caplog.text


def test_auto_kernel_on_a_cpu_is_sdpa_and_named_kernels_say_why_they_cannot_run(mixed_model):
    from liveserve.engine.kernels import kernel_availability, select_kernel

    pool = KVPool.for_model(mixed_model, PoolConfig(budget_tokens=1024))
    assert select_kernel("auto", pool).name == "sdpa"
    available = kernel_availability(pool)
    assert available["sdpa"] is None and available["flex"] is None
    assert "CUDA" in available["flashinfer"] and "CUDA" in available["flash"]
    with pytest.raises(ValueError, match="attention 'flashinfer' cannot run here: FlashInfer needs CUDA"):
        BatchEngine(mixed_model, EngineConfig(pool=PoolConfig(budget_tokens=1024), attention="flashinfer"))


def test_flex_attention_needs_blocks_of_sixteen(mixed_model):
    with pytest.raises(ValueError, match="multiple of 16"):
        BatchEngine(mixed_model, EngineConfig(pool=PoolConfig(budget_tokens=4096, block_size=8), attention="flex"))
