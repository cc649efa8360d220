"""Hostile input by class, and a well-behaved neighbour that measures what it costs.

Each class is a list of cases; a case is one hostile client's whole call (or calls) against an address,
bounded in count and time, and ends however the server ends it. `Neighbour` streams at a steady fps on
its own call meanwhile and records each frame's send -> decision latency, as a client sees it.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import grpc
import numpy as np
from PIL import Image

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from stream_helpers import jpeg

OPEN = pb.ClientMessage(open=pb.Open(fps=2.0, decisions_only=True))
CLOSE = pb.ClientMessage(close=pb.Close())


def frame(t: float, image: bytes) -> pb.ClientMessage:
    return pb.ClientMessage(frame=pb.Frame(timestamp=t, image=image))


def call(address: str, messages, timeout_s: float = 30.0) -> grpc.StatusCode:
    """One call with `messages`; the status it ended with."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            for _ in pb_grpc.LiveStreamStub(channel).Stream(iter(messages), timeout=timeout_s):
                pass
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def raw_call(address: str, data: bytes, timeout_s: float = 10.0) -> grpc.StatusCode:
    """A stream whose one message is `data`, as it is (not a ClientMessage)."""
    with grpc.insecure_channel(address) as channel:
        method = channel.stream_stream("/liveserve.api.v1.LiveStream/Stream", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
        try:
            for _ in method(iter([data]), timeout=timeout_s):
                pass
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@cache
def png(width: int, height: int) -> bytes:
    """A one-colour PNG: a few kilobytes that decode to width x height pixels (a decompression bomb)."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(out, format="PNG")
    return out.getvalue()


@cache
def smooth_jpeg(width: int, height: int) -> bytes:
    """A large JPEG that compresses well (a gradient), so it passes the size limit and costs a full decode."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                       (x + y) % 256], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=70)
    return out.getvalue()


def claims_pixels(width: int, height: int) -> bytes:
    """A PNG header claiming width x height, with no pixels behind it (refused from its header)."""
    return png(8, 8)[:16] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png(8, 8)[24:]


def _bad_frames(address: str) -> None:
    good = jpeg(1)
    images = [os.urandom(2048), good[: len(good) // 2], b"GIF89a" + os.urandom(64), claims_pixels(60000, 60000),
              b"\x89PNG\r\n\x1a\n" + os.urandom(512), b"not an image at all"]
    call(address, [OPEN, *(frame(0.5 * i, images[i % len(images)]) for i in range(24)), CLOSE])


def _protocol(address: str) -> None:
    call(address, [frame(0.0, jpeg(0))])  # no Open first
    call(address, [OPEN, frame(1.0, jpeg(0)), frame(0.5, jpeg(1)), frame(float("nan"), jpeg(2)),
                   pb.ClientMessage(open=pb.Open()), pb.ClientMessage(), CLOSE])
    for data in (os.urandom(64), b"\xff" * 256, b"\x0a\xff\xff\xff\xff\x0f"):
        raw_call(address, data)


def _oversize(address: str, max_frame_bytes: int) -> None:
    call(address, [pb.ClientMessage(open=pb.Open(client_session_id="x" * (100 << 10)))])
    call(address, [OPEN, frame(0.0, os.urandom(max_frame_bytes + 1)), CLOSE])  # refused by the gateway
    call(address, [OPEN, frame(0.0, os.urandom(max_frame_bytes + (128 << 10))), CLOSE])  # refused by gRPC


def _floods(address: str) -> None:
    image = jpeg(3)
    flood = [OPEN, *(frame(0.01 * i, image) for i in range(300)), CLOSE]  # 300 frames as fast as they go
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda messages: call(address, messages), [flood] * 2 + [[OPEN, CLOSE]] * 24))


