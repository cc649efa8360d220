"""Hostile and careless clients against one real server (gRPC on 127.0.0.1, real Redis): calls cancelled
at every stage leave nothing held anywhere, and fuzzed messages (valid protos with wild values, and raw
bytes) always end with a proper status, never a crash, with the server serving the next client."""

from __future__ import annotations

import queue
import re
import threading
import time

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_helpers import steered
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings
from stream_helpers import LiveCall, jpeg, kinds, session_messages, stream

# What a call may end with. UNKNOWN and INTERNAL are bugs: they must never appear.
PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
          grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


@pytest.fixture(scope="module")
def local(tiny_model, redis_url):
    # A Redis database of its own, so what other tests' servers left behind does not count here.
    kwargs = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    redis_url = f"redis://{kwargs['host']}:{kwargs['port']}/7"
    redis.Redis.from_url(redis_url).flushdb()
    model = steered(tiny_model, interval_bias=-1.0, eos_bias=-4.0)  # speaks often, with replies of a few tokens
    server = start_local(model, "127.0.0.1:0", ServiceSettings(
        max_new_tokens=6, window_frames=8, max_frame_bytes=64 << 10, pool_mb=64, max_lag_s=600.0,
        max_frame_pixels=1_000_000, heartbeat_s=0.5, session_ttl_s=5.0), redis_url=redis_url)
    yield server
    server.stop(grace_s=1)


def held(local) -> dict:
    """Everything a session can hold: Decision and Reaction engine sessions, open Redis records, and the
    tenants' session counts."""
    client = local.registry.client
    records = [key for key in client.scan_iter("liveserve:session:*") if not key.endswith(":history")
               and client.hget(key, "state") == "open"]
    counted = sum(client.zcard(key) for key in client.scan_iter("liveserve:tenant:*:sessions"))
    return {"decision": len(local.engine.sessions), "reaction": len(local.reaction.engine.sessions),
            "open records": len(records), "counted": counted, "gateway": len(local.server.gateway.sessions)}


