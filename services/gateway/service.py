"""Gateway: the public LiveStream API, written once, over either transport (seams.py).

One call is one session. The first message must be Open: it is checked (API key, settings) and the
session is admitted by Decision (its KV cache) and, unless it reports decisions only, by Reaction (its
reply cache), each placing it on a replica with room. Frames, queries and Close then flow through the
session (stream_session.py) and the gateway's batched hops (links.py); events come back on one stream
per replica and go out to the client as they arrive.

Recoverable input problems come back as Warnings and the session goes on; problems with the call end
it with a status: FAILED_PRECONDITION (no Open first), UNAUTHENTICATED (the deployment has API keys and
the Open carries none of them), INVALID_ARGUMENT (bad Open; a first message over `max_open_bytes`,
refused before any key is checked), RESOURCE_EXHAUSTED (no replica has room, the tenant is at its
sessions quota, too many failed key checks from the client's host, or the session's cache filled up),
UNAVAILABLE (a service failed or did not answer in time), INTERNAL.

GetTranscript reads a session's record and history from the registry (Redis), under the same API keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import redis
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.engine.kv_pool import PoolFullError
from liveserve.services.wire import contracts as c
from liveserve.services.security.auth import FailedAuthLimit, peer_host, tenant_keys_from_env, tenant_of
from liveserve.services.wire.errors import internal
from liveserve.services.gateway.links import FrameBatcher, ReplicaLink
from liveserve.services.wire.messages import session_config
from liveserve.services.gateway.model_pools import ModelPools, PoolSeams
from liveserve.services.state.registry import SessionRegistry
from liveserve.services.gateway.resume import Parked, ResumeTokens
from liveserve.services.gateway.resume import digest as resume_digest
from liveserve.services.settings import ServiceSettings
from liveserve.services.gateway.stream_session import Finish, StreamSession
from liveserve.services.observability.telemetry import GatewayMetrics
from liveserve.services.security.tenants import QuotaExceeded, Tenancy, quotas_from_setting
from liveserve.services.observability.tracing import extract, tracer
from liveserve.services.state.transcript import SESSION_ID, transcript_from_record

log = logging.getLogger(__name__)


MAX_FPS = 60.0
DEFAULT_FPS = 2.0


@dataclass(frozen=True, slots=True)
class Unparsable:
    """A client message that protobuf could not parse (server.py's deserializer); ends the call."""

    problem: str


@dataclass(frozen=True, slots=True)
class Unparsed:
    """A client message over `max_open_bytes`, not parsed yet: refused if it is the first (an Open is
    small), parsed when the session reads it (frames may be larger)."""

    data: bytes

    def parse(self) -> pb.ClientMessage | Unparsable:
        return parse_message(pb.ClientMessage, self.data)


def parse_message(message_type, data: bytes):
    """A client's message of `message_type`, or what was wrong with it: the Gateway ends the call with
    INVALID_ARGUMENT rather than let gRPC drop the message or fail the call with an unrelated status."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        return Unparsable(f"a message could not be parsed as {message_type.DESCRIPTOR.full_name} ({exc})")


class CallFailed(Exception):
    """Ends the call with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


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
        self.api_keys = tenant_keys_from_env(settings.api_keys_env)  # key -> tenant
        if settings.api_keys_env and not self.api_keys:
            raise ValueError(f"api_keys_env names {settings.api_keys_env}, which holds no keys")
        self.auth_failures = FailedAuthLimit(settings.auth_failures_per_min)
        self.resumes = ResumeTokens(registry.client if registry is not None else None, settings.session_ttl_s)
        self.tenancy = Tenancy(quotas_from_setting(settings.tenant_quotas),
                               registry.client if registry is not None else None, settings.session_ttl_s)
        self._counting: asyncio.Task | None = None  # keeps this gateway's sessions counted in Redis
        self.metrics, self.tracer = GatewayMetrics(), tracer("gateway")
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
            session = await self._open(first, trace_parent, peer_host(context.peer() or ""))
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
            yield pb.ServerMessage(opened=pb.SessionOpened(
                session_id=session.session_id, client_session_id=first.open.client_session_id,
                limits=self._limits(session), resume_token=session.resume_token,
                next_frame_index=session.next_frame_id))
            reader = asyncio.get_running_loop().create_task(self._read(request_iterator, session))
            while not isinstance(message := await session.out.get(), Finish):
                yield message
            end = message
        finally:
            if reader is not None:
                reader.cancel()
            if end.code == grpc.StatusCode.CANCELLED and not session.ended and self.resumes.enabled:
                self._park(session)  # the client went away: it may resume the session with its token
            session.abandon()  # a no-op once the session ended; else the client is gone: free it now
            if self.sessions.pop(session.session_id, None) is not None:
                session.pools.open_sessions -= 1
            self._release_quota(session.tenant, session.session_id)
            self._count_sessions(session.pools)
        if end.code != grpc.StatusCode.OK:
            self.metrics.errors.inc(tags={"code": end.code.name})
            await context.abort(end.code, end.details)

    async def GetTranscript(self, request: pb.GetTranscriptRequest | Unparsable,
                            context: grpc.aio.ServicerContext) -> pb.Transcript:
        try:
            return await self._transcript(request, peer_host(context.peer() or ""))
        except CallFailed as failed:
            self.metrics.errors.inc(tags={"code": failed.code.name})
            await context.abort(failed.code, failed.details)
        except Exception as exc:
            self.metrics.errors.inc(tags={"code": "INTERNAL"})
            await context.abort(grpc.StatusCode.INTERNAL, internal(log, "reading the transcript failed", exc))

    async def ListModels(self, request: pb.ListModelsRequest | Unparsable,
                         context: grpc.aio.ServicerContext) -> pb.ModelList:
        try:
            self._check_host(peer_host(context.peer() or ""))
            if isinstance(request, Unparsable):
                raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
            self._tenant(request.credentials, peer_host(context.peer() or ""), "credentials")
        except CallFailed as failed:
            self.metrics.errors.inc(tags={"code": failed.code.name})
            await context.abort(failed.code, failed.details)
        return pb.ModelList(models=[
            pb.ModelInfo(name=model.name, is_default=model is self.default_model, family=model.served.family,
                         threshold=model.defaults.threshold, max_new_tokens=model.defaults.max_new_tokens,
                         cache_policy=model.defaults.cache.policy, window_frames=model.defaults.cache.window_frames,
                         mode=model.defaults.mode)
            for model in self.models.values()])

    async def _transcript(self, request: pb.GetTranscriptRequest | Unparsable, host: str) -> pb.Transcript:
        self._check_host(host)
        if isinstance(request, Unparsable):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        self._tenant(request.credentials, host, "credentials")
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
                    host: str) -> StreamSession:
        if isinstance(first, Unparsed):  # before any key check: an unauthenticated client gets no parsing
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the first message is {len(first.data)} bytes; an open may be at most "
                             f"{self.settings.max_open_bytes} bytes (max_open_bytes)")
        tenant = self._authenticate(first, host)
        pools = self._check_open(first.open)
        config = self._session_config(first.open, pools)
        if self.unready:  # fail fast and retryably rather than hang on a pool that is not there
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, self.unready)
        parked = await self._resumable(first.open, tenant) if first.open.resume_session_id else None
        try:
            if parked is not None and parked.model != pools.name:
                pools = self._resumed_model(first.open, parked)
                config = self._session_config(first.open, pools)
            request = c.OpenSession(parked.session_id if parked else uuid.uuid4().hex, self.id, config,
                                    c.Restore(parked.frames) if parked else None)
            try:
                usage = await self.tenancy.admit(tenant, request.session_id)
            except QuotaExceeded as exc:
                raise CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            except Exception as exc:  # Redis does not answer: retryable, as when a pool does not
                raise CallFailed(grpc.StatusCode.UNAVAILABLE, internal(log, "counting the tenant's sessions failed",
                                                                       exc)) from None
            try:
                placed, reaction = await self._place_session(pools, request)
            except BaseException:
                self._release_quota(usage, request.session_id)
                raise
        except BaseException:
            if parked is not None:  # not resumed after all: the token stays good for a retry
                await asyncio.to_thread(self.resumes.park, parked, resume_digest(first.open.resume_token))
            raise
        session = StreamSession(self, pools, request.session_id, config, placed, reaction, trace_parent,
                                fps=first.open.fps or DEFAULT_FPS, tenant=usage, resumed=parked)
        if parked is not None:
            self.metrics.recoveries.inc()
            session.warn(pb.WARNING_CODE_SESSION_RECOVERED,
                         f"resumed: the session was rebuilt from its last {len(parked.frames)} frame(s)"
                         f"{'' if parked.frames else ' (another gateway kept them, or they expired)'} and "
                         f"{placed.restored_turns} turn(s) of conversation; frames sent after the connection "
                         f"broke never arrived; the next frame gets index {parked.next_frame}")
        self.sessions[session.session_id] = session
        pools.open_sessions += 1
        self.metrics.sessions_opened.inc(tags={"model": pools.name})
        self._count_sessions(pools)
        self._ensure_watchdog()
        return session

    def _count_sessions(self, pools: ModelPools) -> None:
        self.metrics.sessions_active.set(pools.open_sessions, tags={"model": pools.name})

    @staticmethod
    def _session_config(open_: pb.Open, pools: ModelPools):
        try:
            return session_config(open_, pools.defaults, pools.modes)
        except ValueError as exc:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"bad open: {exc}") from None

    def _resumed_model(self, open_: pb.Open, parked: Parked) -> ModelPools:
        """The model a resumed session ran (its cache holds that model's features and turns)."""
        if open_.model:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                             f"bad open: session {parked.session_id!r} runs model {parked.model!r}, not "
                             f"{open_.model!r}; resume it with that model (or leave model empty)")
        pools = self.models.get(parked.model) if parked.model else self.default_model
        if pools is None:
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"session {parked.session_id!r} ran model {parked.model!r}, which this deployment no "
                             f"longer serves; open a new session")
        return pools

    async def _resumable(self, open_: pb.Open, tenant: str) -> Parked:
        """The parked session the Open resumes (its token is used up), or CallFailed."""
        if not self.resumes.enabled:
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             "this server keeps no session records (no Redis), so sessions cannot be resumed")
        if not SESSION_ID.fullmatch(open_.resume_session_id):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"bad open: resume_session_id must be a session id "
                                                               f"(SessionOpened.session_id), got "
                                                               f"{open_.resume_session_id[:140]!r}")
        try:
            parked = await asyncio.to_thread(self.resumes.take, open_.resume_session_id, open_.resume_token, tenant)
        except redis.RedisError as exc:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, f"the session registry did not answer "
                                                          f"({type(exc).__name__}); retry shortly") from None
        if parked is None:
            raise CallFailed(grpc.StatusCode.NOT_FOUND,
                             f"no session {open_.resume_session_id!r} to resume with that token: it was closed, "
                             f"resumed already, or not resumed within {self.settings.session_ttl_s:g}s of its "
                             f"connection breaking")
        return parked

    def _park(self, session: StreamSession) -> None:
        """Keep what resuming the session needs for `session_ttl_s` (in Redis, off the loop)."""
        parked = Parked(session.session_id, session.tenant.tenant if session.tenant is not None else "",
                        session.pools.name,
                        session.next_frame_id, max(0.0, session.last_timestamp), tuple(session.kept_frames))

        async def park() -> None:
            try:
                await asyncio.to_thread(self.resumes.park, parked, session.resume_digest)
            except Exception:
                log.warning("session %s could not be parked for resuming", session.session_id, exc_info=True)

        self.keep(asyncio.get_running_loop().create_task(park()))

    def _check_host(self, host: str) -> None:
        """A host with too many failed key checks this minute is refused before its message is looked at."""
        if self.api_keys and (wait := self.auth_failures.retry_after(host)):
            raise CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"too many failed api_key checks from this address (auth_failures_per_min: "
                             f"{self.settings.auth_failures_per_min}); retry in {math.ceil(wait)}s")

    def _tenant(self, credentials, host: str, where: str) -> str:
        """The tenant whose key `credentials` carry; a miss counts against the host."""
        tenant = tenant_of(credentials, self.api_keys)
        if tenant is None:
            self.auth_failures.failed(host)
            raise CallFailed(grpc.StatusCode.UNAUTHENTICATED, f"missing or unknown api_key in {where}")
        return tenant

    def _authenticate(self, first: pb.ClientMessage | Unparsable, host: str) -> str:
        """The Open's tenant."""
        self._check_host(host)
        if isinstance(first, Unparsable):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, first.problem)
        kind = first.WhichOneof("kind")
        if kind != "open":
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the first message of a stream must be open, got {kind or 'an empty message'}")
        return self._tenant(first.open.credentials, host, "open.credentials")

    async def _place_session(self, pools: ModelPools,
                             request: c.OpenSession) -> tuple[c.SessionPlaced, c.SessionPlaced | None]:
        # Decision first, then Reaction: two sessions opening at once then never hold one pool each while
        # each waits for the other's (both would be refused with room for one of them).
        placed = await self.place(pools.decision, request)
        reaction = None
        if request.config.replies != "none" and request.config.mode == "live":  # commentary: Decision writes
            try:
                reaction = await self.place(pools.reaction, dataclasses.replace(request, restore=None))
            except CallFailed:
                pools.decision_link(placed.replica).send(c.CloseSession(request.session_id, placed.epoch, False))
                raise
        return placed, reaction

    def _release_quota(self, usage, session_id: str) -> None:
        """The session no longer counts against its tenant (in Redis off the loop; should that fail, its
        entry expires on its own)."""
        async def release() -> None:
            try:
                await self.tenancy.release(usage, session_id)
            except Exception:
                log.warning("releasing session %s from its tenant's count failed", session_id, exc_info=True)

        self.keep(asyncio.get_running_loop().create_task(release()))

    async def _keep_counted(self) -> None:
        while self.tenancy.held:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self.tenancy.refresh()
            except Exception:
                log.warning("refreshing the tenants' session counts failed", exc_info=True)

    def _check_open(self, open_: pb.Open) -> ModelPools:
        """What the gateway checks itself, and the model the Open asks for; the settings are checked by
        SessionConfig, and the sizes against the model's context by Decision."""
        pools = self.models.get(open_.model) if open_.model else self.default_model
        if pools is None:
            raise CallFailed(grpc.StatusCode.NOT_FOUND,
                             f"unknown model {open_.model[:140]!r}; this deployment serves "
                             f"{', '.join(map(repr, self.models))} (leave model empty for "
                             f"{self.default_model.name!r}; ListModels lists them)")
        if open_.fps and not (math.isfinite(open_.fps) and 0 < open_.fps <= MAX_FPS):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                             f"bad open: fps must be in (0, {MAX_FPS:g}] (0: the default {DEFAULT_FPS:g}), "
                             f"got {open_.fps}")
        return pools

    async def place(self, pool, request: c.OpenSession, avoid: str = "") -> c.SessionPlaced:
        """Open a session on a replica of `pool` (Decision or Reaction) with room. While the pool replaces a
        replica that just died, a call may reach it: such failures are retried (with backoff, within
        `call_timeout_s`), so a new or moving session lands on a live replica; a full pool or a bad session
        is not retried. Raises CallFailed."""
        deadline = time.monotonic() + self.settings.call_timeout_s
        delay = 0.05
        while True:
            try:
                return await asyncio.wait_for(pool.open(request, avoid), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise CallFailed(grpc.StatusCode.UNAVAILABLE, f"opening the session took longer than "
                                                              f"{self.settings.call_timeout_s:g}s") from None
            except Exception as exc:
                failure = _open_failure(exc)
                if failure.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay >= deadline:
                    raise failure from None
                log.info("opening session %s failed (%s); retrying", request.session_id, type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    def _limits(self, session: StreamSession) -> pb.Limits:
        limits = session.placed.limits
        return pb.Limits(max_frame_bytes=self.settings.max_frame_bytes, max_query_tokens=limits.max_query_tokens,
                         max_new_tokens=limits.max_new_tokens, max_lag_s=limits.max_lag_s,
                         tokens_per_frame=limits.tokens_per_frame)

    async def _read(self, request_iterator, session: StreamSession) -> None:
        """The client's messages into the session, until Close (or half-close); waits while the session's
        backlog is full, which pushes back on the client through HTTP/2 flow control."""
        drain = True
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
                    session.receive_frame(message.frame)
                elif kind == "query":
                    session.receive_query(message.query)
                elif kind == "close":
                    break
                else:
                    session.warn(pb.WARNING_CODE_UNSPECIFIED,
                                 f"{kind or 'an empty message'} is not valid after open; ignored")
                await session.room.wait()
                if session.finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away mid-stream: stop the session without draining
            log.info("session %s: client stream ended abruptly", session.session_id, exc_info=True)
            drain = False
        if not session.finished:
            session.receive_close(drain)

    # ---- the hops ------------------------------------------------------------------------------------------------

    def _encoded(self, batch: list, result: c.EncodeResult | None, error: str) -> None:
        for row, (frame, session) in enumerate(batch):
            if session.finished:
                continue
            if result is None:  # Perception failed (retried first): these frames are lost, reported; later ones go on
                session.encoded(frame.frame_id, None, f"frame dropped: Perception {error}", pb.WARNING_CODE_FRAME_DROPPED)
            else:
                session.encoded(frame.frame_id, result.features[row], result.errors[row])

    def _make_link(self, pools: ModelPools, name: str, replica: str) -> ReplicaLink:
        """A link to `replica` of `pools`' `name` pool ("decision" or "reaction")."""
        handler = f"on_{name}_event"
        service, make_push = (pools.decision, c.DecisionPush) if name == "decision" else (pools.reaction,
                                                                                           c.ReactionPush)
        return ReplicaLink(service, replica, self.id, make_push=make_push, timeout_s=self.settings.call_timeout_s,
                           interval_s=self.settings.hop_ms / 1000, heartbeat_s=self.settings.heartbeat_s,
                           dispatch=lambda event: self._dispatch(event, handler),
                           failed=lambda link, message: self._link_failed(pools, link, message),
                           on_push=self.metrics.push_commands.observe, name=name)

    def keep(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, event, handler: str) -> None:
        session = self.sessions.get(event.session_id)
        if session is not None and not session.finished:
            getattr(session, handler)(event)

    def _link_failed(self, pools: ModelPools, link: ReplicaLink, message: str) -> None:
        """A replica is unreachable (it died, or drains): its sessions move to another replica of its pool
        (StreamSession.recover, recover_reaction)."""
        decision = link.name == "decision"
        pools.forget(link)
        for session in list(self.sessions.values()):
            held = session.placed if decision else session.reaction
            if session.pools is not pools or held is None or held.replica != link.replica or session.recovering:
                continue
            if decision:
                session.recover(message)
            else:
                session.recover_reaction(message)

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
                if session.reply is not None and now - session.reply.active > timeout:
                    session.reply_failed(f"no word from Reaction for {timeout:g}s")

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


def _open_failure(exc: BaseException) -> CallFailed:
    cause = getattr(exc, "cause", None) or exc  # over Ray: the replica's own exception, without Ray's traceback
    if isinstance(cause, PoolFullError):
        return CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for a new session: {cause}")
    if isinstance(cause, ValueError):  # the session's settings do not fit the model (e.g. its context)
        return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"bad open: {cause}")
    return CallFailed(grpc.StatusCode.UNAVAILABLE, internal(log, "opening the session failed", exc))
