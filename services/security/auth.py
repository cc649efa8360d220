"""API keys for the public API: Open.credentials["api_key"] checked against keys from the environment, each
key naming its tenant; and a limit on failed attempts by what the failing client controls: the key it
presents (its first characters) and, where the address is the client's own (client_address.py), its address.
A valid key is never refused by that limit: behind a proxy that hides clients' addresses, or a NAT, one
client's failures would otherwise lock out everyone who shares its address.

Keys live in an environment variable (named by the `api_keys_env` setting, e.g. filled from a Kubernetes
Secret), never in the Serve config, which is committed and embedded in manifests. The variable holds
comma-separated entries `tenant:key`; a bare `key` (the older form) is a tenant of its own, named by a
digest of the key so that the key never shows up in logs, metrics or Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict, deque
from collections.abc import Mapping

ANONYMOUS = "anonymous"  # every session's tenant when the deployment has no keys


def tenant_keys_from_env(variable: str) -> dict[str, str]:
    """key -> tenant for the entries in `variable`; empty (no check) when `variable` is "" or unset."""
    if not variable:
        return {}
    keys: dict[str, str] = {}
    for entry in os.environ.get(variable, "").split(","):
        tenant, colon, key = entry.partition(":")  # the first colon: a key may contain colons, a tenant not
        tenant, key = (tenant.strip(), key.strip()) if colon else ("", tenant.strip())
        if key:
            keys[key] = tenant or bare_key_tenant(key)
    return keys


def bare_key_tenant(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def tenant_of(credentials: Mapping[str, str], keys: Mapping[str, str]) -> str | None:
    """The tenant whose key credentials["api_key"] is (ANONYMOUS when no keys are configured), else None.
    Every key is compared, in constant time, so response timing does not reveal how much of a key was right."""
    if not keys:
        return ANONYMOUS
    offered = credentials.get("api_key", "").encode()
    tenant = None
    for key, owner in keys.items():
        if hmac.compare_digest(offered, key.encode()):
            tenant = owner
    return tenant


KEY_PREFIX_CHARS = 8  # failures are counted per presented key's first characters (key_source)


def key_source(offered: str) -> str:
    """What failures of the key `offered` are counted under: a digest of its first KEY_PREFIX_CHARS
    characters, so a client retrying one wrong key (or copies of it cut short) is one source, and the limit
    keeps no key material."""
    return "key-" + hashlib.sha256(offered[:KEY_PREFIX_CHARS].encode()).hexdigest()[:16]


class FailedAuthLimit:
    """At most `per_min` failed key checks per source (an address, a key's prefix) in any minute; beyond,
    that source is refused until its oldest failure is a minute old. Remembers at most `max_sources`
    sources (the least recently failing are forgotten first), so a scan from many addresses or with many
    keys cannot grow it."""

    WINDOW_S = 60.0

    def __init__(self, per_min: int, max_sources: int = 10_000) -> None:
        self.per_min, self.max_sources = per_min, max_sources
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, source: str) -> float:
        """Seconds until `source` may try again; 0 when it may now."""
        failures = self._failures.get(source)
        if not self.per_min or failures is None or len(failures) < self.per_min:
            return 0.0
        return max(0.0, failures[0] + self.WINDOW_S - time.monotonic())

    def failed(self, source: str) -> None:
        if not self.per_min:
            return
        failures = self._failures.get(source)
        if failures is None:
            failures = self._failures[source] = deque(maxlen=self.per_min)
            while len(self._failures) > self.max_sources:
                self._failures.popitem(last=False)
        self._failures.move_to_end(source)
        failures.append(time.monotonic())


def peer_host(peer: str) -> str:
    """The client's host from a gRPC peer string: "ipv4:10.0.0.1:5000" -> "10.0.0.1", "ipv6:[::1]:5000" ->
    "::1"; anything else (a Unix socket) as it is."""
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0] or address
    if kind == "ipv6":
        return address.rpartition(":")[0].strip("[]") or address
    return peer
