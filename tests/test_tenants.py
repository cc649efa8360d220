"""Tenants' quotas (sessions, frames a second, replies a minute), failed-auth limits, the Open's size limit and
compute admission per Decision replica: counted in a real Redis and served over real gRPC on 127.0.0.1
by single-process servers (`serve --local`)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import redis

from engine_helpers import steered
from stream_helpers import LiveCall, jpeg, kinds, stream
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings
from liveserve.services.security.tenants import Quota, QuotaBook, RedisSessionCount, Tenancy

KEYS = "acme:ka, beta:kb, gamma:kc, delta:kd"
QUOTAS = {"acme": {"sessions": 1}, "beta": {"frames_per_s": 2}, "gamma": {"replies_per_min": 1},
          "*": {"sessions": 50}}


def until(check, timeout: float = 20.0):
    """Poll `check` until it is truthy (its value) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def open_message(key: str, **fields) -> pb.ClientMessage:
    return pb.ClientMessage(open=pb.Open(credentials={"api_key": key}, **fields))


def refused(address: str, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stream(address, messages)
    return info.value


@pytest.fixture()
def client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(*client.keys("liveserve:tenant*") or ["-"])
    yield client
    client.delete(*client.keys("liveserve:tenant*") or ["-"])
    client.close()


@pytest.fixture(scope="module")
def model(tiny_model):
    return steered(tiny_model, interval_bias=8.0, eos_bias=7.8)


@pytest.fixture(scope="module")
def tenant_servers(model, redis_url):
    """Two single-process servers (two gateways) counting tenants' sessions in one Redis."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LIVESERVE_TENANT_KEYS", KEYS)
    settings = ServiceSettings(api_keys_env="LIVESERVE_TENANT_KEYS", tenant_quotas=QUOTAS, max_new_tokens=4,
                               window_frames=8, pool_mb=16, max_lag_s=600.0, heartbeat_s=0.5, session_ttl_s=5.0)
    servers = [start_local(model, "127.0.0.1:0", settings, redis_url=redis_url) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop(grace_s=1)
    mp.undo()


# ---- the count in Redis -------------------------------------------------------------------------------------

def test_concurrent_sessions_are_counted_atomically_over_gateways(client, redis_url):
    gateways = [RedisSessionCount(redis.Redis.from_url(redis_url, decode_responses=True), ttl_s=30)
                for _ in range(2)]
    admitted: list[bool] = []
    lock = threading.Lock()

    def acquire(i: int) -> None:
        ok = gateways[i % 2].acquire("acme", f"s{i}", 3)
        with lock:
            admitted.append(ok)

    threads = [threading.Thread(target=acquire, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(admitted) == [False] * 9 + [True] * 3
    held = client.zrange(gateways[0].key("acme"), 0, -1)
    gateways[1].release("acme", held[0])
    assert gateways[0].acquire("acme", "late", 3)  # a released place is free again at once


def test_a_dead_gateways_sessions_stop_counting_and_a_live_one_keeps_them(client):
    live, dead = RedisSessionCount(client, ttl_s=30), RedisSessionCount(client, ttl_s=0.3)
    assert live.acquire("acme", "kept", 2) and dead.acquire("acme", "orphan", 2)
    assert not live.acquire("acme", "third", 2)
    before = client.zscore(live.key("acme"), "kept")
    live.refresh([("acme", "kept")])  # the heartbeat moves its expiry forward
    assert client.zscore(live.key("acme"), "kept") >= before
    live.refresh([("acme", "gone")])  # a released session is not brought back
    assert client.zscore(live.key("acme"), "gone") is None
    until(lambda: live.acquire("acme", "third", 2))  # the orphan expired: its gateway stopped refreshing it
    assert set(client.zrange(live.key("acme"), 0, -1)) == {"kept", "third"}


def test_quotas_from_redis_take_the_place_of_the_settings(client):
    book = QuotaBook({"acme": Quota(sessions=1), "*": Quota(frames_per_s=5.0)}, client)
    assert book.quota("acme") == Quota(sessions=1)
    assert book.quota("other") == Quota(frames_per_s=5.0)
    client.hset("liveserve:tenant_quotas", mapping={"acme": '{"sessions": 4, "replies_per_min": 10}',
                                                     "*": '{"sessions": 2}'})
    assert book.quota("acme") == Quota(sessions=4, replies_per_min=10)
    assert book.quota("other") == Quota(sessions=2)
    client.hset("liveserve:tenant_quotas", "acme", '{"sesions": 4}')  # a typo: the next entry applies
    assert book.quota("acme") == Quota(sessions=1)
    assert QuotaBook({}, None).quota("anyone") == Quota()


def test_gateways_share_a_tenants_frame_and_reply_quotas_by_their_part_of_its_sessions(client):
    quotas = {"acme": Quota(frames_per_s=8.0, replies_per_min=10)}
    first, second = (Tenancy(quotas, client, session_ttl_s=30) for _ in range(2))

    async def run():
        here = [await first.admit("acme", "a1")]
        there = [await second.admit("acme", f"b{i}") for i in range(3)]
        assert here[0].frames.rate == 8.0  # the whole quota until the first heartbeat
        await first.refresh()
        await second.refresh()
        return here[0], there[0]

    here, there = asyncio.run(run())
    assert (here.frames.rate, there.frames.rate) == (2.0, 6.0)  # 1 and 3 of the tenant's 4 sessions
    assert (here.replies.per_min, there.replies.per_min) == (3, 8)  # rounded up: 2.5 and 7.5


def test_bad_quota_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="sesions"):
        ServiceSettings(tenant_quotas={"acme": {"sesions": 1}})
    with pytest.raises(ValueError, match="frames_per_s"):
        ServiceSettings(tenant_quotas={"acme": {"frames_per_s": -1}})
    with pytest.raises(ValueError, match="whole number"):
        ServiceSettings(tenant_quotas={"acme": {"sessions": 1.5}})


# ---- over gRPC ----------------------------------------------------------------------------------------------

def test_a_tenant_at_its_sessions_quota_is_refused_on_every_gateway(tenant_servers, client):
    first, second = (server.address for server in tenant_servers)
    held = LiveCall(first, pb.Open(credentials={"api_key": "ka"}, decisions_only=True))
    held.wait_for(lambda: held.of_kind("opened"))
    for address in (first, second):  # the other gateway counts it too
        error = refused(address, [open_message("ka", decisions_only=True)])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "acme" in error.details() and "quota of 1 concurrent session" in error.details()
        assert "(sessions)" in error.details()
    other = stream(second, [open_message("kb", decisions_only=True), pb.ClientMessage(close=pb.Close())])
    assert kinds(other) == ["opened", "closed"]  # other tenants are not affected
    assert kinds(held.close()) == ["opened", "closed"]
    reopened = until(lambda: _opens(second, "ka"))  # its place is free again (released as the call ended)
    assert kinds(reopened) == ["opened", "closed"]


def _opens(address: str, key: str):
    try:
        return stream(address, [open_message(key, decisions_only=True), pb.ClientMessage(close=pb.Close())])
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        return None


def test_frames_over_the_tenants_rate_are_dropped_and_reported(tenant_servers, client):
    address = tenant_servers[0].address
    frames = [pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.05, image=jpeg(i))) for i in range(12)]
    replies = stream(address, [open_message("kb", fps=30.0, decisions_only=True), *frames,
                               pb.ClientMessage(close=pb.Close())])
    assert kinds(replies)[-1] == "closed"  # the call goes on to its end
    warnings = [r.warning for r in replies if r.WhichOneof("kind") == "warning"]
    over = [w for w in warnings if "frames_per_s" in w.message]
    assert over and all(w.code == pb.WARNING_CODE_FRAME_DROPPED for w in over)
    assert "quota of 2 a second" in over[0].message and "beta" in over[0].message
    dropped = sorted(i for w in over for i in w.frame_indexes)
    decided = [r.decision.frame_index for r in replies if r.WhichOneof("kind") == "decision"]
    assert dropped and sorted(decided + dropped) == list(range(12))
    assert replies[-1].closed.frames_dropped == len(dropped)


def test_replies_over_the_tenants_quota_are_not_written_and_the_session_goes_on(tenant_servers, client):
    address = tenant_servers[0].address
    call = LiveCall(address, pb.Open(credentials={"api_key": "kc"}, fps=2.0, threshold=0.0))
    call.send(pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=jpeg(0))))
    call.send(pb.ClientMessage(query=pb.Query(timestamp=0.0, text="what is happening")))
    call.wait_for(lambda: call.of_kind("response_done"))
    call.send(pb.ClientMessage(frame=pb.Frame(timestamp=0.5, image=jpeg(1))))
    call.send(pb.ClientMessage(query=pb.Query(timestamp=0.5, text="and now")))
    warning = call.wait_for(lambda: [w for w in call.of_kind("warning") if "replies_per_min" in w.message])[0]
    assert "'and now'" in warning.message and "quota of 1 replies a minute" in warning.message
    call.send(pb.ClientMessage(frame=pb.Frame(timestamp=1.0, image=jpeg(2))))
    replies = call.close()
    assert kinds(replies)[-1] == "closed"
    assert len(call.of_kind("response_done")) == 1
    assert [d.timestamp for d in call.of_kind("decision")] == [0.0, 0.5, 1.0]  # deciding went on


def test_an_oversized_open_is_refused_before_any_key_check(tenant_servers, client):
    address = tenant_servers[0].address
    huge = open_message("not-a-key", client_session_id="x" * (70 << 10))
    error = refused(address, [huge])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_open_bytes" in error.details() and str(64 << 10) in error.details()
    # Later messages may be larger than an Open: a frame over the limit is decided as usual.
    big_frame = pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=jpeg(0, size=(400, 300))))
    assert big_frame.ByteSize() > 64 << 10 or pytest.skip("the test image compressed too well")
    replies = stream(address, [open_message("kd", decisions_only=True), big_frame, pb.ClientMessage(close=pb.Close())])
    assert kinds(replies)[-1] == "closed" and replies[-1].closed.frames_decided == 1


def test_a_key_with_too_many_failed_checks_is_refused_and_the_right_key_still_admitted(model, monkeypatch):
    """tests/test_auth_limits.py covers addresses, proxies and the Ray application."""
    monkeypatch.setenv("LIVESERVE_TENANT_KEYS", KEYS)
    server = start_local(model, "127.0.0.1:0", ServiceSettings(api_keys_env="LIVESERVE_TENANT_KEYS", pool_mb=8,
                                                               auth_failures_per_min=3))
    try:
        for _ in range(3):
            assert refused(server.address, [open_message("wrong")]).code() == grpc.StatusCode.UNAUTHENTICATED
        error = refused(server.address, [open_message("wrong")])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "auth_failures_per_min: 3" in error.details() and "retry in" in error.details()
        # Someone else's failures never refuse a valid key, from the same address.
        replies = stream(server.address, [open_message("ka", decisions_only=True), pb.ClientMessage(close=pb.Close())])
        assert kinds(replies) == ["opened", "closed"]
    finally:
        server.stop(grace_s=1)


def test_a_decision_replica_admits_at_most_its_max_sessions(model):
    server = start_local(model, "127.0.0.1:0", ServiceSettings(pool_mb=16, max_sessions_per_replica=2))
    try:
        calls = [LiveCall(server.address, pb.Open(decisions_only=True)) for _ in range(2)]
        for call in calls:
            call.wait_for(lambda: call.of_kind("opened"))
        error = refused(server.address, [pb.ClientMessage(open=pb.Open(decisions_only=True))])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_replica (2)" in error.details()
        for call in calls:  # the admitted sessions go on
            call.send(pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=jpeg(0))))
            call.wait_for(lambda: call.of_kind("decision"))
        calls[0].close()
        reopened = until(lambda: _opens_anonymous(server.address))
        assert kinds(reopened) == ["opened", "closed"]
        calls[1].close()
    finally:
        server.stop(grace_s=1)


def _opens_anonymous(address: str):
    try:
        return stream(address, [pb.ClientMessage(open=pb.Open(decisions_only=True)),
                                pb.ClientMessage(close=pb.Close())])
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        return None


def test_capacity_streams_is_the_default_limit_and_zero_means_memory_only():
    assert ServiceSettings().sessions_per_replica() is None
    assert ServiceSettings(capacity_streams=16).sessions_per_replica() == 16
    assert ServiceSettings(capacity_streams=16, max_sessions_per_replica=4).sessions_per_replica() == 4
    assert ServiceSettings(capacity_streams=16, max_sessions_per_replica=0).sessions_per_replica() is None
