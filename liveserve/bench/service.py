"""Service-path benchmark: what the serving paths cost on top of the in-process batched engine.

Same model, same load, one run. N sessions advance in lockstep rounds: each round every session sends
one JPEG frame, and the round ends when all N decisions are back.
  in_process  BatchEngine.push_frame / step in the caller's thread; latency = push -> decision
  grpc        the single-process server (`liveserve serve --local`) on 127.0.0.1 and N client streams;
              latency = the client's send -> the client's receipt of the Decision (serialisation,
              HTTP/2, the engine thread hand-off and the event queue included)
  ray         (--ray) the disaggregated Serve application (`liveserve serve`) on a local Ray cluster:
              Serve's gRPC proxy, the Gateway, a Perception replica and a Decision replica, each frame
              crossing three processes; same client and latency as grpc
Sessions report decisions only (no replies are written), so every step is a frame step.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

import grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.bench.common import environment, percentile, write_report
from liveserve.config import CacheConfig, EngineConfig, PoolConfig, SchedulerConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import FrameDecision
from liveserve.model.live import LiveModel
from liveserve.services.client import encode_jpeg
from liveserve.services.local import start_local


def _frames(model: LiveModel, count: int = 8) -> list[bytes]:
    import torch

    generator = torch.Generator().manual_seed(0)
    size = model.frame_size
    return [encode_jpeg(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))
            for _ in range(count)]


def _engine_config(sessions: int) -> EngineConfig:
    return EngineConfig(pool=PoolConfig(budget_tokens=4096 * sessions),
                        scheduler=SchedulerConfig(max_lag_s=None, max_batch_sessions=sessions))


def _summary(latencies: list[float], wall_s: float) -> dict:
    return {"frames": len(latencies), "wall_s": wall_s, "frames_per_s": len(latencies) / wall_s,
            "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


def bench_in_process(model: LiveModel, sessions: int, rounds: int, warmup: int, frames: list[bytes]) -> dict:
    engine = BatchEngine(model, _engine_config(sessions))
    config = SessionConfig(cache=CacheConfig(policy="sink_window"), replies="none")
    ids = [f"s{k}" for k in range(sessions)]
    for sid in ids:
        engine.open(sid, config)
    latencies, started = [], 0.0
    for r in range(warmup + rounds):
        if r == warmup:
            started = time.perf_counter()
        for k, sid in enumerate(ids):
            engine.push_frame(sid, r * 0.5, frames[(r + k) % len(frames)])
        for _, event in engine.run_until_idle():
            if isinstance(event, FrameDecision) and r >= warmup:
                latencies.append(event.lag_s)
    wall = time.perf_counter() - started
    engine.shutdown()
    return _summary(latencies, wall)


def bench_grpc(model: LiveModel, sessions: int, rounds: int, warmup: int, frames: list[bytes]) -> dict:
    server = start_local(model, "127.0.0.1:0", engine_config=_engine_config(sessions))
    try:
        return drive(server.address, sessions, rounds, warmup, frames)
    finally:
        server.stop(grace_s=1)


def bench_ray(model_path: str, sessions: int, rounds: int, warmup: int, frames: list[bytes]) -> dict:
    from liveserve.orchestration.launch import free_port, load_config, start

    if model_path not in ("default", "tiny"):
        model_path = str(Path(model_path).resolve())  # replicas load it from other working directories
    args = {"model": model_path, "max_lag_s": 600.0, "max_batch_size": max(1, sessions), "batch_wait_ms": 2.0}
    config = load_config(grpc_port=free_port(), args=args,
                         replicas={"Gateway": 1, "Perception": 1, "Decision": 1, "Reaction": 1})
    app = start(config, progress=lambda message: print(f"  ray: {message}", file=sys.stderr, flush=True))
    try:
        return drive(app.address, sessions, rounds, warmup, frames)
    finally:
        app.stop()


def drive(address: str, sessions: int, rounds: int, warmup: int, frames: list[bytes]) -> dict:
    """N client streams against `address` in lockstep rounds; latency = send -> Decision received."""
    outboxes = [queue.Queue() for _ in range(sessions)]
    sent_at: list[dict[float, float]] = [{} for _ in range(sessions)]
    decided = [0] * sessions
    latencies: list[float] = []
    progress = threading.Condition()
    failures: list[BaseException] = []

    def requests(k: int):
        yield pb.ClientMessage(open=pb.Open(fps=2.0, decisions_only=True))
        while (message := outboxes[k].get()) is not None:
            yield message
        yield pb.ClientMessage(close=pb.Close())

    def read(k: int, channel: grpc.Channel) -> None:
        try:
            for message in pb_grpc.LiveStreamStub(channel).Stream(requests(k), timeout=600):
                if message.WhichOneof("kind") != "decision":
                    continue
                now = time.perf_counter()
                with progress:
                    if message.decision.timestamp >= warmup * 0.5:
                        latencies.append(now - sent_at[k][message.decision.timestamp])
                    decided[k] += 1
                    progress.notify_all()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            with progress:
                progress.notify_all()

    channel = grpc.insecure_channel(address)
    readers = [threading.Thread(target=read, args=(k, channel), daemon=True) for k in range(sessions)]
    for thread in readers:
        thread.start()
    started = 0.0
    try:
        for r in range(warmup + rounds):
            if r == warmup:
                started = time.perf_counter()
            for k in range(sessions):
                sent_at[k][r * 0.5] = time.perf_counter()
                outboxes[k].put(pb.ClientMessage(frame=pb.Frame(timestamp=r * 0.5, image=frames[(r + k) % len(frames)])))
            with progress:
                if not progress.wait_for(lambda: failures or min(decided) > r, timeout=120):
                    raise TimeoutError(f"round {r}: decisions did not come back within 120 s")
            if failures:
                raise RuntimeError(f"a benchmark stream failed: {failures[0]}")
        wall = time.perf_counter() - started
    finally:
        for outbox in outboxes:
            outbox.put(None)
        for thread in readers:
            thread.join(30)
        channel.close()
    return _summary(latencies, wall)


def run_service_bench(model: LiveModel, *, sessions: list[int], rounds: int, warmup: int, out: str,
                      ray_model: str | None = None) -> dict:
    """`ray_model`: the model's name or directory, to benchmark the Ray application too (its replicas load
    the model themselves)."""
    frames = _frames(model)
    results = [_compare(model, n, rounds, warmup, frames, ray_model) for n in sessions]
    paths = "in-process engine, single-process gRPC server" + (", Ray Serve application" if ray_model else "")
    report = {"benchmark": "service", **environment(model), "rounds": rounds, "warmup": warmup,
              "paths": paths, "address": "127.0.0.1", "results": results}
    write_report(report, out)
    return report


def _ratios(path: dict, base: dict) -> dict:
    return {"throughput_ratio": path["frames_per_s"] / base["frames_per_s"],
            "added_p50_ms": path["p50_ms"] - base["p50_ms"], "added_p99_ms": path["p99_ms"] - base["p99_ms"]}


def _compare(model: LiveModel, n: int, rounds: int, warmup: int, frames: list[bytes], ray_model: str | None) -> dict:
    print(f"liveserve bench service: {n} sessions x {rounds} rounds", file=sys.stderr, flush=True)
    result = {"sessions": n, "in_process": bench_in_process(model, n, rounds, warmup, frames),
              "grpc": bench_grpc(model, n, rounds, warmup, frames)}
    if ray_model:
        result["ray"] = bench_ray(ray_model, n, rounds, warmup, frames)
    base = result["in_process"]
    result["overhead"] = _ratios(result["grpc"], base)
    if ray_model:
        result["ray_overhead"] = _ratios(result["ray"], base)
    line = ", ".join(f"{path} {result[path]['frames_per_s']:.0f} frames/s (p50 {result[path]['p50_ms']:.1f} ms, "
                     f"p99 {result[path]['p99_ms']:.1f} ms)" for path in ("in_process", "grpc", "ray") if path in result)
    print(f"  {line}", file=sys.stderr, flush=True)
    return result
