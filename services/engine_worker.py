"""A BatchEngine driven by its own thread, with each session's events delivered to an asyncio queue.

The engine's step loop is synchronous and compute-bound, so it runs on a dedicated thread (sleeping in
`wait_for_work` when idle), while gRPC handlers live on an asyncio loop. Pushes go straight into the
engine (thread-safe); events come back through `loop.call_soon_threadsafe` into the session's queue.
A session's queue ends with None once the session is closed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from liveserve.config import SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import Event

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineWorker:
    def __init__(self, engine: BatchEngine, idle_wait_s: float = 0.05) -> None:
        self.engine, self.idle_wait_s = engine, idle_wait_s
        self._subscribers: dict[str, _Subscriber] = {}
        self._lock = threading.Lock()  # guards the subscriber table
        # Held across a step *and* the delivery of its events, so `drained` never sees a session done
        # while its last events are still on their way (its queue's end marker would overtake them).
        self._step_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def open(self, session_id: str, config: SessionConfig, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Admit a session (raises PoolFullError / SessionError) and return the queue its events arrive on."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.open(session_id, config)
            self._subscribers[session_id] = _Subscriber(loop, queue)
        return queue

    def push_frame(self, session_id: str, timestamp: float, frame) -> None:
        self.engine.push_frame(session_id, timestamp, frame)

    def push_query(self, session_id: str, timestamp: float, text: str) -> None:
        self.engine.push_query(session_id, timestamp, text)

    def close(self, session_id: str) -> None:
        """Close the session now (its memory returns to the pool) and end its event queue."""
        with self._lock:
            subscriber = self._subscribers.pop(session_id, None)
        try:
            self.engine.close(session_id)
        finally:
            if subscriber is not None:
                subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, None)

    def drained(self, session_id: str) -> bool:
        """Whether the session has nothing queued or in progress (all its input has been decided)."""
        with self._step_lock:
            session = self.engine.session(session_id)
            return session.closed or (not session.backlog and not session.ready())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for session_id in list(self._subscribers):
            self.close(session_id)
        self.engine.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.engine.wait_for_work(self.idle_wait_s):
                    continue
                with self._step_lock:
                    self._deliver(self.engine.step())
            except Exception:  # keep serving the other sessions; the step itself fails sessions it must
                log.exception("engine step failed")

    def _deliver(self, events: list[tuple[str, Event]]) -> None:
        with self._lock:
            for session_id, event in events:
                subscriber = self._subscribers.get(session_id)
                if subscriber is not None:
                    subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, event)
