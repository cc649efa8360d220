"""A session's recovery at the Gateway: rebuilt on another replica when its own goes away, or rebuilt for a
call that resumes it after the client's connection broke.

Decision: the session opens on another replica from the frames the relay kept and the turns in the
registry (services/decision/recovery.py); the inputs it had not answered are sent again, nothing lost.
Reaction: its reply in progress fails (Decision goes on) and a new writer starts from the kept frames.
Resumed: numbering and time go on where the broken call left them. The client is told each time
(SESSION_RECOVERED).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import SessionConfig
from liveserve.services.gateway.session.event_relay import EventRelay
from liveserve.services.gateway.resume import Parked
from liveserve.services.gateway.session.context import ClientChannel, GatewayContext, Placement
from liveserve.services.gateway.session.inputs import StreamInputs
from liveserve.services.wire import contracts as c


class SessionRecovery:
    def __init__(self, gateway: GatewayContext, where: Placement, client: ClientChannel, inputs: StreamInputs,
                 relay: EventRelay, config: SessionConfig, finish: Callable[[grpc.StatusCode, str], None]) -> None:
        self.gateway, self.where, self.client, self.inputs, self.relay = gateway, where, client, inputs, relay
        self.config, self._finish = config, finish
        self.recoveries = 0

    def resume(self, parked: Parked) -> None:
        """This call resumes `parked`, whose Decision session was just rebuilt (`restored_turns` turns)."""
        self.inputs.next_frame_id, self.inputs.last_timestamp = parked.next_frame, parked.last_timestamp
        self.relay.keep(parked.frames)  # the reply writer is new: it gets them before its first reply
        self.gateway.metrics.recoveries.inc()
        self.client.warn(pb.WARNING_CODE_SESSION_RECOVERED,
                         f"resumed: the session was rebuilt from its last {len(parked.frames)} frame(s)"
                         f"{'' if parked.frames else ' (another gateway kept them, or they expired)'} and "
                         f"{self.where.decision.restored_turns} turn(s) of conversation; frames not decided before "
                         f"the connection broke were not kept: send those from {parked.last_timestamp:.3f}s on "
                         f"again; the next frame gets index {parked.next_frame}")

    # ---- moving to another Decision replica --------------------------------------------------------------------

    def recover(self, reason: str) -> None:
        """The session's Decision replica died or drains: rebuild the session on another one from the frames
        kept here and the turns in the registry, send the frames it had not decided again, and go on. The
        client is told (SESSION_RECOVERED); inputs wait meanwhile."""
        where = self.where
        if self.client.finished or where.ended or where.decision_moving:
            return
        where.decision_moving = True
        self.gateway.keep(asyncio.get_running_loop().create_task(self._recover(reason)))

    async def _recover(self, reason: str) -> None:
        started = time.monotonic()
        where = self.where
        awaited = self.relay.awaited_reply()
        frames = self.relay.kept_frames
        request = c.OpenSession(where.session_id, self.gateway.gateway_id, self.config, c.Restore(frames, awaited))
        try:
            placed = await self.gateway.place(where.pools.decision, request, where.decision.replica)
        except Exception as exc:
            details = getattr(exc, "details", type(exc).__name__)
            where.ended = True  # nothing is left anywhere to close
            self._finish(grpc.StatusCode.UNAVAILABLE, f"{reason}; the session could not be moved: {details}")
            return
        if self.client.finished:  # the client went away meanwhile
            where.pools.decision_link(placed.replica).send(c.CloseSession(where.session_id, placed.epoch, False))
            return
        where.decision, where.decision_moving = placed, False
        self.recoveries += 1
        self.relay.moved()
        resent = self.inputs.resend(where.decision_link(), placed.epoch)
        self.inputs.release()
        took = time.monotonic() - started
        self.gateway.metrics.recoveries.inc()
        self.client.warn(pb.WARNING_CODE_SESSION_RECOVERED,
                         f"{reason}; the session moved to another decision replica in {took:.2f}s, rebuilt from its "
                         f"last {len(frames)} frame(s) and {placed.restored_turns} turn(s) of conversation"
                         f"{'; the reply in progress goes on' if awaited is not None else ''}; {resent} frame(s) "
                         f"it had not decided were sent again, none lost")

    # ---- moving to another Reaction replica --------------------------------------------------------------------

    def recover_reaction(self, reason: str) -> None:
        """The session's Reaction replica died or drains: its reply in progress fails (Decision goes on), and
        the session gets a reply writer on another replica, given the frames kept here. Replies written there
        see those frames, not the conversation before them."""
        where = self.where
        if self.client.finished or where.reaction is None or where.reaction_moving:
            return
        where.reaction_moving = True
        self.relay.reply_failed(reason)
        self.gateway.keep(asyncio.get_running_loop().create_task(self._recover_reaction(reason)))

    async def _recover_reaction(self, reason: str) -> None:
        started = time.monotonic()
        where = self.where
        try:
            placed = await self.gateway.place(where.pools.reaction,
                                              c.OpenSession(where.session_id, self.gateway.gateway_id, self.config),
                                              where.reaction.replica)
        except Exception as exc:
            where.reaction = None  # nothing is left there to close
            self._finish(grpc.StatusCode.UNAVAILABLE,
                         f"{reason}; the session's reply writer could not be moved: {getattr(exc, 'details', exc)}")
            return
        if self.client.finished:  # the client went away meanwhile
            where.pools.reaction_link(placed.replica).send(c.CloseSession(where.session_id, placed.epoch, False))
            return
        where.reaction, where.reaction_moving = placed, False
        self.relay.new_writer()
        self.gateway.metrics.recoveries.inc()
        self.client.warn(pb.WARNING_CODE_SESSION_RECOVERED,
                         f"{reason}; replies are written on another replica from {time.monotonic() - started:.2f}s "
                         f"on, seeing the last {len(self.relay.kept_frames)} frame(s) but not the conversation "
                         f"before them")
