"""Driving a real headless Chromium over the DevTools protocol (CDP), with nothing but `websockets`."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import av
from websockets.sync.client import connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def write_y4m(video: str, out: Path, fps: int, seconds: float, width: int = 384) -> Path:
    """The first `seconds` of `video` as a YUV4MPEG2 clip, Chromium's fake camera input (it loops it)."""
    with av.open(video) as container, out.open("wb") as sink:
        stream = container.streams.video[0]
        step, next_t, written = 1.0 / fps, 0.0, 0
        height = None
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base) if frame.pts is not None else next_t
            if t + 1e-6 < next_t:
                continue
            if height is None:
                height = round(width * frame.height / frame.width / 2) * 2
                sink.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
            image = frame.reformat(width=width, height=height, format="yuv420p")
            sink.write(b"FRAME\n")
            for plane, (w, h) in zip(image.planes, ((width, height), (width // 2, height // 2),
                                                    (width // 2, height // 2))):
                rows = bytes(plane)
                stride = plane.line_size
                sink.write(b"".join(rows[r * stride:r * stride + w] for r in range(h)))
            written += 1
            next_t += step
            if next_t >= seconds:
                break
    if not written:
        raise ValueError(f"{video} has no frames")
    return out


class Chromium:
    """A headless Chromium with a fake camera (a y4m clip, or Chromium's own test pattern) on one page."""

    def __init__(self, binary: str, profile: Path, url: str, camera_clip: Path | None = None,
                 window: tuple[int, int] = (1280, 860)) -> None:
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                "--mute-audio", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
        if camera_clip is not None:
            args.append(f"--use-file-for-fake-video-capture={camera_clip}")
        self.log = profile.parent / "chromium.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(args + [url], stdout=self._log_file, stderr=subprocess.STDOUT)
        self._profile, self._socket, self._next_id = profile, None, 0
        self._stack = contextlib.ExitStack()

    def connect(self, timeout_s: float = 60.0) -> Chromium:
        """Attach to the page once Chromium has written its DevTools port."""
        deadline = time.monotonic() + timeout_s
        port_file = self._profile / "DevToolsActivePort"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            if port_file.exists() and (lines := port_file.read_text().split()):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list", timeout=5) as answer:
                        pages = [t for t in json.load(answer) if t.get("type") == "page"]
                except OSError:
                    pages = []
                if pages:
                    self._socket = self._stack.enter_context(
                        connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
                    loaded = "location.protocol.startsWith('http') && document.readyState === 'complete'"
                    if not self.wait_for(loaded, max(1.0, deadline - time.monotonic())):
                        raise TimeoutError(f"the page did not load within {timeout_s:g}s")
                    return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium's DevTools did not come up within {timeout_s:g}s")
            time.sleep(0.1)

    def call(self, method: str, timeout_s: float = 30.0, **params) -> dict:
        self._next_id += 1
        self._socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            answer = json.loads(self._socket.recv(timeout=max(0.01, deadline - time.monotonic())))
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float):
        """Poll `expression` in the page until it is truthy; its last value either way."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self._stack.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log_file.close()


def chromium_or_skip(pytest) -> str:
    """The Chromium binary; in CI (CI=true) a missing one fails the test instead of skipping it."""
    binary = find_chromium()
    if binary is None:
        reason = ("no chromium on PATH (scripts/install.sh installs Debian's `chromium`; "
                  "apt-get install chromium)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary

