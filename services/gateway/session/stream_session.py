"""One client's session at the Gateway: its inputs on their way to the services, and what comes back.

Inputs keep the client's order on their way to Decision: a frame waits at the head of `pending` until
Perception has encoded it (frames of other sessions do not wait for it), queries and Close wait behind
the frames sent before them. Each frame is numbered as the client sent it (`frame_index`), so nothing is
keyed by timestamp. A frame's latency is measured here, receipt to decision, on this host's clock.

Replies: when Decision wants one, the session sends Reaction the frames decided since its last sync and
the trigger; the reply streams straight back here and on to the client, and its text goes to Decision
for its cache. Decided frames are kept (features included) only until Reaction has them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import torch
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import SessionConfig
from liveserve.engine.inputs import AwaitedReply
from liveserve.services.wire import contracts as c
from liveserve.services.wire.codec import ACTIONS, FINISH, TRIGGERS
from liveserve.services.security.rate_limit import IngressLimit
from liveserve.services.gateway.resume import Parked, new_token
from liveserve.services.observability.tracing import carried, extract

log = logging.getLogger(__name__)
BACKLOG = 64  # inputs waiting at the gateway before the session stops reading its client (flow control)


@dataclass(slots=True)
class Finish:
    """The end of the call: its status (OK after SessionClosed) and details."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


@dataclass(slots=True)
class _Frame:
    frame_id: int
    timestamp: float
    received: float  # time.monotonic() at receipt
    span: Span
    features: torch.Tensor | None = None
    failed: bool = False  # could not be encoded: skipped, the client was warned


@dataclass(frozen=True, slots=True)
class _Query:
    timestamp: float
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class _Close:
    drain: bool


@dataclass(slots=True)
class _Reply:
    trigger: c.Trigger
    timestamp: float
    query: str
    wanted: float  # time.monotonic() the request reached the gateway
    span: Span
    first: float | None = None  # first token at the gateway
    active: float = field(default_factory=time.monotonic)  # last sign of life, for the reply watchdog


