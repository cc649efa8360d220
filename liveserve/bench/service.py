"""Service-path benchmark: what the serving paths cost on top of the in-process batched engine.

Same model, same load, one run. N sessions advance in lockstep rounds: each round every session sends
one JPEG frame, and the round ends when all N decisions are back.
  in_process  BatchEngine.push_frame / step in this process; latency = push -> decision
  grpc        `liveserve serve --local` in its own process on 127.0.0.1 (the Gateway with Perception,
              Decision and Reaction in one process) and N client streams; latency = the client's send ->
              the client's receipt of the Decision (serialisation, HTTP/2 and every hop included)
  ray         (--ray) `liveserve serve` on a local Ray cluster: a Gateway replica serving the API itself, a
              Perception, a Decision and a Reaction replica; same client and latency as grpc
Sessions report decisions only (no replies are written), so every step is a frame step. The client
drives all streams from one asyncio loop, as a load generator would, so its own cost stays small.

The servers start once. Each session count then runs `repeats` times, the paths taking turns
(in_process, grpc, ray, in_process, ...), so a machine whose speed drifts during the run slows every path
alike; frames/s is the median over the repeats, and each ratio is the median of the ratios within a
repeat (paths measured seconds apart). Served replicas use a share of this host's CPUs each
(`threads`), as four pools sharing one host would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
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
from liveserve.model.registry import MODEL_NAMES
from liveserve.services.client.stream import encode_jpeg

_NO_DROPS = 600.0  # max_lag_s for the served paths: lockstep rounds never fall behind on purpose
PATHS = ("in_process", "grpc", "ray")


def _frames(model: LiveModel, count: int = 8) -> list[bytes]:
    import torch

    generator = torch.Generator().manual_seed(0)
    size = model.frame_size
    return [encode_jpeg(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))
            for _ in range(count)]


def replica_threads() -> int:
    """Torch threads per served replica: this host's CPUs shared by the four pools."""
    return max(1, (os.cpu_count() or 1) // 4)


def _pool_mb(sessions: int) -> int:
    return max(64, sessions * 8)


# ---- the paths ------------------------------------------------------------------------------------------------

def bench_in_process(model: LiveModel, sessions: int, rounds: int, warmup: int, frames: list[bytes]) -> tuple:
    """(latencies, wall seconds) of `rounds` lockstep rounds through a BatchEngine in this thread."""
    engine = BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=4096 * sessions),
                                             scheduler=SchedulerConfig(max_lag_s=None, max_batch_sessions=sessions)))
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
    return latencies, wall


@contextlib.contextmanager
def local_server(model_ref: str, device: str, max_sessions: int):
    """`liveserve serve --local` as its own process (as it is deployed); yields its address."""
    from liveserve.services.state.redis_server import free_port

    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "liveserve", "serve", "--local", "--model", model_ref, "--device", device,
               "--address", address, "--pool-mb", str(_pool_mb(max_sessions)), "--metrics-port", "0",
               "--max-lag-s", str(_NO_DROPS)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line, deadline = "", time.monotonic() + 300
        while "serving liveserve.api.v1.LiveStream" not in line:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the single-process server did not start: {line.strip() or server.returncode}")
            line = server.stderr.readline()
        yield address
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


@contextlib.contextmanager
def ray_app(model_ref: str, max_sessions: int):
    """The Serve application on a local Ray, one replica per pool; yields the public API's address."""
    from liveserve.orchestration.launch import free_port, load_config, start

    args = {"model": model_ref, "max_lag_s": _NO_DROPS, "max_batch_size": max(1, max_sessions),
            "pool_mb": _pool_mb(max_sessions), "threads": replica_threads()}
    config = load_config(address=f"127.0.0.1:{free_port()}", args=args,
                         replicas={"Gateway": 1, "Perception": 1, "Decision": 1, "Reaction": 1})
    app = start(config, progress=lambda message: print(f"  ray: {message}", file=sys.stderr, flush=True))
    try:
        yield app.address
    finally:
        app.stop()


def drive(address: str, sessions: int, rounds: int, warmup: int, frames: list[bytes]) -> tuple:
    """N client streams against `address` in lockstep rounds: (latencies send -> Decision received, wall)."""
    return asyncio.run(_drive(address, sessions, rounds, warmup, frames))


