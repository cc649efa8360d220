"""Serve the LiveStream API from one process: gateway, perception and decision on one batched engine.

The single-replica deployment (development, edge boxes, tests); `liveserve serve` runs it until
SIGINT/SIGTERM, then stops taking new sessions, lets open calls finish for a grace period, and exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

from liveserve.config import EngineConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.model.live import LiveModel
from liveserve.services.engine_worker import EngineWorker
from liveserve.services.stream_service import StreamLimits, start_server

log = logging.getLogger(__name__)


class LocalServer:
    """A running single-process server (see `start_local`): the gRPC server lives on its own event-loop
    thread, the engine on another."""

    def __init__(self, model: LiveModel, address: str, engine_config: EngineConfig | None,
                 defaults: SessionConfig | None, limits: StreamLimits | None) -> None:
        self.worker = EngineWorker(BatchEngine(model, engine_config))
        self._requested = address
        self._config = (defaults, limits)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._grace_s = 5.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self.address = ""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="grpc-server", daemon=True)

    def start(self) -> LocalServer:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self.worker.stop()
            raise self._error
        return self

    async def _main(self) -> None:
        self._loop, self._stop_requested = asyncio.get_running_loop(), asyncio.Event()
        try:
            server, port = await start_server(self.worker, self._requested, defaults=self._config[0],
                                              limits=self._config[1])
            self.address = f"{self._requested.rsplit(':', 1)[0]}:{port}"
        except BaseException as exc:  # handed to the caller of start()
            self._error = exc
            return
        finally:
            self._started.set()
        await self._stop_requested.wait()
        await server.stop(self._grace_s)  # new calls are refused; open ones get the grace period

    def stop(self, grace_s: float = 5.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._grace_s = grace_s
            self._loop.call_soon_threadsafe(self._stop_requested.set)
            self._thread.join(grace_s + 10)
        self.worker.stop()


def start_local(model: LiveModel, address: str = "127.0.0.1:0", *, engine_config: EngineConfig | None = None,
                defaults: SessionConfig | None = None, limits: StreamLimits | None = None) -> LocalServer:
    """Start the engine and the gRPC server; returns once listening (`.address` has the bound port)."""
    return LocalServer(model, address, engine_config, defaults, limits).start()


def serve_forever(server: LocalServer, grace_s: float = 5.0) -> None:
    """Block until SIGINT or SIGTERM, then shut down gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("shutting down: no new sessions, %.0fs grace for open ones", grace_s)
    server.stop(grace_s)