class StreamSession:
    def __init__(self, gateway, pools, session_id: str, config: SessionConfig, placed: c.SessionPlaced,
                 reaction: c.SessionPlaced | None, trace_parent: otel_context.Context, fps: float,
                 tenant=None, resumed: Parked | None = None) -> None:
        """`pools`: its model's (model_pools.py). `tenant`: the TenantUsage (tenants.py) its frames and replies
        count against. `resumed`: the parked session this call resumes (services/gateway/resume.py)."""
        self.gateway, self.pools, self.session_id, self.config, self.fps = gateway, pools, session_id, config, fps
        self.tenant = tenant
        self.placed, self.reaction = placed, reaction  # reaction: None for a decisions-only session
        self.trace_parent = trace_parent
        self.out: asyncio.Queue[pb.ServerMessage | Finish] = asyncio.Queue()
        self.finished = False  # the client's call has its final status
        self.ended = False  # Decision closed the session (its memory is free)
        self.closing = False  # Close is on its way to Decision: no more input
        self.shutdown_reason = ""  # the server drains: the call ends UNAVAILABLE with this, once all is decided
        self.next_frame_id = 0
        self.last_timestamp = -1.0
        self._pending: deque[_Frame | _Query | _Close] = deque()
        self._encoding: dict[int, _Frame] = {}  # frames sent to Perception, by id
        self._undecided: dict[int, _Frame] = {}  # frames sent to Decision, by id
        self._unsynced: list[c.FrameFeatures] = []  # decided frames Reaction has not seen
        self._synced = 0
        # The latest decided frames, kept to rebuild the session if its Decision replica goes away.
        self._ring: deque[c.FrameFeatures] = deque(maxlen=config.cache.window_frames)
        self._asked: list[_Query] = []  # queries sent to Decision that no reply has answered yet
        self._close_sent: _Close | None = None
        self.recovering = False  # moving to another Decision replica: inputs wait
        self.reaction_moving = False  # moving to another Reaction replica: no reply can be written
        self._late_reply: tuple[str, tuple[int, ...]] | None = None  # a reply that finished while moving
        self.recoveries = 0
        self._counted = [0, 0, 0]  # frames decided, dropped, replies: this call's, for SessionClosed after a move
        self._carried = (0, 0, 0)  # ... what earlier replicas counted (SessionEnded counts on the last one)
        self._last_decided_trace: c.Trace = c.NO_TRACE
        self.resume_token, self.resume_digest = new_token() if gateway.resumes.enabled else ("", "")
        if resumed is not None:  # numbering and time go on where the broken call left them
            self.next_frame_id, self.last_timestamp = resumed.next_frame, resumed.last_timestamp
            self._ring.extend(resumed.frames)
            self._unsynced = list(resumed.frames)  # the reply writer is new: it gets them before its first reply
        self.reply: _Reply | None = None
        self._said_at = 0.0  # commentary: stream time of the chunk being said
        self.room = asyncio.Event()
        self.room.set()
        rate = gateway.settings.ingress_factor * fps
        self._ingress = IngressLimit(rate, max(8.0, 2 * rate))  # two seconds of burst at the allowed rate
        self._over_rate: list[tuple[int, float]] = []  # frames refused for the rate, reported once a second
        self._over_quota: list[tuple[int, float]] = []  # frames refused for the tenant's frames_per_s
        self.rate_dropped = 0
        self.unencoded = 0  # frames dropped because Perception could not be reached

    # ---- from the client --------------------------------------------------------------------------------

    def receive_frame(self, frame: pb.Frame) -> None:
        if self.closing:
            return
        frame_id = self.next_frame_id
        self.next_frame_id += 1
        problem = self._check_frame(frame)
        if problem:
            self.warn(pb.WARNING_CODE_BAD_FRAME, problem, [(frame_id, frame.timestamp)])
            return
        stream_ok = self._ingress.take()
        if not stream_ok or (self.tenant is not None and not self.tenant.take_frame()):
            if not self._over_rate and not self._over_quota:
                asyncio.get_running_loop().call_later(1.0, self._report_over_rate)
            (self._over_rate if not stream_ok else self._over_quota).append((frame_id, frame.timestamp))
            self.rate_dropped += 1
            return
        self.last_timestamp = frame.timestamp
        gateway = self.gateway
        span = gateway.tracer.start_span("frame", context=self.trace_parent,
                                         attributes={"liveserve.session_id": self.session_id,
                                                     "liveserve.frame_timestamp": frame.timestamp})
        item = _Frame(frame_id, frame.timestamp, time.monotonic(), span)
        self._pending.append(item)
        self._encoding[frame_id] = item
        self.pools.batcher.add(c.FrameImage(self.session_id, frame_id, frame.timestamp, frame.image, carried(span)), self)
        self._update_room()

    def _report_over_rate(self) -> None:
        if self._over_rate and not self.finished:
            frames, self._over_rate = self._over_rate, []
            limit = self.gateway.settings.ingress_factor * self.fps
            self.warn(pb.WARNING_CODE_FRAME_DROPPED, f"{len(frames)} frame(s) dropped: the stream sent frames faster "
                                                     f"than {limit:g} a second ({self.gateway.settings.ingress_factor:g}x "
                                                     f"its declared fps of {self.fps:g})", frames)
        if self._over_quota and not self.finished:
            frames, self._over_quota = self._over_quota, []
            quota = self.tenant.quota.frames_per_s  # None once an operator lifted it since
            self.warn(pb.WARNING_CODE_FRAME_DROPPED, f"{len(frames)} frame(s) dropped: tenant {self.tenant.tenant!r} "
                                                     f"sent frames faster than its quota of "
                                                     f"{quota if quota is None else format(quota, 'g')} a second "
                                                     f"(frames_per_s)", frames)

    def _check_frame(self, frame: pb.Frame) -> str:
        limit = self.gateway.settings.max_frame_bytes
        if not math.isfinite(frame.timestamp) or frame.timestamp < 0:
            return f"frame timestamp must be finite and >= 0, got {frame.timestamp!r}"
        if len(frame.image) > limit:
            return f"frame at {frame.timestamp:.3f}s is {len(frame.image)} bytes; the limit is {limit}"
        if frame.timestamp < self.last_timestamp:
            return (f"frame timestamp {frame.timestamp:.3f}s is before the previous frame's "
                    f"{self.last_timestamp:.3f}s; timestamps must not go backwards")
        return ""

    def receive_query(self, query: pb.Query) -> None:
        if self.closing:
            return
        if self.reaction is None and self.config.mode == "live":
            self.warn(pb.WARNING_CODE_BAD_QUERY, "this session reports decisions only; queries are not answered")
            return
        if not query.text.strip():
            self.warn(pb.WARNING_CODE_BAD_QUERY, "query text is empty")
            return
        span = self.gateway.tracer.start_span("query", context=self.trace_parent,
                                              attributes={"liveserve.session_id": self.session_id,
                                                          "liveserve.query_timestamp": query.timestamp})
        self._pending.append(_Query(query.timestamp, query.text, span))
        self._release()

    def receive_close(self, drain: bool) -> None:
        if self.closing:
            return
        self.closing = True
        self._pending.append(_Close(drain))
        self._release()

    def shut_down(self, reason: str) -> None:
        """The server drains: take no more input, have what was sent decided, then end with `reason`."""
        self.shutdown_reason = reason
        self.receive_close(drain=True)

    # ---- Perception's answer ------------------------------------------------------------------------------

    def encoded(self, frame_id: int, features: torch.Tensor | None, error: str,
                code: int = pb.WARNING_CODE_BAD_FRAME) -> None:
        """Perception's answer for a frame: its features, or (None) why it has none, told the client as
        `code` (BAD_FRAME: the image; FRAME_DROPPED: Perception could not be reached)."""
        frame = self._encoding.pop(frame_id, None)
        if frame is None:
            return
        if features is None:
            frame.failed = True
            frame.span.set_status(Status(StatusCode.ERROR, error))
            frame.span.end()
            self.unencoded += code == pb.WARNING_CODE_FRAME_DROPPED
            self.warn(code, error, [(frame_id, frame.timestamp)])
        else:
            frame.features = features
        self._release()

    def _release(self) -> None:
        """Send Decision every input at the head of the queue that is ready, in the client's order."""
        if self.recovering or self.finished:
            return  # inputs wait for the session's new replica (or the call is over)
        decision = self.pools.decision_link(self.placed.replica)
        epoch = self.placed.epoch
        while self._pending:
            head = self._pending[0]
            if isinstance(head, _Frame):
                if head.features is None and not head.failed:
                    break  # still being encoded: later inputs wait behind it
                self._pending.popleft()
                if not head.failed:
                    self._undecided[head.frame_id] = head
                    decision.send(c.FrameFeatures(self.session_id, epoch, head.frame_id, head.timestamp,
                                                  head.features, carried(head.span)))
            elif isinstance(head, _Query):
                self._pending.popleft()
                self._asked.append(head)
                decision.send(c.QueryText(self.session_id, epoch, head.timestamp, head.text, carried(head.span)))
                head.span.end()
            else:
                self._pending.popleft()
                self._close_sent = head
                decision.send(c.CloseSession(self.session_id, epoch, head.drain))
        self._update_room()

    def _update_room(self) -> None:
        if len(self._pending) < BACKLOG:
            self.room.set()
        else:
            self.room.clear()

    # ---- Decision's events ----------------------------------------------------------------------------------

    def on_decision_event(self, event: c.DecisionEvent) -> None:
        if isinstance(event, c.Decision):
            self._decided(event)
        elif isinstance(event, c.FramesDropped):
            frames = [(frame_id, timestamp) for frame_id, timestamp in zip(event.frame_ids, event.timestamps)]
            self._counted[1] += len(frames)
            for frame_id, _ in frames:
                frame = self._undecided.pop(frame_id, None)
                if frame is not None:
                    frame.span.set_attribute("liveserve.dropped", True)
                    frame.span.end()
            self.warn(pb.WARNING_CODE_FRAME_DROPPED, event.reason, frames)
        elif isinstance(event, c.ReplyRequested):
            self._start_reply(event)
        elif isinstance(event, c.Refused):
            code = {"frame": pb.WARNING_CODE_BAD_FRAME, "query": pb.WARNING_CODE_BAD_QUERY}.get(event.input)
            if code is None:
                log.warning("session %s: decision refused a %s: %s", self.session_id, event.input, event.message)
                return
            frame = self._undecided.pop(event.frame_id, None)
            if frame is not None:
                frame.span.set_status(Status(StatusCode.ERROR, event.message))
                frame.span.end()
            self.warn(code, event.message, [(event.frame_id, frame.timestamp)] if frame is not None else ())
        elif isinstance(event, c.SessionClosed):
            self._ended(event)
        elif isinstance(event, (c.ResponseStarted, c.ResponseDelta, c.ResponseDone)):
            self._said(event)

    def _said(self, event: c.ResponseStarted | c.ResponseDelta | c.ResponseDone) -> None:
        """A commentary session's turn, written by Decision itself: streamed on to the client."""
        if isinstance(event, c.ResponseStarted):
            self._said_at = event.timestamp
            self.out.put_nowait(pb.ServerMessage(response_started=pb.ResponseStarted(
                timestamp=event.timestamp, trigger=TRIGGERS[event.trigger], query=event.query)))
        elif isinstance(event, c.ResponseDelta):
            self.out.put_nowait(pb.ServerMessage(response_delta=pb.ResponseDelta(
                timestamp=self._said_at, text=event.text, token_times=[time.time()] * event.num_tokens)))
        else:
            self._counted[2] += 1
            self.gateway.metrics.ttft.observe(event.ttft_s)
            self.out.put_nowait(pb.ServerMessage(response_done=pb.ResponseDone(
                timestamp=self._said_at, trigger=pb.TRIGGER_COMMENTARY, text=event.text, num_tokens=event.num_tokens,
                finish_reason=FINISH[event.finish_reason], ttft_s=event.ttft_s, duration_s=event.duration_s)))

    def _decided(self, event: c.Decision) -> None:
        gateway = self.gateway
        frame = self._undecided.pop(event.frame_id, None)
        lag = time.monotonic() - frame.received if frame is not None else 0.0
        gateway.metrics.frame_to_decision.observe(lag)
        self._counted[0] += 1
        self.out.put_nowait(pb.ServerMessage(decision=pb.Decision(
            timestamp=event.timestamp, frame_index=event.frame_id, p_silent=event.p_silent, fired=event.fired,
            action=ACTIONS[event.action], lag_s=lag)))
        self._last_decided_trace = event.trace
        if frame is None:
            return
        frame.span.set_attributes({"liveserve.fired": event.fired, "liveserve.p_silent": event.p_silent})
        frame.span.end()
        decided = c.FrameFeatures(self.session_id, 0, frame.frame_id, frame.timestamp, frame.features)
        if self.config.mode == "live":  # commentary sessions are not rebuilt elsewhere: their pixels are not kept
            self._ring.append(decided)
        if self.reaction is not None:
            self._unsynced.append(decided)
            if self.reply is None and len(self._unsynced) >= gateway.settings.reaction_sync_frames:
                self._sync_reaction()

    def _ended(self, event: c.SessionClosed) -> None:
        """Decision closed the session (its memory is free); once Reaction has closed it too, the call ends:
        SessionClosed means the session holds nothing anywhere."""
        self.ended = True
        closing = self._close_reaction()
        task = asyncio.get_running_loop().create_task(self._end_after(closing, event))
        self.gateway.keep(task)

    async def _end_after(self, closing: asyncio.Future | None, event: c.SessionClosed) -> None:
        if closing is not None:
            try:
                await asyncio.wait_for(closing, self.gateway.settings.call_timeout_s)
            except asyncio.TimeoutError:
                log.warning("session %s: its reaction replica did not confirm the close", self.session_id)
        if event.code:
            self.finish(_status(event.code), event.message)
            return
        if self.shutdown_reason:  # everything sent was decided; the client should reopen elsewhere
            self.finish(grpc.StatusCode.UNAVAILABLE, self.shutdown_reason)
            return
        self._report_over_rate()  # before the end of the stream: SessionClosed is its last message
        decided, dropped, responses = self._carried
        self.out.put_nowait(pb.ServerMessage(closed=pb.SessionClosed(
            frames_decided=decided + event.frames_decided,
            frames_dropped=dropped + event.frames_dropped + self.rate_dropped + self.unencoded,
            responses=responses + event.responses)))
        self.finish()

    # ---- replies ----------------------------------------------------------------------------------------------

    def _start_reply(self, event: c.ReplyRequested) -> None:
        if self.reaction is None or self.reply is not None:
            log.warning("session %s: a reply was asked for while %s", self.session_id,
                        "none can be written" if self.reaction is None else "another is being written")
            return
        if self.reaction_moving:  # not written; Decision goes on as if the trigger had been silent
            self.warn(pb.WARNING_CODE_UNSPECIFIED, f"no reply at {event.timestamp:.3f}s: the session's reply "
                                                   f"writer is moving to another replica")
            self.pools.decision_link(self.placed.replica).send(c.ReplyText(self.session_id, self.placed.epoch, "", ()))
            return
        if event.trigger == c.Trigger.QUERY:
            self._asked = [q for q in self._asked if q.timestamp != event.timestamp]
        if self.tenant is not None and not self.tenant.take_reply():  # not written; Decision goes on without it
            what = f"the query {event.query!r}" if event.trigger == c.Trigger.QUERY else "the frame's trigger"
            self.warn(pb.WARNING_CODE_UNSPECIFIED,
                      f"no reply at {event.timestamp:.3f}s to {what}: tenant {self.tenant.tenant!r} is at its "
                      f"quota of {self.tenant.quota.replies_per_min} replies a minute (replies_per_min)")
            self.pools.decision_link(self.placed.replica).send(
                c.ReplyText(self.session_id, self.placed.epoch, "", ()))
            return
        parent = extract(event.trace or self._last_decided_trace)
        span = self.gateway.tracer.start_span("reply", context=parent,
                                              attributes={"liveserve.session_id": self.session_id,
                                                          "liveserve.trigger": str(event.trigger)})
        self.reply = _Reply(event.trigger, event.timestamp, event.query, time.monotonic(), span)
        self._sync_reaction()
        self.pools.reaction_link(self.reaction.replica).send(
            c.Respond(self.session_id, event.trigger, event.timestamp, event.query, carried(span)))

    def _sync_reaction(self) -> None:
        if not self._unsynced or self.reaction_moving:
            return
        frames, self._unsynced = tuple(self._unsynced), []
        self.pools.reaction_link(self.reaction.replica).send(c.SyncFrames(self.session_id, self._synced, frames))
        self._synced += len(frames)

    def on_reaction_event(self, event: c.ReactionEvent) -> None:
        reply = self.reply
        if reply is None:
            return  # a late event of a reply already given up on
        now = time.monotonic()
        reply.active = now
        if isinstance(event, c.ResponseStarted):
            self.out.put_nowait(pb.ServerMessage(response_started=pb.ResponseStarted(
                timestamp=reply.timestamp, trigger=TRIGGERS[reply.trigger], query=reply.query)))
        elif isinstance(event, c.ResponseDelta):
            if reply.first is None:
                reply.first = now
                self.gateway.metrics.ttft.observe(now - reply.wanted)
            self.out.put_nowait(pb.ServerMessage(response_delta=pb.ResponseDelta(
                timestamp=reply.timestamp, text=event.text, token_times=[time.time()] * event.num_tokens)))
        elif isinstance(event, c.ResponseDone):
            first = reply.first if reply.first is not None else now
            self.out.put_nowait(pb.ServerMessage(response_done=pb.ResponseDone(
                timestamp=reply.timestamp, trigger=TRIGGERS[reply.trigger], text=event.text,
                num_tokens=event.num_tokens, finish_reason=FINISH[event.finish_reason], ttft_s=first - reply.wanted,
                duration_s=now - reply.wanted)))
            reply.span.set_attributes({"liveserve.tokens": event.num_tokens})
            self._reply_over(event.text, event.token_ids if self.pools.shared_tokenizer else ())
        elif isinstance(event, c.ResponseFailed):
            self.reply_failed(event.message)

    def reply_failed(self, message: str) -> None:
        reply = self.reply
        if reply is None:
            return
        reply.span.set_status(Status(StatusCode.ERROR, message))
        self.warn(pb.WARNING_CODE_UNSPECIFIED, f"the reply at {reply.timestamp:.3f}s failed: {message}")
        self._reply_over("")

    def _reply_over(self, text: str, token_ids: tuple[int, ...] = ()) -> None:
        """Decision takes the reply into its cache (right after the trigger); "" means nothing to add."""
        self.reply.span.end()
        self.reply = None
        self._counted[2] += bool(text)
        if self.recovering:  # the new replica takes it once the session is there
            self._late_reply = (text, token_ids)
        else:
            self.pools.decision_link(self.placed.replica).send(
                c.ReplyText(self.session_id, self.placed.epoch, text, token_ids))
        if len(self._unsynced) >= self.gateway.settings.reaction_sync_frames:
            self._sync_reaction()

    def _close_reaction(self) -> asyncio.Future | None:
        """Free the session's reply cache; the future resolves once Reaction applied it."""
        if self.reaction is None or self.reaction_moving:  # moving: `_recover_reaction` closes what it placed
            return None
        closing = self.pools.reaction_link(self.reaction.replica).send_acknowledged(
            c.CloseSession(self.session_id, self.reaction.epoch, False))
        self.reaction = None
        return closing

    @property
    def kept_frames(self) -> tuple[c.FrameFeatures, ...]:
        """The decided frames kept to rebuild the session elsewhere (its cache window)."""
        return tuple(self._ring)

    # ---- moving to another Decision replica --------------------------------------------------------------------

    def recover(self, reason: str) -> None:
        """The session's Decision replica died or drains: rebuild the session on another one from the frames
        kept here and the turns in the registry, send the frames it had not decided again, and go on. The
        client is told (SESSION_RECOVERED); inputs wait meanwhile."""
        if self.finished or self.ended or self.recovering:
            return
        self.recovering = True
        self.gateway.keep(asyncio.get_running_loop().create_task(self._recover(reason)))

    async def _recover(self, reason: str) -> None:
        started = time.monotonic()
        reply = self.reply
        awaited = AwaitedReply(reply.timestamp, reply.query or None) if reply is not None else None
        frames = tuple(self._ring)
        request = c.OpenSession(self.session_id, self.gateway.id, self.config, c.Restore(frames, awaited))
        try:
            placed = await self.gateway.place(self.pools.decision, request, avoid=self.placed.replica)
        except Exception as exc:
            details = getattr(exc, "details", type(exc).__name__)
            self.ended = True  # nothing is left anywhere to close
            self.finish(grpc.StatusCode.UNAVAILABLE, f"{reason}; the session could not be moved: {details}")
            return
        link = self.pools.decision_link(placed.replica)
        if self.finished:  # the client went away meanwhile
            link.send(c.CloseSession(self.session_id, placed.epoch, False))
            return
        decided, dropped, responses = self._counted
        self._carried = (decided, dropped, responses - (self._late_reply is not None and bool(self._late_reply[0])))
        self.placed, self.recovering = placed, False
        self.recoveries += 1
        if self._late_reply is not None:
            text, token_ids = self._late_reply
            self._late_reply = None
            link.send(c.ReplyText(self.session_id, placed.epoch, text, token_ids))
        resent = sorted(self._undecided.values(), key=lambda frame: frame.frame_id)
        for frame in resent:  # sent before the move, never decided: the new replica decides them
            link.send(c.FrameFeatures(self.session_id, placed.epoch, frame.frame_id, frame.timestamp,
                                      frame.features, carried(frame.span)))
        for query in self._asked:  # asked before the move, not answered yet
            link.send(c.QueryText(self.session_id, placed.epoch, query.timestamp, query.text))
        if self._close_sent is not None:
            link.send(c.CloseSession(self.session_id, placed.epoch, self._close_sent.drain))
        self._release()
        took = time.monotonic() - started
        self.gateway.metrics.recoveries.inc()
        self.warn(pb.WARNING_CODE_SESSION_RECOVERED,
                  f"{reason}; the session moved to another decision replica in {took:.2f}s, rebuilt from its "
                  f"last {len(frames)} frame(s) and {placed.restored_turns} turn(s) of conversation"
                  f"{'; the reply in progress goes on' if awaited is not None else ''}; {len(resent)} frame(s) "
                  f"it had not decided were sent again, none lost")

    def recover_reaction(self, reason: str) -> None:
        """The session's Reaction replica died or drains: its reply in progress fails (Decision goes on), and
        the session gets a reply writer on another replica, given the frames kept here. Replies written there
        see those frames, not the conversation before them."""
        if self.finished or self.reaction is None or self.reaction_moving:
            return
        self.reaction_moving = True
        self.reply_failed(reason)
        self.gateway.keep(asyncio.get_running_loop().create_task(self._recover_reaction(reason)))

    async def _recover_reaction(self, reason: str) -> None:
        started = time.monotonic()
        try:
            placed = await self.gateway.place(self.pools.reaction,
                                              c.OpenSession(self.session_id, self.gateway.id, self.config),
                                              avoid=self.reaction.replica)
        except Exception as exc:
            self.reaction = None  # nothing is left there to close
            self.finish(grpc.StatusCode.UNAVAILABLE,
                        f"{reason}; the session's reply writer could not be moved: {getattr(exc, 'details', exc)}")
            return
        if self.finished:  # the client went away meanwhile
            self.pools.reaction_link(placed.replica).send(c.CloseSession(self.session_id, placed.epoch, False))
            return
        self.reaction, self.reaction_moving = placed, False
        self._synced, self._unsynced = 0, list(self._ring)  # the new writer starts from the frames kept here
        self._sync_reaction()
        self.gateway.metrics.recoveries.inc()
        self.warn(pb.WARNING_CODE_SESSION_RECOVERED,
                  f"{reason}; replies are written on another replica from {time.monotonic() - started:.2f}s on, "
                  f"seeing the last {len(self._ring)} frame(s) but not the conversation before them")

    # ---- the end ------------------------------------------------------------------------------------------------

    def abandon(self) -> None:
        """The call is over (the client went away, or the call failed) before Decision ended the session:
        free it everywhere now. A no-op once Decision has ended it."""
        if self.recovering:
            self._close_reaction()  # Decision: `_recover` closes what it placed
            self.finish(grpc.StatusCode.CANCELLED, "the client went away")
            return
        if not self.ended:
            self.ended = True
            self.pools.decision_link(self.placed.replica).send(
                c.CloseSession(self.session_id, self.placed.epoch, False))
        self._close_reaction()
        self.finish(grpc.StatusCode.CANCELLED, "the client went away")

    def finish(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        if self.finished:
            return
        self._report_over_rate()
        self.finished = True
        for frame in [*self._encoding.values(), *self._undecided.values()]:
            frame.span.end()
        if self.reply is not None:
            self.reply.span.end()
        self.out.put_nowait(Finish(code, details))
        self.room.set()  # a reader waiting for room must see the end

    def warn(self, code: int, message: str, frames=()) -> None:
        self.gateway.metrics.warnings.inc(tags={"code": pb.WarningCode.Name(code)})
        self.out.put_nowait(pb.ServerMessage(warning=pb.Warning(
            code=code, message=message, timestamps=[t for _, t in frames], frame_indexes=[i for i, _ in frames])))


def _status(code: int) -> grpc.StatusCode:
    return next((status for status in grpc.StatusCode if status.value[0] == code), grpc.StatusCode.INTERNAL)
