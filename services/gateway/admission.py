"""Admitting a session at the Gateway: from a stream's Open to a StreamSession placed on its replicas, and
what outlives the call when it ends (its tenant's count, its resume entry).

`check` is what the gateway decides alone (API key, model, settings); `admit` then takes a resume token
when the Open carries one, counts the session against its tenant, and places it: on Decision (its KV
cache), then, unless it reports decisions only, on Reaction (its reply cache), each on a replica with
room (`place`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable

import grpc
import redis
from opentelemetry import context as otel_context

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import SessionConfig
from liveserve.engine.kv_pool import PoolFullError
from liveserve.services.gateway.access import Access
from liveserve.services.gateway.calls import CallFailed, Unparsable, Unparsed
from liveserve.services.gateway.model_pools import ModelPools
from liveserve.services.gateway.resume import Parked, ResumeTokens
from liveserve.services.gateway.resume import digest as resume_digest
from liveserve.services.gateway.session.context import GatewayContext
from liveserve.services.gateway.session.stream_session import StreamSession
from liveserve.services.security.tenants import QuotaExceeded, Tenancy
from liveserve.services.settings import ServiceSettings
from liveserve.services.state.transcript import SESSION_ID
from liveserve.services.wire import contracts as c
from liveserve.services.wire.errors import internal
from liveserve.services.wire.messages import session_config

log = logging.getLogger(__name__)

MAX_FPS = 60.0
DEFAULT_FPS = 2.0


class Admission:
    def __init__(self, settings: ServiceSettings, models: dict[str, ModelPools], access: Access,
                 resumes: ResumeTokens, tenancy: Tenancy, keep: Callable[[asyncio.Task], None]) -> None:
        """`models`: the served models by name, the default first. `keep`: holds a background task."""
        self.settings, self.models, self.access = settings, models, access
        self.default_model = next(iter(models.values()))
        self.resumes, self.tenancy, self._keep = resumes, tenancy, keep

    def check(self, first: pb.ClientMessage | Unparsable | Unparsed,
              address: str | None) -> tuple[str, ModelPools, SessionConfig]:
        """The Open's tenant, model and session settings, or CallFailed; `address`: the client's own
        (Access.client_address), None when not known."""
        if isinstance(first, Unparsed):  # before any key check: an unauthenticated client gets no parsing
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the first message is {len(first.data)} bytes; an open may be at most "
                             f"{self.settings.max_open_bytes} bytes (max_open_bytes)")
        tenant = self.access.authenticate(first, address)
        pools = self._model(first.open)
        return tenant, pools, self._session_config(first.open, pools)

    async def admit(self, open_: pb.Open, tenant: str, pools: ModelPools, config: SessionConfig,
                    gateway: GatewayContext, trace_parent: otel_context.Context) -> StreamSession:
        """The session `check`ed, counted against its tenant and placed, resumed if the Open says so."""
        parked = await self._resumable(open_, tenant) if open_.resume_session_id else None
        try:
            if parked is not None and parked.model != pools.name:
                pools = self._resumed_model(open_, parked)
                config = self._session_config(open_, pools)
            request = c.OpenSession(parked.session_id if parked else uuid.uuid4().hex, gateway.gateway_id, config,
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
                self.release(usage, request.session_id)
                raise
        except BaseException:
            if parked is not None:  # not resumed after all: the token stays good for a retry
                await asyncio.to_thread(self.resumes.park, parked, resume_digest(open_.resume_token))
            raise
        return StreamSession(gateway, pools, request.session_id, config, placed, reaction, trace_parent,
                             fps=open_.fps or DEFAULT_FPS, tenant=usage, resumed=parked)

    def _model(self, open_: pb.Open) -> ModelPools:
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

    @staticmethod
    def _session_config(open_: pb.Open, pools: ModelPools) -> SessionConfig:
        try:
            return session_config(open_, pools.defaults, pools.modes)
        except ValueError as exc:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"bad open: {exc}") from None

    # ---- resuming ------------------------------------------------------------------------------------------

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

    def park(self, session: StreamSession) -> None:
        """Keep what resuming the session needs for `session_ttl_s` (in Redis, off the loop)."""
        parked = session.parked()

        async def park() -> None:
            try:
                await asyncio.to_thread(self.resumes.park, parked, session.resume_digest)
            except Exception:
                log.warning("session %s could not be parked for resuming", session.session_id, exc_info=True)

        self._keep(asyncio.get_running_loop().create_task(park()))

    def release(self, usage, session_id: str) -> None:
        """The session no longer counts against its tenant (in Redis off the loop; should that fail, its
        entry expires on its own)."""
        async def release() -> None:
            try:
                await self.tenancy.release(usage, session_id)
            except Exception:
                log.warning("releasing session %s from its tenant's count failed", session_id, exc_info=True)

        self._keep(asyncio.get_running_loop().create_task(release()))

    # ---- placing -------------------------------------------------------------------------------------------

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


def _open_failure(exc: BaseException) -> CallFailed:
    cause = getattr(exc, "cause", None) or exc  # over Ray: the replica's own exception, without Ray's traceback
    if isinstance(cause, PoolFullError):
        return CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for a new session: {cause}")
    if isinstance(cause, ValueError):  # the session's settings do not fit the model (e.g. its context)
        return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"bad open: {cause}")
    return CallFailed(grpc.StatusCode.UNAVAILABLE, internal(log, "opening the session failed", exc))
