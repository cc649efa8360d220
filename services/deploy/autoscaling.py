"""Autoscaling policies (Ray Serve custom policies, named in the Serve config).

`SessionScaling` is for the pools whose replicas hold sessions: Gateway (its client streams), Decision
(KV caches) and Reaction (reply caches). `BusyScaling` is for Perception, whose calls are whole gateway
ticks of frames, so the number of calls in flight says little about the work: a replica reports the
share of time its encoder was busy, and the pool grows until that share is at most `target_busy`.

Such replicas are busy because of the sessions they hold and the KV memory those reserve, not because of
a request rate, and a session cannot move off its replica. Each replica reports `sessions` (and, where it
has a KV pool, `kv_used_fraction`) through `record_autoscaling_stats`; the policy asks for enough replicas
that none holds more than `target_sessions` sessions nor has more than `target_kv_fraction` of its pool
reserved, and never fewer replicas than currently hold sessions, so a scale-down only ever removes idle
capacity. Serve applies min/max replicas and the upscale/downscale delays of the deployment's
autoscaling_config on top.
"""

from __future__ import annotations

import math


class SessionScaling:
    def __init__(self, target_sessions: float = 16, target_kv_fraction: float = 0.7) -> None:
        if target_sessions <= 0 or not 0 < target_kv_fraction <= 1:
            raise ValueError("target_sessions must be > 0 and target_kv_fraction in (0, 1]")
        self.target_sessions, self.target_kv_fraction = target_sessions, target_kv_fraction

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        sessions = metrics.get("sessions") or {}
        kv_used = metrics.get("kv_used_fraction") or {}
        if not sessions and not kv_used:  # no reports yet (replicas starting): keep the current target
            return ctx.target_num_replicas, {}
        return self.desired(list(sessions.values()), list(kv_used.values())), {}

    def desired(self, sessions: list[float], kv_used: list[float]) -> int:
        """Replicas wanted for these per-replica session counts and KV pool fractions in use."""
        by_sessions = sum(sessions) / self.target_sessions
        by_memory = sum(kv_used) / self.target_kv_fraction
        holding = sum(1 for count in sessions if count > 0)  # their state cannot move: keep them
        return max(1, math.ceil(by_sessions), math.ceil(by_memory), holding)


class BusyScaling:
    def __init__(self, target_busy: float = 0.7) -> None:
        if not 0 < target_busy <= 1:
            raise ValueError(f"target_busy must be in (0, 1], got {target_busy}")
        self.target_busy = target_busy

    def __call__(self, ctx) -> tuple[int, dict]:
        busy = (ctx.aggregated_metrics or {}).get("busy_fraction") or {}
        if not busy:
            return ctx.target_num_replicas, {}
        return self.desired(list(busy.values())), {}

    def desired(self, busy: list[float]) -> int:
        """Replicas wanted for these per-replica busy shares (0..1)."""
        return max(1, math.ceil(sum(busy) / self.target_busy))
