"""How a Gateway batches its hops: one Perception call per tick, one push per tick and replica, one event
stream per replica.

`FrameBatcher` collects the frames every session of the gateway sent during a tick (`tick_ms` after the
first one) and encodes them with one Perception call; an idle stream is delayed by at most one tick.
It goes sooner once `max_frames` wait, or once every session that is open has a frame in the batch
(no other session could join it, so waiting would only add latency). At most `max_calls` calls are
in flight: when Perception falls behind, frames collect into fuller batches instead of piling up as
ever more calls (the frames that then fall too far behind are dropped by Decision, and reported). An
image that is costly to decode (perception.service.is_heavy) goes in a call of its own, one such call at a
time, so the frames of a tick never wait for another client's decompression bomb. A call
that fails is tried again (Perception is stateless; another replica takes it) before its frames fail. `ReplicaLink` is the gateway's connection to one Decision or Reaction
replica: commands of all sessions on that replica go out together, one push at a time (a push that is
in flight is the next one's batching window, and keeps the replica's view of each session in order),
at most one per `interval_s` while busy (an idle link pushes at once), and one long-lived stream
brings back every event for those sessions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable

from liveserve.services.perception.service import is_heavy
from liveserve.services.wire.contracts import EncodeRequest, EncodeResult, FrameImage

log = logging.getLogger(__name__)
RETRY_S = (0.05, 1.0)  # backoff before a Perception call is tried again: first, most (doubling between)


class FrameBatcher:
    def __init__(self, perception, *, tick_s: float, max_frames: int, timeout_s: float,
                 done: Callable[[list[tuple[FrameImage, object]], EncodeResult | None, str], None],
                 senders: Callable[[], int], max_calls: int = 4, on_batch: Callable[[int], None] | None = None,
                 attempts: int = 8) -> None:
        """`done(batch, result, error)` gets each batch back: its (frame, owner) pairs and the result, or
        None and why the call failed. `senders()`: how many sessions could send a frame now. `attempts`:
        tries of a call that fails (within `timeout_s`), about 4 s of backoff for 8: long enough for the
        pool to route around a replica that died, or to replace its only one."""
        self.perception, self.tick_s, self.max_frames, self.timeout_s = perception, tick_s, max_frames, timeout_s
        self.max_calls, self.attempts = max_calls, attempts
        self._done, self._senders, self._on_batch = done, senders, on_batch
        self._batch: list[tuple[FrameImage, object]] = []
        self._owners: set[int] = set()  # id() of the sessions with a frame in the batch
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task] = set()
        self._heavy: deque[tuple[FrameImage, object]] = deque()  # heavy images, each to go in a call of its own
        self._heavy_call: asyncio.Task | None = None

    def add(self, frame: FrameImage, owner) -> None:
        if is_heavy(frame.image):
            self._heavy.append((frame, owner))
            self._send_heavy()
            return
        self._batch.append((frame, owner))
        self._owners.add(id(owner))
        if len(self._batch) >= self.max_frames or len(self._owners) >= self._senders():
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.tick_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # With max_calls in flight, what collects goes out when one of them ends.
        while self._batch and len(self._calls) < self.max_calls and not self.closed:
            batch, self._batch = self._batch[:self.max_frames], self._batch[self.max_frames:]
            self._owners = {id(owner) for _, owner in self._batch}
            task = asyncio.get_running_loop().create_task(self._encode(batch))
            self._calls.add(task)
            task.add_done_callback(self._call_ended)

    def _send_heavy(self, ended: asyncio.Task | None = None) -> None:
        if ended is not None:
            self._heavy_call = None
        if self._heavy and self._heavy_call is None and not self.closed:
            self._heavy_call = asyncio.get_running_loop().create_task(self._encode([self._heavy.popleft()]))
            self._heavy_call.add_done_callback(self._send_heavy)

    def _call_ended(self, task: asyncio.Task) -> None:
        self._calls.discard(task)
        if self._batch and self._timer is None:
            self.flush()

    async def _encode(self, batch: list[tuple[FrameImage, object]]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        request = EncodeRequest(tuple(frame for frame, _ in batch))
        deadline = time.monotonic() + self.timeout_s
        backoff = RETRY_S[0]
        for attempt in range(1, self.attempts + 1):
            try:
                result = await asyncio.wait_for(self.perception.encode(request), deadline - time.monotonic())
            except asyncio.TimeoutError:
                self._done(batch, None, f"encoding took longer than {self.timeout_s:g}s")
                return
            except Exception as exc:
                # Perception holds no state: a call that failed (e.g. its replica died) may go to another
                # replica, the pool routes around the dead one.
                log.warning("a Perception call for %d frames failed (attempt %d of %d)", len(batch), attempt,
                            self.attempts, exc_info=attempt == 1)
                if attempt == self.attempts or time.monotonic() + backoff >= deadline:
                    self._done(batch, None, f"encoding failed: {type(exc).__name__}")
                    return
                await asyncio.sleep(backoff)
                backoff = min(RETRY_S[1], 2 * backoff)
                continue
            self._done(batch, result, "")
            return

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in [*self._calls, *([self._heavy_call] if self._heavy_call else [])]:
            task.cancel()


class ReplicaLink:
    def __init__(self, service, replica: str, gateway_id: str, *, make_push: Callable[[str, tuple], object],
                 dispatch: Callable[[object], None], failed: Callable[[ReplicaLink, str], None], timeout_s: float,
                 interval_s: float = 0.0, heartbeat_s: float | None = None,
                 on_push: Callable[[int], None] | None = None, name: str = "replica") -> None:
        """`heartbeat_s`: an idle link pushes nothing this often, so the replica knows the gateway is alive
        (it frees a silent gateway's sessions)."""
        self.service, self.replica, self.gateway_id, self.name = service, replica, gateway_id, name
        self._make_push, self._dispatch, self._failed, self._on_push = make_push, dispatch, failed, on_push
        self.timeout_s, self.interval_s, self.heartbeat_s = timeout_s, interval_s, heartbeat_s
        self.closed = False
        self._commands: list = []
        self._acks: list[tuple[int, asyncio.Future]] = []  # (its number among commands sent, its future)
        self._queued = 0  # commands ever sent
        self._applied = 0  # commands in pushes the replica acknowledged
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._push_loop()), loop.create_task(self._event_loop())]

    def send(self, command) -> None:
        if not self.closed:
            self._commands.append(command)
            self._queued += 1
            self._wake.set()

    def send_acknowledged(self, command) -> asyncio.Future:
        """Send `command`; the future resolves once the replica has applied the push that carried it (True),
        or the link failed (False)."""
        future = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(False)
            return future
        self.send(command)
        self._acks.append((self._queued, future))
        return future

    async def _push_loop(self) -> None:
        sent = 0.0  # time.monotonic() of the last push
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
                except asyncio.TimeoutError:  # idle: an empty push says this gateway is still here
                    await asyncio.wait_for(self.service.push(self.replica, self._make_push(self.gateway_id, ())),
                                           self.timeout_s)
                    continue
                self._wake.clear()
                while self._commands:
                    if (wait := sent + self.interval_s - time.monotonic()) > 0:
                        await asyncio.sleep(wait)  # busy: let more commands join this push
                    sent = time.monotonic()
                    batch, self._commands = tuple(self._commands), []
                    if self._on_push is not None:
                        self._on_push(len(batch))
                    await asyncio.wait_for(self.service.push(self.replica, self._make_push(self.gateway_id, batch)),
                                           self.timeout_s)
                    self._applied += len(batch)
                    while self._acks and self._acks[0][0] <= self._applied:
                        self._acks.pop(0)[1].set_result(True)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self._fail(f"the {self.name} replica did not take a push within {self.timeout_s:g}s")
        except Exception as exc:
            log.warning("pushing to %s replica %s failed", self.name, self.replica, exc_info=True)
            self._fail(f"the session's {self.name} replica failed ({type(exc).__name__})")

    async def _event_loop(self) -> None:
        try:
            async for batch in self.service.events(self.replica, self.gateway_id):
                for event in batch.events:
                    self._dispatch(event)
            self._fail(f"the {self.name} replica ended its event stream")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("events from %s replica %s failed", self.name, self.replica, exc_info=True)
            self._fail(f"the session's {self.name} replica failed ({type(exc).__name__})")

    def _fail(self, message: str) -> None:
        if self.closed:
            return
        self.close()
        self._failed(self, message)

    def close(self) -> None:
        self.closed = True
        for _, future in self._acks:
            if not future.done():
                future.set_result(False)
        self._acks.clear()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
