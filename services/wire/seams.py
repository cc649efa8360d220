"""The seams the Gateway talks through, and their two transports.

`Perception`, `Decision` and `Reaction` are Protocols over the dataclasses of contracts.py. In one
process (`serve --local`) the services are plain objects and the calls are plain method calls: nothing
is serialized. On Ray (`serve`) the calls go through Serve deployment handles carrying the internal
protobuf contracts (codec.py); `replica` routes a call to the replica holding the session
(routing.SessionRouter). The Gateway is the same code either way.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from liveserve.services.wire import codec
from liveserve.services.wire.contracts import (DecisionPush, EncodeRequest, EncodeResult, EventBatch, OpenSession,
                                          ReactionPush, SessionPlaced)


class Perception(Protocol):
    async def encode(self, request: EncodeRequest) -> EncodeResult: ...

    async def ping(self) -> None: ...  # raises when the pool cannot serve


class Decision(Protocol):
    async def ping(self) -> None: ...  # raises when the pool cannot serve (Decision: its Redis too)

    # `avoid`: a replica not to place the session on, unless it is the only one (a session moving off it)
    async def open(self, request: OpenSession, avoid: str = "") -> SessionPlaced: ...

    async def push(self, replica: str, push: DecisionPush) -> None: ...

    def events(self, replica: str, gateway_id: str) -> AsyncIterator[EventBatch]: ...


class Reaction(Protocol):
    async def ping(self) -> None: ...

    async def open(self, request: OpenSession, avoid: str = "") -> SessionPlaced: ...

    async def push(self, replica: str, push: ReactionPush) -> None: ...

    def events(self, replica: str, gateway_id: str) -> AsyncIterator[EventBatch]: ...


# ---- in one process --------------------------------------------------------------------------------------

class LocalPerception:
    def __init__(self, encoder) -> None:
        self.encoder = encoder  # perception.FrameEncoder

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        return await self.encoder.encode(request)

    async def ping(self) -> None:
        pass


class LocalSessions:
    """Decision or Reaction in this process: one replica, the service object itself."""

    def __init__(self, service) -> None:
        self.service = service  # decision.DecisionService or reaction.ReactionService

    async def ping(self) -> None:
        await self.service.ping()

    async def open(self, request: OpenSession, avoid: str = "") -> SessionPlaced:
        return await self.service.open(request)  # one replica: nowhere else to go

    async def push(self, replica: str, push) -> None:
        await self.service.push(push)

    def events(self, replica: str, gateway_id: str) -> AsyncIterator[EventBatch]:
        return self.service.events(gateway_id)


# ---- over Ray Serve handles --------------------------------------------------------------------------------

class RayPerception:
    def __init__(self, handle) -> None:
        self.handle = handle

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        response = await self.handle.Encode.remote(codec.encode_request_to_proto(request))
        return codec.encode_result_from_proto(response)

    async def ping(self) -> None:
        await self.handle.Ping.remote()


class RaySessions:
    """Decision or Reaction deployments: `to_proto` / `from_proto` convert that service's pushes and events."""

    def __init__(self, handle, push_to_proto, events_from_proto) -> None:
        self.handle, self._push_to_proto, self._events_from_proto = handle, push_to_proto, events_from_proto

    async def ping(self) -> None:
        await self.handle.Ping.remote()

    async def open(self, request: OpenSession, avoid: str = "") -> SessionPlaced:
        response = await self.handle.Open.remote(codec.open_to_proto(request), avoid=avoid)
        return codec.placed_from_proto(request.session_id, response)

    async def push(self, replica: str, push) -> None:
        await self.handle.Push.remote(self._push_to_proto(push), route_to=replica)

    async def events(self, replica: str, gateway_id: str) -> AsyncIterator[EventBatch]:
        from liveserve.internal.v2 import session_pb2

        stream = self.handle.options(stream=True).Events.remote(session_pb2.EventsRequest(gateway_id=gateway_id),
                                                                route_to=replica)
        try:
            async for message in stream:
                yield self._events_from_proto(message)
        finally:
            stream.cancel()  # the replica learns the gateway stopped listening (and closes its sessions)


def ray_decision(handle) -> RaySessions:
    return RaySessions(handle, codec.decision_push_to_proto, codec.decision_events_from_proto)


def ray_reaction(handle) -> RaySessions:
    return RaySessions(handle, codec.reaction_push_to_proto, codec.reaction_events_from_proto)
