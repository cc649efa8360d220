"""Engine benchmark: per-frame decision latency versus stream length, for each cache policy.

One session per policy streams `max(lengths)` frames of precomputed vision features (so the number is
the decision step: connector + LM forward + cache work). Decisions are forced silent through a logit
bias on the interval token, so every step is a frame step and replies do not blur the curve; that is
also the common case in production, where most frames are silent. Latency "at length L" is the median
over the `window` frames before L.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from liveserve.bench.common import environment, force_silence, sync, write_report
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.kv_pool import CacheFullError
from liveserve.engine.live.session import Session
from liveserve.model.live import LiveModel


def bench_policy(model: LiveModel, policy: str, lengths: list[int], window: int) -> dict:
    session = Session(model, SessionConfig(threshold=0.0, cache=CacheConfig(policy=policy)), session_id=policy)
    generator = torch.Generator().manual_seed(0)
    bank = [torch.randn(model.layout.num_tokens, model.vision_hidden_size, generator=generator) for _ in range(16)]
    total = max(lengths)
    step_s: list[float] = []
    peak_cache_bytes, refused_at = 0, None
    cache_at: dict[int, dict] = {}
    for i in range(total):
        start = time.perf_counter()
        try:
            session.push_frame(i / 2.0, bank[i % len(bank)])
            for _ in session.process():
                pass
        except CacheFullError as exc:
            refused_at = {"frame": i, "reason": str(exc)}
            break
        sync(model.device)
        step_s.append(time.perf_counter() - start)
        peak_cache_bytes = max(peak_cache_bytes, session.cache.nbytes)
        if i + 1 in lengths:
            cache_at[i + 1] = {"cache_tokens": session.cache.length, "cache_bytes": session.cache.nbytes}
        if (i + 1) % max(total // 10, 1) == 0:
            print(f"  {policy}: {i + 1}/{total} frames, last step {step_s[-1] * 1e3:.2f} ms, "
                  f"cache {session.cache.length} tokens", file=sys.stderr, flush=True)
    latency = {}
    for length in lengths:
        if length > len(step_s):
            continue
        sample = step_s[max(0, length - window):length]
        latency[str(length)] = {"p50_ms": statistics.median(sample) * 1e3, "mean_ms": statistics.fmean(sample) * 1e3,
                                "max_ms": max(sample) * 1e3, **cache_at.get(length, {})}
    measured = [int(k) for k in latency]
    result = {
        "frames": len(step_s),
        "frames_per_s": len(step_s) / sum(step_s) if step_s else 0.0,
        "latency_ms_at_length": latency,
        "latency_ratio": (latency[str(max(measured))]["p50_ms"] / latency[str(min(measured))]["p50_ms"]
                          if len(measured) > 1 else None),
        "peak_cache_bytes": peak_cache_bytes,
        "refused": refused_at,
    }
    session.close()
    return result


def run_engine_bench(model: LiveModel, *, lengths: list[int], policies: list[str], window: int, out: str) -> dict:
    handle = force_silence(model)
    try:
        results = {}
        for policy in policies:
            print(f"liveserve bench engine: {policy}, {max(lengths)} frames", file=sys.stderr, flush=True)
            results[policy] = bench_policy(model, policy, lengths, window)
    finally:
        handle.remove()
    report = {"benchmark": "engine", **environment(model), "lengths": lengths, "window": window, "policies": results}
    write_report(report, out)
    for policy, r in results.items():
        lat = ", ".join(f"{k}: {v['p50_ms']:.2f} ms" for k, v in r["latency_ms_at_length"].items())
        ratio = f"{r['latency_ratio']:.2f}" if r["latency_ratio"] else "n/a"
        print(f"{policy}: {r['frames_per_s']:.1f} frames/s; p50 at length {lat}; latency_ratio {ratio}",
              file=sys.stderr)
    return report
