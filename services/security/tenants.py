"""Tenants' quotas: concurrent sessions, frames a second and replies a minute, per tenant (auth.py).

Quotas come from the `tenant_quotas` setting, {tenant: {sessions, frames_per_s, replies_per_min}}, with
"*" for tenants not named; a quota left out (or null) is unlimited. With Redis, an entry in the hash
`{prefix}:tenant_quotas` (field: the tenant or "*", value: the same JSON object) takes the place of the
setting's entry for that name, read at every Open, so an operator can change a tenant's quota without a
redeploy. Which entry applies: Redis's for the tenant, the setting's for the tenant, Redis's "*", the
setting's "*"; none: unlimited.

Concurrent sessions hold across gateways when counted in Redis: one sorted set per tenant,
`{prefix}:tenant:{tenant}:sessions`, its members the open sessions, each scored with the Redis time at
which it expires. Admission drops the expired members and adds the new one in one script, so two
gateways cannot both take the last place; each gateway pushes its sessions' expiry forward every
heartbeat, so the sessions of a gateway that died stop counting `session_ttl_s` later. Without Redis
(`serve --local` without REDIS_URL: one gateway) the count is kept in memory.

Frames a second and replies a minute are counted by each gateway for the tenant's sessions it holds,
against the gateway's share of the quota: with Redis, each heartbeat sets it to the gateway's part of the
tenant's open sessions (3 of 4 sessions here: 3/4 of frames_per_s), so the gateways together keep to the
quota; until the first heartbeat after a tenant's first session here, and without Redis, the whole quota.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Protocol

import redis

from liveserve.services.security.rate_limit import IngressLimit

log = logging.getLogger(__name__)
QUOTA_KEYS = "tenant_quotas"
DEFAULT = "*"


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits; None is unlimited."""

    sessions: int | None = None  # concurrent sessions, over all gateways
    frames_per_s: float | None = None  # frames a second over the tenant's sessions on one gateway
    replies_per_min: int | None = None  # replies in any minute over the tenant's sessions on one gateway

    @classmethod
    def from_dict(cls, values: dict, where: str) -> Quota:
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be a mapping of quotas, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown quota(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{where}.{name} must be a number >= 0 or null (unlimited), got {value!r}")
        for name in ("sessions", "replies_per_min"):
            value = values.get(name)
            if value is not None and value != int(value):
                raise ValueError(f"{where}.{name} must be a whole number, got {value!r}")
        whole = {name: int(values[name]) for name in ("sessions", "replies_per_min") if values.get(name) is not None}
        return cls(**{**values, **whole})


def quotas_from_setting(values: dict | None) -> dict[str, Quota]:
    if not isinstance(values or {}, dict):
        raise ValueError(f"tenant_quotas must map tenant names (or \"*\") to quotas, got {values!r}")
    return {str(tenant): Quota.from_dict(quota, f"tenant_quotas[{tenant!r}]")
            for tenant, quota in (values or {}).items()}


class QuotaExceeded(Exception):
    """An Open over its tenant's quota; the message names the quota and its limit."""


class QuotaBook:
    """Which quota applies to a tenant: the setting's, or Redis's override (see the module's docstring)."""

    def __init__(self, configured: dict[str, Quota], client: redis.Redis | None = None,
                 prefix: str = "liveserve") -> None:
        self.configured, self.client, self.key = configured, client, f"{prefix}:{QUOTA_KEYS}"

    def quota(self, tenant: str) -> Quota:
        """Blocking when there is Redis (one HMGET): call it off the serving loop."""
        override = {}
        if self.client is not None:
            found = self.client.hmget(self.key, [tenant, DEFAULT])
            override = {name: value for name, value in zip((tenant, DEFAULT), found) if value is not None}
        for name, source in ((tenant, override), (tenant, self.configured), (DEFAULT, override),
                             (DEFAULT, self.configured)):
            if name in source:
                quota = source[name]
                if isinstance(quota, str):
                    try:
                        return Quota.from_dict(json.loads(quota), f"Redis {self.key}[{name!r}]")
                    except ValueError as exc:  # a typo in Redis must not open the gates: fall back
                        log.warning("ignoring a bad quota override: %s", exc)
                        continue
                return quota
        return Quota()


class SessionCount(Protocol):
    def acquire(self, tenant: str, session_id: str, limit: int | None) -> bool: ...
    def release(self, tenant: str, session_id: str) -> None: ...
    def refresh(self, held: list[tuple[str, str]]) -> dict[str, int]: ...


class LocalSessionCount:
    """One gateway's count, in memory (a single-process server without Redis)."""

    def __init__(self) -> None:
        self._sessions: dict[str, set[str]] = {}

    def acquire(self, tenant: str, session_id: str, limit: int | None) -> bool:
        held = self._sessions.setdefault(tenant, set())
        if limit is not None and len(held) >= limit:
            return False
        held.add(session_id)
        return True

    def release(self, tenant: str, session_id: str) -> None:
        held = self._sessions.get(tenant)
        if held is not None:
            held.discard(session_id)
            if not held:
                del self._sessions[tenant]

    def refresh(self, held: list[tuple[str, str]]) -> dict[str, int]:
        return {tenant: len(self._sessions.get(tenant, ())) for tenant, _ in held}


# KEYS[1]: the tenant's set; ARGV: session id, limit ('' = none), ttl_ms. Returns 1 (admitted) or 0 (at the limit).
_ACQUIRE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if ARGV[2] ~= '' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: tenants' sets; ARGV: ttl_ms, then the session ids, one per key. Moves each member's expiry forward
# (only members still there: a released session is not brought back), drops the expired; returns each
# key's count of open sessions.
_REFRESH = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now_ms + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  redis.call('PEXPIRE', key, ARGV[1])
  counts[i] = redis.call('ZCARD', key)
end
return counts
"""


class RedisSessionCount:
    """Every gateway's count, in Redis (see the module's docstring). Blocking: call off the serving loop."""

    def __init__(self, client: redis.Redis, ttl_s: float, prefix: str = "liveserve") -> None:
        self.client, self.ttl_ms, self.prefix = client, int(ttl_s * 1000), prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._refresh = client.register_script(_REFRESH)

    def key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:sessions"

    def acquire(self, tenant: str, session_id: str, limit: int | None) -> bool:
        return bool(self._acquire(keys=[self.key(tenant)],
                                  args=[session_id, "" if limit is None else limit, self.ttl_ms]))

    def release(self, tenant: str, session_id: str) -> None:
        self.client.zrem(self.key(tenant), session_id)

    def refresh(self, held: list[tuple[str, str]]) -> dict[str, int]:
        """Renew `held` (tenant, session id) pairs; returns each tenant's open sessions over every gateway."""
        if not held:
            return {}
        counts = self._refresh(keys=[self.key(tenant) for tenant, _ in held],
                               args=[self.ttl_ms, *(session_id for _, session_id in held)])
        return {tenant: int(count) for (tenant, _), count in zip(held, counts)}