async def _drive(address: str, sessions: int, rounds: int, warmup: int, frames: list[bytes]) -> tuple:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LiveStreamStub(channel)
        calls = [stub.Stream(timeout=600) for _ in range(sessions)]
        for call in calls:
            await call.write(pb.ClientMessage(open=pb.Open(fps=2.0, decisions_only=True)))
        for call in calls:
            await _next(call, "opened")
        latencies: list[float] = []
        started = 0.0
        for r in range(warmup + rounds):
            if r == warmup:
                started = time.perf_counter()
            sent = [time.perf_counter()] * sessions  # every stream sends at once, as N cameras would
            writes = [call.write(pb.ClientMessage(frame=pb.Frame(timestamp=r * 0.5, image=frames[(r + k) % len(frames)])))
                      for k, call in enumerate(calls)]
            arrived = await asyncio.wait_for(asyncio.gather(*(_decided(call) for call in calls), *writes), 120)
            arrived = arrived[:sessions]
            if r >= warmup:
                latencies += [at - t for at, t in zip(arrived, sent)]
        wall = time.perf_counter() - started
        for call in calls:
            await call.write(pb.ClientMessage(close=pb.Close()))
            await call.done_writing()
        for call in calls:
            await _next(call, "closed")
    return latencies, wall


async def _decided(call) -> float:
    await _next(call, "decision")
    return time.perf_counter()


async def _next(call, kind: str) -> pb.ServerMessage:
    """The call's next message of `kind`; the call's status if it ends first."""
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            code = await call.code()
            raise RuntimeError(f"a benchmark stream ended before its {kind}: {code.name} {await call.details()}")
        if message.WhichOneof("kind") == kind:
            return message


# ---- the run ----------------------------------------------------------------------------------------------------

def run_service_bench(model: LiveModel, *, model_ref: str, sessions: list[int], rounds: int, warmup: int, out: str,
                      ray: bool = False, repeats: int = 3) -> dict:
    """`model_ref`: the model's name or directory, for the served paths (their processes load it)."""
    if model_ref not in MODEL_NAMES:
        model_ref = str(Path(model_ref).resolve())  # servers load it from other working directories
    frames = _frames(model)
    paths = PATHS if ray else PATHS[:2]
    results = []
    with contextlib.ExitStack() as servers:
        addresses = {"grpc": servers.enter_context(local_server(model_ref, model.device.type, max(sessions)))}
        if ray:
            addresses["ray"] = servers.enter_context(ray_app(model_ref, max(sessions)))
        for n in sessions:
            print(f"liveserve bench service: {n} sessions x {rounds} rounds x {repeats} repeats", file=sys.stderr,
                  flush=True)
            samples: dict[str, list[tuple]] = {path: [] for path in paths}
            for _ in range(repeats):
                for path in paths:
                    if path == "in_process":
                        samples[path].append(bench_in_process(model, n, rounds, warmup, frames))
                    else:
                        samples[path].append(drive(addresses[path], n, rounds, warmup, frames))
            results.append(_result(n, samples))
    report = {"benchmark": "service", **environment(model), "rounds": rounds, "warmup": warmup, "repeats": repeats,
              "paths": ", ".join(paths), "address": "127.0.0.1", "cpus": os.cpu_count(),
              "replica_threads": replica_threads(), "results": results}
    write_report(report, out)
    return report


def _summary(runs: list[tuple]) -> dict:
    latencies = [latency for run_latencies, _ in runs for latency in run_latencies]
    rates = [len(run_latencies) / wall for run_latencies, wall in runs]
    return {"frames": len(latencies), "frames_per_s": statistics.median(rates),
            "frames_per_s_repeats": rates, "wall_s": sum(wall for _, wall in runs),
            "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


def _ratios(runs: list[tuple], base_runs: list[tuple], path: dict, base: dict) -> dict:
    """Throughput as the median of the repeats' own ratios (each pair measured back to back)."""
    pairs = [(len(a) / wa) / (len(b) / wb) for (a, wa), (b, wb) in zip(runs, base_runs)]
    return {"throughput_ratio": statistics.median(pairs), "throughput_ratio_repeats": pairs,
            "added_p50_ms": path["p50_ms"] - base["p50_ms"], "added_p99_ms": path["p99_ms"] - base["p99_ms"]}


def _result(n: int, samples: dict[str, list[tuple]]) -> dict:
    result = {"sessions": n, **{path: _summary(runs) for path, runs in samples.items()}}
    base, base_runs = result["in_process"], samples["in_process"]
    result["overhead"] = _ratios(samples["grpc"], base_runs, result["grpc"], base)
    if "ray" in samples:
        result["ray_overhead"] = _ratios(samples["ray"], base_runs, result["ray"], base)
    line = ", ".join(f"{path} {result[path]['frames_per_s']:.0f} frames/s (p50 {result[path]['p50_ms']:.1f} ms, "
                     f"p99 {result[path]['p99_ms']:.1f} ms)" for path in samples)
    ratios = ", ".join(f"{path} {result[key]['throughput_ratio']:.2f}x" for path, key in
                       (("grpc", "overhead"), ("ray", "ray_overhead")) if key in result)
    print(f"  {line}; of the engine's frames/s: {ratios}", file=sys.stderr, flush=True)
    return result
