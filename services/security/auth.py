"""API keys for the public API: Open.credentials["api_key"] checked against keys from the environment, each
key naming its tenant; and a limit on failed attempts per client host.

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


class FailedAuthLimit:
    """At most `per_min` failed key checks per client host in any minute; beyond, that host's Opens are
    refused without checking keys until the oldest failure is a minute old. Remembers at most `max_hosts`
    hosts (the least recently failing are forgotten first), so a scan from many addresses cannot grow it."""

    WINDOW_S = 60.0

    def __init__(self, per_min: int, max_hosts: int = 10_000) -> None:
        self.per_min, self.max_hosts = per_min, max_hosts
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, host: str) -> float:
        """Seconds until `host` may try again; 0 when it may now."""
        failures = self._failures.get(host)
        if not self.per_min or failures is None or len(failures) < self.per_min:
            return 0.0
        return max(0.0, failures[0] + self.WINDOW_S - time.monotonic())

    def failed(self, host: str) -> None:
        if not self.per_min:
            return
        failures = self._failures.get(host)
        if failures is None:
            failures = self._failures[host] = deque(maxlen=self.per_min)
            while len(self._failures) > self.max_hosts:
                self._failures.popitem(last=False)
        self._failures.move_to_end(host)
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
