"""What a session queues, and the checks every input passes before it is queued.

Validation happens on the caller's thread, before any state changes, so bad input is reported to its
sender as a SessionError and never reaches the model.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# Submits uint8 pixels [3, S, S] for encoding and returns the features [tokens_per_frame, hidden] later.
SubmitFrame = Callable[[torch.Tensor], "Future[torch.Tensor]"]


class SessionError(ValueError):
    """Bad input for a session (the session itself is unaffected)."""


class FeatureShapeError(SessionError):
    """Frame features of another shape than the model's (another vision tower's, say)."""

    def __init__(self, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
        super().__init__(f"frame features must have shape {expected}, got {got}")
        self.got, self.expected = got, expected


@dataclass(frozen=True, slots=True)
class QueuedFrame:
    timestamp: float
    arrival: float  # time.monotonic() when pushed
    pixels: torch.Tensor | None = None  # uint8 [3, S, S], encoded when the frame is stepped
    features: torch.Tensor | Future | None = None  # [tokens_per_frame, vision_hidden], or a pending encode
    frame_id: int = -1  # set as the session queues it: the caller's id, or its number among the pushed frames

    @property
    def ready(self) -> bool:
        return not isinstance(self.features, Future) or self.features.done()

    def vision_features(self, model) -> torch.Tensor:
        if isinstance(self.features, Future):
            return self.features.result()
        if self.features is not None:
            return self.features
        return model.encode_frames(self.pixels[None])[0]


@dataclass(frozen=True, slots=True)
class QueuedQuery:
    """A user query, or (text None) a request to respond proactively at this time (Reaction sessions)."""

    timestamp: float
    arrival: float
    text: str | None

    @property
    def trigger(self) -> str:
        return "proactive" if self.text is None else "query"


@dataclass(frozen=True, slots=True)
class RestoredFrame:
    """A frame the session saw before it moved here: fed again as the silent frame it was decided as."""

    timestamp: float
    frame_id: int
    features: torch.Tensor  # [tokens_per_frame, vision_hidden]


@dataclass(frozen=True, slots=True)
class RestoredTurn:
    """A finished exchange to put back after the frames up to its time: the query (None: proactive) and
    the reply that was given."""

    timestamp: float
    query: str | None
    reply: str
    token_ids: tuple[int, ...] = ()

    @property
    def trigger(self) -> str:
        return "proactive" if self.query is None else "query"


@dataclass(frozen=True, slots=True)
class AwaitedReply:
    """A reply that was being written elsewhere when the session moved: push_reply hands it over later."""

    timestamp: float
    query: str | None

    @property
    def trigger(self) -> str:
        return "proactive" if self.query is None else "query"


Restored = RestoredFrame | RestoredTurn | AwaitedReply


def check_open(failure: str | None, closed: bool) -> None:
    """A session takes input until it fails or is closed."""
    if failure is not None:
        raise SessionError(f"session failed: {failure}")
    if closed:
        raise SessionError("session is closed")


def check_not_before(timestamp: float, last: float) -> None:
    """Frames come in stream order."""
    if timestamp < last:
        raise SessionError(f"frame timestamp {timestamp:.3f}s is before the previous frame's {last:.3f}s; "
                           "timestamps must not go backwards")


def check_time(timestamp, what: str) -> float:
    try:
        value = float(timestamp)
    except (TypeError, ValueError):
        raise SessionError(f"{what} timestamp must be a number, got {timestamp!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SessionError(f"{what} timestamp must be finite and >= 0, got {timestamp!r}")
    return value


def check_frame_id(frame_id) -> int | None:
    if frame_id is None:
        return None
    if isinstance(frame_id, bool) or not isinstance(frame_id, (int, np.integer)) or frame_id < 0:
        raise SessionError(f"frame_id must be an integer >= 0, got {frame_id!r}")
    return int(frame_id)


def as_frame(model, timestamp: float, frame, encoder: SubmitFrame | None) -> QueuedFrame:
    """An encoded image (bytes), an image (uint8 tensor [3,H,W], numpy [H,W,3], PIL) or precomputed vision
    features [tokens_per_frame, vision_hidden] -> a queued frame. Images are decoded, resized and padded
    now; with an `encoder` they are also submitted for (batched) encoding right away."""
    arrival = time.monotonic()
    expected = (model.layout.num_tokens, model.vision_hidden_size)
    if isinstance(frame, torch.Tensor) and frame.is_floating_point():
        if tuple(frame.shape) != expected:
            raise FeatureShapeError(tuple(frame.shape), expected)
        if not bool(torch.isfinite(frame).all()):
            raise SessionError("frame features contain NaN or infinite values")
        return QueuedFrame(timestamp, arrival, features=frame)
    if not isinstance(frame, (bytes, bytearray, memoryview, torch.Tensor, np.ndarray)) and not hasattr(frame, "convert"):
        raise SessionError(f"a frame is an image or a features tensor, got {type(frame).__name__}")
    if model.vision is None:
        raise SessionError("this model has no vision tower loaded; send frame features")
    from liveserve.video import VideoError, decode_image_bytes, resize_and_pad

    try:
        if isinstance(frame, (bytes, bytearray, memoryview)):
            pixels = decode_image_bytes(bytes(frame), model.frame_size)
        else:
            pixels = resize_and_pad(frame, model.frame_size)
    except (ValueError, VideoError) as exc:
        raise SessionError(f"bad frame image: {exc}") from exc
    if encoder is not None:
        return QueuedFrame(timestamp, arrival, features=encoder(pixels))
    return QueuedFrame(timestamp, arrival, pixels=pixels)
