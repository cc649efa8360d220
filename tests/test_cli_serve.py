"""`liveserve serve`, `client` and `demo`: a real server process, real gRPC on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from liveserve.cli import main
from liveserve.services.state.redis_server import free_port


@pytest.fixture
def ray_started_by_the_user():
    """A Ray cluster that `ray start --head` left running on this host, as a user who already runs Ray has.
    Its address file (/tmp/ray/ray_current_cluster) is what a bare `ray.init()` would attach to."""
    marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    had_marker = marker.exists()
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    cluster = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                                "--include-dashboard=false", "--disable-usage-stats"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (marker.exists() and marker.read_text().strip().endswith(f":{port}")):
            assert cluster.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, "ray start did not come up within 90s"
            time.sleep(0.2)
        yield port
    finally:
        # `ray start --block` takes over 30 s to stop on SIGTERM; its processes share its process group
        os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait(timeout=30)
        if not had_marker:
            marker.unlink(missing_ok=True)


def test_demo_runs_the_application_on_its_own_ray_and_shuts_down(tiny_dir, ray_started_by_the_user):
    """The README's first command as a user runs it: its own local Ray and embedded Redis (the one test
    that starts a second Ray cluster; everything else shares the session's), the sample streamed through
    Gateway, Perception, Decision and Reaction, then a clean shutdown. Another Ray cluster already runs on
    the host (started with `ray start`): the demo starts its own beside it instead of attaching to it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL")}
    # The premise: a bare ray.init() here attaches to the user's cluster and refuses the pools' resources.
    attach = subprocess.run([sys.executable, "-c", "import ray; ray.init(resources={'x': 1})"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert attach.returncode != 0 and "resources must not be provided" in attach.stderr, attach.stderr[-2000:]
    demo = subprocess.run([sys.executable, "-m", "liveserve", "demo", "--model", str(tiny_dir), "--max-frames", "4"],
                          capture_output=True, text=True, timeout=400, env={**env, "PYTHONUNBUFFERED": "1"})
    assert demo.returncode == 0, demo.stderr[-3000:]
    # The random model may speak at frame 0 before the query reaches Decision; the query is answered too.
    assert "[   0.00s] User: Please narrate the video in real time.\n" in demo.stdout
    err = demo.stderr
    assert "liveserve: started an embedded Redis at redis://127.0.0.1:" in err
    assert "liveserve: demo application on 127.0.0.1:" in err and "4 frames decided" in err
    assert err.rstrip().endswith("liveserve: demo application stopped")


def test_demo_in_one_process(tiny_dir, capsys):
    code = main(["demo", "--local", "--model", str(tiny_dir), "--max-frames", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("[   0.00s] User: Please narrate the video in real time.\n")
    assert "liveserve: demo server on 127.0.0.1:" in err and "3 frames decided" in err
    assert err.rstrip().endswith("liveserve: demo server stopped")


def test_serve_refuses_bad_deployment_options_before_starting_anything(tmp_path, capsys):
    assert main(["serve", "--address", "127.0.0.1"]) == 2
    assert "--address must be host:port" in capsys.readouterr().err
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: liveserve\n    import_path: liveserve.services.deploy.app:build_app\n"
                   "    args: {modle: tiny}\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "unknown setting(s) modle" in capsys.readouterr().err
    assert main(["serve", "--decision-replicas", "0"]) == 2
    assert "--decision-replicas must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--local", "--http-port", "70000"]) == 2
    assert "--http-port must be in 0..65535" in capsys.readouterr().err
    assert main(["serve", "--local", "--http-port", "8001", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 2
    assert "does not combine with --tls-cert" in capsys.readouterr().err


def test_a_metrics_port_in_use_is_a_one_line_error_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--local", "--model", "no-such-model", "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"liveserve: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use")


def test_client_without_a_server_is_a_one_line_error(capsys):
    code = main(["client", "--address", f"127.0.0.1:{free_port()}", "--max-frames", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("liveserve: error: UNAVAILABLE") and err.count("\n") == 1


def test_single_process_server_answers_a_client_keeps_its_transcript_and_stops_on_sigint(tiny_dir):
    port, http_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    server = subprocess.Popen([sys.executable, "-m", "liveserve", "serve", "--local", "--model", str(tiny_dir),
                               "--address", f"127.0.0.1:{port}", "--pool-mb", "64", "--http-port", str(http_port),
                               "--metrics-port", str(free_port())],
                              stderr=subprocess.PIPE, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "serving liveserve.api.v1.LiveStream" not in line:
            assert time.monotonic() < deadline and server.poll() is None, line
            line = server.stderr.readline()
        assert f"127.0.0.1:{port}" in line
        assert f"browser page http://127.0.0.1:{http_port}/" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=30) as page:
            assert page.status == 200 and b"app.js" in page.read()
        client = subprocess.run([sys.executable, "-m", "liveserve", "client", "--address", f"127.0.0.1:{port}",
                                 "--max-frames", "2", "--query", "0:Hello"], capture_output=True, text=True,
                                timeout=120)
        assert client.returncode == 0, client.stderr
        assert client.stdout.startswith("[   0.00s] User: Hello\n")
        assert "2 frames decided" in client.stderr
        assert "sessions recorded in Redis redis://127.0.0.1:" in line  # an embedded one: REDIS_URL is unset
        session_id = client.stderr.split("session ", 1)[1].split(":", 1)[0]
        deadline = time.monotonic() + 30  # the history is written off the serving path
        while True:
            transcript = subprocess.run([sys.executable, "-m", "liveserve", "transcript", session_id, "--address",
                                         f"127.0.0.1:{port}", "--format", "vtt"], capture_output=True, text=True,
                                        timeout=60)
            assert transcript.returncode == 0, transcript.stderr
            if "<v User>Hello" in transcript.stdout or time.monotonic() > deadline:
                break
        assert transcript.stdout.startswith("WEBVTT\n") and "q1\n00:00:00.000 --> " in transcript.stdout
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_bench_service_compares_grpc_with_in_process(tiny_dir, tmp_path):
    import json

    out = tmp_path / "service.json"
    assert main(["bench", "service", "--model", str(tiny_dir), "--sessions", "2", "--rounds", "2", "--warmup", "0",
                 "--repeats", "1", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["sessions"] == 2
    for path in ("in_process", "grpc"):
        assert result[path]["frames"] == 4 and result[path]["p99_ms"] >= result[path]["p50_ms"] > 0
    assert result["overhead"]["throughput_ratio"] > 0


def test_sigterm_drains_open_sessions_and_ends_them_unavailable(tiny_dir):
    """Shutting down, the single-process server takes no new sessions, decides what open ones sent, ends
    them with UNAVAILABLE (retryable) and exits 0."""
    import grpc

    from liveserve.api.v1 import live_stream_pb2 as pb
    from stream_helpers import LiveCall, jpeg

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "liveserve", "serve", "--local", "--model", str(tiny_dir),
                               "--address", f"127.0.0.1:{port}", "--pool-mb", "16", "--metrics-port", "0"],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, line = time.monotonic() + 120, ""
        while "serving liveserve.api.v1.LiveStream" not in line:
            assert time.monotonic() < deadline and server.poll() is None, line
            line = server.stderr.readline()
        call = LiveCall(f"127.0.0.1:{port}", pb.Open(decisions_only=True, fps=10.0))
        call.wait_for(lambda: call.of_kind("opened"))
        for i in range(4):
            call.send(pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.1, image=jpeg(i))))
        call.wait_for(lambda: len(call.of_kind("decision")) >= 1)
        server.send_signal(signal.SIGTERM)
        call.wait_for(lambda: call.done, timeout=30)
        assert len(call.of_kind("decision")) == 4  # everything sent was decided first
        assert call.error is not None and call.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in call.error.details()
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_serve_local_takes_its_settings_from_the_serve_config(tmp_path, capsys):
    """API keys, tenants' quotas and limits hold in one process as on Ray: --config's args are the settings."""
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - name: liveserve\n    import_path: liveserve.services.deploy.app:build_app\n"
                      "    args: {api_keys_env: LIVESERVE_TEST_KEYS, tenant_quotas: {acme: {sesions: 1}}}\n")
    assert main(["serve", "--local", "--config", str(config), "--model", "tiny"]) == 2
    assert "tenant_quotas['acme']: unknown quota(s) sesions" in capsys.readouterr().err
