"""Gateway: terminates the public LiveStream calls and routes each session to its Decision replica.

One call is one session. Open is validated here and the session is placed on a Decision replica with
room; the replica records itself as owner in Redis, and the gateway reads the route from there and
sends every later call for the session to that replica only (sticky: the KV cache lives there).
Frames go to the Perception pool as they arrive (in flight together, so frames of every session
are encoded in batches) and on to Decision strictly in the order they were sent. The session's
events stream back from Decision as they happen, interleaved with the gateway's own warnings.

Recoverable input problems come back as Warnings and the session goes on; problems with the call end
it with a status: FAILED_PRECONDITION (no Open first), INVALID_ARGUMENT (bad Open), RESOURCE_EXHAUSTED
(no replica has room), UNAVAILABLE (a service did not answer in time), INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.engine.inputs import SessionError, check_time
from liveserve.engine.kv_pool import PoolFullError
from liveserve.internal.v1 import decision_pb2 as dpb
from liveserve.internal.v1 import perception_pb2 as ppb
from liveserve.services.messages import session_config, warning
from liveserve.services.redis_server import connect
from liveserve.services.registry import SessionRegistry
from liveserve.services.settings import ServiceSettings

log = logging.getLogger(__name__)
_ORDERED_BACKLOG = 64  # frames and queries between the client and Decision; more waits (flow control)


class CallFailed(Exception):
    """Ends the call with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)  # both in args: the exception crosses processes pickled
        self.code, self.details = code, details

    def __str__(self) -> str:
        return self.details


@dataclass(frozen=True, slots=True)
class _Route:
    session_id: str
    replica: str
    epoch: int


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class Gateway:
    def __init__(self, perception, decision, settings: dict | None = None) -> None:
        self.settings = ServiceSettings.from_dict(settings)
        self.defaults = self.settings.session_defaults()
        self.perception, self.decision = perception, decision
        self.registry = SessionRegistry(connect()[0], ttl_s=self.settings.session_ttl_s,
                                        closed_ttl_s=self.settings.closed_ttl_s)

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING once the application is deployed (Serve routes here only then)."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Stream(self, request_stream: gRPCInputStream, grpc_context: RayServegRPCContext):
        try:
            first = await anext(request_stream, None)
            if first is None:
                return
            route, limits = await self._open(first)
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
                # Client gone or call failed before its Close went through: free the session now. (A no-op
                # for a session already closed: Decision no longer knows it.)
                asyncio.create_task(self._close_now(route))
        except CallFailed as failed:
            grpc_context.set_code(failed.code)
            grpc_context.set_details(failed.details)
            raise

    # ---- open ------------------------------------------------------------------------------------------

    async def _open(self, first: pb.ClientMessage) -> tuple[_Route, pb.Limits]:
        kind = first.WhichOneof("kind")
        if kind != "open":
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the first message of a stream must be open, got {kind or 'an empty message'}")
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
                    try:
                        last_timestamp = self._check_frame(message.frame, last_timestamp)
                    except SessionError as exc:
                        out.put_nowait(warning(pb.WARNING_CODE_BAD_FRAME, str(exc), [message.frame.timestamp]))
                        continue
                    encoding = self.perception.Encode.remote(ppb.EncodeRequest(
                        session_id=route.session_id, timestamp=message.frame.timestamp, image=message.frame.image))
                    await ordered.put(("frame", message.frame.timestamp, time.time(), encoding))
                elif kind == "query":
                    await ordered.put(("query", message.query))
                else:
                    out.put_nowait(warning(pb.WARNING_CODE_UNSPECIFIED,
                                           f"{kind or 'an empty message'} is not valid after open; ignored"))
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
            if item[0] == "close":
                request.close.drain = item[1]
            elif item[0] == "query":
                request.query.CopyFrom(item[1])
            else:
                _, timestamp, received_at, encoding = item
                try:
                    encoded = await self._call(encoding, f"encoding the frame at {timestamp:.3f}s")
                except SessionError as exc:
                    out.put_nowait(warning(pb.WARNING_CODE_BAD_FRAME, str(exc), [timestamp]))
                    continue
                except CallFailed as failed:
                    out.put_nowait(failed)
                    return
                request.frame.CopyFrom(dpb.FrameFeatures(timestamp=timestamp, features=encoded.features,
                                                         received_at=received_at))
            try:
                await self._call(self.decision.Push.remote(request, route_to=route.replica), "pushing to Decision")
            except SessionError as exc:
                code = pb.WARNING_CODE_BAD_QUERY if item[0] == "query" else pb.WARNING_CODE_BAD_FRAME
                out.put_nowait(warning(code, str(exc)))
            except CallFailed as failed:
                out.put_nowait(failed)
                return
            if item[0] == "close":
                return

    # ---- services -> client ----------------------------------------------------------------------------

    async def _forward_events(self, route: _Route, out: asyncio.Queue) -> None:
        events = self.decision.options(stream=True).Events.remote(
            dpb.EventsRequest(session_id=route.session_id, epoch=route.epoch), route_to=route.replica)
        try:
            async for message in events:
                out.put_nowait(message)
        except Exception as exc:
            log.warning("session %s: events from Decision failed", route.session_id, exc_info=True)
            out.put_nowait(CallFailed(grpc.StatusCode.UNAVAILABLE, f"the session's decision replica failed: {exc}"))
        out.put_nowait(None)

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