class ReplyWindow:
    """At most `per_min` replies in any minute."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self._times: deque[float] = deque()

    def take(self) -> bool:
        now = time.monotonic()
        while self._times and now - self._times[0] >= 60.0:
            self._times.popleft()
        if len(self._times) >= self.per_min:
            return False
        self._times.append(now)
        return True


class TenantUsage:
    """What one gateway counts for one tenant over the sessions it holds: frames and replies."""

    def __init__(self, tenant: str, quota: Quota) -> None:
        self.tenant, self.sessions = tenant, 0
        self.use(quota)

    def use(self, quota: Quota) -> None:
        """Count by `quota` from now on (an operator changed it); the counts start afresh."""
        self.quota = quota
        rate = quota.frames_per_s
        # One second of burst at the tenant's rate (at least one frame), shared by its streams.
        self.frames = IngressLimit(rate, max(1.0, rate)) if rate is not None else None
        self.replies = ReplyWindow(int(quota.replies_per_min)) if quota.replies_per_min is not None else None

    def share(self, fraction: float) -> None:
        """Count against `fraction` of the quota from now on: this gateway's part of the tenant's sessions."""
        if self.frames is not None:
            self.frames.rate = self.quota.frames_per_s * fraction
            self.frames.burst = max(1.0, self.frames.rate)
        if self.replies is not None:  # rounded up: a tenant allowed replies gets at least one on each gateway
            self.replies.per_min = math.ceil(self.quota.replies_per_min * fraction)

    def take_frame(self) -> bool:
        return self.frames is None or self.frames.take()

    def take_reply(self) -> bool:
        return self.replies is None or self.replies.take()


class Tenancy:
    """One gateway's view of the tenants: their quotas, their sessions' count, and their usage here."""

    def __init__(self, configured: dict[str, Quota], client: redis.Redis | None, session_ttl_s: float) -> None:
        self.book = QuotaBook(configured, client)
        self.count: SessionCount = RedisSessionCount(client, session_ttl_s) if client is not None \
            else LocalSessionCount()
        self.usage: dict[str, TenantUsage] = {}  # tenants with sessions on this gateway
        self.held: dict[str, str] = {}  # session id -> tenant, for the sessions this gateway admitted

    async def _blocking(self, call, *args):
        """Redis off the serving loop; the in-memory count on it (where it needs no lock)."""
        if isinstance(self.count, LocalSessionCount) and self.book.client is None:
            return call(*args)
        return await asyncio.to_thread(call, *args)

    async def admit(self, tenant: str, session_id: str) -> TenantUsage:
        """Count the session against its tenant's quota; QuotaExceeded when the tenant is at its limit."""
        quota = await self._blocking(self.book.quota, tenant)
        if not await self._blocking(self.count.acquire, tenant, session_id, quota.sessions):
            raise QuotaExceeded(f"tenant {tenant!r} is at its quota of {quota.sessions} concurrent "
                                f"session(s) (sessions); close one or ask for a larger quota")
        self.held[session_id] = tenant
        usage = self.usage.get(tenant)
        if usage is None:
            usage = self.usage[tenant] = TenantUsage(tenant, quota)
        elif usage.quota != quota:
            usage.use(quota)
        usage.sessions += 1
        return usage

    async def release(self, usage: TenantUsage, session_id: str) -> None:
        usage.sessions -= 1
        if usage.sessions <= 0 and self.usage.get(usage.tenant) is usage:
            del self.usage[usage.tenant]
        tenant = self.held.pop(session_id, None)
        if tenant is not None:
            await self._blocking(self.count.release, tenant, session_id)

    async def refresh(self) -> None:
        """Keep this gateway's sessions counted (each heartbeat: a dead gateway's stop counting on their own),
        and count each tenant's frames and replies here against this gateway's share of its quota."""
        if not self.held:
            return
        totals = await self._blocking(self.count.refresh, [(tenant, sid) for sid, tenant in self.held.items()])
        for tenant, usage in self.usage.items():
            if totals.get(tenant):
                usage.share(min(1.0, usage.sessions / totals[tenant]))
