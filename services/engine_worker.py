"""A BatchEngine driven by its own thread, with each session's events delivered to an asyncio queue.

The engine's step loop is synchronous and compute-bound, so it runs on a dedicated thread (sleeping in
`wait_for_work` when idle), while gRPC handlers live on an asyncio loop. Pushes go straight into the
engine (thread-safe); events come back through `loop.call_soon_threadsafe` into the session's queue.
A session's queue ends with None once the session is closed; closing on the client's behalf happens on
the engine thread, so the event loop never waits for a step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from liveserve.config import SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import Event
from liveserve.engine.inputs import SessionError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineWorker:
    def __init__(self, engine: BatchEngine, idle_wait_s: float = 0.05,
                 on_step: Callable[[BatchEngine], None] | None = None) -> None:
        """`on_step`: called on the engine thread after each step (metrics); its errors are logged."""
        self.engine, self.idle_wait_s, self.on_step = engine, idle_wait_s, on_step
        self._subscribers: dict[str, _Subscriber] = {}
        self._closing: dict[str, float] = {}  # session id -> deadline (time.monotonic) for its drain
        self._lock = threading.Lock()  # guards the two tables above
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def open(self, session_id: str, config: SessionConfig, events: asyncio.Queue,
             loop: asyncio.AbstractEventLoop) -> None:
        """Admit a session (raises PoolFullError / SessionError); its events go to `events` on `loop`.
        May wait for a step in progress: call it off the event loop."""
        with self._lock:
            self.engine.open(session_id, config)
            self._subscribers[session_id] = _Subscriber(loop, events)

    def push_frame(self, session_id: str, timestamp: float, frame) -> None:
        self.engine.push_frame(session_id, timestamp, frame)

    def push_query(self, session_id: str, timestamp: float, text: str) -> None:
        self.engine.push_query(session_id, timestamp, text)

    def close_when_drained(self, session_id: str, timeout_s: float) -> None:
        """Close the session once everything it was sent has been decided (replies included), or after
        `timeout_s` (0: at once). Never blocks: the engine thread closes it between steps, after
        delivering that step's events, so the queue's end marker (None) always follows the last event."""
        with self._lock:
            if session_id in self._subscribers:
                deadline = time.monotonic() + timeout_s
                self._closing[session_id] = min(deadline, self._closing.get(session_id, deadline))

    def close(self, session_id: str) -> None:
        """Close the session now (its memory returns to the pool) and end its event queue."""
        with self._lock:
            subscriber = self._subscribers.pop(session_id, None)
            self._closing.pop(session_id, None)
        try:
            self.engine.close(session_id)
        finally:
            if subscriber is not None:
                subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for session_id in list(self._subscribers):
            self.close(session_id)
        self.engine.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.engine.wait_for_work(self.idle_wait_s):
                    self._deliver(self.engine.step())
                    if self.on_step is not None:
                        self.on_step(self.engine)
                self._close_drained()
            except Exception:  # keep serving the other sessions; the step itself fails sessions it must
                log.exception("engine step failed")

    def _close_drained(self) -> None:
        with self._lock:
            closing = list(self._closing.items())
        now = time.monotonic()
        for session_id, deadline in closing:
            try:
                session = self.engine.session(session_id)
            except SessionError:  # closed meanwhile by another path
                continue
            # an external reply still being written counts as work: its text is appended before close
            drained = session.closed or not (session.backlog or session.ready() or session.awaiting_reply)
            if drained or now >= deadline:
                if not drained:
                    log.info("session %s closed with input still queued (client gone or drain timed out)",
                             session_id)
                self.close(session_id)

    def _deliver(self, events: list[tuple[str, Event]]) -> None:
        with self._lock:
            for session_id, event in events:
                subscriber = self._subscribers.get(session_id)
                if subscriber is not None:
                    subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, event)
