"""Decision: each session's KV cache on this replica's device, frames stepped in batches, one streaming-EOS
decision per frame.

Sessions run with replies="external": when one fires (or meets a query) this replica hands the reply to
Reaction and keeps stepping the session's frames while the reply streams back; the session does not fire
again until the reply is done, and the finished text is appended to its cache. Reaction is kept up to
date incrementally: each call carries only the frames it has not seen.

The session record in Redis names this replica as owner under a fencing epoch; every write (heartbeat,
last timestamp, history) is fenced, and calls carrying another epoch are refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span
from ray import serve

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import EngineConfig, SessionConfig
from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import FrameDecision, FramesDropped, ReplyRequested, SessionFailed
from liveserve.engine.inputs import SessionError
from liveserve.engine.session import Session
from liveserve.internal.v1 import decision_pb2 as dpb
from liveserve.internal.v1 import reaction_pb2 as rpb
from liveserve.services import tensors
from liveserve.services.engine_worker import EngineWorker
from liveserve.services.messages import TRIGGERS, session_config, to_message, warning
from liveserve.services.redis_server import connect
from liveserve.services.registry import RegistryError, SessionRegistry
from liveserve.services.replica import load_replica_model, replica_id
from liveserve.services.routing import SESSION_ROUTER
from liveserve.services.settings import ServiceSettings
from liveserve.services.telemetry import DecisionMetrics, GpuMetrics, sample_periodically
from liveserve.services.tracing import extract, inject, tracer

log = logging.getLogger(__name__)
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@dataclass(slots=True)
class _InFlight:
    """A frame pushed and not yet decided."""

    received_at: float  # Unix time the gateway received it
    span: Span  # decision.decide, push -> decision


@dataclass(slots=True)
class _Served:
    session_id: str
    epoch: int
    open: pb.Open
    session: Session  # the engine's session, kept for its counters after the engine lets go of it
    out: asyncio.Queue  # ServerMessages for the Events stream; None ends it
    in_flight: dict[float, _InFlight] = field(default_factory=dict)  # by frame timestamp
    # trace context of recent frames and queries, by timestamp: a reply's trace hangs under its trigger
    contexts: OrderedDict = field(default_factory=OrderedDict)
    unsynced: list[dpb.FrameFeatures] = field(default_factory=list)  # frames Reaction has not seen
    synced: int = 0  # frames sent to Reaction so far
    reaction_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one Reaction call at a time, in order
    tasks: set[asyncio.Task] = field(default_factory=set)
    last_timestamp: float | None = None


@serve.deployment(name="Decision", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
                  request_router_config=SESSION_ROUTER)
class Decision:
    def __init__(self, reaction, settings: dict | None = None) -> None:
        self.settings = ServiceSettings.from_dict(settings)
        self.model = load_replica_model(self.settings.model, vision=False, threads=self.settings.threads)
        self.engine = BatchEngine(self.model, EngineConfig(pool=self.settings.pool(), scheduler=self.settings.scheduler()))
        self.metrics, self.gpu, self.tracer = DecisionMetrics(), GpuMetrics(), tracer("decision")
        self.worker = EngineWorker(self.engine, on_step=self.metrics.record_step)
        self.defaults = self.settings.session_defaults()
        self.reaction = reaction
        self.replica = replica_id()
        self.redis, _ = connect()  # REDIS_URL: the application's runtime environment names it
        self.registry = SessionRegistry(self.redis, ttl_s=self.settings.session_ttl_s,
                                        closed_ttl_s=self.settings.closed_ttl_s)
        self.sessions: dict[str, _Served] = {}
        self._background: list[asyncio.Task] = []  # started with the first session, on the replica's loop

    # ---- calls from the gateway --------------------------------------------------------------------------

    async def Open(self, request: dpb.OpenRequest) -> dpb.OpenResponse:
        """Admit the session here (PoolFullError when the KV pool has no room) and register it in Redis."""
        config = session_config(request.open, self.defaults)
        config = dataclasses.replace(config, replies="none" if config.replies == "none" else "external")
        sid, events = request.session_id, asyncio.Queue()
        await asyncio.to_thread(self.worker.open, sid, config, events, asyncio.get_running_loop())
        try:
            record = await asyncio.to_thread(self.registry.create, sid, self.replica, _config_record(config))
        except Exception:
            self.worker.close(sid)
            raise
        served = _Served(sid, record.epoch, request.open, self.engine.session(sid), asyncio.Queue())
        self.sessions[sid] = served
        if not self._background:
            loop = asyncio.get_running_loop()
            self._background = [loop.create_task(self._heartbeat_loop()),
                                loop.create_task(sample_periodically(self._sample_metrics))]
        self._spawn(served, self._pump(served, events))
        limits = pb.Limits(max_query_tokens=config.max_query_tokens, max_new_tokens=config.max_new_tokens,
                           max_lag_s=self.engine.config.scheduler.max_lag_s or 0.0,
                           tokens_per_frame=self.model.layout.num_tokens + 1)
        return dpb.OpenResponse(replica_id=self.replica, epoch=record.epoch, limits=limits)

    async def Push(self, request: dpb.PushRequest, route_to: str = "") -> dpb.PushResponse:
        """A frame's features, a query, or close. Bad input raises SessionError (the session goes on)."""
        served = self._served(request.session_id, request.epoch)
        kind = request.WhichOneof("kind")
        if kind == "frame":
            frame = request.frame
            self.worker.push_frame(served.session_id, frame.timestamp, tensors.from_message(frame.features))
            span = self.tracer.start_span("decision.decide", context=extract(request.trace_context),
                                          attributes={"liveserve.session_id": served.session_id,
                                                      "liveserve.frame_timestamp": frame.timestamp})
            served.in_flight[frame.timestamp] = _InFlight(frame.received_at, span)
            _remember(served.contexts, frame.timestamp, trace.set_span_in_context(span))
            served.unsynced.append(frame)
            served.last_timestamp = frame.timestamp
            if len(served.unsynced) >= self.settings.reaction_sync_frames and not served.reaction_lock.locked():
                self._spawn(served, self._sync_reaction(served))
        elif kind == "query":
            self.worker.push_query(served.session_id, request.query.timestamp, request.query.text)
            _remember(served.contexts, request.query.timestamp, extract(request.trace_context))
            self._spawn(served, self._record_turn(served, request.query.timestamp, "user", request.query.text))
        elif kind == "close":
            drain_s = self.settings.drain_timeout_s if request.close.drain else 0.0
            self.worker.close_when_drained(served.session_id, drain_s)
        else:
            raise SessionError("an empty push")
        return dpb.PushResponse()

    async def Events(self, request: dpb.EventsRequest, route_to: str = ""):
        """The session's messages; whatever is queued when the stream is ready goes as one batch (under
        load that is many reply deltas and decisions per hop instead of one)."""
        served = self._served(request.session_id, request.epoch)
        while True:
            batch = dpb.EventBatch(messages=[message] if (message := await served.out.get()) is not None else [])
            while message is not None and not served.out.empty():
                if (message := served.out.get_nowait()) is not None:
                    batch.messages.append(message)
            if batch.messages:
                yield batch
            if message is None:
                return

    async def Sessions(self, route_to: str = "") -> dict[str, dict]:
        """This replica's sessions and how far each got (operators' tools, and tests of stickiness)."""
        report = {}
        for sid, served in self.sessions.items():
            report[sid] = {"epoch": served.epoch, "replica": self.replica,
                           "frames_decided": served.session.frames_decided,
                           "awaiting_reply": served.session.awaiting_reply}
        return report

    def record_autoscaling_stats(self) -> dict:
        """What the Decision pool scales on (services/autoscaling.py): sessions held, KV pool reserved."""
        return {"sessions": float(len(self.sessions)), "kv_used_fraction": self.engine.pool.reserved_fraction}

    def record_routing_stats(self) -> dict:
        """What the router places new sessions by: the free share of the KV pool, and sessions held."""
        return {"sessions": len(self.sessions), "free_fraction": 1.0 - self.engine.pool.reserved_fraction}

    # ---- a session's events ----------------------------------------------------------------------------

    async def _pump(self, served: _Served, events: asyncio.Queue) -> None:
        """Engine events -> the session's Events stream; a reply request starts a Reaction call."""
        sid = served.session_id
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, ReplyRequested):
                    self.metrics.responses.inc(tags={"trigger": event.trigger})
                    self._spawn(served, self._reply(served, event))
                    continue
                message = to_message(event)
                if isinstance(event, FrameDecision):  # frame-to-decision from the gateway's receipt of the frame
                    self.metrics.frames_decided.inc()
                    pending = served.in_flight.pop(event.timestamp, None)
                    if pending is not None:
                        message.decision.lag_s = max(0.0, time.time() - pending.received_at)
                        self.metrics.frame_to_decision.observe(message.decision.lag_s)
                        pending.span.set_attributes({"liveserve.p_silent": event.p_silent, "liveserve.fired": event.fired,
                                                     "liveserve.action": event.action})
                        pending.span.end()
                elif isinstance(event, FramesDropped):
                    self.metrics.frames_dropped.inc(len(event.timestamps))
                    for timestamp in event.timestamps:
                        pending = served.in_flight.pop(timestamp, None)
                        if pending is not None:
                            pending.span.set_attribute("liveserve.dropped", True)
                            pending.span.end()
                elif isinstance(event, SessionFailed):
                    self.worker.close_when_drained(sid, 0)
                served.out.put_nowait(message)
        finally:
            for pending in served.in_flight.values():  # never decided: the session ended first
                pending.span.end()
            session = served.session
            await asyncio.gather(*(t for t in served.tasks if t is not asyncio.current_task()),
                                 return_exceptions=True)
            served.out.put_nowait(pb.ServerMessage(closed=pb.SessionClosed(
                frames_decided=session.frames_decided, frames_dropped=session.frames_dropped,
                responses=session.responses)))
            served.out.put_nowait(None)
            self.sessions.pop(sid, None)
            await self._quietly(self.registry.close, sid, self.replica, served.epoch)
            try:
                await self.reaction.Close.remote(rpb.CloseRequest(session_id=sid))
            except Exception:
                log.warning("closing session %s on its Reaction replica failed", sid, exc_info=True)

    async def _reply(self, served: _Served, event: ReplyRequested) -> None:
        """Have Reaction write the reply, stream it to the client, then append it to the session's cache."""
        text = ""
        parent = served.contexts.get(event.timestamp)
        async with served.reaction_lock:
            request = self._respond_request(served, upto=event.timestamp)
            request.trigger, request.timestamp, request.query = TRIGGERS[event.trigger], event.timestamp, event.query or ""
            span = self.tracer.start_span("decision.reply", context=parent,
                                          attributes={"liveserve.session_id": served.session_id,
                                                      "liveserve.trigger": event.trigger})
            inject(request.trace_context, span)
            try:
                replies = self.reaction.options(stream=True).Respond.remote(request)
                while True:  # each piece of the reply must come within the call timeout
                    try:
                        message = await asyncio.wait_for(anext(replies), self.settings.call_timeout_s)
                    except StopAsyncIteration:
                        break
                    if message.WhichOneof("kind") == "response_done":
                        text = message.response_done.text
                    served.out.put_nowait(message)
            except Exception as exc:
                log.warning("reply for session %s at %.3fs failed", served.session_id, event.timestamp, exc_info=True)
                served.out.put_nowait(warning(pb.WARNING_CODE_UNSPECIFIED,
                                              f"the reply at {event.timestamp:.3f}s failed: {_reason(exc)}"))
                span.record_exception(exc)
            finally:
                span.end()
        try:
            self.worker.engine.push_reply(served.session_id, text)
        except SessionError:  # closed meanwhile
            return
        if text:
            await self._record_turn(served, event.timestamp, "assistant", text)

    async def _sync_reaction(self, served: _Served) -> None:
        """Send Reaction the frames it has not seen, so a later reply starts from an up-to-date cache."""
        async with served.reaction_lock:
            request = self._respond_request(served, upto=None)
            if not request.frames:
                return
            try:
                async for _ in self.reaction.options(stream=True).Respond.remote(request):
                    pass
            except Exception:
                log.warning("syncing session %s to Reaction failed", served.session_id, exc_info=True)

    def _respond_request(self, served: _Served, upto: float | None) -> "rpb.RespondRequest":
        count = len(served.unsynced) if upto is None else sum(1 for f in served.unsynced if f.timestamp <= upto)
        frames, served.unsynced = served.unsynced[:count], served.unsynced[count:]
        request = rpb.RespondRequest(session_id=served.session_id, open=served.open, first_frame_index=served.synced,
                                     frames=frames)
        served.synced += count
        return request

    # ---- bookkeeping -----------------------------------------------------------------------------------

    def _served(self, session_id: str, epoch: int) -> _Served:
        served = self.sessions.get(session_id)
        if served is None:
            raise SessionError(f"unknown session {session_id!r} on decision replica {self.replica}")
        if epoch != served.epoch:
            raise SessionError(f"session {session_id!r} is at epoch {served.epoch} here, not {epoch}")
        return served

    def _spawn(self, served: _Served, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        served.tasks.add(task)
        task.add_done_callback(served.tasks.discard)

    async def _record_turn(self, served: _Served, timestamp: float, role: str, text: str) -> None:
        await self._quietly(self.registry.record, served.session_id, self.replica, served.epoch,
                            turn={"t": timestamp, "role": role, "text": text})

    async def _heartbeat_loop(self) -> None:
        """Keep owned sessions' records alive and their last timestamps current; a session whose record
        was taken over (stale epoch) is stopped here."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for served in list(self.sessions.values()):
                try:
                    await asyncio.to_thread(self.registry.record, served.session_id, self.replica, served.epoch,
                                            last_timestamp=served.last_timestamp)
                except RegistryError as exc:
                    log.warning("session %s lost its registry record: %s", served.session_id, exc)
                    served.out.put_nowait(pb.ServerMessage(error=pb.Error(code=FAILED_PRECONDITION, message=str(exc))))
                    self.worker.close_when_drained(served.session_id, 0)
                except Exception:
                    log.warning("heartbeat for session %s failed", served.session_id, exc_info=True)

    def _sample_metrics(self) -> None:
        self.metrics.record_state(self.engine)
        self.gpu.sample()

    async def _quietly(self, write, *args, **kwargs) -> None:
        try:
            await asyncio.to_thread(write, *args, **kwargs)
        except Exception:
            log.warning("registry write %s failed", getattr(write, "__name__", write), exc_info=True)

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()


def _remember(contexts: OrderedDict, timestamp: float, context, keep: int = 256) -> None:
    contexts[timestamp] = context
    while len(contexts) > keep:
        contexts.popitem(last=False)


def _config_record(config: SessionConfig) -> dict:
    return {"threshold": config.threshold, "max_new_tokens": config.max_new_tokens,
            "cache_policy": config.cache.policy, "window_frames": config.cache.window_frames}


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}"
