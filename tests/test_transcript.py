"""Transcripts: GetTranscript reads back a real session's queries and replies from Redis (one process,
real gRPC on 127.0.0.1, the embedded redis-server), and `liveserve transcript` prints them as JSON or
WebVTT."""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest
import redis

from engine_helpers import steered
from stream_helpers import kinds, session_messages, stream
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.cli import main
from liveserve.services.deploy.local import start_local
from liveserve.services.state.registry import SessionRegistry
from liveserve.services.settings import ServiceSettings
from liveserve.services.state.transcript import to_webvtt

KEYS_ENV = "LIVESERVE_TRANSCRIPT_TEST_KEYS"
API_KEY = "transcript-key-19c2"
QUERY = "what <is> happening & why"


@pytest.fixture(scope="module")
def recorded(tiny_model, redis_url):
    """A server recording sessions in Redis, behind an API key, and one finished session with a query."""
    os.environ[KEYS_ENV] = API_KEY
    registry = SessionRegistry(redis.Redis.from_url(redis_url, decode_responses=True), ttl_s=5, closed_ttl_s=60,
                               prefix="liveserve")
    settings = ServiceSettings(max_new_tokens=4, window_frames=8, pool_mb=32, max_lag_s=600.0, api_keys_env=KEYS_ENV,
                               session_ttl_s=5, closed_ttl_s=60, heartbeat_s=0.5)
    try:
        server = start_local(steered(tiny_model, interval_bias=8.0, eos_bias=7.8), "127.0.0.1:0", settings,
                             registry=registry)
    finally:
        del os.environ[KEYS_ENV]
    messages = list(session_messages(6, queries=[(1.0, QUERY)]))
    messages[0].open.credentials["api_key"] = API_KEY
    replies = stream(server.address, messages)
    assert kinds(replies)[-1] == "closed"
    done = [r.response_done for r in replies if r.WhichOneof("kind") == "response_done"]
    yield server, replies[0].opened.session_id, done
    server.stop(grace_s=1)


def _get(address: str, session_id: str, api_key: str = API_KEY) -> pb.Transcript:
    request = pb.GetTranscriptRequest(session_id=session_id, credentials={"api_key": api_key} if api_key else {})
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.LiveStreamStub(channel).GetTranscript(request, timeout=10)


def _closed_transcript(address: str, session_id: str, turns: int) -> pb.Transcript:
    """The registry is written off the serving path: wait (bounded) until the close and the turns landed."""
    deadline = time.monotonic() + 15
    while True:
        transcript = _get(address, session_id)
        if transcript.state == "closed" and len(transcript.turns) >= turns or time.monotonic() > deadline:
            return transcript
        time.sleep(0.05)


def test_get_transcript_returns_the_sessions_queries_and_replies(recorded):
    server, session_id, done = recorded
    assert done, "the steered model answers the query"
    transcript = _closed_transcript(server.address, session_id, 1 + len(done))
    assert transcript.session_id == session_id and transcript.state == "closed"
    assert transcript.created == pytest.approx(time.time(), abs=300)
    assert transcript.max_new_tokens == 4 and transcript.cache_policy == "sink_window"
    assert transcript.last_timestamp >= 0 or not transcript.HasField("last_timestamp")
    user = [t for t in transcript.turns if t.role == pb.ROLE_USER]
    assistant = [t for t in transcript.turns if t.role == pb.ROLE_ASSISTANT]
    assert [(t.timestamp, t.text) for t in user] == [(1.0, QUERY)]
    assert [t.text for t in assistant] == [d.text for d in done]
    assert [t.timestamp for t in assistant] == [d.timestamp for d in done]


def test_a_closed_sessions_transcript_reaches_its_last_decided_frame(recorded):
    """Heartbeats carry the stream's time only every heartbeat_s: the close carries it too."""
    server = recorded[0]
    messages = list(session_messages(6))
    messages[0].open.credentials["api_key"] = API_KEY
    replies = stream(server.address, messages)
    decided = [r.decision.timestamp for r in replies if r.WhichOneof("kind") == "decision"]
    assert decided and replies[-1].closed.frames_decided == len(decided)
    transcript = _closed_transcript(server.address, replies[0].opened.session_id, 0)
    assert transcript.state == "closed" and transcript.last_timestamp == max(decided)


