"""API keys for the public API: Open.credentials["api_key"] checked against keys from the environment.

Keys live in an environment variable (named by the `api_keys_env` setting, e.g. filled from a Kubernetes
Secret), never in the Serve config, which is committed and embedded in manifests.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping


def api_keys_from_env(variable: str) -> frozenset[str]:
    """The comma-separated keys in `variable`; empty (no check) when `variable` is "" or unset."""
    if not variable:
        return frozenset()
    return frozenset(key.strip() for key in os.environ.get(variable, "").split(",") if key.strip())


def api_key_accepted(credentials: Mapping[str, str], keys: frozenset[str]) -> bool:
    """True when no keys are configured, or credentials["api_key"] is one of them (compared in constant
    time, so response timing does not reveal how much of a key was right)."""
    if not keys:
        return True
    offered = credentials.get("api_key", "").encode()
    return any(hmac.compare_digest(offered, key.encode()) for key in keys)
