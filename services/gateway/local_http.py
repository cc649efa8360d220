"""The browser front of `serve --local`: web.web_app on a uvicorn server in its own thread and event loop."""

from __future__ import annotations

import asyncio
import threading

import uvicorn

from liveserve.services.gateway.web import web_app


class WebServer:
    """HTTP (the page) and WebSocket (/v1/stream) on `host:port` (0: a free port), bridging to `grpc_address`."""

    def __init__(self, grpc_address: str, host: str, port: int, max_frame_bytes: int, refusal: str = "") -> None:
        """With a `refusal`, every stream is refused with it (web.web_app)."""
        # A frame in JSON is base64 (4/3 of its bytes): the gateway's limits answer it, not the socket's.
        config = uvicorn.Config(web_app(grpc_address, refusal), host=host, port=port, lifespan="off", log_config=None,
                                access_log=False, ws_max_size=max_frame_bytes * 4 // 3 + (1 << 20))
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the main thread keeps SIGINT/SIGTERM
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="web-server", daemon=True)
        self.host, self.port = host, 0

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve())
        except BaseException as exc:  # e.g. the port is taken: handed to start()
            self._error = exc

    def start(self, timeout_s: float = 30.0) -> WebServer:
        self._thread.start()
        waited = threading.Event()
        while not self._server.started and self._thread.is_alive() and timeout_s > 0:
            waited.wait(0.05)
            timeout_s -= 0.05
        if not self._server.started:
            self._thread.join(5)
            if self._error is not None:
                raise OSError(f"the web server cannot listen on {self.host}: {self._error}")
            raise OSError(f"the web server did not start listening on {self.host}")
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
