"""A live MPEG-TS over HTTP source on loopback, fed from the bundled sample at real-time pace.

Each client gets its own encoder (as from a camera): the sample's frames loop, each shown for its
duration at `rate` frames per second, encoded (MPEG-2, no B-frames, a keyframe every second) and
written as it is due, so nothing arrives earlier than a camera would send it. `stop()` drops every
client and the listening socket, as a crashed camera or server does; `start()` on the same port
brings it back.
"""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from liveserve.video import SAMPLE_VIDEO


def sample_images() -> tuple[list[np.ndarray], float]:
    """The sample's frames (RGB arrays) and its frame rate."""
    with av.open(str(SAMPLE_VIDEO)) as container:
        stream = container.streams.video[0]
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return images, float(stream.average_rate)


class LiveTsServer:
    def __init__(self, rate: int = 10, port: int = 0) -> None:
        self.rate, self.port = rate, port
        self.images, self.sample_fps = sample_images()
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/live.ts"

    def start(self) -> LiveTsServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self.port = listener.getsockname()[1]
        self._listener, self._stopped = listener, threading.Event()
        threading.Thread(target=self._accept, args=(listener, self._stopped), daemon=True, name="ts-accept").start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            sockets, self._clients = [self._listener, *self._clients], []
        for sock in sockets:
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> LiveTsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self, listener: socket.socket, stopped: threading.Event) -> None:
        while not stopped.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.append(conn)
            threading.Thread(target=self._serve, args=(conn, stopped), daemon=True, name="ts-client").start()

    def _serve(self, conn: socket.socket, stopped: threading.Event) -> None:
        try:
            conn.settimeout(5.0)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\nCache-Control: no-cache\r\n\r\n")
            out = conn.makefile("wb", buffering=0)
            with av.open(out, mode="w", format="mpegts", options={"flush_packets": "1"}) as container:
                stream = container.add_stream("mpeg2video", rate=self.rate)
                stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
                stream.codec_context.gop_size = self.rate
                stream.codec_context.max_b_frames = 0
                repeat = max(1, round(self.rate / self.sample_fps))
                started, i = time.monotonic(), 0
                while not stopped.is_set():
                    image = self.images[(i // repeat) % len(self.images)]
                    due = started + i / self.rate
                    if (wait := due - time.monotonic()) > 0 and stopped.wait(wait):
                        return
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts, frame.time_base = i, Fraction(1, self.rate)
                    container.mux(stream.encode(frame))
                    i += 1
        except (OSError, av.FFmpegError, ValueError):
            return  # the client went away or the server was stopped
        finally:
            conn.close()


def write_hls(directory: Path, seconds: int = 4, rate: int = 10, segment_s: int = 1) -> Path:
    """An HLS playlist of the sample (MPEG-2 in MPEG-TS segments of `segment_s`); returns the playlist."""
    images, sample_fps = sample_images()
    repeat = max(1, round(rate / sample_fps))
    playlist = directory / "index.m3u8"
    options = {"hls_time": str(segment_s), "hls_playlist_type": "vod"}
    with av.open(str(playlist), mode="w", format="hls", options=options) as container:
        stream = container.add_stream("mpeg2video", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        stream.codec_context.gop_size = rate
        for i in range(seconds * rate):
            frame = av.VideoFrame.from_ndarray(images[(i // repeat) % len(images)], format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return playlist


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve_directory(directory: Path) -> http.server.ThreadingHTTPServer:
    """A plain HTTP server for `directory` on 127.0.0.1 (every file whole, as fast as asked)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler,
                                                                                 directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True, name="http-dir").start()
    return server
