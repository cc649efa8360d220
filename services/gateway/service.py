"""Gateway: the public LiveStream API, written once, over either transport (seams.py).

One call is one session. The first message must be Open: it is checked (API key: access.py; model and
settings) and the session is admitted by Decision (its KV cache) and, unless it reports decisions only,
by Reaction (its reply cache), each placing it on a replica with room (admission.py). Frames, queries
and Close then flow through the session (session/stream_session.py) and the gateway's batched hops
(links.py); events come back on one stream per replica and go, by type, to their session's relay
(session/event_relay.py).

Recoverable input problems come back as Warnings and the session goes on; problems with the call end
it with a status: FAILED_PRECONDITION (no Open first), UNAUTHENTICATED (the deployment has API keys and
the Open carries none of them), INVALID_ARGUMENT (bad Open; a first message over `max_open_bytes`,
refused before any key is checked), RESOURCE_EXHAUSTED (no replica has room, the tenant is at its
sessions quota, a wrong key after too many failed checks with that key or from the client's address, or
the session's cache filled up), UNAVAILABLE (a service failed or did not answer in time), INTERNAL.

GetTranscript reads a session's record and history from the registry (Redis), under the same API keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

import grpc
import redis
from opentelemetry import context as otel_context

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.services.gateway.access import Access
from liveserve.services.gateway.admission import Admission
from liveserve.services.gateway.calls import CallFailed, Unparsable, Unparsed
from liveserve.services.gateway.session.event_relay import EventRelay
from liveserve.services.gateway.links import FrameBatcher, ReplicaLink
from liveserve.services.gateway.model_pools import ModelPools, PoolSeams
from liveserve.services.gateway.resume import ResumeTokens
from liveserve.services.gateway.session.context import Finish, GatewayContext
from liveserve.services.gateway.session.inputs import StreamInputs
from liveserve.services.gateway.session.stream_session import StreamSession
from liveserve.services.observability.telemetry import GatewayMetrics
from liveserve.services.observability.tracing import extract, tracer
from liveserve.services.security.tenants import Tenancy, quotas_from_setting
from liveserve.services.settings import ServiceSettings
from liveserve.services.state.registry import SessionRegistry
from liveserve.services.state.transcript import SESSION_ID, transcript_from_record
from liveserve.services.wire import contracts as c
from liveserve.services.wire.errors import internal

log = logging.getLogger(__name__)


class Gateway(pb_grpc.LiveStreamServicer):
    def __init__(self, models: Sequence[PoolSeams], settings: ServiceSettings, gateway_id: str = "",
                 registry: SessionRegistry | None = None) -> None:
        """`models`: each served model with its pools through one transport (seams.py), the default first;
        `registry`: where Decision records sessions, read by GetTranscript, and where tenants' sessions are
        counted over every gateway (None: no transcripts, and tenants counted by this gateway alone)."""
        if not models:
            raise ValueError("a gateway serves at least one model")
        self.registry = registry
        self.settings, self.id = settings, gateway_id or f"gateway-{uuid.uuid4().hex[:12]}"
        self.models = {seams.model.name: ModelPools(seams, make_link=self._make_link, batcher=self._batcher_for)
                       for seams in models}
        self.default_model = next(iter(self.models.values()))
        self.access = Access(settings)
        redis_client = registry.client if registry is not None else None
        self.resumes = ResumeTokens(redis_client, settings.session_ttl_s)
        self.tenancy = Tenancy(quotas_from_setting(settings.tenant_quotas), redis_client, settings.session_ttl_s)
        self.admission = Admission(settings, self.models, self.access, self.resumes, self.tenancy, self.keep)
        self._counting: asyncio.Task | None = None  # keeps this gateway's sessions counted in Redis
        self.metrics, self.tracer = GatewayMetrics(), tracer("gateway")
        # All of the gateway its sessions see.
        self.context = GatewayContext(self.id, settings, self.metrics, self.tracer, self.admission.place, self.keep,
                                      resumable=self.resumes.enabled)
        self.sessions: dict[str, StreamSession] = {}
        self._batchers: dict[str, FrameBatcher] = {}  # by Perception pool: models that share one share its
        self._watchdog: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # referenced until done (the loop keeps only weak references)
        self.unready = ""  # why new sessions are refused (a pool does not answer; the server drains); "": ready

    def _batcher_for(self, pools: ModelPools) -> FrameBatcher:
        """The frame batcher of `pools`' Perception pool, made on the serving loop by its first frame."""
        name = pools.served.perception_pool
        batcher = self._batchers.get(name)
        if batcher is None:
            settings = self.settings
            sharing = [model for model in self.models.values() if model.served.perception_pool == name]

            def senders() -> int:  # sessions that may send this pool frames: asked for every frame
                return sum(model.open_sessions for model in sharing)

            batcher = self._batchers[name] = FrameBatcher(
                pools.perception, tick_s=settings.tick_ms / 1000, max_frames=pools.settings.max_batch_size,
                timeout_s=settings.call_timeout_s, done=self._encoded, senders=senders,
                max_calls=settings.perception_calls, on_batch=self.metrics.tick_frames.observe)
        return batcher

    # ---- the public call ------------------------------------------------------------------------------------

    async def Stream(self, request_iterator, context: grpc.aio.ServicerContext):
        trace_parent = extract(dict(context.invocation_metadata() or ()))
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            session = await self._open(first, trace_parent, self.access.client_address(context))
        except CallFailed as failed:
            self.metrics.errors.inc(tags={"code": failed.code.name})
            await context.abort(failed.code, failed.details)
            return
        except Exception as exc:  # a bug: the client gets an id to report, the log the traceback
            self.metrics.errors.inc(tags={"code": "INTERNAL"})
            await context.abort(grpc.StatusCode.INTERNAL, internal(log, "opening the session failed", exc))
            return
        reader = None
        end = Finish(grpc.StatusCode.CANCELLED, "the call ended")
        try:  # from the first yield: a client gone at SessionOpened must not leave the session (or its quota)
            yield session.opened(first.open.client_session_id, self.settings.max_frame_bytes)
            reader = asyncio.get_running_loop().create_task(self._read(request_iterator, session))
            while not isinstance(message := await session.client.out.get(), Finish):
                yield message
            end = message
        finally:
            if reader is not None:
                reader.cancel()
            if end.code == grpc.StatusCode.CANCELLED and not session.ended and self.resumes.enabled:
                self.admission.park(session)  # the client went away: it may resume the session with its token
            session.abandon()  # a no-op once the session ended; else the client is gone: free it now
            if self.sessions.pop(session.session_id, None) is not None:
                session.pools.open_sessions -= 1
            self.admission.release(session.tenant, session.session_id)
            self._count_sessions(session.pools)
        if end.code != grpc.StatusCode.OK:
            self.metrics.errors.inc(tags={"code": end.code.name})
            await context.abort(end.code, end.details)

    async def GetTranscript(self, request: pb.GetTranscriptRequest | Unparsable,
                            context: grpc.aio.ServicerContext) -> pb.Transcript:
        try:
            return await self._transcript(request, self.access.client_address(context))
        except CallFailed as failed:
            self.metrics.errors.inc(tags={"code": failed.code.name})
            await context.abort(failed.code, failed.details)
        except Exception as exc:
            self.metrics.errors.inc(tags={"code": "INTERNAL"})
            await context.abort(grpc.StatusCode.INTERNAL, internal(log, "reading the transcript failed", exc))

    async def ListModels(self, request: pb.ListModelsRequest | Unparsable,
                         context: grpc.aio.ServicerContext) -> pb.ModelList:
        try:
            if isinstance(request, Unparsable):
                raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
            self.access.tenant(request.credentials, self.access.client_address(context), "credentials")
        except CallFailed as failed:
            self.metrics.errors.inc(tags={"code": failed.code.name})
            await context.abort(failed.code, failed.details)
        return pb.ModelList(models=[model.info(is_default=model is self.default_model)
                                    for model in self.models.values()])

    async def _transcript(self, request: pb.GetTranscriptRequest | Unparsable,
                          address: str | None) -> pb.Transcript:
        if isinstance(request, Unparsable):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        self.access.tenant(request.credentials, address, "credentials")
        if not SESSION_ID.fullmatch(request.session_id):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"session_id must be 1-128 letters, digits, '-' or "
                                                               f"'_' (SessionOpened.session_id), got "
                                                               f"{request.session_id[:140]!r}")
        if self.registry is None:
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             "this server keeps no session records (no Redis), so it has no transcripts")
        try:
            record = await asyncio.to_thread(self.registry.get, request.session_id)
        except redis.RedisError as exc:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, f"the session registry did not answer ({type(exc).__name__});"
                                                          f" retry shortly") from None
        if record is None:
            raise CallFailed(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}: it never existed, or "
                                                        f"its record expired ({self.settings.closed_ttl_s:g}s after "
                                                        f"it closed)")
        return transcript_from_record(record)

    async def _open(self, first: pb.ClientMessage | Unparsable | Unparsed, trace_parent: otel_context.Context,
                    address: str | None) -> StreamSession:
        tenant, pools, config = self.admission.check(first, address)
        if self.unready:  # fail fast and retryably rather than hang on a pool that is not there
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, self.unready)
        session = await self.admission.admit(first.open, tenant, pools, config, self.context, trace_parent)
        pools = session.pools  # a resumed session keeps the model it ran
        self.sessions[session.session_id] = session
        pools.open_sessions += 1
        self.metrics.sessions_opened.inc(tags={"model": pools.name})
        self._count_sessions(pools)
        self._ensure_watchdog()
        return session

    def _count_sessions(self, pools: ModelPools) -> None:
        self.metrics.sessions_active.set(pools.open_sessions, tags={"model": pools.name})

    async def _keep_counted(self) -> None:
        while self.tenancy.held:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self.tenancy.refresh()
            except Exception:
                log.warning("refreshing the tenants' session counts failed", exc_info=True)

    async def _read(self, request_iterator, session: StreamSession) -> None:
        """The client's messages into the session, until Close (or half-close); waits while the session's
        backlog is full, which pushes back on the client through HTTP/2 flow control."""
        drain = True
        inputs = session.inputs
        try:
            async for message in request_iterator:
                if isinstance(message, Unparsed):
                    message = message.parse()
                if isinstance(message, Unparsable):
                    session.finish(grpc.StatusCode.INVALID_ARGUMENT, message.problem)
                    return
                kind = message.WhichOneof("kind")
                if kind == "frame":
                    self.metrics.frames_received.inc()
                    inputs.receive_frame(message.frame)
                elif kind == "query":
                    inputs.receive_query(message.query)
                elif kind == "close":
                    break
                else:
                    session.client.warn(pb.WARNING_CODE_UNSPECIFIED,
                                        f"{kind or 'an empty message'} is not valid after open; ignored")
                await inputs.room.wait()
                if session.finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-stream (expected): stop the session without draining
            log.info("session %s: client stream ended abruptly (%s)", session.session_id, _one_line(exc))
            drain = False
        if not session.finished:
            inputs.receive_close(drain)

    # ---- the hops ------------------------------------------------------------------------------------------------

    def _encoded(self, batch: list[tuple[c.FrameImage, StreamInputs]], result: c.EncodeResult | None,
                 error: str) -> None:
        for row, (frame, inputs) in enumerate(batch):
            if inputs.finished:
                continue
            if result is None:  # Perception failed (retried first): these frames are lost, reported; later ones go on
                inputs.encoded(frame.frame_id, None, f"frame dropped: Perception {error}",
                               pb.WARNING_CODE_FRAME_DROPPED)
            else:
                inputs.encoded(frame.frame_id, result.features[row], result.errors[row])

    def _make_link(self, pools: ModelPools, name: str, replica: str) -> ReplicaLink:
        """A link to `replica` of `pools`' `name` pool ("decision" or "reaction"); its events go to the
        relay of their session, by the relay's handler for that pool."""
        if name == "decision":
            service, make_push, relay = pools.decision, c.DecisionPush, EventRelay.on_decision_event
        else:
            service, make_push, relay = pools.reaction, c.ReactionPush, EventRelay.on_reaction_event
        return ReplicaLink(service, replica, self.id, make_push=make_push, timeout_s=self.settings.call_timeout_s,
                           interval_s=self.settings.hop_ms / 1000, heartbeat_s=self.settings.heartbeat_s,
                           dispatch=lambda event: self._dispatch(event, relay),
                           failed=lambda link, message: self._link_failed(pools, link, message),
                           on_push=self.metrics.push_commands.observe, name=name)

    def keep(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, event, relay: Callable[[EventRelay, object], None]) -> None:
        session = self.sessions.get(event.session_id)
        if session is not None and not session.finished:
            relay(session.relay, event)

    def _link_failed(self, pools: ModelPools, link: ReplicaLink, message: str) -> None:
        """A replica is unreachable (it died, or drains): its sessions move to another replica of its pool
        (SessionRecovery.recover, recover_reaction)."""
        decision = link.name == "decision"
        pools.forget(link)
        for session in list(self.sessions.values()):
            where = session.where
            held = where.decision if decision else where.reaction
            if where.pools is not pools or held is None or held.replica != link.replica or where.decision_moving:
                continue
            if decision:
                session.recovery.recover(message)
            else:
                session.recovery.recover_reaction(message)

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_replies())
        if self.tenancy.held and (self._counting is None or self._counting.done()):
            self._counting = asyncio.get_running_loop().create_task(self._keep_counted())

    async def _watch_replies(self) -> None:
        """A reply that shows no sign of life for `call_timeout_s` is given up (its session goes on)."""
        timeout = self.settings.call_timeout_s
        while self.sessions:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                session.relay.give_up_if_stalled(now, timeout)

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def check(self, timeout_s: float = 5.0) -> str:
        """Ask every pool (and, through Decision, Redis) whether it answers; "" when all do, else why not.
        While something does not answer, new sessions are refused at once with UNAVAILABLE."""
        if self.unready.startswith("the server is shutting down"):
            return self.unready
        pools = {name: pool for model in self.models.values() for name, pool in model.pools().items()}
        answers = await asyncio.gather(*(asyncio.wait_for(pool.ping(), timeout_s) for pool in pools.values()),
                                       return_exceptions=True)
        down = [f"{name} ({'no answer' if isinstance(a, asyncio.TimeoutError) else type(a).__name__})"
                for name, a in zip(pools, answers) if isinstance(a, BaseException)]
        if down:
            log.warning("not ready: %s", ", ".join(down))
        self.unready = f"the service is not ready ({', '.join(down)}); retry shortly" if down else ""
        return self.unready

    async def drain(self, grace_s: float) -> None:
        """Shutting down: no new sessions; every open one stops taking input, has what it sent decided,
        and ends UNAVAILABLE (retryable) rather than being cut off. Waits up to `grace_s` for them."""
        self.unready = "the server is shutting down; open the session again to reach another server"
        for session in list(self.sessions.values()):
            session.shut_down(self.unready)
        deadline = time.monotonic() + grace_s
        while any(not s.finished for s in self.sessions.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def load(self) -> dict:
        return {"sessions": len(self.sessions)}

    def close(self) -> None:
        """Stop the hops (on the serving loop); open sessions end UNAVAILABLE."""
        for session in list(self.sessions.values()):
            session.finish(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        for model in self.models.values():
            model.close()
        for batcher in self._batchers.values():
            batcher.close()
        for task in (self._watchdog, self._counting):
            if task is not None:
                task.cancel()
        for task in self._tasks:
            task.cancel()


def _one_line(exc: BaseException) -> str:
    """An exception as one log line: its type and first line, no traceback (for failures that are expected)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
