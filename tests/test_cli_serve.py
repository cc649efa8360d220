"""`liveserve serve`, `client` and `demo`: a real server process, real gRPC on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from liveserve.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_serves_the_sample_and_shuts_down(tiny_dir, capsys):
    code = main(["demo", "--model", str(tiny_dir), "--max-frames", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("[   0.00s] User: Please narrate the video in real time.\n")
    assert "liveserve: demo server on 127.0.0.1:" in err and "3 frames decided" in err
    assert err.rstrip().endswith("liveserve: demo server stopped")


def test_client_without_a_server_is_a_one_line_error(capsys):
    code = main(["client", "--address", f"127.0.0.1:{free_port()}", "--max-frames", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("liveserve: error: UNAVAILABLE") and err.count("\n") == 1


def test_serve_process_answers_a_client_and_stops_on_sigint(tiny_dir):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "liveserve", "serve", "--model", str(tiny_dir),
                               "--address", f"127.0.0.1:{port}", "--pool-mb", "64"],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "serving liveserve.api.v1.LiveStream" not in line:
            assert time.monotonic() < deadline and server.poll() is None, line
            line = server.stderr.readline()
        assert f"127.0.0.1:{port}" in line
        client = subprocess.run([sys.executable, "-m", "liveserve", "client", "--address", f"127.0.0.1:{port}",
                                 "--max-frames", "2", "--query", "0:Hello"], capture_output=True, text=True,
                                timeout=120)
        assert client.returncode == 0, client.stderr
        assert client.stdout.startswith("[   0.00s] User: Hello\n")
        assert "2 frames decided" in client.stderr
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_bench_service_compares_grpc_with_in_process(tiny_dir, tmp_path):
    import json

    out = tmp_path / "service.json"
    assert main(["bench", "service", "--model", str(tiny_dir), "--sessions", "2", "--rounds", "2", "--warmup", "0",
                 "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["sessions"] == 2
    for path in ("in_process", "grpc"):
        assert result[path]["frames"] == 4 and result[path]["p99_ms"] >= result[path]["p50_ms"] > 0
    assert result["overhead"]["throughput_ratio"] > 0
