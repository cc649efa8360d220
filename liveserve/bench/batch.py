"""Batch benchmark: many concurrent streams on one replica, batched engine versus sequential sessions.

For each session count N, both contenders get the same load in lockstep rounds: every round one new
frame arrives for each of the N streams, and the round ends when all N are decided.
  batched     one BatchEngine: frames encoded in dynamic batches, one packed forward per step
  sequential  N independent Sessions stepped one after another (what one-stream-per-model code does)
Per-frame latency is frame arrival -> decision (so in the sequential case a frame also waits for the
sessions stepped before it). Aggregate frames/s = frames decided / wall time of the measured rounds.
Decisions are forced silent (see common.force_silence), as in the engine benchmark.

A commentary model (Qwen2.5-VL family) gets a chunk per round (`chunk_s * fps` frames: a turn and its
reply, `max_tokens_per_chunk` tokens when the model does not stop earlier, as a random one does not);
latency is then the chunk's last frame -> its reply's last token, and frames/s counts the chunks' frames.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch

from liveserve.bench.common import environment, force_silence, percentile, sync, write_report
from liveserve.config import CacheConfig, CommentaryConfig, EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import ChunkDone, FrameDecision
from liveserve.engine.sessions import new_session, session_tokens
from liveserve.model.live import LiveModel

INPUTS = ("pixels", "features")


def _frame_source(model: LiveModel, kind: str) -> Callable[[int], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if kind == "features" and model.family == "live":
        bank = [torch.randn(model.layout.num_tokens, model.vision_hidden_size, generator=generator) for _ in range(16)]
    else:
        size = model.frame_size
        bank = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(16)]
    return lambda i: bank[i % len(bank)]


def _summary(latencies: list[float], frames: int, wall_s: float, bytes_per_session: float) -> dict:
    return {"frames": frames, "wall_s": wall_s, "frames_per_s": frames / wall_s,
            "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3, "kv_bytes_per_session": bytes_per_session}


def _round(config: SessionConfig, r: int) -> list[float]:
    """The stream times of round r's frames: one frame at 2 FPS, or a commentary chunk's frames."""
    if config.mode != "commentary":
        return [r * 0.5]
    chunk = config.commentary
    return [r * chunk.chunk_s + j / chunk.fps for j in range(chunk.frames_per_chunk)]


def _decided(event) -> int:
    """Frames an event reports decided: a frame's decision, or a commentary chunk's."""
    if isinstance(event, FrameDecision):
        return 1
    return len(event.frame_ids) if isinstance(event, ChunkDone) else 0


def bench_batched(model: LiveModel, sessions: int, rounds: int, warmup: int, config: SessionConfig,
                  frame: Callable[[int], torch.Tensor]) -> dict:
    budget = sessions * session_tokens(model, config) + 64 * sessions  # every session admitted, block rounding
    engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=budget),
                                             scheduler=SchedulerConfig(max_lag_s=None, max_batch_sessions=sessions)))
    ids = [f"s{k}" for k in range(sessions)]
    for sid in ids:
        engine.open(sid, config)
    latencies, started, decided = [], 0.0, 0
    for r in range(warmup + rounds):
        if r == warmup:
            sync(model.device)
            started = time.perf_counter()
        for k, sid in enumerate(ids):
            for j, timestamp in enumerate(_round(config, r)):
                engine.push_frame(sid, timestamp, frame(r + k + j))
        for _, event in engine.run_until_idle():
            if _decided(event) and r >= warmup:
                latencies.append(event.lag_s)
                decided += _decided(event)
    sync(model.device)
    wall = time.perf_counter() - started
    used = engine.pool.used_blocks * engine.pool.block_size * engine.pool.bytes_per_token
    stats = engine.stats()
    engine.shutdown()
    result = _summary(latencies, decided, wall, used / sessions)
    result["steps"] = stats.steps
    result["perception_mean_batch"] = stats.perception_frames / stats.perception_batches if stats.perception_batches else None
    return result


def bench_sequential(model: LiveModel, sessions: int, rounds: int, warmup: int, config: SessionConfig,
                     frame: Callable[[int], torch.Tensor]) -> dict:
    streams = [new_session(model, config, f"s{k}") for k in range(sessions)]
    latencies, started, decided = [], 0.0, 0
    for r in range(warmup + rounds):
        if r == warmup:
            sync(model.device)
            started = time.perf_counter()
        for k, session in enumerate(streams):  # all frames of the round arrive together
            for j, timestamp in enumerate(_round(config, r)):
                session.push_frame(timestamp, frame(r + k + j))
        for session in streams:
            for event in session.process():
                if _decided(event) and r >= warmup:
                    latencies.append(event.lag_s)
                    decided += _decided(event)
    sync(model.device)
    wall = time.perf_counter() - started
    cache_bytes = statistics.fmean(s.cache.nbytes for s in streams)
    for session in streams:
        session.close()
    return _summary(latencies, decided, wall, cache_bytes)


def run_batch_bench(model: LiveModel, *, sessions: list[int], rounds: int, warmup: int, input_kind: str,
                    out: str, window_frames: int = 64, max_tokens_per_chunk: int = 20) -> dict:
    if input_kind not in INPUTS:
        raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {input_kind!r}")
    if input_kind == "pixels" and model.vision is None:
        raise ValueError("this model has no vision tower; use --input features")
    commentary = model.family != "live"
    if commentary and input_kind != "pixels":
        raise ValueError("a commentary model encodes each chunk of frames itself: use --input pixels")
    if commentary:
        config = SessionConfig(mode="commentary", commentary=CommentaryConfig(max_tokens_per_chunk=max_tokens_per_chunk))
        cache = {"policy": "streaming_vlm", "max_tokens_per_chunk": max_tokens_per_chunk}
    else:
        config = SessionConfig(threshold=0.0, cache=CacheConfig(policy="sink_window", window_frames=window_frames,
                                                               evict_frames=min(8, window_frames)))
        cache = {"policy": "sink_window", "window_frames": window_frames}
    frame = _frame_source(model, input_kind)
    results = []
    handle = None if commentary else force_silence(model)
    try:
        for n in sessions:
            print(f"liveserve bench batch: {n} sessions x {rounds} rounds ({input_kind})", file=sys.stderr, flush=True)
            batched = bench_batched(model, n, rounds, warmup, config, frame)
            sequential = bench_sequential(model, n, rounds, warmup, config, frame)
            speedup = batched["frames_per_s"] / sequential["frames_per_s"]
            results.append({"sessions": n, "batched": batched, "sequential": sequential, "speedup": speedup})
            print(f"  batched {batched['frames_per_s']:.0f} frames/s (p50 {batched['p50_ms']:.1f} ms, "
                  f"p99 {batched['p99_ms']:.1f} ms); sequential {sequential['frames_per_s']:.0f} frames/s "
                  f"(p50 {sequential['p50_ms']:.1f} ms, p99 {sequential['p99_ms']:.1f} ms); speedup {speedup:.2f}x",
                  file=sys.stderr, flush=True)
    finally:
        if handle is not None:
            handle.remove()
    report = {"benchmark": "batch", **environment(model), "mode": config.mode, "input": input_kind, "rounds": rounds,
              "warmup": warmup, "cache": cache, "results": results}
    write_report(report, out)
    return report
