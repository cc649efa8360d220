"""Faults injected into the running Ray application (real Ray, gRPC and Redis on loopback), and what the
clients see: a Decision replica killed outright mid-stream moves its sessions to the other replica, where
they go on deciding every frame, with the conversation restored and the old owner fenced off."""

from __future__ import annotations

import re
import time

import pytest
import redis

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.state.registry import SessionRegistry
from stream_helpers import LiveCall, jpeg


@pytest.fixture(scope="module")
def registry(ray_app):
    return SessionRegistry(redis.Redis.from_url(ray_app.redis_url, decode_responses=True))


def frame(i: int) -> pb.ClientMessage:
    return pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(i)))


def decided(call: LiveCall) -> list[int]:
    return [d.frame_index for d in call.of_kind("decision")]


def running_replicas(deployment: str) -> set[str]:
    """The replicas of `deployment` alive now (their actors), once Serve counts as many RUNNING."""
    import ray
    from ray import serve

    prefix = f"SERVE_REPLICA::liveserve#{deployment}#"
    alive = {actor["name"][len(prefix):] for actor in ray.util.list_named_actors(all_namespaces=True)
             if actor["name"].startswith(prefix)}
    states = serve.status().applications["liveserve"].deployments[deployment].replica_states
    return alive if states.get("RUNNING", 0) == len(alive) else set()


def kill_replica(deployment: str, replica: str) -> None:
    """kill -9 the replica's actor process: no shutdown hook runs, nothing is drained."""
    import ray

    ray.kill(ray.get_actor(f"SERVE_REPLICA::liveserve#{deployment}#{replica}", namespace="serve"), no_restart=True)


def replaced(deployment: str, victim: str, count: int) -> None:
    """Wait for Serve to replace the killed replica, so later tests find the pool whole."""
    wait_for(lambda: len(replicas := running_replicas(deployment)) >= count and victim not in replicas, 180,
             f"Serve to replace the killed {deployment} replica")


