"""What the parts of a gateway session (stream_session.py) share: the little they need of the gateway, the
client's half of the call, and where the session lives.

A session's input side (inputs.py), its event relay (event_relay.py) and its recovery (recovery.py)
each get these, never the Gateway itself: `GatewayContext` is all of the gateway a session may use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc
from opentelemetry.trace import Tracer

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.gateway.links import ReplicaLink
from liveserve.services.gateway.model_pools import ModelPools
from liveserve.services.observability.telemetry import GatewayMetrics
from liveserve.services.settings import ServiceSettings
from liveserve.services.wire import contracts as c


@dataclass(frozen=True, slots=True)
class GatewayContext:
    """What a session needs of its gateway."""

    gateway_id: str
    settings: ServiceSettings
    metrics: GatewayMetrics
    tracer: Tracer
    # Open a session on a replica of a pool with room, `avoid`ing one (Gateway.place: retried; raises CallFailed).
    place: Callable[[object, c.OpenSession, str], Awaitable[c.SessionPlaced]]
    keep: Callable[[asyncio.Task], None]  # holds a background task until it is done
    resumable: bool  # the gateway keeps session records: calls get resume tokens


@dataclass(slots=True)
class Finish:
    """The end of the call: its status (OK after SessionClosed) and details."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


class ClientChannel:
    """The client's half of the call: the messages that go out to it, in order, then its final status."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.out: asyncio.Queue[pb.ServerMessage | Finish] = asyncio.Queue()
        self.finished = False  # the call has its final status: nothing more goes out

    def send(self, message: pb.ServerMessage) -> None:
        self.out.put_nowait(message)

    def warn(self, code: int, message: str, frames: Iterable[tuple[int, float]] = ()) -> None:
        """A Warning about `frames`, (frame index, timestamp) pairs; the session goes on."""
        frames = list(frames)
        self.metrics.warnings.inc(tags={"code": pb.WarningCode.Name(code)})
        self.send(pb.ServerMessage(warning=pb.Warning(
            code=code, message=message, timestamps=[t for _, t in frames], frame_indexes=[i for i, _ in frames])))

    def end(self, finish: Finish) -> None:
        self.finished = True
        self.out.put_nowait(finish)


@dataclass(slots=True)
class Placement:
    """Where the session lives: its Decision replica, its Reaction replica (None: decisions only, or a
    commentary session, whose Decision writes what it says), and whether either is moving."""

    pools: ModelPools  # its model's pools, and this gateway's links to their replicas
    session_id: str
    decision: c.SessionPlaced
    reaction: c.SessionPlaced | None
    decision_moving: bool = False  # moving to another Decision replica: inputs wait
    reaction_moving: bool = False  # moving to another Reaction replica: no reply can be written
    ended: bool = False  # Decision closed the session (its memory there is free)

    def decision_link(self) -> ReplicaLink:
        return self.pools.decision_link(self.decision.replica)

    def reaction_link(self) -> ReplicaLink:
        return self.pools.reaction_link(self.reaction.replica)

    def hand_back(self, text: str, token_ids: tuple[int, ...] = ()) -> None:
        """Decision takes a reply's text into its cache ("": the reply failed, or was not written)."""
        self.decision_link().send(c.ReplyText(self.session_id, self.decision.epoch, text, token_ids))