def _huge_queries(address: str) -> None:
    live = pb.ClientMessage(open=pb.Open(fps=2.0))
    call(address, [live, frame(0.0, jpeg(4)), pb.ClientMessage(query=pb.Query(timestamp=0.0, text="x" * (1 << 20))),
                   pb.ClientMessage(query=pb.Query(timestamp=0.0, text="why " * 50_000)), CLOSE])
    call(address, [live, *(pb.ClientMessage(query=pb.Query(timestamp=0.0, text="word " * 2000)) for _ in range(20)),
                   CLOSE])


def _bombs(address: str) -> None:
    images = [png(4000, 4000), smooth_jpeg(4000, 3000), png(4096, 4096)]
    call(address, [OPEN, *(frame(0.5 * i, images[i % len(images)]) for i in range(6)), CLOSE], timeout_s=60)


def corpus(max_frame_bytes: int) -> dict[str, list]:
    """Each class of hostile input: its cases, each a function of the server's address. The bombs are
    made here, once: making them while a neighbour is measured would cost its process the time."""
    png(4000, 4000), png(4096, 4096), smooth_jpeg(4000, 3000)
    return {"bad frames": [_bad_frames], "protocol": [_protocol],
            "oversize": [lambda address: _oversize(address, max_frame_bytes)],
            "floods": [_floods], "huge queries": [_huge_queries], "bombs": [_bombs]}


@dataclass
class Neighbour:
    """A well-behaved session: `fps` frames a second, decisions only; latencies in seconds by frame."""

    address: str
    fps: float = 4.0
    sent: dict[int, float] = field(default_factory=dict)
    decided: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(pb.ClientMessage(open=pb.Open(fps=self.fps, decisions_only=True)))
        self._channel = grpc.insecure_channel(self.address)
        self._call = pb_grpc.LiveStreamStub(self._channel).Stream(iter(self._outbox.get, None), timeout=600)
        self._opened = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next = 0

    def _read(self) -> None:
        try:
            for reply in self._call:
                kind = reply.WhichOneof("kind")
                if kind == "opened":
                    self._opened.set()
                elif kind == "decision":
                    self.decided[reply.decision.frame_index] = time.monotonic()
        except grpc.RpcError:
            pass
        self._opened.set()

    def stream_for(self, seconds: float, stop: threading.Event | None = None) -> list[float]:
        """Send frames at `fps` for `seconds` (or until `stop`); the latencies of those frames, once decided."""
        assert self._opened.wait(60), "the neighbour's session did not open"
        first = self._next
        started = time.monotonic()
        while time.monotonic() - started < seconds and not (stop is not None and stop.is_set()):
            index = self._next
            self._next += 1
            self.sent[index] = time.monotonic()
            self._outbox.put(frame(index / self.fps, jpeg(index % 8)))
            time.sleep(max(0.0, started + (index - first + 1) / self.fps - time.monotonic()))  # the stream's pace
        indexes = range(first, self._next)
        deadline = time.monotonic() + 10
        while not all(i in self.decided for i in indexes) and time.monotonic() < deadline:
            time.sleep(0.02)
        return [self.decided.get(i, float("inf")) - self.sent[i] for i in indexes]

    def close(self) -> None:
        self._outbox.put(CLOSE)
        self._outbox.put(None)
        self._reader.join(10)
        self._channel.close()


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def measure(address: str, classes: dict[str, list], rest_s: float = 3.0, fps: float = 4.0,
            baseline: bool = True) -> dict[str, list[float]]:
    """The neighbour's latencies at rest (with `baseline`), then while each class runs (its cases one after
    another, repeated until the neighbour has streamed `rest_s`)."""
    neighbour = Neighbour(address, fps)
    try:
        neighbour.stream_for(1.0)  # warm: the first frames pay for the session's start
        results = {"at rest": neighbour.stream_for(rest_s)} if baseline else {}
        for name, cases in classes.items():
            stop = threading.Event()

            def attack() -> None:
                while not stop.is_set():
                    for case in cases:
                        case(address)

            attacker = threading.Thread(target=attack, daemon=True)
            attacker.start()
            results[name] = neighbour.stream_for(rest_s)
            stop.set()
            attacker.join(60)
    finally:
        neighbour.close()
    return results