def wait_for(check, timeout_s: float = 120.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_killing_a_decision_replica_moves_its_sessions_and_loses_no_frame(ray_app, registry):
    calls = [LiveCall(ray_app.address, pb.Open(threshold=1.0, fps=30.0)) for _ in range(4)]
    try:
        ids = [call.wait_for(lambda call=call: call.of_kind("opened"))[0].session_id for call in calls]
        for i in range(6):
            for call in calls:
                call.send(frame(i))
        calls[0].send(pb.ClientMessage(query=pb.Query(timestamp=2.5, text="what is on screen?")))
        for call in calls:
            call.wait_for(lambda call=call: len(decided(call)) == 6)
        calls[0].wait_for(lambda: calls[0].of_kind("response_done"))
        before = {sid: registry.get(sid) for sid in ids}
        victim = before[ids[0]].owner
        moved = [sid for sid in ids if before[sid].owner == victim]
        wait_for(lambda: any(t["role"] == "assistant" for t in registry.get(ids[0]).history), 30, "the reply's turn")

        killed_at = time.monotonic()
        kill_replica("Decision", victim)
        for i in range(6, 12):  # the stream goes on while the session moves
            for call in calls:
                call.send(frame(i))
        for call in calls:
            try:
                call.wait_for(lambda call=call: len(decided(call)) == 12, 120)
            except AssertionError:
                print([(w.code, w.message, list(w.frame_indexes)) for w in call.of_kind("warning")], decided(call))
                raise
        recovered_in = time.monotonic() - killed_at
        results = [call.close() for call in calls]
    finally:
        for call in calls:
            if not call.done:
                call.close()

    for sid, call, replies in zip(ids, calls, results):
        assert sorted(decided(call)) == list(range(12))  # every frame decided exactly once, none lost
        closed = replies[-1].closed
        assert replies[-1].WhichOneof("kind") == "closed" and closed.frames_decided == 12
        warnings = [w for w in call.of_kind("warning") if w.code == pb.WARNING_CODE_SESSION_RECOVERED]
        after = registry.get(sid)
        if sid in moved:
            assert len(warnings) == 1 and "moved to another decision replica" in warnings[0].message
            assert after.owner != victim and after.epoch == before[sid].epoch + 1  # the old owner is fenced off
        else:
            assert not warnings and after.epoch == before[sid].epoch
        assert after.state == "closed"
    # The conversation came along: the moved session's record keeps its turns, and its restored cache
    # got them back (the warning counts them).
    if ids[0] in moved:
        message = next(w.message for w in calls[0].of_kind("warning") if w.code == pb.WARNING_CODE_SESSION_RECOVERED)
        assert int(re.search(r"(\d+) turn\(s\)", message).group(1)) >= 1, message
    assert recovered_in < 60
    print(f"\nrecovery: {len(moved)} session(s) moved, all 12 frames decided {recovered_in:.1f}s after the kill")
    replaced("Decision", victim, 2)


def recovered_warnings(call: LiveCall) -> list:
    return [w for w in call.of_kind("warning") if w.code == pb.WARNING_CODE_SESSION_RECOVERED]


def test_killing_the_reaction_replica_moves_reply_writing_and_the_stream_goes_on(ray_app):
    """The only Reaction replica dies mid-stream: replies in progress fail (said so), decisions go on, and
    once Serve has a new replica the sessions' replies are written there."""
    (victim,) = running_replicas("Reaction")
    calls = [LiveCall(ray_app.address, pb.Open(threshold=1.0, fps=30.0)) for _ in range(2)]
    try:
        for call in calls:
            call.wait_for(lambda call=call: call.of_kind("opened"))
        for i in range(4):
            for call in calls:
                call.send(frame(i))
        for call in calls:
            call.wait_for(lambda call=call: len(decided(call)) == 4 and call.of_kind("response_done"))
        killed_at = time.monotonic()
        kill_replica("Reaction", victim)
        for call in calls:
            call.wait_for(lambda call=call: recovered_warnings(call), 120)
        moved_in = time.monotonic() - killed_at
        for i in range(4, 10):
            for call in calls:
                call.send(frame(i))
        for call in calls:  # a reply written by the new replica, after the move
            call.wait_for(lambda call=call: len(decided(call)) == 10 and any(
                r.WhichOneof("kind") == "response_done" for r in call.replies[call.replies.index(
                    next(r for r in call.replies if r.warning.code == pb.WARNING_CODE_SESSION_RECOVERED)):]), 120)
        results = [call.close() for call in calls]
    finally:
        for call in calls:
            if not call.done:
                call.close()
    for call, replies in zip(calls, results):
        assert sorted(decided(call)) == list(range(10))
        assert replies[-1].WhichOneof("kind") == "closed" and replies[-1].closed.frames_decided == 10
        assert "replies are written on another replica" in recovered_warnings(call)[0].message
        told = [w.message for w in call.of_kind("warning")]
        assert len(told) == len(set(told)), told  # each trigger without a reply is told once
    print(f"\nreaction recovery: sessions writing replies again {moved_in:.1f}s after the kill")
    replaced("Reaction", victim, 1)


def test_killing_a_perception_replica_loses_at_most_the_frames_in_flight_and_says_which(ray_app):
    """Perception holds nothing: calls that failed are tried again until the pool answers; frames that
    could not be encoded meanwhile are reported dropped, and the stream goes on."""
    victims = running_replicas("Perception")
    call = LiveCall(ray_app.address, pb.Open(threshold=0.0, fps=30.0))
    try:
        call.wait_for(lambda: call.of_kind("opened"))
        for i in range(4):
            call.send(frame(i))
        call.wait_for(lambda: len(decided(call)) == 4)
        killed_at = time.monotonic()
        for victim in victims:
            kill_replica("Perception", victim)
        for i in range(4, 12):
            call.send(frame(i))
        dropped = lambda: {i for w in call.of_kind("warning") if w.code == pb.WARNING_CODE_FRAME_DROPPED
                           for i in w.frame_indexes}
        call.wait_for(lambda: len(set(decided(call)) | dropped()) == 12, 120)
        back_in = time.monotonic() - killed_at
        replies = call.close()
    finally:
        if not call.done:
            call.close()
    assert not set(decided(call)) & dropped() and len(decided(call)) == len(set(decided(call)))
    closed = replies[-1].closed
    assert closed.frames_decided + closed.frames_dropped == 12
    print(f"\nperception: {len(dropped())} of 8 frames dropped, all accounted for {back_in:.1f}s after the kill")
    for victim in victims:
        replaced("Perception", victim, 1)
