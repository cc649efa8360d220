"""One client's session at the Gateway: its parts, and the end of its call.

`inputs` (inputs.py) takes the client's frames, queries and Close on to Decision in order;
`relay` (event_relay.py) takes what Decision and Reaction report on to the client; `recovery`
(recovery.py) rebuilds the session when a replica goes away or a broken call resumes. They share
`where` (its replicas) and `client` (its half of the call), and see of the gateway only its
`GatewayContext` (context.py).
"""

from __future__ import annotations

import grpc
from opentelemetry import context as otel_context

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import SessionConfig
from liveserve.services.gateway.session.event_relay import EventRelay
from liveserve.services.gateway.model_pools import ModelPools
from liveserve.services.gateway.resume import Parked, new_token
from liveserve.services.gateway.session.context import ClientChannel, Finish, GatewayContext, Placement
from liveserve.services.gateway.session.inputs import StreamInputs
from liveserve.services.gateway.session.recovery import SessionRecovery
from liveserve.services.wire import contracts as c
from liveserve.services.wire.codec import limits_to_proto


class StreamSession:
    def __init__(self, gateway: GatewayContext, pools: ModelPools, session_id: str, config: SessionConfig,
                 placed: c.SessionPlaced, reaction: c.SessionPlaced | None, trace_parent: otel_context.Context,
                 fps: float, tenant=None, resumed: Parked | None = None) -> None:
        """`pools`: its model's (model_pools.py). `reaction`: None for a decisions-only or commentary session.
        `tenant`: the TenantUsage (tenants.py) its frames and replies count against. `resumed`: the parked
        session this call resumes (resume.py)."""
        self.session_id, self.config, self.tenant = session_id, config, tenant
        self.where = Placement(pools, session_id, placed, reaction)
        self.client = ClientChannel(gateway.metrics)
        self.inputs = StreamInputs(gateway, self.where, self.client, config, trace_parent, fps, tenant)
        self.relay = EventRelay(gateway, self.where, self.client, self.inputs, config, self.finish, tenant)
        self.recovery = SessionRecovery(gateway, self.where, self.client, self.inputs, self.relay, config,
                                        self.finish)
        self.resume_token, self.resume_digest = new_token() if gateway.resumable else ("", "")
        if resumed is not None:
            self.recovery.resume(resumed)

    @property
    def pools(self) -> ModelPools:
        return self.where.pools

    @property
    def finished(self) -> bool:
        """The client's call has its final status."""
        return self.client.finished

    @property
    def ended(self) -> bool:
        """Decision closed the session (its memory is free)."""
        return self.where.ended

    def opened(self, client_session_id: str, max_frame_bytes: int) -> pb.ServerMessage:
        """What the client is told first: the session's id, its limits and where its numbering starts."""
        limits = limits_to_proto(self.where.decision.limits)
        limits.max_frame_bytes = max_frame_bytes  # the gateway's own limit
        return pb.ServerMessage(opened=pb.SessionOpened(
            session_id=self.session_id, client_session_id=client_session_id, limits=limits,
            resume_token=self.resume_token, next_frame_index=self.inputs.next_frame_id))

    def parked(self) -> Parked:
        """What resuming the session needs, should its client come back (resume.py). Frames received but not
        decided when the call broke are gone with it, so the resumed call takes frames from the last decided
        one's time on: a client sends those frames again without their being refused as out of order."""
        kept = self.relay.kept_frames
        return Parked(self.session_id, self.tenant.tenant if self.tenant is not None else "", self.pools.name,
                      self.inputs.next_frame_id, kept[-1].timestamp if kept else 0.0, kept)

    def shut_down(self, reason: str) -> None:
        """The server drains: take no more input, have what was sent decided, then end with `reason`."""
        self.relay.shutdown_reason = reason
        self.inputs.receive_close(drain=True)

    def abandon(self) -> None:
        """The call is over (the client went away, or the call failed) before Decision ended the session:
        free it everywhere now. A no-op once Decision has ended it."""
        where = self.where
        if not where.decision_moving and not where.ended:  # moving: the recovery closes what it placed
            where.ended = True
            where.decision_link().send(c.CloseSession(self.session_id, where.decision.epoch, False))
        self.relay.close_reaction()
        self.finish(grpc.StatusCode.CANCELLED, "the client went away")

    def finish(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        if self.client.finished:
            return
        self.inputs.report_over_rate()
        self.inputs.end_spans()
        self.relay.end_spans()
        self.client.end(Finish(code, details))
        self.inputs.room.set()  # a reader waiting for room must see the end
