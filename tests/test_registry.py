"""Session metadata in a real Redis: records, history, fencing by epoch, expiry, replica leases."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from liveserve.services.state.redis_server import EmbeddedRedis, RedisUnavailable, connect
from liveserve.services.state.registry import (ReplicaLease, SessionClosedError, SessionExistsError, SessionRegistry,
                                         StaleEpochError, UnknownSessionError)


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def registry(client):
    return SessionRegistry(client, ttl_s=5, closed_ttl_s=0.3, history_max=3, prefix=f"test-{uuid.uuid4().hex[:8]}")


def test_create_record_and_read_back(registry):
    registry.create("s1", "replica-a", {"threshold": 0.7, "cache": "sink_window"})
    with pytest.raises(SessionExistsError, match="already exists"):
        registry.create("s1", "replica-b", {})
    registry.record("s1", "replica-a", 1, last_timestamp=2.5, turn={"t": 2.5, "role": "user", "text": "hi"})
    for i in range(4):
        registry.record("s1", "replica-a", 1, turn={"t": 3.0 + i, "role": "assistant", "text": f"reply {i}"})
    record = registry.get("s1")
    assert (record.owner, record.epoch, record.state) == ("replica-a", 1, "open")
    assert record.config == {"threshold": 0.7, "cache": "sink_window"}
    assert record.last_timestamp == 2.5
    assert [turn["text"] for turn in record.history] == ["reply 1", "reply 2", "reply 3"]  # newest history_max
    assert registry.get("nope") is None


def test_claim_fences_off_the_stale_owner(registry):
    registry.create("s2", "replica-a", {})
    assert registry.claim("s2", "replica-b") == 2
    with pytest.raises(StaleEpochError, match="'replica-a' at epoch 1 was fenced off; it is held by 'replica-b' at epoch 2"):
        registry.record("s2", "replica-a", 1, last_timestamp=9.0)
    with pytest.raises(StaleEpochError):
        registry.heartbeat("s2", "replica-b", 1)  # right owner, stale epoch
    registry.record("s2", "replica-b", 2, last_timestamp=9.0)
    assert registry.get("s2").last_timestamp == 9.0


def test_a_resumed_session_reopens_with_its_history_under_a_new_epoch(registry):
    registry.create("s4", "replica-a", {})
    registry.record("s4", "replica-a", 1, turn={"t": 1.0, "role": "assistant", "text": "hello"})
    registry.close("s4", "replica-a", 1)
    assert registry.claim("s4", "replica-b", reopen=True) == 2
    record = registry.get("s4")
    assert (record.state, record.owner, [t["text"] for t in record.history]) == ("open", "replica-b", ["hello"])
    assert registry.client.pttl(f"{registry.prefix}:session:s4:history") > 1000  # no longer closed_ttl_s
    with pytest.raises(StaleEpochError):
        registry.record("s4", "replica-a", 1, last_timestamp=2.0)


def test_closed_sessions_refuse_writes_and_expire(registry):
    registry.create("s3", "replica-a", {})
    registry.record("s3", "replica-a", 1, turn={"t": 0.0, "role": "user", "text": "q"})
    registry.close("s3", "replica-a", 1)
    assert registry.get("s3").state == "closed"
    with pytest.raises(SessionClosedError):
        registry.record("s3", "replica-a", 1, last_timestamp=1.0)
    with pytest.raises(SessionClosedError):
        registry.claim("s3", "replica-b")
    deadline = time.monotonic() + 5
    while registry.get("s3") is not None:
        assert time.monotonic() < deadline, "closed record did not expire"
        time.sleep(0.05)
    assert not registry.client.exists(f"{registry.prefix}:session:s3:history")
    with pytest.raises(UnknownSessionError, match="does not exist or has expired"):
        registry.heartbeat("s3", "replica-a", 1)


def test_records_expire_without_heartbeats(client):
    registry = SessionRegistry(client, ttl_s=0.2, prefix=f"test-{uuid.uuid4().hex[:8]}")
    registry.create("s4", "replica-a", {})
    for _ in range(4):  # heartbeats keep it alive past its TTL
        time.sleep(0.1)
        registry.heartbeat("s4", "replica-a", 1)
    assert registry.get("s4") is not None
    deadline = time.monotonic() + 5
    while registry.get("s4") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_replica_lease_is_exclusive_and_only_its_holder_renews(client):
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    first = ReplicaLease(client, "decision-0", ttl_s=0.3, prefix=prefix)
    second = ReplicaLease(client, "decision-0", ttl_s=0.3, prefix=prefix)
    assert first.acquire() and not second.acquire()
    assert not second.renew() and not second.release()
    assert first.renew() and first.holder() == first.token
    time.sleep(0.5)  # expired without renewal
    assert not first.renew()
    assert second.acquire() and second.holder() == second.token
    assert second.release() and second.holder() is None


def test_connect_uses_the_url_or_starts_an_embedded_server(redis_url, monkeypatch):
    client, server = connect(redis_url)
    assert server is None and client.ping()
    client.close()
    monkeypatch.delenv("REDIS_URL", raising=False)
    client, server = connect()
    try:
        assert server is not None and server.url.startswith("redis://127.0.0.1:") and client.ping()
    finally:
        client.close()
        server.stop()
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        connect("redis://127.0.0.1:1/0")


def test_embedded_server_reports_a_port_in_use(redis_url):
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(RedisUnavailable, match="exited"):
        EmbeddedRedis(port=port, startup_timeout_s=3).start()


def test_an_embedded_redis_that_dies_is_started_again_on_its_port():
    import os
    import signal as signals
    import time

    from liveserve.services.state.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start().keep_alive(check_every_s=0.05)
    try:
        before = server._process.pid
        os.kill(before, signals.SIGKILL)
        client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if int(client.info("server")["process_id"]) != before:
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server was not started again"
            time.sleep(0.05)
        assert server.restarts == 1
    finally:
        server.stop()
