"""Reaction: the asynchronous reply writer, with its own per-session cache.

A session is opened here on its first call and then only ever appended to: each Respond call carries the
frames this replica has not seen (numbered, so a gap is caught instead of silently skipped), they are
prefilled in batches with other sessions' work, and the reply is generated from the up-to-date cache.
The cost of a reply therefore depends on the frames since the previous call, not on the stream's length.
The Reaction model may be a larger checkpoint than Decision's (`reaction_model`), or the same one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from ray import serve

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import EngineConfig, SchedulerConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import FrameDecision, ResponseDelta, ResponseDone, SessionFailed
from liveserve.engine.inputs import SessionError
from liveserve.internal.v1 import reaction_pb2 as rpb
from liveserve.services import tensors
from liveserve.services.engine_worker import EngineWorker
from liveserve.services.messages import session_config, to_message
from liveserve.services.replica import load_replica_model
from liveserve.services.routing import SESSION_ROUTER
from liveserve.services.settings import ServiceSettings
from liveserve.services.telemetry import GpuMetrics, ReactionMetrics, sample_periodically
from liveserve.services.tracing import extract, tracer

log = logging.getLogger(__name__)


def _merge_ready_deltas(first: ResponseDelta, events: asyncio.Queue, held: list) -> ResponseDelta:
    """`first` plus the deltas already queued behind it, as one delta (each one costs a hop through
    Decision and the Gateway); the first other event read is put in `held`. An idle stream still sends
    every token as it comes."""
    texts, ids = [first.text], list(first.token_ids)
    while not events.empty():
        event = events.get_nowait()
        if not isinstance(event, ResponseDelta):
            held.append(event)
            break
        texts.append(event.text)
        ids.extend(event.token_ids)
    return ResponseDelta(first.timestamp, "".join(texts), tuple(ids))


class _ReplyEvents(asyncio.Queue):
    """A Reaction session's events, without its frames' decisions: frames are only read here, and on a
    long silent stream their decisions would pile up between replies."""

    def put_nowait(self, item) -> None:
        if not isinstance(item, FrameDecision):
            super().put_nowait(item)


@dataclass(slots=True)
class _Writer:
    events: _ReplyEvents
    next_frame_index: int = 0


@serve.deployment(name="Reaction", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                  request_router_config=SESSION_ROUTER)
class Reaction:
    def __init__(self, settings: dict | None = None) -> None:
        self.settings = ServiceSettings.from_dict(settings)
        self.model = load_replica_model(self.settings.reaction_model or self.settings.model, vision=False,
                                        threads=self.settings.threads)
        # Frames arrive in bursts at triggers and must all be read: never drop them for lag here.
        scheduler = SchedulerConfig(max_lag_s=None, max_queued_frames=1 << 20)
        self.engine = BatchEngine(self.model, EngineConfig(pool=self.settings.pool(), scheduler=scheduler))
        self.metrics, self.gpu, self.tracer = ReactionMetrics(), GpuMetrics(), tracer("reaction")
        self.worker = EngineWorker(self.engine, on_step=self.metrics.record_step)
        self.defaults = self.settings.session_defaults()
        self.sessions: dict[str, _Writer] = {}
        self.replies_in_progress = 0
        self._sampler: asyncio.Task | None = None

    async def Respond(self, request: rpb.RespondRequest):
        """Catch the session up on `frames`, then (unless the trigger is unspecified: a sync only) stream
        the reply: ResponseStarted, ResponseDelta..., ResponseDone."""
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(sample_periodically(self._sample_metrics))
        sid = request.session_id
        writer = self.sessions.get(sid)
        if writer is None:  # new here; after a replica change it starts from the frames it is sent now
            writer = await self._open(request)
            writer.next_frame_index = request.first_frame_index
        if request.first_frame_index != writer.next_frame_index:
            raise SessionError(f"session {sid!r}: frames from index {request.first_frame_index} sent, but this "
                               f"replica has seen {writer.next_frame_index}; the gap cannot be replied over")
        for frame in request.frames:
            self.engine.push_frame(sid, frame.timestamp, tensors.from_message(frame.features))
            writer.next_frame_index += 1
        if request.trigger == pb.TRIGGER_UNSPECIFIED:
            return
        span = self.tracer.start_span("reaction.respond", context=extract(request.trace_context),
                                      attributes={"liveserve.session_id": sid, "liveserve.frames_read": len(request.frames)})
        self.replies_in_progress += 1
        self.metrics.replies_in_progress.set(self.replies_in_progress)
        try:
            if request.trigger == pb.TRIGGER_QUERY:
                self.engine.push_query(sid, request.timestamp, request.query)
            else:
                self.engine.push_respond(sid, request.timestamp)
            held: list = []  # an event read ahead while merging deltas (it may be None, the end marker)
            while True:
                event = held.pop() if held else await writer.events.get()
                if isinstance(event, ResponseDelta):
                    event = _merge_ready_deltas(event, writer.events, held)
                if event is None:
                    raise SessionError(f"session {sid!r} was closed while its reply was being written")
                if isinstance(event, SessionFailed):
                    raise RuntimeError(f"session {sid!r} failed on its Reaction replica: {event.message}")
                yield to_message(event)
                if isinstance(event, ResponseDone):
                    self._record_reply(event, span)
                    return
        finally:
            self.replies_in_progress -= 1
            self.metrics.replies_in_progress.set(self.replies_in_progress)
            span.end()

    async def Close(self, request: rpb.CloseRequest) -> rpb.CloseResponse:
        if self.sessions.pop(request.session_id, None) is not None:
            self.worker.close_when_drained(request.session_id, 0)
        return rpb.CloseResponse()

    def _record_reply(self, done: ResponseDone, span) -> None:
        self.metrics.ttft.observe(done.ttft_s)
        if done.num_tokens > 1:
            self.metrics.tpot.observe((done.duration_s - done.ttft_s) / (done.num_tokens - 1))
        self.metrics.replies.inc(tags={"finish": done.finish_reason})
        span.set_attributes({"liveserve.tokens": done.num_tokens, "liveserve.ttft_s": done.ttft_s,
                             "liveserve.finish_reason": done.finish_reason})

    def _sample_metrics(self) -> None:
        self.metrics.record_state(self.engine)
        self.gpu.sample()

    def record_routing_stats(self) -> dict:
        return {"sessions": len(self.sessions), "free_fraction": 1.0 - self.engine.pool.reserved_fraction}

    async def _open(self, request: rpb.RespondRequest) -> _Writer:
        config = dataclasses.replace(session_config(request.open, self.defaults), replies="on_request")
        writer = _Writer(_ReplyEvents())
        await asyncio.to_thread(self.worker.open, request.session_id, config, writer.events, asyncio.get_running_loop())
        self.sessions[request.session_id] = writer
        return writer

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()
