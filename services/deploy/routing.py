"""Session-sticky request routing for replicas that hold session state in memory (Ray Serve router).

A Decision replica holds its sessions' KV caches, a Reaction replica its sessions' reply caches: every
call for a session must reach the replica holding it.

- A call with a `route_to` keyword (the replica the session was placed on, which its Open returned to
  the gateway) goes to that replica only. If the replica is gone the call waits for it; callers bound
  the wait and report UNAVAILABLE rather than guess (another replica has no state for the session).
- An Open goes to a replica with room and the fewest sessions, from the routing stats each replica
  reports (`free_fraction` of its KV pool, `sessions`, `max_sessions`); ties rotate; an `avoid` keyword
  (the replica a moving session leaves) keeps it off that replica unless no other is left. A Ping (a
  health check) goes anywhere.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Sequence

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

MIN_FREE = 0.1  # a replica with less of its KV pool unreserved takes new sessions only if all are as full
STATS_PERIOD_S = 2.0  # how often a replica reports its routing stats
PLACED_WINDOW_S = 2 * STATS_PERIOD_S  # placements older than this are in the replica's stats


def replica_key(replica: RunningReplica) -> str:
    return replica.replica_id.unique_id


class SessionRouter(RequestRouter):
    # No FIFOMixin: it hands a replica chosen for one request to the oldest pending request, which may
    # belong to another session pinned elsewhere. The base router fulfils exactly the request it routed.

    def initialize_state(self, **kwargs) -> None:
        self._turn = itertools.count()
        self._placed: dict[str, deque[float]] = {}  # replica key -> when this router placed sessions there

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> Sequence[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # back off while a pinned replica is busy
        route_to = pending_request.kwargs.get("route_to")
        if route_to:  # the session's replica or none
            return [[r for r in candidate_replicas if replica_key(r) == route_to]]
        if pending_request.metadata.call_method == "Ping":  # any replica; no session is placed
            return [candidate_replicas]
        # A session moving off a replica its gateway lost goes elsewhere while there is an elsewhere: the
        # replica may be alive (a timeout) and still hold the session's old self.
        avoid = pending_request.kwargs.get("avoid")
        candidates = [r for r in candidate_replicas if replica_key(r) != avoid] or candidate_replicas
        return [[replica] for replica in self.rank_by_room(candidates)]

    def rank_by_room(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Replicas with room (at least `MIN_FREE` of their KV pool unreserved, fewer sessions than their
        `max_sessions` when they have one) first, fewest sessions
        first among them, then most free memory. A replica's stats arrive every few seconds, so sessions
        this router placed in the last two report periods count too (a burst of opens would otherwise all
        land on the replica that looked emptiest); older placements are in the stats already, or closed.
        (Waiting for the stats to change instead is wrong: a replica whose short sessions end between
        reports reports the same stats again and again, and its placements would pile up forever.)"""
        if not replicas:
            return []
        turn = next(self._turn) % len(replicas)
        rotated = replicas[turn:] + replicas[:turn]  # equal room: spread new sessions round-robin

        now = time.monotonic()

        def room(replica: RunningReplica) -> tuple[bool, int, float]:
            stats = replica.routing_stats or {}
            placed = self._placed.setdefault(replica_key(replica), deque())
            while placed and placed[0] < now - PLACED_WINDOW_S:
                placed.popleft()
            free = float(stats.get("free_fraction", 1.0))
            sessions, most = int(stats.get("sessions", 0)) + len(placed), int(stats.get("max_sessions", 0))
            return free < MIN_FREE or 0 < most <= sessions, sessions, -free

        ranked = sorted(rotated, key=room)  # stable: the rotation breaks ties
        self._placed[replica_key(ranked[0])].append(now)
        return ranked


# For deployments whose replicas hold session state (Decision, Reaction).
SESSION_ROUTER = RequestRouterConfig(request_router_class=f"{__name__}.SessionRouter",
                                     request_routing_stats_period_s=STATS_PERIOD_S)
