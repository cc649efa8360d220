"""The public LiveStream API over real gRPC on 127.0.0.1, served from one process: the Gateway with
Perception, Decision and Reaction in the same process (`serve --local`)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_helpers import steered
from stream_helpers import jpeg, kinds, session_messages, stream
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings


@pytest.fixture(scope="module")
def local(tiny_model):
    """One single-process server for the module."""
    model = steered(tiny_model, interval_bias=8.0, eos_bias=7.8)
    settings = ServiceSettings(max_new_tokens=4, window_frames=8, max_frame_bytes=64 << 10, pool_mb=64,
                               max_lag_s=600.0, max_frame_pixels=1_000_000)
    server = start_local(model, "127.0.0.1:0", settings)
    yield server
    server.stop(grace_s=1)


@pytest.fixture(scope="module")
def server(local):
    return local.address, local.engine


def test_one_session_end_to_end(server):
    address, engine = server
    replies = stream(address, session_messages(6, queries=[(1.0, "what is happening")]))
    assert kinds(replies)[0] == "opened" and kinds(replies)[-1] == "closed"
    assert replies[0].opened.limits.tokens_per_frame == 11
    decisions = [r.decision for r in replies if r.WhichOneof("kind") == "decision"]
    assert [d.timestamp for d in decisions] == [i * 0.5 for i in range(6)]
    assert [d.frame_index for d in decisions] == list(range(6))
    started = [r.response_started for r in replies if r.WhichOneof("kind") == "response_started"]
    assert any(s.trigger == pb.TRIGGER_QUERY and s.query == "what is happening" for s in started)
    assert replies[-1].closed.frames_decided == 6
    assert not engine.sessions  # closed and released


def test_eight_concurrent_sessions_with_different_thresholds(server):
    address, _ = server
    thresholds = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0]
    results = [None] * len(thresholds)

    def run(k):
        results[k] = stream(address, session_messages(8, threshold=thresholds[k]))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(thresholds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    fired, wanted = [], []
    for replies in results:
        decisions = [r.decision for r in replies if r.WhichOneof("kind") == "decision"]
        assert len(decisions) == 8 and replies[-1].WhichOneof("kind") == "closed"
        fired.append(sum(d.fired for d in decisions))
        wanted.append(sum(d.fired or d.action == pb.ACTION_SUPPRESSED for d in decisions))
    # threshold 0 is plain argmax (for this steered model, always the interval); 1 wants to speak at every
    # frame: it fires, or (while a reply is still being written) reports the frame as suppressed
    assert fired[0] == 0 and 1 <= fired[-1] and wanted[-1] == 8


def test_bad_input_gets_specific_warnings_and_the_session_goes_on(server):
    address, _ = server
    extra = [
        (1, pb.ClientMessage(frame=pb.Frame(timestamp=0.6, image=b"not an image"))),  # the clock still advances
        (2, pb.ClientMessage(frame=pb.Frame(timestamp=0.1, image=jpeg(99)))),  # backwards in time
        (3, pb.ClientMessage(frame=pb.Frame(timestamp=1.6, image=b"\xff" * (70 << 10)))),  # over max_frame_bytes
        (3, pb.ClientMessage(query=pb.Query(timestamp=1.6, text="   "))),
        (4, pb.ClientMessage(open=pb.Open())),
    ]
    replies = stream(address, session_messages(6, extra=extra))
    warnings = [r.warning for r in replies if r.WhichOneof("kind") == "warning"]
    messages = [w.message for w in warnings]
    assert any(w.code == pb.WARNING_CODE_BAD_FRAME and "cannot decode" in w.message for w in warnings), messages
    assert any(w.code == pb.WARNING_CODE_BAD_FRAME and "must not go backwards" in w.message for w in warnings)
    assert any(w.code == pb.WARNING_CODE_BAD_FRAME and "limit is 65536" in w.message for w in warnings)
    assert any(w.code == pb.WARNING_CODE_BAD_QUERY and "empty" in w.message for w in warnings)
    assert any("open is not valid after open" in m for m in messages)
    assert sum(r.WhichOneof("kind") == "decision" for r in replies) == 6  # every good frame decided
    assert replies[-1].WhichOneof("kind") == "closed"


def test_call_level_errors_have_status_codes(server):
    address, _ = server
    with pytest.raises(grpc.RpcError) as info:
        stream(address, [pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=jpeg(0)))])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "must be open" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stream(address, [pb.ClientMessage(open=pb.Open(threshold=1.5))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "threshold must be in [0, 1]" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stream(address, [pb.ClientMessage(open=pb.Open(cache=pb.CacheOptions(policy="everything")))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache policy" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # beyond the transport's message limit
        stream(address, [pb.ClientMessage(open=pb.Open()),
                         pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=b"\0" * (1 << 20)))])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_a_client_that_vanishes(local):
    address, engines = local.address, (local.engine, local.reaction.engine)
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="liveserve.api.v1.LiveStream"), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        call = pb_grpc.LiveStreamStub(channel).Stream(session_messages(50, close=False), timeout=60)
        assert next(call).WhichOneof("kind") == "opened"
        call.cancel()  # the client disappears mid-stream
    deadline = time.monotonic() + 10
    while any(engine.sessions for engine in engines):  # its sessions are closed and their memory returned
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert all(engine.pool.reserved_blocks == 0 for engine in engines)


def test_api_keys_hold_in_one_process_too(tiny_model, monkeypatch):
    monkeypatch.setenv("LIVESERVE_TEST_KEYS", "k1, k2")
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(api_keys_env="LIVESERVE_TEST_KEYS", pool_mb=8))
    try:
        for credentials in ({}, {"api_key": "nope"}):
            with pytest.raises(grpc.RpcError) as info:
                stream(server.address, [pb.ClientMessage(open=pb.Open(credentials=credentials))])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = stream(server.address, [pb.ClientMessage(open=pb.Open(credentials={"api_key": "k2"},
                                                                          decisions_only=True)),
                                          pb.ClientMessage(close=pb.Close())])
        assert kinds(replies) == ["opened", "closed"]
    finally:
        server.stop(grace_s=1)


def test_one_process_serves_the_same_prometheus_metrics(server):
    import urllib.request

    from liveserve.services.observability.telemetry import serve_metrics

    address, _ = server
    stream(address, session_messages(3, threshold=1.0, queries=[(0.5, "what do you see")]))
    port = serve_metrics("127.0.0.1:0")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    for name in ("liveserve_sessions_opened_total", "liveserve_frames_received_total",
                 "liveserve_frame_to_decision_seconds_bucket", "liveserve_gateway_tick_frames_bucket",
                 "liveserve_frames_encoded_total", "liveserve_frames_decided_total",
                 "liveserve_decision_kv_pool_reserved_ratio", "liveserve_replies_total",
                 "liveserve_time_to_first_token_seconds_bucket"):
        assert f"\n{name}" in body, name


def test_a_frame_that_wants_to_speak_during_a_reply_is_reported_suppressed(server):
    address, _ = server
    messages = [pb.ClientMessage(open=pb.Open(threshold=1.0, max_new_tokens=32, fps=20.0))]
    messages += [pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.05, image=jpeg(i))) for i in range(12)]
    replies = stream(address, messages + [pb.ClientMessage(close=pb.Close())])
    decisions = [r.decision for r in replies if r.WhichOneof("kind") == "decision"]
    assert len(decisions) == 12 and decisions[0].fired  # threshold 1: every frame wants to speak
    assert all(d.fired or d.action == pb.ACTION_SUPPRESSED for d in decisions)
    assert any(d.action == pb.ACTION_SUPPRESSED and not d.fired for d in decisions)
    assert replies[-1].closed.responses == sum(d.fired for d in decisions)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with (almost) no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _raw_stream(address: str, payloads: list[bytes]):
    """The LiveStream call with raw bytes as messages, as a broken or hostile client would send them."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream("/liveserve.api.v1.LiveStream/Stream", request_serializer=lambda b: b,
                                     response_deserializer=pb.ServerMessage.FromString)
        return list(call(iter(payloads), timeout=30))


