"""Capacity benchmark: how many real-time streams one model replica decides within a latency SLO.

Open loop, real time: at each level N, N streams send frames at `fps`, their phases staggered evenly over
one frame period, for `duration_s`; frames arrive when they are due whether or not the engine keeps up.
A frame's latency is its due time -> its FrameDecision (so time a frame waits behind a busy step counts).
Sessions are Decision sessions (replies="external"), as in the disaggregated service: when one fires,
the bench plays the Reaction model and hands back a fixed reply `reply_delay_s` later, which the session
appends after its trigger and replays the frames decided meanwhile.

Random weights decide at random; a calibrated decision bias makes them behave like a narrator that is
mostly silent: on a short silent warm-up stream the bench measures each frame's margin
log P(interval) - log P(rest) and sets a logit bias on the interval token so that about `reply_rate`
of those frames fall below the streaming threshold (they fire); the bias then stays fixed for the run,
and the measured share of frames that fired is reported.

Before a level is timed every session is brought to a steady-state cache (`prefill_frames` frames, fed
in lockstep and not measured), so attention runs over the cache length a long-running stream has.

A level passes when its p99 is within `slo_ms` and no frame was dropped, left undecided or failed;
`capacity` is the largest passing N. In the same run a single stream (inline replies, full cache,
frame by frame) goes through the engine and through a reference-style loop the bench carries: one
Hugging Face DynamicCache, one forward per frame, greedy replies, as VideoLLM-online's inference loop
does. Both make the same decisions on the same weights (reported: `decisions_match`), and
`single_stream_speedup` is the ratio of their frames/s.

A commentary model (Qwen2.5-VL family) runs its own mode: each stream's frames make chunks (`chunk_s * fps`
frames), a chunk's latency is its last frame's due time -> its turn's last token (its frames count as
decided then), and its turns say `max_tokens_per_chunk` tokens where the random model does not stop
earlier (no bias is calibrated: the model's own choices, a worst case for a narrator that is often
silent). Frames are pixels. There is no single-stream reference loop for this family here:
`single_stream_speedup` is null.
"""

from __future__ import annotations

import gc
import sys

import torch

from liveserve.bench.capacity_settings import MAX_LEVELS, CapacitySettings
from liveserve.bench.common import environment, write_report
from liveserve.bench.open_loop import DecisionBias, frame_source, level_config, run_level
from liveserve.bench.single_stream import single_stream
from liveserve.config import EngineConfig, PoolConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.kernels import select_kernel
from liveserve.engine.kv_pool import KVPool
from liveserve.engine.sessions import session_tokens
from liveserve.model.live import LiveModel


def sweep_levels(sweep_max: int) -> list[int]:
    """1, 2, 4, ... up to `sweep_max`, which is always the last level."""
    levels, n = [], 1
    while n < sweep_max:
        levels.append(n)
        n *= 2
    return levels + [sweep_max]


# ---- the run ----------------------------------------------------------------------------------------------

def _level_line(level: dict) -> str:
    if "refused" in level:
        return f"  {level['sessions']} streams: refused after {level['admitted']} ({level['refused']})"
    if "failed" in level:
        return f"  {level['sessions']} streams: {level['failed']}"
    p = (f"p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms" if "p99_ms" in level else "no decisions")
    return (f"  {level['sessions']} streams: {p}, {level['dropped']} dropped, {level['undecided']} undecided, "
            f"{level['replies']} replies, {level['mean_batch_sessions']:.1f} sessions/step -> "
            f"{'meets' if level['meets_slo'] else 'misses'} the SLO")


def pool_config(model: LiveModel, settings: CapacitySettings, largest: int,
                memory_fraction: float | None) -> PoolConfig:
    """On CUDA the serving default (a fraction of the memory left after the weights); on CPU room for the
    largest level (host memory is shared, so no fraction of it is taken)."""
    if model.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # memory the allocator caches from the warm-up engines counts as free
        return PoolConfig(memory_fraction=memory_fraction or PoolConfig().memory_fraction)
    return PoolConfig(budget_tokens=largest * (session_tokens(model, level_config(model, settings)) + 16) + 16)


