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

The load is closed-loop: a stream's next frame goes out as soon as the round's decisions are back, which
on a small model is far faster than any camera. Streams declare the API's highest frame rate, and the
servers this bench starts lift the Gateway's per-stream ingress limit (`ingress_factor`, which otherwise
drops a stream's frames beyond twice its declared fps after a short burst); the report says so in
`load`. The limit's check still runs on every frame. `liveserve loadtest` is the benchmark of real-rate
cameras within every limit. A round that cannot complete fails the run at once with what the server
said (a frame dropped, a stream ended), or after `wait_s` with what was still missing: never a hang.

The servers start once. Each session count then runs `repeats` times, the paths taking turns
(in_process, grpc, ray, in_process, ...), so a machine whose speed drifts during the run slows every path
alike; frames/s is the median over the repeats, and each ratio is the median of the ratios within a
repeat (paths measured seconds apart). The in-process engine and the single-process server run
`threads` torch threads each (1 by default: on cores shared with other work, intra-op threads waiting on
each other can slow a step tenfold); Ray's replicas use a share of this host's CPUs each
(`replica_threads`), as four pools sharing one host would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

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
DECLARED_FPS = 60.0  # the most a stream may declare (the Gateway's MAX_FPS); frames are stamped at this rate
# ingress_factor of the servers this bench starts: 60,000 frames/s per stream, beyond any lockstep round.
LIFTED_INGRESS_FACTOR = 1000.0
# The longest a served path may take to open the streams, answer a round or close them (a first round on a
# GPU may compile kernels).
DEFAULT_WAIT_S = 120.0


class BenchStalled(RuntimeError):
    """A served path stopped answering a round: the message says what was awaited and what the server said."""


def _frames(model: LiveModel, count: int = 8) -> list[bytes]:
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
            engine.push_frame(sid, r / DECLARED_FPS, frames[(r + k) % len(frames)])
        for _, event in engine.run_until_idle():
            if isinstance(event, FrameDecision) and r >= warmup:
                latencies.append(event.lag_s)
    wall = time.perf_counter() - started
    engine.shutdown()
    return latencies, wall


def _lifted_limits(max_sessions: int) -> dict:
    """The settings that let the bench's own servers take its load: no per-stream ingress limit, and each
    Decision replica admitting the largest level's sessions (whatever capacity figure the model has)."""
    return {"ingress_factor": LIFTED_INGRESS_FACTOR, "max_sessions_per_replica": max(1, max_sessions)}


@contextlib.contextmanager
def local_server(model_ref: str, device: str, max_sessions: int, threads: int):
    """`liveserve serve --local` as its own process (as it is deployed), its limits lifted for the bench's load
    (a Serve config with only `_lifted_limits`); yields its address."""
    import yaml

    from liveserve.orchestration.launch import APP_NAME
    from liveserve.services.state.redis_server import free_port

    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="liveserve-bench-") as tmp:
        config = Path(tmp) / "serve_config.yaml"
        config.write_text(yaml.safe_dump({"applications": [{"name": APP_NAME,
                                                            "args": _lifted_limits(max_sessions)}]}))
        command = [sys.executable, "-m", "liveserve", "serve", "--local", "--model", model_ref, "--device", device,
                   "--address", address, "--pool-mb", str(_pool_mb(max_sessions)), "--metrics-port", "0",
                   "--max-lag-s", str(_NO_DROPS), "--threads", str(threads), "--config", str(config)]
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            said, serving = _drain(server.stderr, "serving liveserve.api.v1.LiveStream")
            deadline = time.monotonic() + 300
            while not serving.wait(0.5):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the single-process server did not start (exit status {server.poll()}):\n"
                                       + "".join(said))
            yield address
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def _drain(pipe, ready: str) -> tuple[deque[str], threading.Event]:
    """Read `pipe` to its end on a thread, so a server that logs a lot never blocks on a full pipe; returns
    its last lines and an event set once a line contains `ready`."""
    said: deque[str] = deque(maxlen=12)
    seen = threading.Event()

    def read() -> None:
        for line in pipe:
            said.append(line)
            if ready in line:
                seen.set()

    threading.Thread(target=read, name="bench-server-stderr", daemon=True).start()
    return said, seen


