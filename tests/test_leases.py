"""A replica frees the sessions of a gateway that went silent, even when nothing told it the gateway is
gone (a process killed outright closes no stream): each push renews the gateway's lease."""

from __future__ import annotations

import asyncio

import grpc

from liveserve.config import CacheConfig, SessionConfig
from liveserve.services.wire import contracts as c
from liveserve.services.decision.service import DecisionService
from liveserve.services.reaction.service import ReactionService
from liveserve.services.settings import ServiceSettings

SETTINGS = ServiceSettings(pool_mb=8, session_ttl_s=0.6, heartbeat_s=0.1)
CONFIG = SessionConfig(cache=CacheConfig(policy="sink_window", window_frames=8, evict_frames=8), replies="none")


def test_sessions_of_a_silent_gateway_are_closed_and_a_renewing_one_keeps_them(tiny_model):
    async def main():
        decision = DecisionService(tiny_model, SETTINGS, replica="d")
        reaction = ReactionService(tiny_model, SETTINGS, replica="r")
        try:
            await decision.open(c.OpenSession("silent", "gone-gateway", CONFIG))
            await decision.open(c.OpenSession("kept", "live-gateway", CONFIG))
            await reaction.open(c.OpenSession("silent", "gone-gateway", CONFIG))
            events = decision.events("gone-gateway")
            for _ in range(12):  # the live gateway heartbeats with empty pushes, the other says nothing
                await decision.push(c.DecisionPush("live-gateway", ()))
                await asyncio.sleep(0.1)
            ended = (await asyncio.wait_for(anext(events), 5)).events
            return ended, set(decision.sessions), set(reaction.writers), decision.engine.pool.reserved_blocks
        finally:
            decision.stop()
            reaction.stop()

    ended, decision_sessions, reaction_sessions, reserved = asyncio.run(main())
    assert [type(e) for e in ended] == [c.SessionClosed] and ended[0].session_id == "silent"
    assert ended[0].code == grpc.StatusCode.UNAVAILABLE.value[0] and "went silent" in ended[0].message
    assert decision_sessions == {"kept"} and reaction_sessions == set() and reserved > 0


def test_a_session_record_lost_with_redis_is_written_again_by_its_owner(tiny_model, redis_url):
    import redis

    from liveserve.services.state.registry import SessionRegistry

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    registry = SessionRegistry(client, ttl_s=5.0, prefix="liveserve-test-rewrite")
    settings = ServiceSettings(pool_mb=8, session_ttl_s=5.0, heartbeat_s=0.1)

    async def main():
        decision = DecisionService(tiny_model, settings, replica="d", registry=registry)
        try:
            await decision.open(c.OpenSession("s1", "g", CONFIG))
            client.delete(*registry._keys("s1"))  # as a restarted Redis would have it: gone
            for _ in range(50):
                await asyncio.sleep(0.05)
                if (record := registry.get("s1")) is not None:
                    return record
        finally:
            decision.stop()

    record = asyncio.run(main())
    assert record is not None and record.owner == "d" and record.state == "open" and record.config["restored"]