def run_capacity_bench(model: LiveModel, *, levels: list[int], settings: CapacitySettings, out: str,
                       preset: str | None = None, sweep: bool = False, refine: int = 1,
                       memory_fraction: float | None = None, attention: str = "auto") -> dict:
    """`levels`: session counts, ascending. `attention`: the engine's kernel (EngineConfig.attention). With `sweep`, stop at the first level that misses the SLO and
    then bisect up to `refine` more levels between the last pass and that miss."""
    commentary = model.family != "live"
    if settings.input_kind == "pixels" and model.vision is None:
        raise ValueError("this model has no vision tower; use --input features")
    if commentary and settings.input_kind != "pixels":
        raise ValueError("a commentary model encodes each chunk of frames itself: use --input pixels")
    # a kernel or CUDA graphs that cannot run here are refused now, not after the single-stream comparison
    select_kernel(attention, KVPool.for_model(model, PoolConfig(budget_tokens=64)))
    model.use_cuda_graphs(settings.cuda_graphs)
    frame = frame_source(model, "pixels") if settings.input_kind == "pixels" else None
    features = frame if commentary else frame_source(model, "features")
    frame = frame or features
    bias = None if commentary else DecisionBias(model)
    try:
        single, speedup = None, None
        if bias is None:
            print(f"liveserve bench capacity: {model.name} on {model.device}; commentary, up to "
                  f"{settings.max_tokens_per_chunk} tokens a chunk", file=sys.stderr, flush=True)
        else:
            calibration = max(16, min(64, round(2 / max(settings.reply_rate, 1e-3))))
            bias.calibrate([frame(i) for i in range(calibration)], settings.reply_rate, settings.threshold)
            print(f"liveserve bench capacity: {model.name} on {model.device}; interval logit bias {bias.bias:+.2f} "
                  f"for ~{settings.reply_rate:.0%} replies", file=sys.stderr, flush=True)
            single = single_stream(model, settings, frame)
            speedup = single["engine_frames_per_s"] / single["reference_frames_per_s"]
            print(f"  single stream: engine {single['engine_frames_per_s']:.1f} frames/s, reference loop "
                  f"{single['reference_frames_per_s']:.1f} frames/s ({speedup:.2f}x); decisions match: "
                  f"{single['decisions_match']}", file=sys.stderr, flush=True)
        engine = BatchEngine(model, EngineConfig(pool=pool_config(model, settings, max(levels), memory_fraction),
                                                 attention=attention, cuda_graphs=settings.cuda_graphs))
        forward = getattr(model, "forward_path", "hf")
        print(f"  attention kernel: {engine.kernel.name}; LM forward: {forward}", file=sys.stderr, flush=True)
        per_session = session_tokens(model, level_config(model, settings))
        pool = {"capacity_tokens": engine.pool.capacity_tokens, "bytes": engine.pool.nbytes,
                "bytes_per_token": engine.pool.bytes_per_token, "session_tokens": per_session,
                "sessions_admitted": engine.pool.sessions_admitted(per_session)}
        reply_ids = () if commentary else tuple(model.template.encode(" A red square appears.")[: settings.reply_tokens])
        reply_text = model.template.decode(reply_ids)
        results: list[dict] = []
        try:
            pending, passed, missed = list(levels), 0, None
            while pending and len(results) < MAX_LEVELS:
                n = pending.pop(0)
                print(f"liveserve bench capacity: {n} streams at {settings.fps:g} fps for {settings.duration_s:g}s "
                      f"({settings.input_kind})", file=sys.stderr, flush=True)
                level = run_level(engine, n, settings, frame, features, reply_ids, reply_text)
                results.append(level)
                print(_level_line(level), file=sys.stderr, flush=True)
                gc.collect()
                if level["meets_slo"]:
                    passed = max(passed, n)
                elif sweep:
                    missed = n if missed is None else min(missed, n)
                    pending = []
                if sweep and not pending and missed is not None and refine > 0 and missed - passed > 1:
                    refine -= 1
                    pending = [(passed + missed) // 2]
        finally:
            engine.shutdown()
    finally:
        if bias is not None:
            bias.remove()
    passing = [level["sessions"] for level in results if level["meets_slo"]]
    report = {"benchmark": "capacity", **environment(model), "preset": preset,
              "parameters": sum(p.numel() for p in model.parameters()), "input": settings.input_kind,
              "fps": settings.fps, "duration_s": settings.duration_s, "warmup_s": settings.warmup_s,
              "slo_ms": settings.slo_ms, "prefill_frames": settings.prefill_frames,
              "mode": "commentary" if commentary else "live",
              "cache": ({"policy": "commentary", "max_tokens_per_chunk": settings.max_tokens_per_chunk} if commentary
                        else {"policy": "sink_window", "window_frames": settings.window_frames}),
              "decision_bias": None if bias is None else {
                  "interval_logit_bias": bias.bias, "target_reply_rate": settings.reply_rate,
                  "threshold": settings.threshold, "reply_tokens": len(reply_ids),
                  "reply_delay_s": settings.reply_delay_s},
              "attention": engine.kernel.name, "forward": forward, "pool": pool, "levels": sorted(results, key=lambda level: level["sessions"]),
              "capacity": max(passing, default=0),
              # every level run passed: the capacity is at least this, the sweep just did not go higher
              "capacity_is_lower_bound": bool(results) and all(level["meets_slo"] for level in results),
              "single_stream": single, "single_stream_speedup": speedup}
    write_report(report, out)
    speed = "none (no reference loop for this family)" if speedup is None else f"{speedup:.2f}x"
    print(f"capacity: {report['capacity']} streams (p99 <= {settings.slo_ms:g} ms, no drops); single_stream_speedup "
          f"{speed}", file=sys.stderr)
    return report