@contextlib.contextmanager
def ray_app(model_ref: str, max_sessions: int):
    """The Serve application on a local Ray, one replica per pool, its limits lifted; yields the
    public API's address."""
    from liveserve.orchestration.launch import free_port, load_config, start

    args = {"model": model_ref, "max_lag_s": _NO_DROPS, "max_batch_size": max(1, max_sessions),
            "pool_mb": _pool_mb(max_sessions), "threads": replica_threads(), **_lifted_limits(max_sessions)}
    config = load_config(address=f"127.0.0.1:{free_port()}", args=args,
                         replicas={"Gateway": 1, "Perception": 1, "Decision": 1, "Reaction": 1})
    app = start(config, progress=lambda message: print(f"  ray: {message}", file=sys.stderr, flush=True))
    try:
        yield app.address
    finally:
        app.stop()


def drive(address: str, sessions: int, rounds: int, warmup: int, frames: list[bytes],
          wait_s: float = DEFAULT_WAIT_S, fps: float = DECLARED_FPS) -> tuple:
    """N client streams declaring `fps` against `address` in lockstep rounds: (latencies send -> Decision
    received, wall). Raises BenchStalled when a round cannot complete (see the module's docstring)."""
    return asyncio.run(_drive(address, sessions, rounds, warmup, frames, wait_s, fps))


@dataclass
class _Stream:
    """One benchmark stream: its call, and the arrival times of its messages by kind, filled by its reader."""
    index: int
    call: grpc.aio.StreamStreamCall
    arrivals: dict[str, asyncio.Queue] = field(
        default_factory=lambda: {kind: asyncio.Queue() for kind in ("opened", "decision", "closed")})
    closed: bool = False

    async def next(self, kind: str) -> float:
        return await self.arrivals[kind].get()


async def _read(stream: _Stream, failure: asyncio.Future) -> None:
    """Route the stream's messages; a frame the server will never decide, or the call ending before its
    close, fails the run at once (no round could complete)."""

    def fail(why: str) -> None:
        if not failure.done():
            failure.set_result(f"stream {stream.index}: {why}")

    try:
        while True:
            message = await stream.call.read()
            if message is grpc.aio.EOF:
                if not stream.closed:
                    fail(f"the call ended before its close: {(await stream.call.code()).name} "
                         f"{await stream.call.details()}")
                return
            kind = message.WhichOneof("kind")
            if kind in stream.arrivals:
                stream.closed = stream.closed or kind == "closed"
                stream.arrivals[kind].put_nowait(time.perf_counter())
            elif kind == "warning" and message.warning.code in (pb.WARNING_CODE_FRAME_DROPPED,
                                                                pb.WARNING_CODE_BAD_FRAME):
                fail(f"the server will not decide {len(message.warning.timestamps)} frame(s): "
                     f"{pb.WarningCode.Name(message.warning.code)} {message.warning.message!r}")
    except grpc.aio.AioRpcError as exc:
        fail(f"the call failed: {exc.code().name} {exc.details()}")


