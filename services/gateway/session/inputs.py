"""A session's input side at the Gateway: the client's frames, queries and Close on their way to Decision.

Inputs keep the client's order on their way to Decision: a frame waits at the head of `pending` until
Perception has encoded it (frames of other sessions do not wait for it), queries and Close wait behind
the frames sent before them. Each frame is numbered as the client sent it (`frame_index`), so nothing is
keyed by timestamp, and its receipt time is taken here, on this host's clock. Frames over the stream's
rate (or its tenant's quota) are refused here and reported once a second.

What was sent to Decision but not answered yet stays here too (`decided`, `answered`), so a session
moving to another replica can send it again (`resend`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

import torch
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import SessionConfig
from liveserve.services.gateway.links import ReplicaLink
from liveserve.services.gateway.session.context import ClientChannel, GatewayContext, Placement
from liveserve.services.observability.tracing import carried
from liveserve.services.security.rate_limit import IngressLimit
from liveserve.services.wire import contracts as c

BACKLOG = 64  # inputs waiting at the gateway before the session stops reading its client (flow control)
# A query longer than max_query_tokens * this many characters is refused here: text averages a few
# characters a token, so it could not fit, and Decision's engine need not spend its time (shared by every
# session on the replica) tokenizing it first: huge queries put a neighbour's p99 at 455 ms (--local).
MAX_CHARS_PER_TOKEN = 32


@dataclass(slots=True)
class SentFrame:
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


class StreamInputs:
    def __init__(self, gateway: GatewayContext, where: Placement, client: ClientChannel, config: SessionConfig,
                 trace_parent: otel_context.Context, fps: float, tenant=None) -> None:
        """`tenant`: the TenantUsage (tenants.py) its frames count against; None: no tenant quotas."""
        self.gateway, self.where, self.client, self.config = gateway, where, client, config
        self.trace_parent, self.fps, self.tenant = trace_parent, fps, tenant
        self.next_frame_id = 0
        self.last_timestamp = -1.0
        self.closing = False  # Close is on its way to Decision: no more input
        self._pending: deque[SentFrame | _Query | _Close] = deque()
        self._encoding: dict[int, SentFrame] = {}  # frames sent to Perception, by id
        self._undecided: dict[int, SentFrame] = {}  # frames sent to Decision, by id
        self._asked: list[_Query] = []  # queries sent to Decision that no reply has answered yet
        self._close_sent: _Close | None = None
        self.room = asyncio.Event()  # set while the backlog has room: the call reads its client meanwhile
        self.room.set()
        rate = gateway.settings.ingress_factor * fps
        self._ingress = IngressLimit(rate, max(8.0, 2 * rate))  # two seconds of burst at the allowed rate
        self._over_rate: list[tuple[int, float]] = []  # frames refused for the rate, reported once a second
        self._over_quota: list[tuple[int, float]] = []  # frames refused for the tenant's frames_per_s
        self.rate_dropped = 0
        self.unencoded = 0  # frames dropped because Perception could not be reached

    @property
    def finished(self) -> bool:
        return self.client.finished

    @property
    def dropped(self) -> int:
        """Frames dropped here, never sent to Decision (so not in its counts)."""
        return self.rate_dropped + self.unencoded

    # ---- from the client --------------------------------------------------------------------------------

    def receive_frame(self, frame: pb.Frame) -> None:
        if self.closing:
            return
        frame_id = self.next_frame_id
        self.next_frame_id += 1
        problem = self._check_frame(frame)
        if problem:
            self.client.warn(pb.WARNING_CODE_BAD_FRAME, problem, [(frame_id, frame.timestamp)])
            return
        stream_ok = self._ingress.take()
        if not stream_ok or (self.tenant is not None and not self.tenant.take_frame()):
            if not self._over_rate and not self._over_quota:
                asyncio.get_running_loop().call_later(1.0, self.report_over_rate)
            (self._over_rate if not stream_ok else self._over_quota).append((frame_id, frame.timestamp))
            self.rate_dropped += 1
            return
        self.last_timestamp = frame.timestamp
        span = self.gateway.tracer.start_span("frame", context=self.trace_parent,
                                              attributes={"liveserve.session_id": self.where.session_id,
                                                          "liveserve.frame_timestamp": frame.timestamp})
        item = SentFrame(frame_id, frame.timestamp, time.monotonic(), span)
        self._pending.append(item)
        self._encoding[frame_id] = item
        self.where.pools.batcher.add(c.FrameImage(self.where.session_id, frame_id, frame.timestamp, frame.image,
                                                  carried(span)), self)
        self._update_room()

    def report_over_rate(self) -> None:
        if self._over_rate and not self.finished:
            frames, self._over_rate = self._over_rate, []
            factor = self.gateway.settings.ingress_factor
            self.client.warn(pb.WARNING_CODE_FRAME_DROPPED,
                             f"{len(frames)} frame(s) dropped: the stream sent frames faster than "
                             f"{factor * self.fps:g} a second ({factor:g}x its declared fps of {self.fps:g})", frames)
        if self._over_quota and not self.finished:
            frames, self._over_quota = self._over_quota, []
            quota = self.tenant.quota.frames_per_s  # None once an operator lifted it since
            self.client.warn(pb.WARNING_CODE_FRAME_DROPPED,
                             f"{len(frames)} frame(s) dropped: tenant {self.tenant.tenant!r} sent frames faster "
                             f"than its quota of {quota if quota is None else format(quota, 'g')} a second "
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
        if self.where.reaction is None and self.config.mode == "live":
            self.client.warn(pb.WARNING_CODE_BAD_QUERY, "this session reports decisions only; queries are not answered")
            return
        if not query.text.strip():
            self.client.warn(pb.WARNING_CODE_BAD_QUERY, "query text is empty")
            return
        tokens = max(self.config.max_query_tokens, self.config.commentary.max_query_tokens)
        if len(query.text) > tokens * MAX_CHARS_PER_TOKEN:
            self.client.warn(pb.WARNING_CODE_BAD_QUERY, f"query at {query.timestamp:.3f}s is {len(query.text)} "
                                                        f"characters; at most {tokens} tokens (max_query_tokens) are "
                                                        f"accepted, and this many characters cannot fit")
            return
        span = self.gateway.tracer.start_span("query", context=self.trace_parent,
                                              attributes={"liveserve.session_id": self.where.session_id,
                                                          "liveserve.query_timestamp": query.timestamp})
        self._pending.append(_Query(query.timestamp, query.text, span))
        self.release()

    def receive_close(self, drain: bool) -> None:
        if self.closing:
            return
        self.closing = True
        self._pending.append(_Close(drain))
        self.release()

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
            self.client.warn(code, error, [(frame_id, frame.timestamp)])
        else:
            frame.features = features
        self.release()

    # ---- on to Decision -------------------------------------------------------------------------------------

    def release(self) -> None:
        """Send Decision every input at the head of the queue that is ready, in the client's order."""
        if self.where.decision_moving or self.finished:
            return  # inputs wait for the session's new replica (or the call is over)
        decision, sid, epoch = self.where.decision_link(), self.where.session_id, self.where.decision.epoch
        while self._pending:
            head = self._pending[0]
            if isinstance(head, SentFrame):
                if head.features is None and not head.failed:
                    break  # still being encoded: later inputs wait behind it
                self._pending.popleft()
                if not head.failed:
                    self._undecided[head.frame_id] = head
                    decision.send(c.FrameFeatures(sid, epoch, head.frame_id, head.timestamp, head.features,
                                                  carried(head.span)))
            elif isinstance(head, _Query):
                self._pending.popleft()
                self._asked.append(head)
                decision.send(c.QueryText(sid, epoch, head.timestamp, head.text, carried(head.span)))
                head.span.end()
            else:
                self._pending.popleft()
                self._close_sent = head
                decision.send(c.CloseSession(sid, epoch, head.drain))
        self._update_room()

    def _update_room(self) -> None:
        if len(self._pending) < BACKLOG:
            self.room.set()
        else:
            self.room.clear()

    def decided(self, frame_id: int) -> SentFrame | None:
        """Decision answered for the frame (decided, dropped or refused it): it is no longer waited for."""
        return self._undecided.pop(frame_id, None)

    def answered(self, timestamp: float) -> None:
        """A reply to the query at `timestamp` is being written."""
        self._asked = [query for query in self._asked if query.timestamp != timestamp]

    def resend(self, link: ReplicaLink, epoch: int) -> int:
        """Send a new Decision replica what the old one never answered: frames sent and not decided,
        queries not answered, and the Close; returns how many frames."""
        sid = self.where.session_id
        resent = sorted(self._undecided.values(), key=lambda frame: frame.frame_id)
        for frame in resent:
            link.send(c.FrameFeatures(sid, epoch, frame.frame_id, frame.timestamp, frame.features, carried(frame.span)))
        for query in self._asked:
            link.send(c.QueryText(sid, epoch, query.timestamp, query.text))
        if self._close_sent is not None:
            link.send(c.CloseSession(sid, epoch, self._close_sent.drain))
        return len(resent)

    def end_spans(self) -> None:
        for frame in [*self._encoding.values(), *self._undecided.values()]:
            frame.span.end()
