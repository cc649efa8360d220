"""Reaction: the asynchronous reply writer, with its own per-session cache.

A session is opened here when it opens at the gateway and is then only ever appended to: the gateway
syncs the frames Decision decided (numbered, so a gap is caught instead of silently skipped), they are
prefilled in batches with other sessions' work, and a Respond has the reply generated from the
up-to-date cache. The cost of a reply therefore depends on the frames since the previous sync, not on
the stream's length. Replies stream to the session's gateway on its event stream: reply tokens of all
that gateway's sessions travel together, consecutive tokens of one reply merged into one delta.
The Reaction model may be a larger checkpoint than Decision's (`reaction_model`), or the same one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

from opentelemetry.trace import Span

from liveserve.config import EngineConfig, SchedulerConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import Event, ResponseDelta, ResponseDone, ResponseStarted, SessionFailed
from liveserve.engine.inputs import SessionError
from liveserve.engine.live.session import Session
from liveserve.model.live import LiveModel
from liveserve.services.wire import contracts as c
from liveserve.services.replica.engine_worker import EngineWorker
from liveserve.services.wire.errors import internal
from liveserve.services.replica.outbox import GatewayLeases, Outboxes
from liveserve.services.settings import ServiceSettings
from liveserve.services.observability.telemetry import GpuMetrics, ReactionMetrics, sample_periodically
from liveserve.services.observability.tracing import extract, tracer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Writer:
    session_id: str
    gateway_id: str
    session: Session
    frames_seen: int = 0
    out_of_sync: str = ""  # why the cache no longer matches the stream (a reply would be wrong)
    replying: bool = False
    asked_at: float | None = None  # time.monotonic() of the Respond being answered, until its first token
    span: Span | None = None


def merge_deltas(events: list) -> list:
    """Consecutive ResponseDeltas of one session become one delta (other sessions' events may sit between)."""
    merged: list = []
    last: dict[str, int] = {}  # session -> index in `merged` of its latest event
    for event in events:
        at = last.get(event.session_id)
        if isinstance(event, c.ResponseDelta) and at is not None and isinstance(merged[at], c.ResponseDelta):
            previous = merged[at]
            merged[at] = c.ResponseDelta(event.session_id, previous.text + event.text,
                                      previous.num_tokens + event.num_tokens)
            continue
        last[event.session_id] = len(merged)
        merged.append(event)
    return merged


class ReactionService:
    def __init__(self, model: LiveModel, settings: ServiceSettings, replica: str) -> None:
        self.model, self.settings, self.replica = model, settings, replica
        # Frames arrive in bursts at triggers and must all be read: never drop them for lag here.
        scheduler = SchedulerConfig(max_lag_s=None, max_queued_frames=1 << 20)
        self.engine = BatchEngine(model, EngineConfig(pool=settings.pool(), scheduler=scheduler,
                                                      attention=settings.attention, cuda_graphs=settings.cuda_graphs))
        self.metrics, self.gpu, self.tracer = ReactionMetrics(), GpuMetrics(), tracer("reaction")
        self.writers: dict[str, _Writer] = {}
        self.outboxes = Outboxes(self._gateway_gone, merge=merge_deltas, interval_s=settings.hop_ms / 1000)
        self.leases = GatewayLeases(settings.session_ttl_s, self._gateway_gone)
        self.replies_in_progress = 0
        self._worker: EngineWorker | None = None
        self._background: list[asyncio.Task] = []

    def _start(self) -> EngineWorker:
        if self._worker is None:
            loop = asyncio.get_running_loop()
            # Replies yield the CPU to frame decisions where they share cores: a late token is a slower
            # reply, a late decision is a missed moment of the stream.
            self._worker = EngineWorker(self.engine, loop, self._deliver, self._ended, on_step=self.metrics.record_step,
                                        name="reaction-engine", nice=self.settings.reaction_nice)
            self._background = [loop.create_task(sample_periodically(self._sample_metrics)),
                                loop.create_task(self.leases.watch())]
        return self._worker

    # ---- the seam: open, push, events ---------------------------------------------------------------------

    async def ping(self) -> None:
        pass

    async def open(self, request: c.OpenSession) -> c.SessionPlaced:
        worker = self._start()
        self.leases.renew(request.gateway_id)
        config = dataclasses.replace(request.config, replies="on_request")
        session = await asyncio.to_thread(worker.open, request.session_id, config)
        self.writers[request.session_id] = _Writer(request.session_id, request.gateway_id, session)
        limits = c.Limits(max_query_tokens=config.max_query_tokens, max_new_tokens=config.max_new_tokens,
                          max_lag_s=0.0, tokens_per_frame=self.model.layout.num_tokens + 1)
        return c.SessionPlaced(request.session_id, self.replica, 1, limits)

    async def push(self, push: c.ReactionPush) -> None:
        worker = self._start()
        self.leases.renew(push.gateway_id)  # an empty push is the gateway's heartbeat
        for command in push.commands:
            writer = self.writers.get(command.session_id)
            if writer is None:
                if isinstance(command, c.Respond):
                    self.outboxes.put(push.gateway_id, c.ResponseFailed(
                        command.session_id, f"session {command.session_id!r} is unknown on reaction replica "
                                            f"{self.replica}"))
                continue
            if isinstance(command, c.SyncFrames):
                self._sync(writer, command)
            elif isinstance(command, c.Respond):
                self._respond(writer, command)
            else:  # closed before the push is acknowledged: the gateway then knows the memory is free
                await asyncio.to_thread(worker.close, command.session_id)
        self.engine.wake()

    def events(self, gateway_id: str):
        return self.outboxes.stream(gateway_id)

    def _sync(self, writer: _Writer, sync: c.SyncFrames) -> None:
        if writer.out_of_sync:
            return
        if sync.first != writer.frames_seen:
            writer.out_of_sync = (f"frames from index {sync.first} were sent, but this replica has seen "
                                  f"{writer.frames_seen}; the gap cannot be replied over")
            return
        try:
            for frame in sync.frames:
                writer.session.push_frame(frame.timestamp, frame.features, frame_id=frame.frame_id)
                writer.frames_seen += 1
        except SessionError as exc:
            writer.out_of_sync = f"a frame could not be read: {exc}"

    def _respond(self, writer: _Writer, respond: c.Respond) -> None:
        sid = writer.session_id
        try:
            if writer.out_of_sync:
                raise SessionError(writer.out_of_sync)
            if respond.trigger == c.Trigger.QUERY:
                writer.session.push_query(respond.timestamp, respond.query)
            else:
                writer.session.push_respond(respond.timestamp)
        except SessionError as exc:
            self.outboxes.put(writer.gateway_id, c.ResponseFailed(sid, f"session {sid!r}: {exc}"))
            return
        writer.replying, writer.asked_at = True, time.monotonic()
        if respond.trace:
            writer.span = self.tracer.start_span("reaction.respond", context=extract(respond.trace),
                                                 attributes={"liveserve.session_id": sid})
        self.replies_in_progress += 1
        self.metrics.replies_in_progress.set(self.replies_in_progress)

    # ---- engine events -> the gateways' outboxes (on the serving loop) ------------------------------------

    def _deliver(self, events: list[tuple[str, Event]]) -> None:
        for sid, event in events:
            writer = self.writers.get(sid)
            if writer is None:
                continue
            if isinstance(event, ResponseStarted):
                self.outboxes.put(writer.gateway_id, c.ResponseStarted(sid, event.timestamp, c.Trigger(event.trigger),
                                                                    event.query or ""))
            elif isinstance(event, ResponseDelta):
                if writer.asked_at is not None:
                    self.metrics.ttft.observe(time.monotonic() - writer.asked_at)
                    writer.asked_at = None
                self.outboxes.put(writer.gateway_id, c.ResponseDelta(sid, event.text, len(event.token_ids)))
            elif isinstance(event, ResponseDone):
                self._finish(writer)
                self._record_reply(event, writer)
                self.outboxes.put(writer.gateway_id, c.ResponseDone(sid, event.text, event.num_tokens, event.finish_reason,
                                                                 event.ttft_s, event.duration_s, event.token_ids))
            elif isinstance(event, SessionFailed):
                self._finish(writer)
                message = event.message if event.code == "cache_full" else internal(
                    log, f"session {sid} failed on reaction replica {self.replica}", detail=event.message)
                self.outboxes.put(writer.gateway_id, c.ResponseFailed(sid, message))
                self._worker.close_when_drained(sid, 0)
            # Frame decisions of a reply writer are not news: it never fires by itself.

    def _finish(self, writer: _Writer) -> None:
        if writer.replying:
            self.replies_in_progress -= 1
            self.metrics.replies_in_progress.set(self.replies_in_progress)
        writer.replying, writer.asked_at = False, None

    def _record_reply(self, done: ResponseDone, writer: _Writer) -> None:
        if done.num_tokens > 1:
            self.metrics.tpot.observe((done.duration_s - done.ttft_s) / (done.num_tokens - 1))
        self.metrics.replies.inc(tags={"finish": done.finish_reason})
        if writer.span is not None:
            writer.span.set_attributes({"liveserve.tokens": done.num_tokens, "liveserve.ttft_s": done.ttft_s,
                                        "liveserve.finish_reason": done.finish_reason})
            writer.span.end()
            writer.span = None

    def _ended(self, session_id: str, session: Session) -> None:
        writer = self.writers.pop(session_id, None)
        if writer is not None:
            self._finish(writer)
            if writer.span is not None:
                writer.span.end()

    def _gateway_gone(self, gateway_id: str) -> None:
        for writer in list(self.writers.values()):
            if writer.gateway_id == gateway_id and self._worker is not None:
                self._worker.close_when_drained(writer.session_id, 0)

    def _sample_metrics(self) -> None:
        self.metrics.record_state(self.engine)
        self.gpu.sample()

    def load(self) -> dict:
        """What routing and autoscaling go by: sessions held and the KV pool's reserved share."""
        reserved = self.engine.pool.reserved_fraction
        return {"sessions": len(self.writers), "kv_used_fraction": reserved, "free_fraction": 1.0 - reserved}

    def stop(self) -> None:
        for task in self._background:
            task.cancel()
        if self._worker is not None:
            self._worker.stop()