async def _all(streams: list[_Stream], kind: str, writes: list, failure: asyncio.Future, wait_s: float,
               what: str) -> list[float]:
    """Every stream's next `kind` arrival time (while `writes` go out), or BenchStalled."""
    waiting = asyncio.ensure_future(asyncio.gather(*(stream.next(kind) for stream in streams), *writes))
    done, _ = await asyncio.wait({waiting, failure}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    if waiting in done:
        return waiting.result()[:len(streams)]
    waiting.cancel()
    if failure in done:
        raise BenchStalled(f"{what}: {failure.result()}")
    behind = sum(1 for stream in streams if stream.arrivals[kind].empty())
    raise BenchStalled(f"{what}: {behind} of {len(streams)} streams had no {kind} after {wait_s:g} s, and the "
                       f"server reported nothing dropped")


async def _drive(address: str, sessions: int, rounds: int, warmup: int, frames: list[bytes], wait_s: float,
                 fps: float) -> tuple:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LiveStreamStub(channel)
        failure = asyncio.get_running_loop().create_future()
        streams = [_Stream(k, stub.Stream()) for k in range(sessions)]
        readers = [asyncio.create_task(_read(stream, failure)) for stream in streams]
        try:
            opens = [s.call.write(pb.ClientMessage(open=pb.Open(fps=fps, decisions_only=True)))
                     for s in streams]
            await _all(streams, "opened", opens, failure, wait_s, f"opening {sessions} streams")
            latencies: list[float] = []
            started = 0.0
            for r in range(warmup + rounds):
                if r == warmup:
                    started = time.perf_counter()
                sent = time.perf_counter()  # every stream sends at once, as N cameras would
                writes = [s.call.write(pb.ClientMessage(frame=pb.Frame(timestamp=r / fps,
                                                                       image=frames[(r + k) % len(frames)])))
                          for k, s in enumerate(streams)]
                arrived = await _all(streams, "decision", writes, failure, wait_s,
                                     f"round {r + 1} of {warmup + rounds} ({sessions} streams)")
                if r >= warmup:
                    latencies += [at - sent for at in arrived]
            wall = time.perf_counter() - started
            closes = [_close(s.call) for s in streams]
            await _all(streams, "closed", closes, failure, wait_s, f"closing {sessions} streams")
        finally:
            for reader in readers:
                reader.cancel()
    return latencies, wall


async def _close(call) -> None:
    await call.write(pb.ClientMessage(close=pb.Close()))
    await call.done_writing()


# ---- the run ----------------------------------------------------------------------------------------------------

def run_service_bench(model: LiveModel, *, model_ref: str, sessions: list[int], rounds: int, warmup: int, out: str,
                      ray: bool = False, repeats: int = 3, threads: int = 1, servers: dict[str, str] | None = None,
                      wait_s: float = DEFAULT_WAIT_S) -> dict:
    """`model_ref`: the model's name or directory, for the served paths (their processes load it).
    `servers`: addresses of already running servers to use for "grpc" or "ray" instead of starting them
    (their own limits apply; the report says which were started here)."""
    if model_ref not in MODEL_NAMES:
        model_ref = str(Path(model_ref).resolve())  # servers load it from other working directories
    torch.set_num_threads(threads)  # the in-process engine's, as the single-process server's
    frames = _frames(model)
    paths = PATHS if ray else PATHS[:2]
    given = dict(servers or {})
    results = []
    with contextlib.ExitStack() as stack:
        addresses = dict(given)
        if "grpc" not in addresses:
            addresses["grpc"] = stack.enter_context(local_server(model_ref, model.device.type, max(sessions), threads))
        if ray and "ray" not in addresses:
            addresses["ray"] = stack.enter_context(ray_app(model_ref, max(sessions)))
        load = _load(paths[1:], given)
        print(f"liveserve bench service: {load['note']}", file=sys.stderr, flush=True)
        for n in sessions:
            print(f"liveserve bench service: {n} sessions x {rounds} rounds x {repeats} repeats", file=sys.stderr,
                  flush=True)
            samples: dict[str, list[tuple]] = {path: [] for path in paths}
            for _ in range(repeats):
                for path in paths:
                    if path == "in_process":
                        samples[path].append(bench_in_process(model, n, rounds, warmup, frames))
                    else:
                        samples[path].append(drive(addresses[path], n, rounds, warmup, frames, wait_s))
            results.append(_result(n, samples))
    report = {"benchmark": "service", **environment(model), "rounds": rounds, "warmup": warmup, "repeats": repeats,
              "paths": ", ".join(paths), "address": "127.0.0.1", "cpus": os.cpu_count(),
              "replica_threads": replica_threads(), "load": load, "results": results}
    write_report(report, out)
    return report


def _load(served: tuple[str, ...], given: dict[str, str]) -> dict:
    """What the load is and which limits it met, for the report: lockstep rounds outpace any camera, so the
    servers started here lift the per-stream ingress limit, and the report must say so."""
    factors = {path: None if path in given else LIFTED_INGRESS_FACTOR for path in served}
    lifted = [path for path, factor in factors.items() if factor is not None]
    kept = [path for path, factor in factors.items() if factor is None]
    note = (f"lockstep rounds, every stream declaring {DECLARED_FPS:g} fps and sending its next frame as soon as "
            f"the round is decided")
    if lifted:
        note += (f"; ingress limit lifted on {' and '.join(lifted)} (ingress_factor {LIFTED_INGRESS_FACTOR:g}, "
                 f"the default 2 drops frames sent faster than twice the declared fps), and their Decision "
                 f"replicas admit every session of the largest level (max_sessions_per_replica)")
    if kept:
        note += f"; {' and '.join(kept)} already running, with their own ingress limits"
    return {"kind": "lockstep", "declared_fps": DECLARED_FPS, "ingress_factor": factors,
            "ingress_limit_lifted": bool(lifted), "note": note}


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
