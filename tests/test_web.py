"""The browser front (services/gateway/web.py): the LiveStream session protocol over a WebSocket, relayed to the
gRPC API of `serve --local` (real gRPC and HTTP on 127.0.0.1), and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from browser_helpers import Chromium, chromium_or_skip, write_y4m
from stream_helpers import jpeg
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.deploy.local import start_local
from liveserve.services.gateway.local_http import WebServer
from liveserve.services.settings import ServiceSettings
from liveserve.video import SAMPLE_VIDEO

KEYS_ENV = "LIVESERVE_WEB_TEST_KEYS"
API_KEY = "web-test-key-51c2"


@pytest.fixture(scope="module")
def web(tiny_model):
    """`serve --local` with an API key and its browser front, both on loopback."""
    os.environ[KEYS_ENV] = f"web:{API_KEY}"
    try:
        server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(
            pool_mb=32, max_new_tokens=6, window_frames=16, max_lag_s=600.0, api_keys_env=KEYS_ENV))
    finally:
        del os.environ[KEYS_ENV]
    front = WebServer(server.address, "127.0.0.1", 0, server.settings.max_frame_bytes).start()
    front.local = server  # for tests that look at the gateway's sessions
    yield front
    front.stop()
    server.stop(grace_s=1)


def _ws_url(front: WebServer) -> str:
    return f"ws://127.0.0.1:{front.port}/v1/stream"


def _session(front: WebServer, messages: list, binary: bool = False, timeout_s: float = 60.0):
    """Send `messages` (ClientMessages), read until the server closes: (ServerMessage dicts, close code)."""
    received = []
    with connect(_ws_url(front), open_timeout=10, max_size=None) as socket:
        for message in messages:
            if binary:
                socket.send(message.SerializeToString())
            else:
                socket.send(message if isinstance(message, str) else _json(message))
        try:
            while True:
                data = socket.recv(timeout=timeout_s)
                if binary:
                    assert isinstance(data, bytes)
                    received.append(pb.ServerMessage.FromString(data))
                else:
                    received.append(json.loads(data))
        except ConnectionClosed:
            return received, socket.close_code


def _json(message: pb.ClientMessage) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(message)


def _messages(frames: int, key: str = API_KEY, threshold: float = 1.0) -> list[pb.ClientMessage]:
    """A session that fires on every frame (threshold 1: silent only when P(silent) >= 1)."""
    messages = [pb.ClientMessage(open=pb.Open(fps=2, threshold=threshold, credentials={"api_key": key})),
                pb.ClientMessage(query=pb.Query(timestamp=0.0, text="What happens?"))]
    messages += [pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(i))) for i in range(frames)]
    return messages + [pb.ClientMessage(close=pb.Close())]


def test_a_json_session_decides_every_frame_replies_and_closes_cleanly(web):
    received, code = _session(web, _messages(4))
    kinds = [next(iter(m)) for m in received]
    assert kinds[0] == "opened" and kinds[-1] == "closed" and code == 1000
    decisions = [m["decision"] for m in received if "decision" in m]
    assert [d["frame_index"] for d in decisions] == [0, 1, 2, 3]  # 64-bit integers as JSON numbers
    assert all({"p_silent", "lag_s", "action", "fired"} <= d.keys() for d in decisions)  # defaults included
    done = [m["response_done"] for m in received if "response_done" in m]
    assert done and all(d["num_tokens"] >= 1 for d in done)


def test_binary_protobuf_messages_get_binary_replies(web):
    received, code = _session(web, _messages(2), binary=True)
    assert code == 1000
    assert [m.WhichOneof("kind") for m in received][:1] == ["opened"]
    assert sum(m.HasField("decision") for m in received) == 2


def test_a_wrong_api_key_is_refused_as_on_grpc(web):
    received, code = _session(web, _messages(1, key="wrong"))
    assert code == 4016, received  # 4000 + UNAUTHENTICATED
    assert received[-1]["error"]["code"] == 16 and "api_key" in received[-1]["error"]["message"]


def test_a_message_that_is_not_a_client_message_ends_the_session_invalid_argument(web):
    received, code = _session(web, ['{"open": {"fps": "fast"}}'])
    assert code == 4003
    assert received == [{"error": {"code": 3, "message": received[0]["error"]["message"]}}]
    assert "ClientMessage JSON" in received[0]["error"]["message"]
    received, code = _session(web, [_json(_messages(0)[0]), "not json"])
    assert code == 4003 and received[-1]["error"]["code"] == 3


def test_frames_over_the_limits_get_the_grpc_answers(web):
    limit = ServiceSettings().max_frame_bytes
    over = pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=b"\xff" * (limit + 1)))
    received, code = _session(web, [_messages(0)[0], over, pb.ClientMessage(close=pb.Close())])
    warnings = [m["warning"] for m in received if "warning" in m]
    assert code == 1000 and warnings[0]["code"] == "WARNING_CODE_BAD_FRAME" and str(limit) in warnings[0]["message"]
    beyond = pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=b"\xff" * (limit + (128 << 10))))
    received, code = _session(web, [_messages(0)[0], beyond])  # beyond the transport's message limit
    assert code == 4008 and received[-1]["error"]["code"] == 8, received[-1]


def test_a_browser_that_goes_away_mid_session_ends_its_grpc_call(web):
    gateway = web.local.server.gateway
    with connect(_ws_url(web), open_timeout=10) as socket:
        for message in _messages(2)[:-1]:  # no Close: the browser just goes
            socket.send(_json(message))
        assert "opened" in json.loads(socket.recv(timeout=30))
        assert len(gateway.sessions) == 1
    deadline = time.monotonic() + 30
    while gateway.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gateway.sessions


def test_a_front_that_cannot_relay_refuses_every_stream_with_its_reason(web):
    """As a Ray Gateway serving TLS does: the bridge speaks plaintext gRPC only."""
    front = WebServer(web.local.address, "127.0.0.1", 0, 1 << 20, refusal="no plaintext gRPC here").start()
    try:
        received, code = _session(front, _messages(1)[:1])  # the Open
    finally:
        front.stop()
    assert code == 4009 and received == [{"error": {"code": 9, "message": "no plaintext gRPC here"}}]


def _get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_models_list_is_list_models_under_the_same_keys(web):
    status, body = _get_json(f"{web.url.rstrip('/')}/v1/models", {"X-Api-Key": API_KEY})
    assert status == 200 and [(m["name"], m["is_default"], m["family"]) for m in body["models"]] == \
        [("default", True, "live")]
    assert body["models"][0]["max_new_tokens"] == 6 and body["models"][0]["window_frames"] == 16
    status, body = _get_json(f"{web.url.rstrip('/')}/v1/models")  # no key: refused as on gRPC
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    front = WebServer(web.local.address, "127.0.0.1", 0, 1 << 20, refusal="no plaintext gRPC here").start()
    try:
        status, body = _get_json(f"http://127.0.0.1:{front.port}/v1/models", {"X-Api-Key": API_KEY})
    finally:
        front.stop()
    assert status == 412 and body["error"]["message"] == "no plaintext gRPC here"


def test_the_page_is_self_contained(web):
    for path in ("/", "/app.js", "/style.css"):
        with urllib.request.urlopen(f"{web.url.rstrip('/')}{path}", timeout=10) as answer:
            body = answer.read().decode()
            assert answer.status == 200
        assert "://" not in body.replace("${scheme}//", ""), f"{path} loads something from elsewhere"


PAGE_FIGURES = ("({status: document.getElementById('status').textContent, "
                "decisions: +document.getElementById('decisions').textContent, "
                "replies: [...document.querySelectorAll('#replies li .text')].map(e => e.textContent), "
                "lag: document.getElementById('lag').textContent})")


def _page_session(browser: Chromium, frames: int) -> dict:
    """Wait (bounded) for the page's session to end; what the page shows then."""
    state = browser.wait_for("['closed', 'error'].includes(document.body.dataset.state) && "
                             "document.body.dataset.state", timeout_s=120)
    figures = browser.evaluate(PAGE_FIGURES)
    assert state == "closed", figures
    assert figures["decisions"] == frames
    assert any(text for text in figures["replies"]), figures
    assert figures["lag"].endswith(" ms")
    return figures