def test_unknown_sessions_bad_ids_and_missing_keys_get_specific_statuses(recorded):
    server, session_id, _ = recorded
    cases = [("0" * 32, API_KEY, grpc.StatusCode.NOT_FOUND, "expired"),
             ("a:b", API_KEY, grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
             ("", API_KEY, grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
             (session_id, "", grpc.StatusCode.UNAUTHENTICATED, "api_key"),
             (session_id, "wrong", grpc.StatusCode.UNAUTHENTICATED, "api_key")]
    for sid, key, code, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            _get(server.address, sid, key)
        assert info.value.code() == code and words in info.value.details(), (sid, info.value.details())


def test_a_request_that_cannot_be_parsed_is_invalid_argument(recorded):
    server, _, _ = recorded
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/liveserve.api.v1.LiveStream/GetTranscript")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\x0a\xff\xff", timeout=10)  # a length-delimited field running past the end
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "liveserve.api.v1.GetTranscriptRequest" in info.value.details()


def test_a_server_without_redis_says_it_has_no_transcripts(tiny_model):
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(pool_mb=8))
    try:
        with pytest.raises(grpc.RpcError) as info:
            _get(server.address, "0" * 32, "")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop(grace_s=1)


def test_a_registry_that_does_not_answer_is_unavailable(tiny_model):
    from liveserve.services.state.redis_server import free_port

    nobody = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1,
                                  decode_responses=True)
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(pool_mb=8), registry=SessionRegistry(nobody))
    try:
        with pytest.raises(grpc.RpcError) as info:
            _get(server.address, "0" * 32, "")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in info.value.details()
    finally:
        server.stop(grace_s=1)


def test_the_transcript_command_prints_json_and_webvtt(recorded, capsys):
    server, session_id, done = recorded
    _closed_transcript(server.address, session_id, 1 + len(done))
    common = ["transcript", session_id, "--address", server.address, "--api-key", API_KEY]
    assert main(common) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["session_id"] == session_id and data["state"] == "closed"
    assert data["turns"][0] == {"timestamp": 1.0, "role": "user", "text": QUERY}
    assert [t["role"] for t in data["turns"][1:]] == ["assistant"] * len(done)
    assert main([*common, "--format", "vtt", "--cue-s", "3"]) == 0
    vtt = capsys.readouterr().out
    assert vtt.startswith("WEBVTT\n\n")
    assert "q1\n00:00:01.000 --> 00:00:04.000\n<v User>what &lt;is&gt; happening &amp; why\n" in vtt
    assert "\nr1\n" in vtt and "<v Assistant>" in vtt
    assert main(["transcript", "0" * 32, "--address", server.address, "--api-key", API_KEY]) == 2
    assert capsys.readouterr().err.startswith("liveserve: error: NOT_FOUND")


def test_webvtt_cues_run_to_the_next_reply_or_the_cue_length():
    transcript = pb.Transcript(session_id="s", state="closed", turns=[
        pb.Turn(timestamp=0.0, role=pb.ROLE_USER, text="narrate"),
        pb.Turn(timestamp=0.0, role=pb.ROLE_ASSISTANT, text="a kitchen"),
        pb.Turn(timestamp=2.5, role=pb.ROLE_ASSISTANT, text="she picks up\n\na knife"),
        pb.Turn(timestamp=3661.25, role=pb.ROLE_ASSISTANT, text="done")])
    vtt = to_webvtt(transcript, cue_s=4)
    assert vtt == ("WEBVTT\n\nNOTE liveserve session s (closed)\n\n"
                   "q1\n00:00:00.000 --> 00:00:04.000\n<v User>narrate\n\n"
                   "r1\n00:00:00.000 --> 00:00:02.500\n<v Assistant>a kitchen\n\n"
                   "r2\n00:00:02.500 --> 00:00:06.500\n<v Assistant>she picks up\na knife\n\n"
                   "r3\n01:01:01.250 --> 01:01:05.250\n<v Assistant>done\n")
    with pytest.raises(ValueError, match="cue_s"):
        to_webvtt(transcript, cue_s=0)