def test_a_message_that_cannot_be_parsed_ends_the_call_with_invalid_argument(server):
    address, engine = server
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field claiming more bytes than follow
    for payloads in ([garbage], [pb.ClientMessage(open=pb.Open()).SerializeToString(), garbage]):
        with pytest.raises(grpc.RpcError) as info:
            _raw_stream(address, payloads)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be parsed as liveserve.api.v1.ClientMessage" in info.value.details()
    deadline = time.monotonic() + 10
    while engine.sessions:  # the session opened before the garbage is closed, not leaked
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("open_, code, words", [
    (pb.Open(fps=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "fps must be in (0, 60]"),
    (pb.Open(fps=1000.0), grpc.StatusCode.INVALID_ARGUMENT, "fps must be in (0, 60]"),
    (pb.Open(model="gpt-17"), grpc.StatusCode.NOT_FOUND, "unknown model 'gpt-17'"),
    (pb.Open(cache=pb.CacheOptions(window_frames=100_000)), grpc.StatusCode.INVALID_ARGUMENT, "positions"),
    (pb.Open(max_new_tokens=10_000_000), grpc.StatusCode.INVALID_ARGUMENT, "positions"),
])
def test_every_open_field_is_checked_with_a_specific_message(server, open_, code, words):
    address, engine = server
    with pytest.raises(grpc.RpcError) as info:
        stream(address, [pb.ClientMessage(open=open_)])
    assert info.value.code() == code and words in info.value.details(), info.value.details()
    assert "Traceback" not in info.value.details() and "/" not in info.value.details().split("(")[0]


def test_an_image_claiming_too_many_pixels_is_refused_from_its_header(server):
    address, _ = server
    bomb = pb.ClientMessage(frame=pb.Frame(timestamp=0.6, image=_png_header(5000, 5000)))
    replies = stream(address, session_messages(3, extra=[(1, bomb)]))
    warnings = [r.warning for r in replies if r.WhichOneof("kind") == "warning"]
    assert [(w.code, list(w.frame_indexes)) for w in warnings] == [(pb.WARNING_CODE_BAD_FRAME, [2])]
    assert "5000x5000 pixels; the limit is 1000000 pixels" in warnings[0].message
    assert replies[-1].closed.frames_decided == 3


def test_a_flooding_stream_is_limited_to_its_declared_rate_and_its_neighbour_keeps_up(server):
    address, _ = server
    neighbour: list = []
    runner = threading.Thread(target=lambda: neighbour.extend(stream(address, session_messages(6, threshold=0.5))))
    flood = [pb.ClientMessage(open=pb.Open(fps=2.0, decisions_only=True))]
    flood += [pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.01, image=jpeg(i))) for i in range(60)]
    runner.start()
    replies = stream(address, flood + [pb.ClientMessage(close=pb.Close())])
    runner.join(60)
    dropped = [w for w in (r.warning for r in replies if r.WhichOneof("kind") == "warning")
               if w.code == pb.WARNING_CODE_FRAME_DROPPED and "faster than 4 a second" in w.message]
    decided = [r.decision.frame_index for r in replies if r.WhichOneof("kind") == "decision"]
    refused = sorted(i for w in dropped for i in w.frame_indexes)
    assert dropped and sorted(decided + refused) == list(range(60)) and len(decided) < 20
    assert replies[-1].closed.frames_dropped >= len(refused)
    assert kinds(neighbour)[-1] == "closed" and neighbour[-1].closed.frames_decided == 6


def test_new_sessions_fail_fast_while_a_pool_does_not_answer_and_health_says_so(tiny_model):
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(pool_mb=8, heartbeat_s=0.1, session_ttl_s=5))
    health_request = health_pb2.HealthCheckRequest(service="liveserve.api.v1.LiveStream")

    async def broken() -> None:
        raise ConnectionError("Redis is down")

    try:
        server.decision.ping = broken
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while stub.Check(health_request, timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stream(server.address, [pb.ClientMessage(open=pb.Open(decisions_only=True))])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "Decision (ConnectionError)" in info.value.details()
        assert time.monotonic() - started < 5  # at once, not after a call timeout
        del server.decision.ping  # it answers again: the service is back
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while stub.Check(health_request, timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert kinds(stream(server.address, [pb.ClientMessage(open=pb.Open(decisions_only=True)),
                                             pb.ClientMessage(close=pb.Close())])) == ["opened", "closed"]
    finally:
        server.stop(grace_s=1)
