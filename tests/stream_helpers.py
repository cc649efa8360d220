"""Shared helpers for tests of the public LiveStream API: test images and scripted sessions."""

from __future__ import annotations

import io

import grpc
import torch
from PIL import Image

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc


def jpeg(seed: int, size=(64, 48)) -> bytes:
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="JPEG")
    return out.getvalue()


def stream(address: str, messages, timeout: float = 60.0, metadata=None) -> list[pb.ServerMessage]:
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.LiveStreamStub(channel).Stream(iter(messages), timeout=timeout, metadata=metadata))


def session_messages(frames: int, threshold: float | None = None, queries=(), close=True, extra=()):
    open_ = pb.Open(fps=2.0)
    if threshold is not None:
        open_.threshold = threshold
    yield pb.ClientMessage(open=open_)
    pending = sorted(queries)
    for i in range(frames):
        t = i * 0.5
        while pending and pending[0][0] <= t:
            q_t, text = pending.pop(0)
            yield pb.ClientMessage(query=pb.Query(timestamp=q_t, text=text))
        yield pb.ClientMessage(frame=pb.Frame(timestamp=t, image=jpeg(i)))
        for when, message in extra:
            if when == i:
                yield message
    if close:
        yield pb.ClientMessage(close=pb.Close())


def other_address() -> str | None:
    """An IPv4 address of this host other than loopback, if it has one (to show a port is loopback-only)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # sends nothing: only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def kinds(replies) -> list[str]:
    return [r.WhichOneof("kind") for r in replies]


class LiveCall:
    """One interactive LiveStream call: send messages when the test decides, read replies as they come."""

    def __init__(self, address: str, open_: pb.Open, timeout: float = 120.0, channel_options=()) -> None:
        import queue
        import threading

        self._outbox: queue.Queue = queue.Queue()
        self.replies: list[pb.ServerMessage] = []
        self.error: grpc.RpcError | None = None
        self._changed = threading.Condition()
        self._channel = grpc.insecure_channel(address, options=list(channel_options))
        self._outbox.put(pb.ClientMessage(open=open_))

        def requests():
            while (message := self._outbox.get()) is not None:
                yield message

        call = pb_grpc.LiveStreamStub(self._channel).Stream(requests(), timeout=timeout)

        def read() -> None:
            try:
                for reply in call:
                    with self._changed:
                        self.replies.append(reply)
                        self._changed.notify_all()
            except grpc.RpcError as exc:
                self.error = exc
            with self._changed:
                self.done = True
                self._changed.notify_all()

        self.done = False
        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def send(self, message: pb.ClientMessage) -> None:
        self._outbox.put(message)

    def of_kind(self, kind: str) -> list:
        with self._changed:
            return [getattr(r, kind) for r in self.replies if r.WhichOneof("kind") == kind]

    def wait_for(self, check, timeout: float = 60.0):
        """Block until `check()` is truthy (re-checked on every reply); its value, or AssertionError."""
        with self._changed:
            if not self._changed.wait_for(lambda: check() or self.done, timeout) or not check():
                raise AssertionError(f"timed out or ended ({self.error}); replies so far: {kinds(self.replies)}")
            return check()

    def close(self, timeout: float = 60.0) -> list[pb.ServerMessage]:
        self._outbox.put(pb.ClientMessage(close=pb.Close()))
        self._outbox.put(None)
        self._reader.join(timeout)
        self._channel.close()
        if self.error is not None:
            raise self.error
        return self.replies
