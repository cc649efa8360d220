"""A session's event relay at the Gateway: what Decision and Reaction report for it, out to its client.

Events are dispatched by type (`FROM_DECISION`, `FROM_REACTION`: a table per source, one handler per
event class of contracts.py; a test checks that none is missing). A Decision becomes the client's
Decision, its lag measured from the frame's receipt here. When Decision requests a reply, the relay sends
Reaction the frames decided since its last sync and the trigger; the reply streams straight back here and
on to the client, and its text goes to Decision for its cache. Decided frames are kept (features
included) only until Reaction has them, and the last cache window of them to rebuild the session
elsewhere (recovery.py). A commentary session's Decision writes what it says itself: those
replies come with Decision's events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
from opentelemetry.trace import Span, Status, StatusCode

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import SessionConfig
from liveserve.engine.inputs import AwaitedReply
from liveserve.services.gateway.session.context import ClientChannel, GatewayContext, Placement
from liveserve.services.gateway.session.inputs import StreamInputs
from liveserve.services.observability.tracing import carried, extract
from liveserve.services.wire import contracts as c
from liveserve.services.wire.codec import ACTIONS, FINISH, TRIGGERS

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Reply:
    trigger: c.Trigger
    timestamp: float
    query: str
    requested: float  # time.monotonic() the request reached the gateway
    span: Span
    first: float | None = None  # first token at the gateway
    active: float = field(default_factory=time.monotonic)  # last sign of life, for the reply watchdog


class EventRelay:
    def __init__(self, gateway: GatewayContext, where: Placement, client: ClientChannel, inputs: StreamInputs,
                 config: SessionConfig, finish: Callable[[grpc.StatusCode, str], None], tenant=None) -> None:
        """`finish(code, details)`: ends the call (StreamSession.finish). `tenant`: the TenantUsage its
        replies count against."""
        self.gateway, self.where, self.client, self.inputs = gateway, where, client, inputs
        self.config, self.tenant, self._finish = config, tenant, finish
        self.reply: _Reply | None = None
        self.shutdown_reason = ""  # the server drains: the call ends UNAVAILABLE with this, once all is decided
        self._said_at = 0.0  # commentary: stream time of the chunk being said
        self._unsynced: list[c.FrameFeatures] = []  # decided frames Reaction has not seen
        self._synced = 0
        # The latest decided frames, kept to rebuild the session if its Decision replica goes away.
        self._ring: deque[c.FrameFeatures] = deque(maxlen=config.cache.window_frames)
        self._late_reply: tuple[str, tuple[int, ...]] | None = None  # a reply that finished while moving
        self._counted = [0, 0, 0]  # frames decided, dropped, replies: this call's, for SessionClosed after a move
        self._carried = (0, 0, 0)  # ... what earlier replicas counted (SessionClosed counts on the last one)
        self._last_decided_trace: c.Trace = c.NO_TRACE
        self._unwritten: tuple | None = None  # the last trigger told "no reply": told once, however often asked

    # ---- dispatch by type -----------------------------------------------------------------------------------

    def on_decision_event(self, event: c.DecisionEvent) -> None:
        self._dispatch(self.FROM_DECISION, event, "decision")

    def on_reaction_event(self, event: c.ReactionEvent) -> None:
        self._dispatch(self.FROM_REACTION, event, "reaction")

    def _dispatch(self, handlers: dict[type, Callable[[EventRelay, Any], None]], event, source: str) -> None:
        handler = handlers.get(type(event))
        if handler is None:  # a replica of another version: said, never silently dropped
            log.error("session %s: no handler for a %s from its %s replica", self.where.session_id,
                      type(event).__name__, source)
            return
        handler(self, event)

    # ---- Decision's events ----------------------------------------------------------------------------------

    def _decision(self, event: c.Decision) -> None:
        frame = self.inputs.decided(event.frame_id)
        lag = time.monotonic() - frame.received if frame is not None else 0.0
        self.gateway.metrics.frame_to_decision.observe(lag)
        self._counted[0] += 1
        self.client.send(pb.ServerMessage(decision=pb.Decision(
            timestamp=event.timestamp, frame_index=event.frame_id, p_silent=event.p_silent, fired=event.fired,
            action=ACTIONS[event.action], lag_s=lag)))
        self._last_decided_trace = event.trace
        if frame is None:
            return
        frame.span.set_attributes({"liveserve.fired": event.fired, "liveserve.p_silent": event.p_silent})
        frame.span.end()
        decided = c.FrameFeatures(self.where.session_id, 0, frame.frame_id, frame.timestamp, frame.features)
        if self.config.mode == "live":  # commentary sessions are not rebuilt elsewhere: their pixels are not kept
            self._ring.append(decided)
        if self.where.reaction is not None:
            self._unsynced.append(decided)
            if self.reply is None and len(self._unsynced) >= self.gateway.settings.reaction_sync_frames:
                self.sync_reaction()

    def _frames_dropped(self, event: c.FramesDropped) -> None:
        frames = list(zip(event.frame_ids, event.timestamps))
        self._counted[1] += len(frames)
        for frame_id, _ in frames:
            frame = self.inputs.decided(frame_id)
            if frame is not None:
                frame.span.set_attribute("liveserve.dropped", True)
                frame.span.end()
        self.client.warn(pb.WARNING_CODE_FRAME_DROPPED, event.reason, frames)

    def _refused(self, event: c.Refused) -> None:
        code = {"frame": pb.WARNING_CODE_BAD_FRAME, "query": pb.WARNING_CODE_BAD_QUERY}.get(event.input)
        if code is None:
            log.warning("session %s: decision refused a %s: %s", self.where.session_id, event.input, event.message)
            return
        frame = self.inputs.decided(event.frame_id)
        if frame is not None:
            frame.span.set_status(Status(StatusCode.ERROR, event.message))
            frame.span.end()
        self.client.warn(code, event.message, [(event.frame_id, frame.timestamp)] if frame is not None else ())

    def _session_closed(self, event: c.SessionClosed) -> None:
        """Decision closed the session (its memory is free); once Reaction has closed it too, the call ends:
        SessionClosed means the session holds nothing anywhere."""
        self.where.ended = True
        closing = self.close_reaction()
        self.gateway.keep(asyncio.get_running_loop().create_task(self._end_after(closing, event)))

    async def _end_after(self, closing: asyncio.Future | None, event: c.SessionClosed) -> None:
        if closing is not None:
            try:
                await asyncio.wait_for(closing, self.gateway.settings.call_timeout_s)
            except asyncio.TimeoutError:
                log.warning("session %s: its reaction replica did not confirm the close", self.where.session_id)
        if event.code:
            self._finish(_status(event.code), event.message)
            return
        if self.shutdown_reason:  # everything sent was decided; the client should reopen elsewhere
            self._finish(grpc.StatusCode.UNAVAILABLE, self.shutdown_reason)
            return
        self.inputs.report_over_rate()  # before the end of the stream: SessionClosed is its last message
        decided, dropped, responses = self._carried
        self.client.send(pb.ServerMessage(closed=pb.SessionClosed(
            frames_decided=decided + event.frames_decided,
            frames_dropped=dropped + event.frames_dropped + self.inputs.dropped,
            responses=responses + event.responses)))
        self._finish(grpc.StatusCode.OK, "")

    # ---- a commentary session's turns, written by Decision itself ---------------------------------------------

    def _said_started(self, event: c.ResponseStarted) -> None:
        self._said_at = event.timestamp
        self.client.send(pb.ServerMessage(response_started=pb.ResponseStarted(
            timestamp=event.timestamp, trigger=TRIGGERS[event.trigger], query=event.query)))

    def _said_delta(self, event: c.ResponseDelta) -> None:
        self.client.send(pb.ServerMessage(response_delta=pb.ResponseDelta(
            timestamp=self._said_at, text=event.text, token_times=[time.time()] * event.num_tokens)))

    def _said_done(self, event: c.ResponseDone) -> None:
        self._counted[2] += 1
        self.gateway.metrics.ttft.observe(event.ttft_s)
        self.client.send(pb.ServerMessage(response_done=pb.ResponseDone(
            timestamp=self._said_at, trigger=pb.TRIGGER_COMMENTARY, text=event.text, num_tokens=event.num_tokens,
            finish_reason=FINISH[event.finish_reason], ttft_s=event.ttft_s, duration_s=event.duration_s)))

    # ---- replies written by Reaction ----------------------------------------------------------------------------

    def _reply_requested(self, event: c.ReplyRequested) -> None:
        where = self.where
        if where.reaction is None or self.reply is not None:
            log.warning("session %s: a reply was asked for while %s", where.session_id,
                        "none can be written" if where.reaction is None else "another is being written")
            return
        if where.reaction_moving:  # not written; Decision goes on as if the trigger had been silent
            self._not_written(event, f"no reply at {event.timestamp:.3f}s: the session's reply writer is moving to "
                                     f"another replica")
            return
        if event.trigger == c.Trigger.QUERY:
            self.inputs.answered(event.timestamp)
        if self.tenant is not None and not self.tenant.take_reply():  # not written; Decision goes on without it
            what = f"the query {event.query!r}" if event.trigger == c.Trigger.QUERY else "the frame's trigger"
            self._not_written(event, f"no reply at {event.timestamp:.3f}s to {what}: tenant {self.tenant.tenant!r} is "
                                     f"at its quota of {self.tenant.quota.replies_per_min} replies a minute "
                                     f"(replies_per_min)")
            return
        parent = extract(event.trace or self._last_decided_trace)
        span = self.gateway.tracer.start_span("reply", context=parent,
                                              attributes={"liveserve.session_id": where.session_id,
                                                          "liveserve.trigger": str(event.trigger)})
        self.reply = _Reply(event.trigger, event.timestamp, event.query, time.monotonic(), span)
        self.sync_reaction()
        where.reaction_link().send(c.Respond(where.session_id, event.trigger, event.timestamp, event.query,
                                             carried(span)))

    def _not_written(self, event: c.ReplyRequested, message: str) -> None:
        """Decision goes on without this reply. A trigger Decision asks about again (seen while a Reaction
        replica was replaced) gets its answer again, but the client is told once."""
        trigger = (event.trigger, event.timestamp, event.query)
        if trigger != self._unwritten:
            self._unwritten = trigger
            self.client.warn(pb.WARNING_CODE_UNSPECIFIED, message)
        self.where.hand_back("")

    def _response_started(self, event: c.ResponseStarted) -> None:
        if (reply := self._alive()) is not None:
            self.client.send(pb.ServerMessage(response_started=pb.ResponseStarted(
                timestamp=reply.timestamp, trigger=TRIGGERS[reply.trigger], query=reply.query)))

    def _response_delta(self, event: c.ResponseDelta) -> None:
        if (reply := self._alive()) is None:
            return
        if reply.first is None:
            reply.first = reply.active
            self.gateway.metrics.ttft.observe(reply.first - reply.requested)
        self.client.send(pb.ServerMessage(response_delta=pb.ResponseDelta(
            timestamp=reply.timestamp, text=event.text, token_times=[time.time()] * event.num_tokens)))

    def _response_done(self, event: c.ResponseDone) -> None:
        if (reply := self._alive()) is None:
            return
        now = reply.active
        first = reply.first if reply.first is not None else now
        self.client.send(pb.ServerMessage(response_done=pb.ResponseDone(
            timestamp=reply.timestamp, trigger=TRIGGERS[reply.trigger], text=event.text,
            num_tokens=event.num_tokens, finish_reason=FINISH[event.finish_reason], ttft_s=first - reply.requested,
            duration_s=now - reply.requested)))
        reply.span.set_attributes({"liveserve.tokens": event.num_tokens})
        self._reply_over(event.text, event.token_ids if self.where.pools.shared_tokenizer else ())

    def _response_failed(self, event: c.ResponseFailed) -> None:
        if self._alive() is not None:
            self.reply_failed(event.message)

    def _alive(self) -> _Reply | None:
        """The reply an event of Reaction's is about, marked alive now; None: a late event of a reply
        already given up on."""
        if self.reply is not None:
            self.reply.active = time.monotonic()
        return self.reply

    def reply_failed(self, message: str) -> None:
        reply = self.reply
        if reply is None:
            return
        reply.span.set_status(Status(StatusCode.ERROR, message))
        self.client.warn(pb.WARNING_CODE_UNSPECIFIED, f"the reply at {reply.timestamp:.3f}s failed: {message}")
        self._reply_over("")

    def give_up_if_stalled(self, now: float, timeout_s: float) -> None:
        """The reply watchdog: a reply that showed no sign of life for `timeout_s` fails (the session goes on)."""
        if self.reply is not None and now - self.reply.active > timeout_s:
            self.reply_failed(f"no word from Reaction for {timeout_s:g}s")

    def _reply_over(self, text: str, token_ids: tuple[int, ...] = ()) -> None:
        """Decision takes the reply into its cache (right after the trigger); "" means nothing to add."""
        self.reply.span.end()
        self.reply = None
        self._counted[2] += bool(text)
        if self.where.decision_moving:  # the new replica takes it once the session is there
            self._late_reply = (text, token_ids)
        else:
            self.where.hand_back(text, token_ids)
        if len(self._unsynced) >= self.gateway.settings.reaction_sync_frames:
            self.sync_reaction()

    def sync_reaction(self) -> None:
        if not self._unsynced or self.where.reaction_moving:
            return
        frames, self._unsynced = tuple(self._unsynced), []
        self.where.reaction_link().send(c.SyncFrames(self.where.session_id, self._synced, frames))
        self._synced += len(frames)

    def close_reaction(self) -> asyncio.Future | None:
        """Free the session's reply cache; the future resolves once Reaction applied it."""
        where = self.where
        if where.reaction is None or where.reaction_moving:  # moving: the recovery closes what it placed
            return None
        closing = where.reaction_link().send_acknowledged(c.CloseSession(where.session_id, where.reaction.epoch, False))
        where.reaction = None
        return closing

    FROM_DECISION: ClassVar[dict[type, Callable[[EventRelay, Any], None]]] = {
        c.Decision: _decision, c.FramesDropped: _frames_dropped, c.ReplyRequested: _reply_requested,
        c.Refused: _refused, c.SessionClosed: _session_closed, c.ResponseStarted: _said_started,
        c.ResponseDelta: _said_delta, c.ResponseDone: _said_done}
    FROM_REACTION: ClassVar[dict[type, Callable[[EventRelay, Any], None]]] = {
        c.ResponseStarted: _response_started, c.ResponseDelta: _response_delta, c.ResponseDone: _response_done,
        c.ResponseFailed: _response_failed}

    # ---- what a moved or resumed session is rebuilt from ---------------------------------------------------------

    @property
    def kept_frames(self) -> tuple[c.FrameFeatures, ...]:
        """The decided frames kept to rebuild the session elsewhere (its cache window)."""
        return tuple(self._ring)

    def awaited_reply(self) -> AwaitedReply | None:
        """The reply being written, for a new Decision replica to wait for."""
        return AwaitedReply(self.reply.timestamp, self.reply.query or None) if self.reply is not None else None

    def keep(self, frames: tuple[c.FrameFeatures, ...]) -> None:
        """A resumed session's frames: kept as if decided here, and synced to its new reply writer."""
        self._ring.extend(frames)
        self._unsynced = list(frames)

    def moved(self) -> None:
        """The session is on a new Decision replica: its counts start there again, and it takes the reply
        that finished during the move."""
        decided, dropped, responses = self._counted
        late = self._late_reply
        self._carried = (decided, dropped, responses - (late is not None and bool(late[0])))
        if late is not None:
            self._late_reply = None
            self.where.hand_back(*late)

    def new_writer(self) -> None:
        """The session has a new Reaction replica: it starts from the frames kept here."""
        self._synced, self._unsynced = 0, list(self._ring)
        self.sync_reaction()

    def end_spans(self) -> None:
        if self.reply is not None:
            self.reply.span.end()


def _status(code: int) -> grpc.StatusCode:
    return next((status for status in grpc.StatusCode if status.value[0] == code), grpc.StatusCode.INTERNAL)
