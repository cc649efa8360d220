"""Gateway: terminates the public LiveStream calls and routes each session to its Decision replica.

One call is one session. Open is validated here and the session is placed on a Decision replica with
room; the replica records itself as owner in Redis, and the gateway reads the route from there and
sends every later call for the session to that replica only (sticky: the KV cache lives there).
Frames go to the Perception pool as they arrive (in flight together, so frames of every session
are encoded in batches) and on to Decision strictly in the order they were sent. The session's
events stream back from Decision as they happen, interleaved with the gateway's own warnings.

Recoverable input problems come back as Warnings and the session goes on; problems with the call end
it with a status: FAILED_PRECONDITION (no Open first), UNAUTHENTICATED (api keys are configured and the
Open carries none of them), INVALID_ARGUMENT (bad Open), RESOURCE_EXHAUSTED
(no replica has room), UNAVAILABLE (a service did not answer in time), INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.engine.inputs import SessionError, check_time
from liveserve.engine.kv_pool import PoolFullError
from liveserve.internal.v1 import decision_pb2 as dpb
from liveserve.internal.v1 import perception_pb2 as ppb
from liveserve.services.auth import api_key_accepted, api_keys_from_env
from liveserve.services.messages import session_config, warning
from liveserve.services.redis_server import connect
from liveserve.services.registry import SessionRegistry
from liveserve.services.settings import ServiceSettings
from liveserve.services.telemetry import GatewayMetrics
from liveserve.services.tracing import extract, inject, tracer

log = logging.getLogger(__name__)
_ORDERED_BACKLOG = 64  # frames and queries between the client and Decision; more waits (flow control)


class CallFailed(Exception):
    """Ends the call with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)  # both in args: the exception crosses processes pickled
        self.code, self.details = code, details

    def __str__(self) -> str:
        return self.details


