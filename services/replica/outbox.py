"""Events on their way from a replica to the gateways that own its sessions.

A replica keeps one outbox per gateway. Whatever collected since the gateway's stream last read goes
out as one batch (under load: many sessions' decisions, or many reply tokens, per hop instead of one
each). A busy stream sends at most one batch per `interval_s`; an idle one sends at once, so the
pacing adds latency only when there is company to batch with. Events wait in the outbox until the gateway's stream attaches, so none is lost between a
session's placement and the gateway opening its stream. When a gateway's stream ends (the gateway
went away or was restarted), `gone` is called so the replica can close that gateway's sessions.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from liveserve.services.wire.contracts import EventBatch


@dataclass(slots=True)
class _Outbox:
    events: list = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    readers: int = 0


class Outboxes:
    def __init__(self, gone: Callable[[str], None], merge: Callable[[list], list] | None = None,
                 interval_s: float = 0.0) -> None:
        """`merge` may coalesce a batch before it goes out (e.g. consecutive reply deltas of a session)."""
        self._boxes: dict[str, _Outbox] = {}
        self._gone, self._merge, self.interval_s = gone, merge, interval_s
        self._departed: set[str] = set()  # gateways whose stream ended: nobody will read their events

    def put(self, gateway_id: str, event) -> None:
        if gateway_id in self._departed:
            return
        box = self._boxes.setdefault(gateway_id, _Outbox())
        box.events.append(event)
        box.ready.set()

    async def stream(self, gateway_id: str) -> AsyncIterator[EventBatch]:
        self._departed.discard(gateway_id)  # the gateway reconnected
        box = self._boxes.setdefault(gateway_id, _Outbox())
        box.readers += 1
        sent = 0.0  # time.monotonic() of the last batch
        try:
            while True:
                await box.ready.wait()
                if (wait := sent + self.interval_s - time.monotonic()) > 0:
                    await asyncio.sleep(wait)  # busy: let more events join this batch
                box.ready.clear()
                if box.events:
                    events, box.events = box.events, []
                    sent = time.monotonic()
                    yield EventBatch(tuple(self._merge(events) if self._merge else events))
        finally:
            box.readers -= 1
            if not box.readers:
                self._boxes.pop(gateway_id, None)
                self._departed.add(gateway_id)
                self._gone(gateway_id)


class GatewayLeases:
    """Which gateways are still there: each push renews its gateway's lease (an idle gateway pushes an empty
    one every few seconds). A gateway silent for `ttl_s` is gone, even if its event stream never ended
    (a process killed outright ends nothing), and `expire` frees its sessions."""

    def __init__(self, ttl_s: float, expire: Callable[[str], None]) -> None:
        self.ttl_s, self._expire = ttl_s, expire
        self._seen: dict[str, float] = {}

    def renew(self, gateway_id: str) -> None:
        self._seen[gateway_id] = time.monotonic()

    def forget(self, gateway_id: str) -> None:
        self._seen.pop(gateway_id, None)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl_s / 4))
            deadline = time.monotonic() - self.ttl_s
            for gateway_id, seen in list(self._seen.items()):
                if seen < deadline:
                    del self._seen[gateway_id]
                    self._expire(gateway_id)
