"""A BatchEngine driven by its own thread, handing each step's events to an asyncio loop in one call.

The engine's step loop is synchronous and compute-bound, so it runs on a dedicated thread (sleeping in
`wait_for_work` when idle) while the service lives on an asyncio loop. Pushes go straight into the
engine (thread-safe). Every step's events reach the loop as one `deliver(events)` call, and a closed
session as `ended(session_id, session)` after its last events: both travel through
`loop.call_soon_threadsafe`, so they arrive in the order they happened. Closing on a caller's behalf
happens on the engine thread, between steps, so the loop never waits for a forward.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Callable

from liveserve.config import SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import Event
from liveserve.engine.inputs import SessionError
from liveserve.engine.live.session import Session

log = logging.getLogger(__name__)

Deliver = Callable[[list[tuple[str, Event]]], None]
Ended = Callable[[str, Session], None]


class EngineWorker:
    def __init__(self, engine: BatchEngine, loop: asyncio.AbstractEventLoop, deliver: Deliver, ended: Ended, *,
                 idle_wait_s: float = 0.05, on_step: Callable[[BatchEngine], None] | None = None,
                 name: str = "engine-loop", nice: int = 0) -> None:
        """`deliver` and `ended` run on `loop`; `on_step` on the engine thread after each step (metrics).
        `nice` > 0 lowers the engine thread's CPU priority (Linux): where it shares cores with more urgent
        work, that work goes first."""
        self.engine, self.loop, self.idle_wait_s, self.on_step = engine, loop, idle_wait_s, on_step
        self.nice = nice
        self._deliver_on_loop, self._ended_on_loop = deliver, ended
        self._closing: dict[str, float] = {}  # session id -> deadline (time.monotonic) for its drain
        self._lock = threading.Lock()  # guards _closing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def open(self, session_id: str, config: SessionConfig) -> Session:
        """Admit a session (raises PoolFullError / SessionError). May wait for a step in progress: call it
        off the event loop."""
        return self.engine.open(session_id, config)

    def close_when_drained(self, session_id: str, timeout_s: float) -> None:
        """Close the session once everything it was sent has been decided (an awaited reply included), or
        after `timeout_s` (0: at once). Never blocks: the engine thread closes it between steps, after
        delivering that step's events."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            self._closing[session_id] = min(deadline, self._closing.get(session_id, deadline))
        self.engine.wake()  # a drained session may have no work left to wake the loop

    def close(self, session_id: str) -> None:
        """Close the session now (its memory returns to the pool); `ended` follows on the loop."""
        with self._lock:
            self._closing.pop(session_id, None)
        try:
            session = self.engine.session(session_id)
        except SessionError:
            return  # closed already
        self.engine.close(session_id)
        if not self.loop.is_closed():  # at shutdown nobody is left to tell
            self.loop.call_soon_threadsafe(self._ended_on_loop, session_id, session)

    def stop(self) -> None:
        self._stop.set()
        self.engine.wake()
        self._thread.join(timeout=10)
        for session in self.engine.sessions:
            self.close(session.session_id)
        self.engine.shutdown()

    def _run(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            try:  # a Linux thread is its own task: this lowers this thread only
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
            except OSError:
                log.info("could not lower the priority of %s", self._thread.name)
        while not self._stop.is_set():
            try:
                if self.engine.wait_for_work(self.idle_wait_s):
                    events = self.engine.step()
                    if events:
                        self.loop.call_soon_threadsafe(self._deliver_on_loop, events)
                    if self.on_step is not None:
                        self.on_step(self.engine)
                self._close_drained()
            except RuntimeError as exc:
                if self.loop.is_closed():  # the service is shutting down
                    return
                log.exception("engine step failed: %s", exc)
            except Exception:  # keep serving the other sessions; the step itself fails sessions it must
                log.exception("engine step failed")

    def _close_drained(self) -> None:
        with self._lock:
            if not self._closing:
                return
            closing = list(self._closing.items())
        now = time.monotonic()
        for session_id, deadline in closing:
            try:
                session = self.engine.session(session_id)
            except SessionError:  # closed meanwhile by another path
                with self._lock:
                    self._closing.pop(session_id, None)
                continue
            # an awaited reply counts as work: its text is appended before close
            drained = session.closed or not (session.backlog or session.ready() or session.awaiting_reply)
            if drained or now >= deadline:
                if not drained:
                    log.info("session %s closed with input still queued (client gone or drain timed out)",
                             session_id)
                self.close(session_id)
