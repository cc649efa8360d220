"""Session metadata in Redis: who owns a session, under which epoch, and what was said.

Keys (all under `prefix`, default "liveserve"):
    {prefix}:session:{id}           hash: owner, epoch, state, config (JSON), created, last_timestamp
    {prefix}:session:{id}:history   list of JSON turns {"t", "role", "text"}, the newest `history_max`
    {prefix}:replica:{id}           a replica's lease: a random token, with a TTL

Every write by a replica is fenced: it names the owner and epoch it believes in, and a Lua script
applies it only if both still match. Reassigning a session (`claim`) bumps the epoch, so a stale
replica that lost its lease, paused, or was partitioned away can no longer write, whatever its clock
says (TTL leases alone are only advisory). Records expire `ttl_s` after the last heartbeat, and
`closed_ttl_s` after close.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import redis

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', 1, 'state', 'open', 'config', ARGV[2],
           'created', ARGV[3], 'last_timestamp', '')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# ARGV: owner, epoch, ttl_ms, last_timestamp or '', history entry or '', history_max, closing ('1' or '')
_FENCED_WRITE = """
local current = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'state')
if not current[1] then return -1 end
if current[1] ~= ARGV[1] or current[2] ~= ARGV[2] then return -2 end
if current[3] ~= 'open' then return -3 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'last_timestamp', ARGV[4]) end
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[5])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[6]), -1)
end
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'state', 'closed') end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return 1
"""

# ARGV: owner, ttl_ms, reopen ('1': a closed session may be claimed too, and is open again)
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'state') ~= 'open' and ARGV[3] ~= '1' then return -3 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'state', 'open')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return epoch
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why."""


class UnknownSessionError(RegistryError):
    pass


class SessionExistsError(RegistryError):
    pass


class StaleEpochError(RegistryError):
    """The writer's (owner, epoch) is no longer current: another replica owns the session now."""


class SessionClosedError(RegistryError):
    pass


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    owner: str
    epoch: int
    state: str  # "open" | "closed"
    config: dict
    created: float
    last_timestamp: float | None
    history: tuple[dict, ...]


class SessionRegistry:
    def __init__(self, client: redis.Redis, *, ttl_s: float = 30.0, closed_ttl_s: float = 60.0,
                 history_max: int = 256, prefix: str = "liveserve") -> None:
        if ttl_s <= 0 or closed_ttl_s <= 0 or history_max < 1:
            raise ValueError("ttl_s and closed_ttl_s must be > 0 and history_max >= 1")
        self.client, self.prefix = client, prefix
        self.ttl_ms, self.closed_ttl_ms, self.history_max = int(ttl_s * 1000), int(closed_ttl_s * 1000), history_max
        self._create = client.register_script(_CREATE)
        self._write = client.register_script(_FENCED_WRITE)
        self._claim = client.register_script(_CLAIM)

    def _keys(self, session_id: str) -> list[str]:
        key = f"{self.prefix}:session:{session_id}"
        return [key, f"{key}:history"]

    def create(self, session_id: str, owner: str, config: dict) -> SessionRecord:
        """Register a new session owned by `owner` at epoch 1."""
        created = time.time()
        if not self._create(keys=self._keys(session_id)[:1],
                            args=[owner, json.dumps(config, sort_keys=True), repr(created), self.ttl_ms]):
            raise SessionExistsError(f"session {session_id!r} already exists")
        return SessionRecord(session_id, owner, 1, "open", config, created, None, ())

    def get(self, session_id: str) -> SessionRecord | None:
        key, history_key = self._keys(session_id)
        with self.client.pipeline(transaction=True) as pipe:
            fields, history = pipe.hgetall(key).lrange(history_key, 0, -1).execute()
        if not fields:
            return None
        last = fields.get("last_timestamp", "")
        return SessionRecord(session_id, fields["owner"], int(fields["epoch"]), fields["state"],
                             json.loads(fields["config"]), float(fields["created"]), float(last) if last else None,
                             tuple(json.loads(turn) for turn in history))

    def heartbeat(self, session_id: str, owner: str, epoch: int) -> None:
        """Keep the record alive for another ttl_s; raises if the writer was fenced off."""
        self._fenced(session_id, owner, epoch)

    def record(self, session_id: str, owner: str, epoch: int, *, last_timestamp: float | None = None,
               turn: dict | None = None) -> None:
        """Advance the stream's last timestamp and/or append a text turn, e.g. {"t": 3.5, "role": "user",
        "text": "..."}; the write is also a heartbeat."""
        self._fenced(session_id, owner, epoch, last_timestamp=last_timestamp, turn=turn)

    def close(self, session_id: str, owner: str, epoch: int) -> None:
        """Mark the session closed; its record expires closed_ttl_s later."""
        self._fenced(session_id, owner, epoch, closing=True)

    def claim(self, session_id: str, owner: str, *, reopen: bool = False) -> int:
        """Move an open session to `owner` (e.g. after its replica died); returns the new epoch, which
        fences off every earlier owner. `reopen`: a closed session (its client resumes it) is claimed too
        and open again."""
        result = self._claim(keys=self._keys(session_id), args=[owner, self.ttl_ms, "1" if reopen else ""])
        if result == -1:
            raise UnknownSessionError(f"session {session_id!r} does not exist or has expired")
        if result == -3:
            raise SessionClosedError(f"session {session_id!r} is closed")
        return int(result)

    def _fenced(self, session_id: str, owner: str, epoch: int, *, last_timestamp: float | None = None,
                turn: dict | None = None, closing: bool = False) -> None:
        ttl = self.closed_ttl_ms if closing else self.ttl_ms
        args = [owner, str(epoch), ttl, "" if last_timestamp is None else repr(float(last_timestamp)),
                "" if turn is None else json.dumps(turn, sort_keys=True), self.history_max, "1" if closing else ""]
        result = self._write(keys=self._keys(session_id), args=args)
        if result == -1:
            raise UnknownSessionError(f"session {session_id!r} does not exist or has expired")
        if result == -2:
            current = self.get(session_id)
            holder = f"{current.owner!r} at epoch {current.epoch}" if current else "nobody"
            raise StaleEpochError(f"session {session_id!r}: {owner!r} at epoch {epoch} was fenced off; "
                                  f"it is held by {holder}")
        if result == -3:
            raise SessionClosedError(f"session {session_id!r} is closed")


class ReplicaLease:
    """A replica's liveness lease: SET NX with a TTL, renewed and released only by its token's holder."""

    def __init__(self, client: redis.Redis, replica_id: str, *, ttl_s: float = 10.0, prefix: str = "liveserve") -> None:
        self.client, self.replica_id = client, replica_id
        self.key, self.ttl_ms = f"{prefix}:replica:{replica_id}", int(ttl_s * 1000)
        self.token = secrets.token_hex(16)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """False when the lease expired (or someone else holds it): stop serving and re-register."""
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        return bool(self._release(keys=[self.key], args=[self.token]))

    def holder(self) -> str | None:
        return self.client.get(self.key)
