"""The input side of a LIVE session: what callers push, validated on their thread before anything changes
and queued in stream-time order. The step state machine (session.py) takes its work from here.

Thread-safe: callers push while the engine steps. `lock` is the session's one lock: it also guards the
few fields of the state machine that another thread touches (an external reply handed back), so a
decision about what to step next sees the queues and that state at one instant.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import replace

from liveserve.config import SessionConfig
from liveserve.engine.inputs import (QueuedFrame, QueuedQuery, SessionError, SubmitFrame, as_frame, check_frame_id,
                                     check_not_before, check_open, check_time)


class SessionInputs:
    def __init__(self, model, config: SessionConfig, encoder: SubmitFrame | None) -> None:
        self.model, self.config, self.encoder = model, config, encoder
        self.lock = threading.Lock()
        self.frames: deque[QueuedFrame] = deque()
        self.queries: deque[QueuedQuery] = deque()
        self.last_frame_time = -float("inf")
        self.frames_pushed = 0
        self.frames_dropped = 0
        self.closed = False
        self.failure: str | None = None

    # ---- pushes (any thread) ----------------------------------------------------------------------------

    def push_frame(self, timestamp: float, frame, frame_id: int | None = None) -> None:
        timestamp = check_time(timestamp, "frame")
        frame_id = check_frame_id(frame_id)
        with self.lock:  # refuse early and cheaply, before decoding
            self._check_in_order(timestamp)
        item = as_frame(self.model, timestamp, frame, self.encoder)
        with self.lock:
            self._check_in_order(timestamp)
            self.last_frame_time = timestamp
            self.frames.append(replace(item, frame_id=self.frames_pushed if frame_id is None else frame_id))
            self.frames_pushed += 1

    def push_query(self, timestamp: float, text: str) -> None:
        timestamp = check_time(timestamp, "query")
        if self.config.replies == "none":
            raise SessionError("this session reports decisions only; queries are not answered")
        if not isinstance(text, str) or not text.strip():
            raise SessionError("query text is empty")
        n = len(self.model.template.encode(text))
        if n > self.config.max_query_tokens:
            raise SessionError(f"query is {n} tokens; the limit is {self.config.max_query_tokens}")
        with self.lock:
            self.check_open()
            self.queries.append(QueuedQuery(timestamp, time.monotonic(), text.strip()))

    def push_respond(self, timestamp: float) -> None:
        timestamp = check_time(timestamp, "trigger")
        if self.config.replies != "on_request":
            raise SessionError(f"push_respond needs replies='on_request'; this session's is {self.config.replies!r}")
        with self.lock:
            self.check_open()
            if self.last_frame_time == -float("inf"):
                raise SessionError("a proactive reply needs at least one frame first")
            self.queries.append(QueuedQuery(timestamp, time.monotonic(), None))

    def drop_stale(self, max_lag_s: float | None, max_queued: int) -> list[QueuedFrame]:
        """Drop the oldest queued frames while more than `max_queued` wait or they span more than
        `max_lag_s` of stream time (the newest frame always stays). Returns the dropped frames."""
        dropped = []
        with self.lock:
            frames = self.frames
            while len(frames) > 1 and (len(frames) > max_queued or (
                    max_lag_s is not None and frames[-1].timestamp - frames[0].timestamp > max_lag_s)):
                frame = frames.popleft()
                if isinstance(frame.features, Future):
                    frame.features.cancel()  # spare the encoder work nobody will read
                dropped.append(frame)
        self.frames_dropped += len(dropped)
        return dropped

    # ---- taking work (the stepping thread; the caller holds `lock`) ------------------------------------

    def next_item(self, replying_elsewhere: bool, frame_room: bool) -> QueuedFrame | QueuedQuery | None:
        """What comes next in stream time: a query before the first frame later than it. While a reply is
        written elsewhere queries wait for it, and frames go on only while `frame_room` (the frames decided
        meanwhile are computed again after the reply, so they are bounded)."""
        if replying_elsewhere:
            return self.frames[0] if self.frames and frame_room else None
        if self.queries and (not self.frames or self.queries[0].timestamp < self.frames[0].timestamp):
            return self.queries[0]
        return self.frames[0] if self.frames else None

    def take(self, item: QueuedFrame | QueuedQuery) -> None:
        """Remove `item`, the one `next_item` returned."""
        (self.queries if isinstance(item, QueuedQuery) else self.frames).popleft()

    def query_by(self, timestamp: float) -> QueuedQuery | None:
        """Take the first queued query if it was asked at or before `timestamp`: it pre-empts the decision
        of the frame at that time."""
        if self.queries and self.queries[0].timestamp <= timestamp:
            return self.queries.popleft()
        return None

    def resume_after(self, timestamp: float, frame_id: int) -> None:
        """A restored session's frames went up to `timestamp` / `frame_id`: new ones must follow them."""
        self.last_frame_time, self.frames_pushed = timestamp, frame_id + 1

    @property
    def empty(self) -> bool:
        return not self.frames and not self.queries

    # ---- state ------------------------------------------------------------------------------------------

    def check_open(self) -> None:
        check_open(self.failure, self.closed)

    def close(self, failure: str | None = None) -> None:
        """No more input: later pushes are refused (with `failure`, when the session failed)."""
        with self.lock:
            self.closed = True
            self.failure = self.failure or failure
            self.frames.clear()
            self.queries.clear()

    def _check_in_order(self, timestamp: float) -> None:
        self.check_open()
        check_not_before(timestamp, self.last_frame_time)
