"""Batched perception: frames from all sessions are encoded together, in dynamic batches.

Pushing a frame decodes and resizes it on the caller's thread (so a corrupt image is reported to its
own sender at once) and `submit`s the pixels, which returns a Future of the frame's vision features.
The engine calls `encode_waiting` at the start of every step: everything that arrived since the last
step is encoded in batches of up to `max_batch_size`, so batches grow with load and a lone stream
waits for nobody. `max_wait_ms` > 0 lets a small batch wait that long for company (see
`worth_waiting`), which pays off where the tower's per-call cost dominates.

Where encoding runs (`PerceptionConfig.overlap`): on the CPU, on the engine's thread at the start of each
step, since two threads issuing torch ops fight over the same cores (the intra-op pool spins); on CUDA,
on a thread of its own with its own stream (`start`), so the vision tower overlaps the LM step instead
of delaying it, and the engine is woken once a batch's features are ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from liveserve.config import PerceptionConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PerceptionStats:
    batches: int = 0
    frames: int = 0
    max_batch: int = 0
    busy_s: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0


class BatchedFrameEncoder:
    def __init__(self, model, config: PerceptionConfig | None = None) -> None:
        if model.vision is None:
            raise ValueError(f"model {model.name!r} has no vision tower; sessions must send frame features")
        self.model, self.config = model, config or PerceptionConfig()
        self.stats = PerceptionStats()
        self._waiting: deque[tuple[float, torch.Tensor, Future]] = deque()
        self._lock = threading.Lock()
        overlap = self.config.overlap
        self.overlap = model.device.type == "cuda" if overlap is None else overlap
        self._arrived = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self, ready: Callable[[], None]) -> None:
        """With `overlap`: encode on a thread of its own from now on, calling `ready()` after each batch
        (the engine's wake-up). A no-op otherwise: the engine calls `encode_waiting` in its step."""
        if self.overlap and self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(ready,), name="perception", daemon=True)
            self._thread.start()

    def _run(self, ready: Callable[[], None]) -> None:
        stream = torch.cuda.Stream(self.model.device) if self.model.device.type == "cuda" else None
        while True:
            with self._lock:
                while not self._closed and (not self._waiting or self._wait_s() > 0):
                    self._arrived.wait(self._wait_s() if self._waiting else None)
                if self._closed:
                    return
            try:
                if stream is None:
                    self.encode_waiting()
                else:
                    engine_stream = torch.cuda.default_stream(self.model.device)

                    def hand_over(features: torch.Tensor) -> None:
                        stream.synchronize()  # the features are complete before the engine's step reads them
                        features.record_stream(engine_stream)  # not reused while that step may still read them

                    with torch.cuda.stream(stream):
                        self.encode_waiting(before_results=hand_over)
            except Exception:  # encode_waiting fails frames itself; anything else must not end the thread
                log.exception("the perception thread's batch failed")
            ready()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, pixels: torch.Tensor) -> Future:
        """uint8 [3, S, S] -> Future of features [tokens_per_frame, vision_hidden]. Thread-safe."""
        future: Future = Future()
        with self._lock:
            self._waiting.append((time.monotonic(), pixels, future))
            self._arrived.notify()
        return future

    def worth_waiting(self) -> float:
        """Seconds a small batch should still wait for more frames (0: encode now)."""
        with self._lock:
            return self._wait_s()

    def _wait_s(self) -> float:  # under the lock
        if not self._waiting or len(self._waiting) >= self.config.max_batch_size:
            return 0.0
        return max(0.0, self._waiting[0][0] + self.config.max_wait_ms / 1000 - time.monotonic())

    def encode_waiting(self, before_results: Callable[[torch.Tensor], None] | None = None) -> int:
        """Encode every waiting frame (cancelled ones, from dropped frames, are skipped); returns how many.
        `before_results(features)`: called before a batch's features are handed out (a side stream's
        hand-over to the engine's)."""
        done = 0
        while batch := self._take(self.config.max_batch_size):
            started = time.perf_counter()
            try:
                features = self.model.encode_frames(torch.stack([pixels for pixels, _ in batch]))
            except Exception as exc:  # the frames' sessions see the error; the engine goes on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            if before_results is not None:
                before_results(features)
            for (_, future), row in zip(batch, features):
                future.set_result(row)
            stats = self.stats
            stats.batches += 1
            stats.frames += len(batch)
            stats.max_batch = max(stats.max_batch, len(batch))
            stats.busy_s += time.perf_counter() - started
            done += len(batch)
        return done

    def _take(self, limit: int) -> list[tuple[torch.Tensor, Future]]:
        batch = []
        with self._lock:
            while self._waiting and len(batch) < limit:
                _, pixels, future = self._waiting.popleft()
                if future.set_running_or_notify_cancel():
                    batch.append((pixels, future))
        return batch

    def close(self) -> None:
        """Stop the thread (if any) and fail frames still waiting, so nothing hangs on them."""
        with self._lock:
            self._closed = True
            self._arrived.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for _, future in self._take(len(self._waiting) + 1):
            future.set_exception(RuntimeError("the frame encoder was closed before this frame was encoded"))
