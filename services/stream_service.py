"""The public LiveStream gRPC service over an EngineWorker, plus the server that hosts it.

One call is one session. The first client message must be Open; then frames and queries are pushed
into the engine as they arrive and the session's events stream back as they happen. Problems with
one input (an undecodable or oversized frame, a timestamp going backwards, an empty query) come back
as a Warning and the session goes on; problems with the call itself end it with a status:
FAILED_PRECONDITION (no Open first), INVALID_ARGUMENT (bad Open), RESOURCE_EXHAUSTED (no room for the
session, or its cache filled up), INTERNAL. Close (or the client half-closing) drains: every frame
already sent is decided before SessionClosed ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.events import SessionFailed
from liveserve.engine.inputs import SessionError
from liveserve.engine.kv_pool import PoolFullError
from liveserve.services.engine_worker import EngineWorker
from liveserve.services.messages import FAILURE_STATUS, session_config, to_message, warning

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LiveStream"].full_name


@dataclass(frozen=True, slots=True)
class StreamLimits:
    max_frame_bytes: int = 4 << 20
    drain_timeout_s: float = 60.0  # how long Close waits for the session's queued frames to be decided


class LiveStreamService(pb_grpc.LiveStreamServicer):
    def __init__(self, worker: EngineWorker, defaults: SessionConfig | None = None,
                 limits: StreamLimits | None = None) -> None:
        # Served sessions default to a bounded cache: a `full` one would reserve the model's whole context.
        defaults = defaults or SessionConfig(cache=CacheConfig(policy="sink_window"))
        self.worker, self.defaults, self.limits = worker, defaults, limits or StreamLimits()

    async def Stream(self, request_iterator, context: grpc.aio.ServicerContext):
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the first message of a stream must be open, got {first.WhichOneof('kind')}")
        try:
            config = session_config(first.open, self.defaults)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad open: {exc}")
        session_id = uuid.uuid4().hex
        events: asyncio.Queue = asyncio.Queue()
        try:  # admission may wait for a running step: keep the event loop free meanwhile
            await asyncio.to_thread(self.worker.open, session_id, config, events, asyncio.get_running_loop())
        except PoolFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for a new session: {exc}")
        engine = self.worker.engine
        session = engine.session(session_id)  # kept for its counters after close
        yield pb.ServerMessage(opened=pb.SessionOpened(
            session_id=session_id, client_session_id=first.open.client_session_id,
            limits=pb.Limits(max_frame_bytes=self.limits.max_frame_bytes, max_query_tokens=config.max_query_tokens,
                             max_new_tokens=config.max_new_tokens,
                             max_lag_s=engine.config.scheduler.max_lag_s or 0.0,
                             tokens_per_frame=engine.model.layout.num_tokens + 1)))
        reader = asyncio.create_task(self._read(session_id, request_iterator, events))
        try:
            while (item := await events.get()) is not None:
                if isinstance(item, pb.ServerMessage):
                    yield item
                    continue
                yield to_message(item)
                if isinstance(item, SessionFailed):
                    await context.abort(FAILURE_STATUS[item.code], item.message)
            yield pb.ServerMessage(closed=pb.SessionClosed(frames_decided=session.frames_decided,
                                                           frames_dropped=session.frames_dropped,
                                                           responses=session.responses))
        finally:
            reader.cancel()
            self.worker.close_when_drained(session_id, timeout_s=0)  # no-op when already closed

    async def _read(self, session_id: str, request_iterator, events: asyncio.Queue) -> None:
        """Push the client's frames and queries into the engine; on Close (or half-close) have the
        session closed once all of it is decided, which ends the event stream."""
        drain_s = self.limits.drain_timeout_s
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "close":
                    break
                try:
                    if kind == "frame":
                        self._push_frame(session_id, message.frame)
                    elif kind == "query":
                        self.worker.push_query(session_id, message.query.timestamp, message.query.text)
                    else:
                        events.put_nowait(warning(pb.WARNING_CODE_UNSPECIFIED,
                                                  f"{kind or 'an empty message'} is not valid after open; ignored"))
                except SessionError as exc:
                    code = pb.WARNING_CODE_BAD_QUERY if kind == "query" else pb.WARNING_CODE_BAD_FRAME
                    events.put_nowait(warning(code, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away mid-stream, or a bug: end this session only
            log.exception("reading session %s failed", session_id)
            drain_s = 0.0
        self.worker.close_when_drained(session_id, drain_s)

    def _push_frame(self, session_id: str, frame: pb.Frame) -> None:
        size = len(frame.image)
        if size > self.limits.max_frame_bytes:
            raise SessionError(f"frame at {frame.timestamp:.3f}s is {size} bytes; the limit is "
                               f"{self.limits.max_frame_bytes}")
        self.worker.push_frame(session_id, frame.timestamp, frame.image)


async def start_server(worker: EngineWorker, address: str = "127.0.0.1:0", *, defaults: SessionConfig | None = None,
                       limits: StreamLimits | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server with LiveStream, health checking and reflection; returns it and its port."""
    limits = limits or StreamLimits()
    message_limit = limits.max_frame_bytes + (64 << 10)  # a frame plus its envelope; larger: RESOURCE_EXHAUSTED
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", message_limit),
                                      ("grpc.max_send_message_length", 4 << 20)])
    pb_grpc.add_LiveStreamServicer_to_server(LiveStreamService(worker, defaults, limits), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port
