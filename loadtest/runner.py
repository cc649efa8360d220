"""Run a load test: check the target, run each load level with its sessions, and build the report.

A level opens its sessions over the ramp, lets every one of them stream for the configured duration,
closes them (each Close drains: the server decides every frame already sent) and only then starts the
next level, so levels never overlap. Sessions are spread over a few HTTP/2 connections, as many
cameras behind one gateway would be, rather than all multiplexed on one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import platform
import signal
import socket
import time
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.loadtest.config import LoadConfig
from liveserve.loadtest.metrics import LevelReport, LiveStats, RunReport, aggregate, capacity, capacity_notes
from liveserve.loadtest.progress import Progress
from liveserve.loadtest.session import SessionDriver
from liveserve.loadtest.workload import FrameBank, frame_bank
from liveserve.services.client import ResumePolicy
from liveserve.services.client.session import channel_options
from liveserve.services.security.tls import channel_credentials

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LiveStream"].full_name
# Above this the client itself was late: what it measured is a lighter load than the one configured.
CLIENT_SLIP_WARN_MS = 50.0


class LoadTestError(RuntimeError):
    """The run could not start or go on (target unreachable or not serving); the message is one line."""


def _channel(config: LoadConfig) -> grpc.aio.Channel:
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # each channel its own TCP connection, not a shared one
        ("grpc.max_send_message_length", 16 << 20),
        ("grpc.max_receive_message_length", 16 << 20),
        *channel_options(ResumePolicy()),  # a Gateway back after a restart is seen within the sessions' backoff
    ]
    if config.uses_tls:
        credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
        return grpc.aio.secure_channel(config.address, credentials, options=options)
    return grpc.aio.insecure_channel(config.address, options=options)


async def check_target(config: LoadConfig) -> None:
    """Fail fast, with one clear line, when nothing answers at the address or it reports not serving.
    Targets without the gRPC health service are accepted (a gateway may not expose it)."""
    channel = _channel(config)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), config.connect_timeout_s)
        except TimeoutError:
            raise LoadTestError(f"cannot reach {config.address}: no connection within {config.connect_timeout_s:g} s "
                                "(is the server running? check --address)") from None
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=config.connect_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                return
            raise LoadTestError(f"{config.address}: health check failed: {exc.code().name}: {exc.details()}") from None
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            raise LoadTestError(f"{config.address} reports {status} for {SERVICE_NAME}")
    finally:
        await channel.close()


async def run_level(config: LoadConfig, sessions: int, bank: FrameBank, progress: Progress,
                    stop: asyncio.Event) -> LevelReport:
    """`sessions` concurrent sessions, ramped up over config.ramp_up_s; returns once all have ended."""
    live = LiveStats(level_sessions=sessions)
    channels = [_channel(config) for _ in range(math.ceil(sessions / config.streams_per_connection))]
    stubs = [pb_grpc.LiveStreamStub(c) for c in channels]
    run_id = f"loadtest-{int(time.time())}-{sessions}"
    origin = time.perf_counter()
    drivers = [SessionDriver(k, config, stubs[k % len(stubs)], bank, live, origin, k * config.ramp_up_s / sessions,
                             stop, run_id) for k in range(sessions)]
    label = f"{sessions} session{'s' if sessions != 1 else ''}"
    progress.start(live, label)
    try:
        records = await asyncio.gather(*(d.run() for d in drivers))
    finally:
        await progress.stop(live, label)
        for channel in channels:
            await channel.close()
    return aggregate(records, sessions=sessions, wall_s=time.perf_counter() - origin, slo_ms=config.slo_ms,
                     slo_target=config.slo_target)


async def run_async(config: LoadConfig, progress: Progress | None = None, *, handle_signals: bool = False,
                    bank: FrameBank | None = None) -> RunReport:
    progress = progress or Progress(None)
    stop = asyncio.Event()
    if handle_signals:
        _stop_on_signals(stop, progress)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    bank = bank or await asyncio.to_thread(frame_bank, config)  # encoding takes a moment: keep the loop free
    await check_target(config)
    progress.message(f"liveserve loadtest: {config.address}, {len(config.levels)} level(s) of "
                     f"{config.duration_s:g} s at {config.fps:g} fps per session; frames: {bank.description}")
    levels: list[LevelReport] = []
    notes: list[str] = []
    for n in config.levels:
        if stop.is_set():
            break
        report = await run_level(config, n, bank, progress, stop)
        levels.append(report)
        if report.sessions_sustained == 0 and report.errors:
            notes.append(f"{n} sessions: every session failed ({_top_error(report)})")
        if config.sweep_max is not None and not report.slo_met:
            if n != config.levels[-1]:
                notes.append(f"doubling stopped at {n} sessions: SLO attainment {report.slo_attainment:.2%} is below "
                             f"the target {config.slo_target:.2%}")
            break
    if config.is_sweep:
        points = [(level.sessions, level.slo_attainment) for level in levels]
        best = capacity(points, config.slo_target)
        notes = capacity_notes(points, config.slo_target) + notes
    else:
        best = None
    notes += _client_health_notes(levels)
    if stop.is_set():
        notes.append("interrupted: sessions were closed early; the figures cover what ran")
    return RunReport(target=config.address, started_at=started_at, config=_public_config(config),
                     frames=bank.description, slo_ms=config.slo_ms, slo_target=config.slo_target, levels=levels,
                     sweep=config.is_sweep, capacity=best, interrupted=stop.is_set(), notes=notes,
                     environment=_environment())


def run(config: LoadConfig, *, progress: Progress | None = None, handle_signals: bool = False,
        bank: FrameBank | None = None) -> RunReport:
    """Run the load test to completion (blocking). Raises LoadTestError when the target is unreachable."""
    return asyncio.run(run_async(config, progress, handle_signals=handle_signals, bank=bank))


def _stop_on_signals(stop: asyncio.Event, progress: Progress) -> None:
    """First Ctrl-C (or SIGTERM): stop sending, drain open sessions, still write the report. Second: abort."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        stop.set()
        progress.message(f"{sig.name}: stopping; open sessions are drained and the report is written "
                         "(press Ctrl-C again to abort)")
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)  # the next one takes its default course

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


def _top_error(report: LevelReport) -> str:
    return report.error_messages[0] if report.error_messages else next(iter(report.errors))


def _client_health_notes(levels: list[LevelReport]) -> list[str]:
    notes = []
    for level in levels:
        slip = level.send_slip_ms.p99_ms
        if slip is not None and slip > CLIENT_SLIP_WARN_MS:
            notes.append(f"{level.sessions} sessions: the load generator sent frames late (p99 {slip:.0f} ms behind "
                         "schedule), so the server saw less load than configured; use fewer sessions per client "
                         "process or a machine with more cores")
    return notes


def _public_config(config: LoadConfig) -> dict:
    """The settings as JSON, with credential values redacted (reports get shared)."""
    data = dataclasses.asdict(config)
    data["credentials"] = {key: "<redacted>" for key, _ in config.credentials}
    data["sweep"] = list(config.sweep)
    data["levels"] = list(config.levels)
    return data


def _environment() -> dict:
    return {"client_host": socket.gethostname(), "python": platform.python_version(), "grpcio": grpc.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
