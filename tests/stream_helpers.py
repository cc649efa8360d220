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


def kinds(replies) -> list[str]:
    return [r.WhichOneof("kind") for r in replies]