def test_the_page_in_headless_chromium_shows_decisions_and_a_reply(web, tmp_path):
    """The page, started by its URL, streams Chromium's fake camera (the sample video as a y4m clip) and
    shows the decisions, a reply and the latency."""
    binary = chromium_or_skip(pytest)
    clip = write_y4m(str(SAMPLE_VIDEO), tmp_path / "camera.y4m", fps=4, seconds=6)
    url = f"{web.url}?auto=1&source=camera&fps=4&threshold=1&max_frames=10&key={API_KEY}"
    browser = Chromium(binary, tmp_path / "profile", url, camera_clip=clip).connect()
    try:
        _page_session(browser, 10)
        # The model picker lists what the deployment serves (GET /v1/models), the default chosen.
        assert browser.evaluate("[...document.getElementById('model').options].map(o => o.textContent)") == \
            ["default (default)"]
        browser.screenshot(tmp_path / "browser.png")
    finally:
        browser.close()
    assert (tmp_path / "browser.png").stat().st_size > 10_000
    if keep := os.environ.get("LIVESERVE_BROWSER_SCREENSHOT"):  # where to keep the page's screenshot
        Path(keep).write_bytes((tmp_path / "browser.png").read_bytes())


def test_the_page_in_headless_chromium_streams_a_local_video_file(web, tmp_path):
    """The other source: a file picked in the page's file input (set over CDP), played and streamed."""
    binary = chromium_or_skip(pytest)
    url = f"{web.url}?source=file&fps=4&threshold=1&max_frames=6&key={API_KEY}"
    browser = Chromium(binary, tmp_path / "profile", url).connect()
    try:
        document = browser.call("DOM.getDocument")
        node = browser.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
        browser.call("DOM.setFileInputFiles", files=[str(SAMPLE_VIDEO)], nodeId=node["nodeId"])
        browser.evaluate("document.getElementById('start').click()")
        _page_session(browser, 6)
    finally:
        browser.close()