@dataclass(slots=True)
class _Route:
    """A session's route (its Decision replica and fencing epoch) and its open frame traces."""

    session_id: str
    replica: str
    epoch: int
    trace_parent: otel_context.Context | None = None  # from the client's traceparent metadata
    frame_spans: dict[float, Span] = field(default_factory=dict)  # receipt -> decision, by frame timestamp


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class Gateway:
    def __init__(self, perception, decision, settings: dict | None = None) -> None:
        self.settings = ServiceSettings.from_dict(settings)
        self.defaults = self.settings.session_defaults()
        self.perception, self.decision = perception, decision
        self.registry = SessionRegistry(connect()[0], ttl_s=self.settings.session_ttl_s,
                                        closed_ttl_s=self.settings.closed_ttl_s)
        self.metrics, self.tracer = GatewayMetrics(), tracer("gateway")
        self.api_keys = api_keys_from_env(self.settings.api_keys_env)
        if self.settings.api_keys_env and not self.api_keys:
            raise ValueError(f"api_keys_env names {self.settings.api_keys_env}, which holds no keys")
        self.active = 0
        self._closing: set[asyncio.Task] = set()  # referenced until done (the loop keeps only weak refs)

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING once the application is deployed (Serve routes here only then)."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Stream(self, request_stream: gRPCInputStream, grpc_context: RayServegRPCContext):
        try:
            first = await anext(request_stream, None)
            if first is None:
                return
            route, limits = await self._open(first)
            route.trace_parent = extract(dict(grpc_context.invocation_metadata()))
            self.metrics.sessions_opened.inc()
            self.active += 1
            self.metrics.sessions_active.set(self.active)
            yield pb.ServerMessage(opened=pb.SessionOpened(session_id=route.session_id,
                                                           client_session_id=first.open.client_session_id,
                                                           limits=limits))
            out: asyncio.Queue = asyncio.Queue()
            tasks = [asyncio.create_task(self._read(request_stream, route, out)),
                     asyncio.create_task(self._forward_events(route, out))]
            try:
                while (message := await out.get()) is not None:
                    if isinstance(message, CallFailed):
                        raise message
                    yield message
                    if message.WhichOneof("kind") == "error":
                        raise CallFailed(_status(message.error.code), message.error.message)
            finally:
                for task in tasks:
                    task.cancel()
                for span in route.frame_spans.values():
                    span.end()
                self.active -= 1
                self.metrics.sessions_active.set(self.active)
                # Client gone or call failed before its Close went through: free the session now. (A no-op
                # for a session already closed: Decision no longer knows it.)
                closing = asyncio.create_task(self._close_now(route))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        except CallFailed as failed:
            self.metrics.errors.inc(tags={"code": failed.code.name})
            grpc_context.set_code(failed.code)
            grpc_context.set_details(failed.details)
            raise

    # ---- open ------------------------------------------------------------------------------------------

    async def _open(self, first: pb.ClientMessage) -> tuple[_Route, pb.Limits]:
        kind = first.WhichOneof("kind")
        if kind != "open":
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the first message of a stream must be open, got {kind or 'an empty message'}")
        if not api_key_accepted(first.open.credentials, self.api_keys):
            raise CallFailed(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown api_key in open.credentials")
        try:
            session_config(first.open, self.defaults)
        except ValueError as exc:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"bad open: {exc}") from None
        session_id = uuid.uuid4().hex
        try:
            opened = await self._call(self.decision.Open.remote(dpb.OpenRequest(session_id=session_id, open=first.open)),
                                      "opening the session")
        except PoolFullError as exc:
            raise CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for a new session: {exc}") from None
        record = await asyncio.to_thread(self.registry.get, session_id)  # the route lives in Redis
        if record is None:
            raise CallFailed(grpc.StatusCode.INTERNAL, f"session {session_id} is missing from the registry")
        limits = pb.Limits()
        limits.CopyFrom(opened.limits)
        limits.max_frame_bytes = self.settings.max_frame_bytes
        return _Route(session_id, record.owner, record.epoch), limits

    # ---- client -> services ------------------------------------------------------------------------------

    async def _read(self, request_stream: gRPCInputStream, route: _Route, out: asyncio.Queue) -> None:
        """Check each input, start its frame's encoding at once, and hand everything to `_forward` in order."""
        ordered: asyncio.Queue = asyncio.Queue(_ORDERED_BACKLOG)
        forwarder = asyncio.create_task(self._forward(route, ordered, out))
        last_timestamp, drain = -1.0, True
        try:
            async for message in request_stream:
                kind = message.WhichOneof("kind")
                if kind == "close":
                    break
                if kind == "frame":
                    self.metrics.frames_received.inc()
                    try:
                        last_timestamp = self._check_frame(message.frame, last_timestamp)
                    except SessionError as exc:
                        self._warn(out, pb.WARNING_CODE_BAD_FRAME, str(exc), [message.frame.timestamp])
                        continue
                    timestamp = message.frame.timestamp
                    span = self.tracer.start_span("frame", context=route.trace_parent,
                                                  attributes={"liveserve.session_id": route.session_id,
                                                              "liveserve.frame_timestamp": timestamp})
                    route.frame_spans[timestamp] = span
                    request = ppb.EncodeRequest(session_id=route.session_id, timestamp=timestamp,
                                                image=message.frame.image)
                    inject(request.trace_context, span)
                    await ordered.put(("frame", timestamp, time.time(), self.perception.Encode.remote(request)))
                elif kind == "query":
                    await ordered.put(("query", message.query))
                else:
                    self._warn(out, pb.WARNING_CODE_UNSPECIFIED,
                               f"{kind or 'an empty message'} is not valid after open; ignored")
        except Exception:  # the client went away mid-stream: stop the session without draining
            log.info("session %s: client stream ended abruptly", route.session_id, exc_info=True)
            drain = False
        await ordered.put(("close", drain))
        await forwarder

    def _check_frame(self, frame: pb.Frame, last_timestamp: float) -> float:
        timestamp = check_time(frame.timestamp, "frame")
        if len(frame.image) > self.settings.max_frame_bytes:
            raise SessionError(f"frame at {timestamp:.3f}s is {len(frame.image)} bytes; the limit is "
                               f"{self.settings.max_frame_bytes}")
        if timestamp < last_timestamp:
            raise SessionError(f"frame timestamp {timestamp:.3f}s is before the previous frame's "
                               f"{last_timestamp:.3f}s; timestamps must not go backwards")
        return timestamp

    async def _forward(self, route: _Route, ordered: asyncio.Queue, out: asyncio.Queue) -> None:
        """Frames (once encoded) and queries to Decision, in the order the client sent them."""
        while True:
            item = await ordered.get()
            request = dpb.PushRequest(session_id=route.session_id, epoch=route.epoch)
            query_span = None
            if item[0] == "close":
                request.close.drain = item[1]
            elif item[0] == "query":
                request.query.CopyFrom(item[1])
                query_span = self.tracer.start_span("query", context=route.trace_parent,
                                                    attributes={"liveserve.session_id": route.session_id,
                                                                "liveserve.query_timestamp": item[1].timestamp})
                inject(request.trace_context, query_span)
            else:
                _, timestamp, received_at, encoding = item
                try:
                    encoded = await self._call(encoding, f"encoding the frame at {timestamp:.3f}s")
                except SessionError as exc:
                    self._end_frame_span(route, timestamp, str(exc))
                    self._warn(out, pb.WARNING_CODE_BAD_FRAME, str(exc), [timestamp])
                    continue
                except CallFailed as failed:
                    out.put_nowait(failed)
                    return
                request.frame.CopyFrom(dpb.FrameFeatures(timestamp=timestamp, features=encoded.features,
                                                         received_at=received_at))
                if timestamp in route.frame_spans:
                    inject(request.trace_context, route.frame_spans[timestamp])
            try:
                await self._call(self.decision.Push.remote(request, route_to=route.replica), "pushing to Decision")
            except SessionError as exc:
                code = pb.WARNING_CODE_BAD_QUERY if item[0] == "query" else pb.WARNING_CODE_BAD_FRAME
                if item[0] == "frame":
                    self._end_frame_span(route, item[1], str(exc))
                self._warn(out, code, str(exc))
            except CallFailed as failed:
                out.put_nowait(failed)
                return
            finally:
                if query_span is not None:
                    query_span.end()
            if item[0] == "close":
                return

    # ---- services -> client ----------------------------------------------------------------------------

    async def _forward_events(self, route: _Route, out: asyncio.Queue) -> None:
        events = self.decision.options(stream=True).Events.remote(
            dpb.EventsRequest(session_id=route.session_id, epoch=route.epoch), route_to=route.replica)
        try:
            async for batch in events:
                for message in batch.messages:
                    self._relay(route, message, out)
        except Exception as exc:
            log.warning("session %s: events from Decision failed", route.session_id, exc_info=True)
            out.put_nowait(CallFailed(grpc.StatusCode.UNAVAILABLE, f"the session's decision replica failed: {exc}"))
        out.put_nowait(None)

    def _relay(self, route: _Route, message: pb.ServerMessage, out: asyncio.Queue) -> None:
        """One of Decision's messages on its way to the client: close the frame traces it settles."""
        kind = message.WhichOneof("kind")
        if kind == "decision":
            span = route.frame_spans.pop(message.decision.timestamp, None)
            if span is not None:
                span.set_attributes({"liveserve.fired": message.decision.fired,
                                     "liveserve.p_silent": message.decision.p_silent})
                span.end()
        elif kind == "warning":
            self.metrics.warnings.inc(tags={"code": pb.WarningCode.Name(message.warning.code)})
            for timestamp in message.warning.timestamps:  # dropped frames: their traces end here
                self._end_frame_span(route, timestamp, message.warning.message)
        out.put_nowait(message)

    def _warn(self, out: asyncio.Queue, code: int, message: str, timestamps=()) -> None:
        self.metrics.warnings.inc(tags={"code": pb.WarningCode.Name(code)})
        out.put_nowait(warning(code, message, timestamps))

    def _end_frame_span(self, route: _Route, timestamp: float, problem: str) -> None:
        span = route.frame_spans.pop(timestamp, None)
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, problem))
            span.end()

    async def _close_now(self, route: _Route) -> None:
        request = dpb.PushRequest(session_id=route.session_id, epoch=route.epoch, close=dpb.CloseSession(drain=False))
        try:
            await self._call(self.decision.Push.remote(request, route_to=route.replica), "closing the session")
        except (SessionError, CallFailed):
            pass  # already closed, or its replica is gone with it

    async def _call(self, response, what: str):
        """Await an internal call; SessionError/PoolFullError pass through, a timeout is UNAVAILABLE."""
        try:
            return await asyncio.wait_for(response, self.settings.call_timeout_s)
        except (SessionError, PoolFullError):
            raise
        except asyncio.TimeoutError:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE,
                             f"{what} took longer than {self.settings.call_timeout_s:.0f}s") from None
        except Exception as exc:
            log.warning("%s failed", what, exc_info=True)
            raise CallFailed(grpc.StatusCode.INTERNAL, f"{what} failed: {type(exc).__name__}") from None


def _status(code: int) -> grpc.StatusCode:
    return next((status for status in grpc.StatusCode if status.value[0] == code), grpc.StatusCode.INTERNAL)
