"""Resume tokens: a client whose connection broke opens its session again, within `session_ttl_s`.

Every SessionOpened carries a fresh token; only its SHA-256 is kept. When a call ends because the client
went away (not after Close, not on an error), its gateway parks the session: Redis keeps
`{prefix}:resume:{session_id}` (the token's digest, the tenant, where frame numbering and time had got to)
for `ttl_s`, and the gateway keeps the session's decided frames in memory as long. An Open naming the
session and its token takes the entry (once: a token resumes one call) and the session is rebuilt like a
moved one (services/decision/recovery.py), with the frames when the same gateway parked it, else from its turns
alone. The KV state was freed at once when the client went away: parking holds no device memory.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis

from liveserve.services.wire.contracts import FrameFeatures


# The entry, deleted, when the digest and tenant match (atomically: a token resumes one call); else nil.
# Comparing digests, not tokens, leaks nothing through timing.
_TAKE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return nil end
local entry = cjson.decode(raw)
if entry['digest'] ~= ARGV[1] or entry['tenant'] ~= ARGV[2] then return nil end
redis.call('DEL', KEYS[1])
return raw
"""


@dataclass(frozen=True, slots=True)
class Parked:
    session_id: str
    tenant: str
    model: str  # the served model it ran (ServedModel.name)
    next_frame: int  # the index the client's next frame gets
    last_timestamp: float  # the client's next frame may not be earlier
    frames: tuple[FrameFeatures, ...]  # decided frames this gateway kept; () when another gateway parked it


def new_token() -> tuple[str, str]:
    """(token for the client, digest to keep)."""
    token = secrets.token_urlsafe(24)
    return token, digest(token)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ResumeTokens:
    def __init__(self, client: redis.Redis | None, ttl_s: float, *, prefix: str = "liveserve",
                 keep_frames_for: int = 1024) -> None:
        """`client`: None = no resuming (nothing outlives a call). `keep_frames_for`: parked sessions whose
        frames this gateway keeps (the oldest are forgotten first; they resume from their turns)."""
        self.client, self.ttl_s, self.prefix = client, ttl_s, prefix
        self._frames: OrderedDict[str, tuple[float, tuple[FrameFeatures, ...]]] = OrderedDict()
        self._keep = keep_frames_for
        self._take = client.register_script(_TAKE) if client is not None else None

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:resume:{session_id}"

    def park(self, parked: Parked, token_digest: str) -> None:
        """Blocking (Redis): call off the event loop."""
        if self.client is None:
            return
        entry = {"digest": token_digest, "tenant": parked.tenant, "model": parked.model, "next_frame": parked.next_frame,
                 "last_timestamp": parked.last_timestamp}
        self.client.set(self._key(parked.session_id), json.dumps(entry), px=int(self.ttl_s * 1000))
        self._frames[parked.session_id] = (time.monotonic() + self.ttl_s, parked.frames)
        self._frames.move_to_end(parked.session_id)
        while len(self._frames) > self._keep:
            self._frames.popitem(last=False)

    def take(self, session_id: str, token: str, tenant: str) -> Parked | None:
        """The parked session if `token` resumes it for `tenant` (the entry is gone afterwards), else None.
        Blocking (Redis): call off the event loop."""
        if self.client is None:
            return None
        raw = self._take(keys=[self._key(session_id)], args=[digest(token), tenant])
        if raw is None:  # unknown, expired, taken already, or not this token's (then left for its owner)
            return None
        entry = json.loads(raw)
        expires, frames = self._frames.pop(session_id, (0.0, ()))
        return Parked(session_id, tenant, str(entry.get("model", "")), int(entry["next_frame"]),
                      float(entry["last_timestamp"]),
                      frames if expires > time.monotonic() else ())
