"""SessionRouter's placement rules on stand-in replicas (the real routing is tested end to end in
test_ray_services.py: stickiness over two Decision replicas)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")
from liveserve.services.deploy.routing import SessionRouter  # noqa: E402


def replica(key: str, **stats):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=key), routing_stats=stats)


def request(*args, method: str = "Open", **kwargs):
    return SimpleNamespace(args=args, kwargs=kwargs, metadata=SimpleNamespace(call_method=method),
                           routing_context=SimpleNamespace(should_backoff=False))


@pytest.fixture
def router():
    router = SessionRouter.__new__(SessionRouter)  # the placement logic only; no Serve controller
    router.initialize_state()
    return router


def choose(router, replicas, pending):
    return asyncio.run(router.choose_replicas(replicas, pending))


def test_route_to_pins_to_the_owner_or_waits_for_it(router):
    a, b = replica("a"), replica("b")
    assert choose(router, [a, b], request(route_to="b")) == [[b]]
    assert choose(router, [a], request(route_to="b")) == [[]]  # owner gone: no other replica has the cache


def test_new_sessions_go_where_there_is_room_and_a_burst_is_spread(router):
    full, empty = replica("full", free_fraction=0.2, sessions=9), replica("empty", free_fraction=1.0, sessions=0)
    assert choose(router, [full, empty], request())[0] == [empty]
    a, b = replica("a", free_fraction=1.0, sessions=0), replica("b", free_fraction=1.0, sessions=0)
    first = [choose(router, [a, b], request(SimpleNamespace(session_id=f"s{i}")))[0][0].replica_id.unique_id
             for i in range(4)]
    assert sorted(first) == ["a", "a", "b", "b"]  # stale stats do not send the whole burst to one replica


def test_placements_stop_counting_once_the_stats_have_had_time_to_include_them(router, monkeypatch):
    """A replica whose short sessions end between reports keeps reporting the same stats: what this router
    placed there must not pile up against it forever."""
    import liveserve.services.deploy.routing as routing

    clock = [1000.0]
    monkeypatch.setattr(routing.time, "monotonic", lambda: clock[0])
    a, b = replica("a", free_fraction=1.0, sessions=0), replica("b", free_fraction=1.0, sessions=0)
    for _ in range(10):  # short sessions, all on a (b is busy elsewhere: at its cap)
        choose(router, [a, replica("b", free_fraction=1.0, sessions=1, max_sessions=1)], request())
    clock[0] += routing.PLACED_WINDOW_S + 1  # a's stats still say 0 sessions: they have ended
    first = [choose(router, [a, b], request())[0][0].replica_id.unique_id for _ in range(4)]
    assert sorted(first) == ["a", "a", "b", "b"]


def test_a_moving_session_avoids_the_replica_it_leaves_unless_it_is_the_only_one(router):
    left, other = replica("left", free_fraction=1.0, sessions=0), replica("other", free_fraction=0.5, sessions=3)
    assert choose(router, [left, other], request(avoid="left")) == [[other]]
    assert choose(router, [left], request(avoid="left")) == [[left]]


def test_a_replica_at_its_max_sessions_takes_new_sessions_only_when_every_replica_is(router):
    capped = replica("capped", free_fraction=0.9, sessions=2, max_sessions=2)
    busier = replica("busier", free_fraction=0.5, sessions=5, max_sessions=8)
    assert choose(router, [capped, busier], request())[0] == [busier]  # fewer sessions, but at its cap
    other = replica("other", free_fraction=0.5, sessions=8, max_sessions=8)
    ranked = choose(router, [capped, other], request())
    assert [r[0].replica_id.unique_id for r in ranked] == ["capped", "other"]  # all capped: it refuses
