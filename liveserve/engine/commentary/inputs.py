"""The input side of a commentary session: frames grouped into chunks, and the queries each chunk's turn
asks. Validated on the caller's thread before anything changes; thread-safe (callers push while the
engine steps; the commentary session takes whole chunks from here).

A chunk is complete with its `chunk_s * fps` frames, or early when a frame of a later chunk's time
arrives (a short chunk repeats its last frame). Frames are sized by the session's CommentaryConfig
(`model.frame_format`; frames already at their size stay as they are), and a chunk's frames share the size
of its first (the tower takes a chunk as one grid), so a source that changes resolution mid-chunk is
sized to it. Chunk k is labelled `Time=k*chunk_s-(k+1)*chunk_s`: the
chunk after the last one, or the chunk of its first frame's time after a gap, so jittery timestamps
never repeat a label.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from liveserve.config import SessionConfig
from liveserve.engine.inputs import (QueuedFrame, SessionError, check_frame_id, check_not_before, check_open,
                                     check_time)


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int  # floor(start / chunk_s)
    frames: tuple[QueuedFrame, ...]
    queries: tuple[str, ...]
    features: torch.Tensor | None = None  # its vision tokens, once encoded (see commentary.encode_chunks)

    @property
    def start_s(self) -> float:
        return self.frames[0].timestamp

    def pixels(self) -> torch.Tensor:
        return torch.stack([frame.pixels for frame in self.frames])

    def distinct_frames(self) -> list[QueuedFrame]:
        """Its frames, a short chunk's repeated last frame once (by identity: frames hold tensors)."""
        return list({id(frame): frame for frame in self.frames}.values())


class ChunkInputs:
    def __init__(self, model, config: SessionConfig) -> None:
        self.model, self.commentary = model, config.commentary
        try:
            self.frame_format = model.frame_format(config.commentary)
        except ValueError as exc:  # the session's pixel bounds against the model's
            raise SessionError(str(exc)) from None
        self.lock = threading.Lock()
        self.chunks: deque[Chunk] = deque()  # full chunks, waiting for their turn
        self._filling: list[QueuedFrame] = []  # the chunk being filled
        self._filling_index = -1
        self._last_index = -1  # the last closed chunk's
        self._queries: list[str] = []  # pushed since the last chunk closed: asked in the next one's turn
        self._last_frame_time = -float("inf")
        self._frames_pushed = 0
        self.frames_dropped = 0
        self.closed = False
        self.failure: str | None = None

    # ---- pushes (any thread) ----------------------------------------------------------------------------

    def push_frame(self, timestamp: float, frame, frame_id: int | None = None) -> None:
        timestamp = check_time(timestamp, "frame")
        frame_id = check_frame_id(frame_id)
        if isinstance(frame, torch.Tensor) and frame.is_floating_point():
            raise SessionError("commentary sessions take images: the tower encodes a chunk of frames together")
        with self.lock:  # refuse early and cheaply, before decoding
            self._check_in_order(timestamp)
        pixels = _pixels(frame, self.frame_format)
        with self.lock:
            self._check_in_order(timestamp)
            self._last_frame_time = timestamp
            item = QueuedFrame(timestamp, time.monotonic(), pixels=pixels,
                               frame_id=self._frames_pushed if frame_id is None else frame_id)
            self._frames_pushed += 1
            second = int(timestamp // self.commentary.chunk_s)
            if self._filling and second > self._filling_index:  # the source skipped the rest of the chunk
                self._close_chunk()
            if not self._filling:  # a new chunk: the next one, or the one of this time after a gap
                self._filling_index = max(self._last_index + 1, second)
            elif pixels.shape != (first := self._filling[0].pixels).shape:
                item = replace(item, pixels=_sized_as(pixels, first))
            self._filling.append(item)
            if len(self._filling) == self.commentary.frames_per_chunk:
                self._close_chunk()

    def push_query(self, timestamp: float, text: str) -> None:
        check_time(timestamp, "query")
        if not isinstance(text, str) or not text.strip():
            raise SessionError("query text is empty")
        n = len(self.model.template.encode(text))
        if n > self.commentary.max_query_tokens:
            raise SessionError(f"query is {n} tokens; the limit is {self.commentary.max_query_tokens}")
        with self.lock:
            check_open(self.failure, self.closed)
            self._queries.append(text.strip())

    def flush(self) -> None:
        with self.lock:
            if self._filling:
                self._close_chunk()

    def drop_stale(self, max_lag_s: float | None, max_queued: int) -> list[QueuedFrame]:
        """Drop the oldest waiting chunks while they span more than `max_lag_s` of stream time or hold more
        than `max_queued` frames (the newest chunk always stays). A dropped chunk's queries are asked with
        the next one."""
        dropped: list[QueuedFrame] = []
        with self.lock:
            chunks = self.chunks
            while len(chunks) > 1 and (sum(len(c.frames) for c in chunks) > max_queued or (
                    max_lag_s is not None and chunks[-1].start_s - chunks[0].start_s > max_lag_s)):
                gone = chunks.popleft()
                dropped.extend(gone.distinct_frames())
                if gone.queries:
                    chunks[0] = replace(chunks[0], queries=gone.queries + chunks[0].queries)
        self.frames_dropped += len(dropped)
        return dropped

    def close(self, failure: str | None = None) -> None:
        with self.lock:
            self.closed = True
            self.failure = self.failure or failure
            self.chunks.clear()
            self._filling = []

    # ---- taking work (the stepping thread) -----------------------------------------------------------

    def next_chunk(self) -> Chunk | None:
        with self.lock:
            return self.chunks[0] if self.chunks else None

    def take_chunk(self) -> Chunk | None:
        with self.lock:
            return self.chunks.popleft() if self.chunks else None

    def give_features(self, chunk: Chunk, features: torch.Tensor) -> None:
        with self.lock:
            if self.chunks and self.chunks[0] is chunk:  # not dropped meanwhile
                self.chunks[0] = replace(chunk, features=features)

    def _close_chunk(self) -> None:
        frames, n = self._filling, self.commentary.frames_per_chunk
        frames = frames + [frames[-1]] * (n - len(frames))
        self.chunks.append(Chunk(self._filling_index, tuple(frames), tuple(self._queries)))
        self._last_index = self._filling_index
        self._filling, self._queries = [], []

    def _check_in_order(self, timestamp: float) -> None:
        check_open(self.failure, self.closed)
        check_not_before(timestamp, self._last_frame_time)


def _pixels(frame, size) -> torch.Tensor:
    """`frame` (image bytes, a tensor, array or PIL image) sized by the FrameFormat `size`."""
    from liveserve.video import VideoError, decode_image_bytes, fit_frame

    try:
        if isinstance(frame, (bytes, bytearray, memoryview)):
            return decode_image_bytes(bytes(frame), size)
        return fit_frame(frame, size)
    except (ValueError, VideoError, TypeError) as exc:
        raise SessionError(f"bad frame image: {exc}") from exc


def _sized_as(pixels: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    from liveserve.video import scale_to

    return scale_to(pixels, *first.shape[1:])