def settle(local, timeout_s: float = 20.0) -> dict:
    """Wait until nothing is held; what is still held otherwise."""
    deadline = time.monotonic() + timeout_s
    while any((now := held(local)).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


class Call:
    """A call the test can cut off at any moment."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.outbox: queue.Queue = queue.Queue()
        self.replies: list[pb.ServerMessage] = []
        self.seen = threading.Condition()
        self.call = pb_grpc.LiveStreamStub(self.channel).Stream(iter(self.outbox.get, None), timeout=60)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                with self.seen:
                    self.replies.append(reply)
                    self.seen.notify_all()
        except grpc.RpcError:
            pass

    def send(self, message: pb.ClientMessage) -> None:
        self.outbox.put(message)

    def until(self, kind: str, timeout_s: float = 30.0) -> None:
        with self.seen:
            assert self.seen.wait_for(lambda: kind in kinds(self.replies), timeout_s), kinds(self.replies)

    def cut(self) -> None:
        self.call.cancel()
        self.outbox.put(None)
        self.reader.join(10)
        self.channel.close()


def frame(i: int) -> pb.ClientMessage:
    return pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(i)))


STAGES = ["before SessionOpened", "after SessionOpened", "with frames in flight", "after decisions",
          "mid-reply", "after Close"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_call_cut_off_at_any_stage_leaves_nothing_held(local, stage):
    assert settle(local) == dict.fromkeys(held(local), 0)  # the baseline
    call = Call(local.address)
    call.send(pb.ClientMessage(open=pb.Open(threshold=0.0, fps=30.0)))
    if stage != "before SessionOpened":
        call.until("opened")
    if stage in ("with frames in flight", "after decisions", "mid-reply", "after Close"):
        for i in range(6):
            call.send(frame(i))
    if stage in ("after decisions", "mid-reply"):
        call.until("decision")
    if stage == "mid-reply":
        call.send(pb.ClientMessage(query=pb.Query(timestamp=3.0, text="what is there?")))
        call.until("response_started")
    if stage == "after Close":
        call.send(pb.ClientMessage(close=pb.Close()))
    call.cut()
    assert settle(local) == dict.fromkeys(held(local), 0), f"held after a call cut {stage}"


# ---- fuzzing ---------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=True, allow_infinity=True, width=64)
opens = st.builds(pb.Open, threshold=finite, max_new_tokens=st.integers(0, 2**32 - 1), fps=finite,
                  model=st.sampled_from(["", "default", "nope", "x" * 300]), decisions_only=st.booleans(),
                  client_session_id=st.text(max_size=40), system_prompt=st.text(max_size=60))
frames = st.builds(pb.Frame, timestamp=finite,
                   image=st.one_of(st.binary(max_size=64), st.sampled_from([jpeg(1), jpeg(2)[:40], b""])))
queries = st.builds(pb.Query, timestamp=finite, text=st.text(max_size=80))
messages = st.one_of(st.builds(lambda o: pb.ClientMessage(open=o), opens),
                     st.builds(lambda f: pb.ClientMessage(frame=f), frames),
                     st.builds(lambda q: pb.ClientMessage(query=q), queries),
                     st.just(pb.ClientMessage(close=pb.Close())), st.just(pb.ClientMessage()))


def outcome(call) -> tuple[grpc.StatusCode, list[str]]:
    try:
        replies = list(call)
    except grpc.RpcError as exc:
        return exc.code(), []
    return grpc.StatusCode.OK, kinds(replies)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(first=opens, rest=st.lists(messages, max_size=8))
def test_fuzzed_messages_always_end_with_a_proper_status(local, first, rest):
    with grpc.insecure_channel(local.address) as channel:
        call = pb_grpc.LiveStreamStub(channel).Stream(iter([pb.ClientMessage(open=first), *rest]), timeout=30)
        code, replied = outcome(call)
    assert code in PROPER, code
    if code == grpc.StatusCode.OK and replied:  # a session that opened ends with its summary
        assert replied[0] == "opened" and replied[-1] == "closed", replied


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_raw_bytes_end_with_a_proper_status(local, raw):
    with grpc.insecure_channel(local.address) as channel:
        call = channel.stream_stream("/liveserve.api.v1.LiveStream/Stream", request_serializer=None,
                                     response_deserializer=pb.ServerMessage.FromString)(iter(raw), timeout=30)
        code, _ = outcome(call)
    assert code in PROPER, code


BAD_IMAGES = [b"\x00" * 16, b"not an image at all", b"GIF89a" + bytes(range(64)), b"\x89PNG\r\n\x1a\n" + bytes(200),
              jpeg(0)[:300], bytes(range(256)) * 8]


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_warnings_about_bad_frames_carry_no_object_reprs(request, mode):
    address = request.getfixturevalue("local").address if mode == "local" else \
        request.getfixturevalue("ray_app").address
    messages = [pb.ClientMessage(open=pb.Open(fps=2.0, decisions_only=True))]
    messages += [pb.ClientMessage(frame=pb.Frame(timestamp=0.5 * i, image=image)) for i, image in enumerate(BAD_IMAGES)]
    replies = stream(address, messages + [pb.ClientMessage(close=pb.Close())])
    warnings = [r.warning.message for r in replies if r.WhichOneof("kind") == "warning"]
    assert len(warnings) == len(BAD_IMAGES), warnings
    assert all("bad frame image" in w for w in warnings), warnings
    assert not [w for w in warnings if re.search(r"object at 0x|<[\w.]+ object", w)], warnings


def test_on_ray_an_open_refused_by_decision_is_one_log_line_with_its_request_id(ray_app):
    """Serve logs a replica method's exception with its traceback; a refusal its client is told about is
    not a failure: one line, with the request id Serve writes on each of the request's lines."""
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"

    def decision_logs() -> dict[Path, str]:
        return {path: path.read_text(errors="replace") for path in logs.glob("replica_liveserve_Decision_*.log")}

    def since(before: dict[Path, str]) -> str:
        return "".join(text[len(before.get(path, "")):] for path, text in decision_logs().items())

    before = decision_logs()
    with pytest.raises(grpc.RpcError) as info:
        stream(ray_app.address, [pb.ClientMessage(open=pb.Open(cache=pb.CacheOptions(window_frames=1_000_000)))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "positions" in info.value.details()
    deadline = time.monotonic() + 20
    while "Request refused" not in (new := since(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    (line,) = [line for line in new.splitlines() if "Request refused" in line]
    assert "ValueError: sink_window needs" in line and re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", line), line
    assert "Traceback" not in new, new


def test_after_the_fuzzing_the_server_serves_and_holds_nothing(local):
    replies = stream(local.address, session_messages(3))
    assert kinds(replies)[0] == "opened" and kinds(replies)[-1] == "closed"
    assert settle(local) == dict.fromkeys(held(local), 0)


# ---- resuming ---------------------------------------------------------------------------------------------

def test_a_broken_connection_resumes_its_session_with_its_token(local):
    first = Call(local.address)
    first.send(pb.ClientMessage(open=pb.Open(threshold=0.0, fps=30.0)))
    first.until("opened")
    opened = first.replies[0].opened
    assert opened.resume_token and opened.next_frame_index == 0
    for i in range(6):
        first.send(frame(i))
    first.send(pb.ClientMessage(query=pb.Query(timestamp=2.5, text="what is there?")))
    first.until("response_done")
    with first.seen:
        first.seen.wait_for(lambda: len([r for r in first.replies if r.WhichOneof("kind") == "decision"]) == 6, 30)
    first.cut()  # the connection breaks
    assert settle(local) == dict.fromkeys(held(local), 0)  # parked: nothing held but the token's entry

    resume = pb.Open(threshold=0.0, fps=30.0, resume_session_id=opened.session_id, resume_token=opened.resume_token)
    call = LiveCall(local.address, resume)
    reopened = call.wait_for(lambda: call.of_kind("opened"))[0]
    assert reopened.session_id == opened.session_id and reopened.next_frame_index == 6
    assert reopened.resume_token and reopened.resume_token != opened.resume_token
    (warning,) = call.wait_for(lambda: [w for w in call.of_kind("warning")
                                        if w.code == pb.WARNING_CODE_SESSION_RECOVERED])
    assert "last 6 frame(s)" in warning.message and " 0 turn(s)" not in warning.message, warning.message
    call.send(pb.ClientMessage(frame=pb.Frame(timestamp=1.0, image=jpeg(9))))  # time goes on where it was
    (backwards,) = call.wait_for(lambda: [w for w in call.of_kind("warning") if w.code == pb.WARNING_CODE_BAD_FRAME])
    assert list(backwards.frame_indexes) == [6] and "backwards" in backwards.message
    for i in range(6, 9):
        call.send(frame(i))
    replies = call.close()
    decided = [d.frame_index for d in call.of_kind("decision")]
    assert decided == [7, 8, 9] and kinds(replies)[-1] == "closed"  # index 6 went to the refused frame
    assert settle(local) == dict.fromkeys(held(local), 0)

    # A token resumes one call; a closed session none; a wrong token none.
    for open_ in (resume, pb.Open(resume_session_id=opened.session_id, resume_token="guess")):
        with pytest.raises(grpc.RpcError) as failed:
            stream(local.address, [pb.ClientMessage(open=open_)])
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND and "to resume" in failed.value.details()


def test_without_session_records_a_resume_is_refused_by_name(tiny_model):
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(pool_mb=8))
    try:
        replies = stream(server.address, session_messages(1))
        assert replies[0].opened.resume_token == ""
        with pytest.raises(grpc.RpcError) as failed:
            stream(server.address, [pb.ClientMessage(open=pb.Open(resume_session_id="abc", resume_token="x"))])
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no Redis" in failed.value.details()
    finally:
        server.stop(grace_s=1)


# ---- Redis dies -------------------------------------------------------------------------------------------

def test_a_redis_server_killed_mid_stream_comes_back_and_the_sessions_never_notice(tiny_model):
    """kill -9 of the embedded redis-server under live streams: they go on deciding every frame; it is
    started again on its port, and the replicas write their sessions' records again."""
    import os
    import signal

    from liveserve.services.state.redis_server import EmbeddedRedis

    redis_server = EmbeddedRedis().start().keep_alive(check_every_s=0.05)
    server = start_local(steered(tiny_model, interval_bias=8.0, eos_bias=7.8), "127.0.0.1:0",
                         ServiceSettings(pool_mb=16, heartbeat_s=0.2, session_ttl_s=5.0, max_lag_s=600.0),
                         redis_url=redis_server.url)
    try:
        calls = [LiveCall(server.address, pb.Open(fps=30.0)) for _ in range(2)]
        ids = [call.wait_for(lambda call=call: call.of_kind("opened"))[0].session_id for call in calls]
        for i in range(5):
            for call in calls:
                call.send(frame(i))
        killed_at = time.monotonic()
        os.kill(redis_server._process.pid, signal.SIGKILL)
        for i in range(5, 10):
            for call in calls:
                call.send(frame(i))
        registry = server.registry
        deadline = time.monotonic() + 30
        while not all((record := _get(registry, sid)) is not None and record.state == "open" for sid in ids):
            assert time.monotonic() < deadline, "the sessions' records were not written again"
            time.sleep(0.05)
        back_in = time.monotonic() - killed_at
        results = [call.close() for call in calls]
    finally:
        server.stop(grace_s=1)
        redis_server.stop()
    for call, replies in zip(calls, results):
        assert [d.frame_index for d in call.of_kind("decision")] == list(range(10)), (kinds(replies), [
            (w.code, w.message) for w in call.of_kind("warning")])
        assert kinds(replies)[-1] == "closed" and replies[-1].closed.frames_decided == 10
    assert redis_server.restarts >= 1
    print(f"\nredis: restarted and both records written again {back_in:.1f}s after the kill")


def _get(registry, session_id: str):
    try:
        return registry.get(session_id)
    except redis.RedisError:
        return None


def test_a_resume_refused_for_room_keeps_its_token_good(local):
    first = Call(local.address)
    first.send(pb.ClientMessage(open=pb.Open(fps=30.0)))
    first.until("opened")
    opened = first.replies[0].opened
    first.send(frame(0))
    first.until("decision")
    first.cut()
    assert settle(local) == dict.fromkeys(held(local), 0)
    resume = pb.Open(fps=30.0, resume_session_id=opened.session_id, resume_token=opened.resume_token)
    blocker = LiveCall(local.address, pb.Open(fps=30.0))
    blocker.wait_for(lambda: blocker.of_kind("opened"))
    before, local.decision.max_sessions = local.decision.max_sessions, 1  # the one replica is full
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stream(local.address, [pb.ClientMessage(open=resume)])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        local.decision.max_sessions = before
        blocker.close()
    replies = stream(local.address, [pb.ClientMessage(open=resume), frame(1), pb.ClientMessage(close=pb.Close())])
    assert replies[0].opened.session_id == opened.session_id and kinds(replies)[-1] == "closed"
