"""The disaggregated application on real Ray Serve, real gRPC on 127.0.0.1 and real Redis: Gateway,
Perception, two Decision replicas and Reaction, driven through the public API."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.events import FrameDecision, ResponseDone
from liveserve.engine.live.session import Session
from liveserve.services.state.registry import SessionRegistry
from liveserve.video import decode_image_bytes
from stream_helpers import LiveCall, jpeg, kinds, session_messages, stream


def paced(messages, interval_s: float):
    """The scripted messages with `interval_s` between frames, as a live client sends them."""
    for message in messages:
        if message.WhichOneof("kind") == "frame":
            time.sleep(interval_s)
        yield message


def of_kind(replies, kind: str) -> list:
    return [getattr(r, kind) for r in replies if r.WhichOneof("kind") == kind]


@pytest.fixture(scope="module")
def registry(ray_app):
    return SessionRegistry(redis.Redis.from_url(ray_app.redis_url, decode_responses=True))


def get_transcript(address: str, session_id: str) -> pb.Transcript:
    from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LiveStreamStub(channel).GetTranscript(pb.GetTranscriptRequest(session_id=session_id),
                                                            timeout=10)


def decision_handle():
    from ray import serve

    return serve.get_deployment_handle("Decision", app_name="liveserve")


def test_one_session_end_to_end_with_a_query_and_its_record_in_redis(ray_app, registry):
    replies = stream(ray_app.address, session_messages(6, threshold=0.0, queries=[(1.0, "what is happening")]))
    assert kinds(replies)[0] == "opened" and kinds(replies)[-1] == "closed", kinds(replies)
    opened = replies[0].opened
    assert opened.limits.tokens_per_frame == 11 and opened.limits.max_frame_bytes == 64 << 10
    decisions = of_kind(replies, "decision")
    assert [d.timestamp for d in decisions] == [i * 0.5 for i in range(6)]
    assert all(d.lag_s > 0 for d in decisions)  # gateway receipt -> decision, wall clock
    done = of_kind(replies, "response_done")
    assert pb.TRIGGER_QUERY in [d.trigger for d in done] and all(d.num_tokens > 0 for d in done), (kinds(replies), [w.message for w in of_kind(replies, "warning")])
    assert len(of_kind(replies, "response_started")) == len(done) and of_kind(replies, "response_delta")
    assert replies[-1].closed.frames_decided == 6 and replies[-1].closed.responses == len(done)

    record = registry.get(opened.session_id)
    assert record is not None and record.state == "closed" and record.owner
    assert {"t": 1.0, "role": "user", "text": "what is happening"} in record.history
    assert [t["text"] for t in record.history if t["role"] == "assistant"] == [d.text for d in done]
    transcript = get_transcript(ray_app.address, opened.session_id)  # the Gateway reads the same record
    assert transcript.state == "closed"
    assert [(t.timestamp, t.text) for t in transcript.turns] == [(t["t"], t["text"]) for t in record.history]


def test_session_metadata_expires_after_close(ray_app, registry):
    replies = stream(ray_app.address, session_messages(2, threshold=0.0))
    session_id = replies[0].opened.session_id
    key = f"{registry.prefix}:session:{session_id}"
    assert 0 < registry.client.pttl(key) <= 3000  # closed_ttl_s of the test deployment
    deadline = time.monotonic() + 10
    while registry.get(session_id) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registry.get(session_id) is None
    with pytest.raises(grpc.RpcError) as info:
        get_transcript(ray_app.address, session_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_eight_concurrent_sessions_with_different_thresholds(ray_app):
    thresholds = [0.0, 0.0, 0.3, 0.5, 0.7, 0.9, 1.0, 1.0]
    results: dict[int, list] = {}

    def run(i: int) -> None:
        results[i] = stream(ray_app.address, paced(session_messages(8, threshold=thresholds[i]), 0.05))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(thresholds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == list(range(8))
    ids = {r[0].opened.session_id for r in results.values()}
    assert len(ids) == 8
    for i, replies in results.items():
        assert kinds(replies)[-1] == "closed" and replies[-1].closed.frames_decided == 8, (i, kinds(replies))
        assert len(of_kind(replies, "response_done")) == replies[-1].closed.responses
    # The first frame meets the same cache in every session, so its P(silent) is the same; each session's
    # own threshold then decides: below it the session must speak, at or above it the argmax decides
    # (the same way for all of them).
    first = [of_kind(results[i], "decision")[0] for i in range(8)]
    p_silent = first[0].p_silent
    assert all(d.p_silent == pytest.approx(p_silent, abs=1e-4) for d in first)
    assert all(d.fired for d, t in zip(first, thresholds) if p_silent < t)
    assert len({d.fired for d, t in zip(first, thresholds) if p_silent >= t}) <= 1
    assert any(p_silent < t for t in thresholds) and any(p_silent >= t for t in thresholds)


def test_decisions_keep_arriving_while_a_reply_is_written(ray_app):
    open_ = pb.Open(threshold=1.0, max_new_tokens=48, fps=50.0)  # 40 frames at 20 ms: as fast as declared
    messages = [pb.ClientMessage(open=open_)]
    messages += [pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.05, image=jpeg(i))) for i in range(40)]
    replies = stream(ray_app.address, paced(messages + [pb.ClientMessage(close=pb.Close())], 0.02))
    order = kinds(replies)
    assert order[-1] == "closed"
    done = order.index("response_done")
    trigger = of_kind(replies, "response_started")[0].timestamp
    # Frames after the trigger decided before the reply was done (its start may reach the client after
    # some of them): decided while it was being written, and none of them fired a second reply.
    during = [r.decision for r in replies[:done] if r.WhichOneof("kind") == "decision" and r.decision.timestamp > trigger]
    assert during and not any(d.fired for d in during), order
    # One reply at a time: a frame fires again only after the previous reply is done.
    in_flight = 0
    for reply in replies:
        kind = reply.WhichOneof("kind")
        if kind == "decision" and reply.decision.fired:
            assert in_flight == 0
            in_flight += 1
        elif kind == "response_done":
            in_flight -= 1


def test_every_frame_of_a_session_is_stepped_on_its_one_decision_replica(ray_app, registry):
    """Sessions spread over both Decision replicas; each lives on exactly the replica its Redis record
    names, and every frame decided so far was decided there."""
    handle = decision_handle()
    holds = threading.Event()
    results: dict[int, list] = {}

    def run(i: int) -> None:
        def messages():
            yield from session_messages(5, threshold=0.0, close=False)
            holds.wait(60)  # keep the session open while the replicas are inspected
            yield pb.ClientMessage(close=pb.Close())
        results[i] = stream(ray_app.address, messages())

    # Six sessions: even if one replica's last stats report still counts an earlier test's sessions,
    # placement by fewest sessions must use both replicas.
    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            open_ids = [k.rsplit(":", 1)[-1] for k in registry.client.scan_iter(f"{registry.prefix}:session:*")
                        if not k.endswith(":history")]
            records = [r for r in map(registry.get, open_ids) if r is not None and r.state == "open"]
            if len(records) == 6:
                break
            time.sleep(0.2)
        owners = {r.session_id: r.owner for r in records}
        assert len(set(owners.values())) == 2  # both replicas got sessions
        deadline = time.monotonic() + 60
        while True:
            held = {}
            for replica in set(owners.values()):
                held[replica] = handle.Sessions.remote(route_to=replica).result(timeout_s=30)["sessions"]
            if all(held[o].get(s, {}).get("frames_decided") == 5 for s, o in owners.items()):
                break
            assert time.monotonic() < deadline, held
            time.sleep(0.2)
        for session_id, owner in owners.items():
            elsewhere = [r for r in held if r != owner and session_id in held[r]]
            assert not elsewhere and held[owner][session_id]["replica"] == owner
    finally:
        holds.set()
        for thread in threads:
            thread.join(60)
    assert all(kinds(r)[-1] == "closed" and r[-1].closed.frames_decided == 5 for r in results.values())


def test_bad_input_gets_a_specific_answer_and_the_neighbours_go_on(ray_app):
    neighbour: list = []
    runner = threading.Thread(target=lambda: neighbour.extend(
        stream(ray_app.address, paced(session_messages(8, threshold=0.0), 0.05))))
    runner.start()

    corrupt = pb.ClientMessage(frame=pb.Frame(timestamp=0.6, image=b"\xff\xd8 not really a jpeg"))
    backwards = pb.ClientMessage(frame=pb.Frame(timestamp=0.1, image=jpeg(99)))
    oversized = pb.ClientMessage(frame=pb.Frame(timestamp=0.7, image=b"\x00" * (65 << 10)))
    empty_query = pb.ClientMessage(query=pb.Query(timestamp=0.8, text="  "))
    replies = stream(ray_app.address, session_messages(4, threshold=0.0, extra=[
        (1, corrupt), (1, backwards), (1, oversized), (1, empty_query)]))
    warnings = of_kind(replies, "warning")
    codes = [w.code for w in warnings]
    assert codes.count(pb.WARNING_CODE_BAD_FRAME) == 3 and pb.WARNING_CODE_BAD_QUERY in codes, warnings
    assert any("bad frame image" in w.message for w in warnings)
    assert any("must not go backwards" in w.message for w in warnings)
    assert any("the limit is" in w.message for w in warnings)
    assert kinds(replies)[-1] == "closed" and replies[-1].closed.frames_decided == 4  # the session went on

    with pytest.raises(grpc.RpcError) as failed:
        stream(ray_app.address, [pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=jpeg(0)))])
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "must be open" in failed.value.details()
    with pytest.raises(grpc.RpcError) as failed:
        stream(ray_app.address, [pb.ClientMessage(open=pb.Open(threshold=1.5))])
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "threshold" in failed.value.details()

    runner.join(120)
    assert kinds(neighbour)[-1] == "closed" and neighbour[-1].closed.frames_decided == 8


def test_a_command_for_an_unknown_session_is_refused_by_name_on_the_event_stream(ray_app):
    from liveserve.internal.v2 import decision_pb2 as dpb
    from liveserve.internal.v2 import session_pb2 as spb

    handle = decision_handle()
    replica = handle.Sessions.remote().result(timeout_s=30)["replica"]
    push = dpb.DecisionPush(gateway_id="test-gateway", commands=[dpb.DecisionCommand(
        close_session=spb.CloseSession(session_id="no-such-session", epoch=1, drain=True))])
    handle.Push.remote(push, route_to=replica).result(timeout_s=30)  # taken: refusals travel as events
    events = handle.options(stream=True).Events.remote(spb.EventsRequest(gateway_id="test-gateway"), route_to=replica)
    first = next(iter(events))
    events.cancel()
    refused = first.events[0].refused
    assert refused.session_id == "no-such-session" and refused.input == "close"
    assert "session 'no-such-session' is unknown on decision replica" in refused.message


def test_health_checking_and_reflection(ray_app):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(ray_app.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        names = {s.name for response in listing for s in response.list_services_response.service}
    assert "liveserve.api.v1.LiveStream" in names


def _features(model, seed: int):
    return model.encode_frames(decode_image_bytes(jpeg(seed), model.frame_size)[None])[0]


def _inline_plan(model, config: SessionConfig, during: int = 2):
    """Frames (as JPEG seeds) on which an inline session fires first at frame k, then, after its reply,
    stays silent on `during` frames and one more: found by trying frame orders in turn."""
    for start in range(200):
        seeds = [(start * 7 + i * 3) % 101 for i in range(8)]
        inline = Session(model, config)
        decisions, reply = [], None
        for i, seed in enumerate(seeds):
            inline.push_frame(i * 0.5, _features(model, seed))
            for event in inline.process():
                if isinstance(event, FrameDecision):
                    decisions.append(event)
                elif isinstance(event, ResponseDone):
                    reply = event.text
            fired = [d for d in decisions if d.fired]
            if fired and len(decisions) == fired[0].frame_index + during + 2:
                k = fired[0].frame_index
                if k <= 3 and not any(d.fired for d in decisions[k + 1:]):
                    return seeds[:len(decisions)], k, reply, decisions, inline.cache.length
                break
            if len(fired) > 1 or (fired and len(decisions) > fired[0].frame_index + during + 2):
                break
    pytest.fail("no frame order makes the quiet model fire once and then stay silent")


def test_a_reply_lands_right_after_its_trigger_so_later_decisions_match_an_inline_session(ray_app, registry,
                                                                                           quiet_model):
    """The Ray path writes a reply elsewhere while Decision keeps deciding frames; once the reply is in,
    Decision's cache (reply right after its trigger, the frames decided meanwhile replayed after it) and
    its next decision equal a single-model session that wrote the same reply inline."""
    during = 2
    config = SessionConfig(max_new_tokens=48, cache=CacheConfig(policy="sink_window", window_frames=8, evict_frames=8))
    seeds, k, reply_text, inline, inline_cache = _inline_plan(quiet_model, config, during)

    call = LiveCall(ray_app.address, pb.Open(fps=2.0, max_new_tokens=48))
    session_id = call.wait_for(lambda: call.of_kind("opened"))[0].session_id
    for i in range(k + 1):  # up to the trigger, one decision at a time
        call.send(pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(seeds[i]))))
        call.wait_for(lambda: len(call.of_kind("decision")) == i + 1)
    assert call.of_kind("decision")[k].fired
    for i in range(k + 1, k + 1 + during):  # while the reply is being written
        call.send(pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(seeds[i]))))
    done = call.wait_for(lambda: call.of_kind("response_done"))[0]
    order = kinds(call.replies)  # decided before the reply was done: before Decision had its text
    decided_during = [r.decision.frame_index for r in call.replies[:order.index("response_done")]
                      if r.WhichOneof("kind") == "decision" and r.decision.frame_index > k]
    assert decided_during == list(range(k + 1, k + 1 + during)), (order, "the reply ended before those frames")
    assert done.text == reply_text

    owner = registry.get(session_id).owner
    handle = decision_handle()

    def replayed():
        state = handle.Sessions.remote(route_to=owner).result(timeout_s=30)["sessions"][session_id]
        return not state["awaiting_reply"] and state["frames_replayed"] == during and state

    deadline = time.monotonic() + 30
    while not replayed():
        assert time.monotonic() < deadline, "the reply never reached Decision's cache"
        time.sleep(0.05)
    last = k + 1 + during
    call.send(pb.ClientMessage(frame=pb.Frame(timestamp=last * 0.5, image=jpeg(seeds[last]))))
    decision = call.wait_for(lambda: len(call.of_kind("decision")) == last + 1 and call.of_kind("decision")[last])
    state = replayed()
    call.close()

    want = inline[last]
    assert decision.p_silent == pytest.approx(want.p_silent, abs=1e-4)
    assert decision.fired == want.fired and state["cache_tokens"] == inline_cache


def test_two_gateway_replicas_share_the_port_and_each_keeps_its_streams(ray_app, registry):
    """Gateway replicas on one host listen on the same port: connections spread over them, and every
    session stays with the Gateway that accepted it (the one its Decision events go to)."""
    results: dict[int, list] = {}

    def run(i: int) -> None:  # one connection per client, as separate cameras would open
        with grpc.insecure_channel(ray_app.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc

            results[i] = list(pb_grpc.LiveStreamStub(channel).Stream(
                iter(list(session_messages(2, threshold=0.0))), timeout=60))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == list(range(16))
    assert all(kinds(r)[-1] == "closed" and r[-1].closed.frames_decided == 2 for r in results.values())
    gateways = {registry.get(r[0].opened.session_id).config["gateway"] for r in results.values()}
    assert len(gateways) == 2, gateways


def test_frames_with_equal_timestamps_are_each_decided_and_told_apart(ray_app):
    messages = [pb.ClientMessage(open=pb.Open(threshold=0.0, decisions_only=True))]
    messages += [pb.ClientMessage(frame=pb.Frame(timestamp=1.0, image=jpeg(i))) for i in range(3)]
    replies = stream(ray_app.address, messages + [pb.ClientMessage(close=pb.Close())])
    decisions = of_kind(replies, "decision")
    assert [d.frame_index for d in decisions] == [0, 1, 2] and all(d.timestamp == 1.0 for d in decisions)
    assert all(d.lag_s > 0 for d in decisions)


def test_a_tenants_sessions_quota_holds_over_both_gateway_replicas(ray_app):
    """Sessions are counted in Redis, so a tenant at its quota is refused by every Gateway replica, not
    only by the one holding its session (connections spread over both; see the test above). The quota
    comes from Redis, which overrides the settings' without a redeploy."""
    client = redis.Redis.from_url(ray_app.redis_url, decode_responses=True)
    deadline = time.monotonic() + 30  # earlier tests' sessions have stopped counting
    while client.zcard("liveserve:tenant:anonymous:sessions"):
        assert time.monotonic() < deadline, client.zrange("liveserve:tenant:anonymous:sessions", 0, -1)
        time.sleep(0.05)
    client.hset("liveserve:tenant_quotas", "anonymous", '{"sessions": 1}')  # the tenant when there are no keys
    held = None
    try:
        held = LiveCall(ray_app.address, pb.Open(decisions_only=True))
        held.wait_for(lambda: held.of_kind("opened"))
        codes = []
        for _ in range(8):  # one connection each: the kernel spreads them over the two replicas
            with grpc.insecure_channel(ray_app.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc

                try:
                    list(pb_grpc.LiveStreamStub(channel).Stream(
                        iter([pb.ClientMessage(open=pb.Open(decisions_only=True))]), timeout=60))
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    assert "quota of 1 concurrent session" in exc.details(), exc.details()
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8
    finally:
        if held is not None:
            held.close()
        client.delete("liveserve:tenant_quotas")
    assert kinds(held.replies) == ["opened", "closed"]


def test_the_browser_front_on_the_serve_http_proxy_relays_a_session_to_the_gateway(ray_app):
    """The Gateway is the application's HTTP ingress: the page, and a WebSocket session (services/gateway/web.py)
    through Serve's proxy into a Gateway replica's own gRPC port."""
    import json
    import urllib.request

    from google.protobuf import json_format
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with urllib.request.urlopen(ray_app.http_url, timeout=30) as answer:
        assert answer.status == 200 and b"app.js" in answer.read()
    received = []
    with connect(ray_app.http_url.replace("http://", "ws://") + "v1/stream", open_timeout=30) as socket:
        for message in session_messages(3):
            socket.send(json_format.MessageToJson(message))
        try:
            while True:
                received.append(json.loads(socket.recv(timeout=60)))
        except ConnectionClosed:
            pass
    assert socket.close_code == 1000, received[-1:]
    assert "opened" in received[0] and "closed" in received[-1]
    assert [m["decision"]["frame_index"] for m in received if "decision" in m] == [0, 1, 2]
