"""A Decision replica's engine events as the wire's (contracts.py): each frame's Decision with the span it
closes, drops, reply requests, a failed session's status, and what a commentary session says, with the
metrics they count."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import Span

from liveserve.engine.events import (ChunkDone, Event, FrameDecision, FramesDropped, ReplyRequested, ResponseDelta,
                                     ResponseDone, ResponseStarted, SessionFailed)
from liveserve.engine.live.session import Session
from liveserve.services.observability.telemetry import DecisionMetrics
from liveserve.services.observability.tracing import carried
from liveserve.services.wire import contracts as c
from liveserve.services.wire.errors import internal

log = logging.getLogger("liveserve.services.decision.service")  # one logger for the replica's lines
_FAILURES = {"cache_full": grpc.StatusCode.RESOURCE_EXHAUSTED, "internal": grpc.StatusCode.INTERNAL}
_SAID = (ChunkDone, ResponseStarted, ResponseDelta, ResponseDone)  # a commentary session's own events


@dataclass(slots=True)
class HeldSession:
    """A session this replica holds."""

    session_id: str
    gateway_id: str
    epoch: int
    session: Session  # the engine's session, kept for its counters after the engine lets go of it
    decide_spans: dict[int, Span] = field(default_factory=dict)  # frame id -> decision.decide (traced frames)
    trigger_traces: dict[float, c.Trace] = field(default_factory=dict)  # query timestamp -> its trace
    record: dict = field(default_factory=dict)  # what the registry holds for it (written again if lost)
    last_timestamp: float | None = None
    reply_at: float = 0.0  # stream time of the trigger whose reply is awaited (the history's timestamp)
    failure: tuple[int, str] | None = None  # (grpc status value, message) when the engine failed it



class EventTranslator:
    """Called with each engine event of a held session; returns what goes to its gateway."""

    def __init__(self, replica: str, metrics: DecisionMetrics,
                 record_turn: Callable[[HeldSession, float, str, str], None],
                 close_failed: Callable[[str], None]) -> None:
        self.replica, self.metrics = replica, metrics
        self._record_turn, self._close_failed = record_turn, close_failed

    def __call__(self, held: HeldSession, event: Event) -> list[c.DecisionEvent]:
        if isinstance(event, _SAID):
            return self._commentary(held, event)
        translated = self._live(held, event)
        return [] if translated is None else [translated]

    def _commentary(self, held: HeldSession, event: ChunkDone | ResponseStarted | ResponseDelta | ResponseDone
                    ) -> list[c.DecisionEvent]:
        """A commentary session's events: a chunk's frames decided (fired: something was said about it),
        and what it says, streamed as a reply is."""
        sid = held.session_id
        if isinstance(event, ChunkDone):
            self.metrics.frames_decided.inc(len(event.frame_ids))
            self.metrics.decision_latency.observe(event.lag_s)
            action = c.Action.SILENT if event.silent else c.Action.RESPOND
            decided = []
            for frame_id, timestamp in zip(event.frame_ids, event.timestamps):
                span = held.decide_spans.pop(frame_id, None)
                trace_context = c.NO_TRACE
                if span is not None:
                    span.set_attributes({"liveserve.fired": not event.silent, "liveserve.action": str(action)})
                    trace_context = carried(span)
                    span.end()
                decided.append(c.Decision(sid, frame_id, timestamp, float(event.silent), not event.silent, action,
                                         trace_context))
            return decided
        if isinstance(event, ResponseStarted):
            self.metrics.responses.inc(tags={"trigger": event.trigger})
            return [c.ResponseStarted(sid, event.timestamp, c.Trigger.COMMENTARY, "")]
        if isinstance(event, ResponseDelta):
            return [c.ResponseDelta(sid, event.text, len(event.token_ids))]
        self._record_turn(held, event.timestamp, "assistant", event.text)
        return [c.ResponseDone(sid, event.text, event.num_tokens, event.finish_reason, event.ttft_s, event.duration_s,
                            event.token_ids)]

    def _live(self, held: HeldSession, event: Event) -> c.DecisionEvent | None:
        sid = held.session_id
        if isinstance(event, FrameDecision):
            self.metrics.frames_decided.inc()
            self.metrics.decision_latency.observe(event.lag_s)
            trace_context = c.NO_TRACE
            span = held.decide_spans.pop(event.frame_index, None)
            if span is not None:
                span.set_attributes({"liveserve.p_silent": event.p_silent, "liveserve.fired": event.fired,
                                     "liveserve.action": event.action})
                trace_context = carried(span)
                span.end()
            return c.Decision(sid, event.frame_index, event.timestamp, event.p_silent, event.fired,
                             c.Action(event.action), trace_context)
        if isinstance(event, FramesDropped):
            self.metrics.frames_dropped.inc(len(event.timestamps))
            for frame_id in event.frame_ids:
                span = held.decide_spans.pop(frame_id, None)
                if span is not None:
                    span.set_attribute("liveserve.dropped", True)
                    span.end()
            return c.FramesDropped(sid, tuple(event.frame_ids), tuple(event.timestamps), event.reason)
        if isinstance(event, ReplyRequested):
            self.metrics.responses.inc(tags={"trigger": event.trigger})
            held.reply_at = event.timestamp
            trace_context = held.trigger_traces.pop(event.timestamp, c.NO_TRACE) if event.trigger == "query" else ()
            return c.ReplyRequested(sid, c.Trigger(event.trigger), event.timestamp, event.query or "",
                                 event.frame_index, trace_context)
        if isinstance(event, SessionFailed):  # its own cache is full (the message says why), or a bug (logged)
            message = event.message if event.code == "cache_full" else internal(
                log, f"session {sid} failed on decision replica {self.replica}", detail=event.message)
            held.failure = (_FAILURES[event.code].value[0], message)
            self._close_failed(sid)
            return None  # SessionClosed follows, with the status and the message
        raise TypeError(f"a Decision session reported {type(event).__name__}")

