"""Gauges do not vanish: Ray's agent drops a gauge series no export refreshed for two export intervals, so
a gauge set only when it changes (sessions opening, replies starting, a queue moving) would disappear
from dashboards while the platform streams steadily. The shared Ray application exports every second
here (tests/conftest.py), so that window is 2 s rather than the default 20 s."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from stream_helpers import LiveCall, jpeg, stream
from liveserve.api.v1 import live_stream_pb2 as pb

K8S = Path(__file__).resolve().parent.parent / "k8s"
# Series that exist only from their event on (a counter is exported from its first increment, and then never
# expires): no GPU on the test host; frames dropped for lag and sessions moved off a dead replica do not
# happen in a steady state, and frames replayed after replies are counted when their session ends.
EVENT_ONLY = {"ray_liveserve_gpu_utilization_ratio", "ray_liveserve_gpu_memory_used_bytes",
              "ray_liveserve_gpu_memory_total_bytes", "ray_liveserve_gpu_power_watts",
              "ray_liveserve_frames_dropped_total", "ray_liveserve_frames_replayed_total",
              "ray_liveserve_sessions_recovered_total"}


def dashboard_series() -> set[str]:
    """Every series the Grafana dashboards and the PrometheusRule name."""
    text = "".join(path.read_text() for path in [*(K8S / "grafana").glob("*.json"), K8S / "prometheusrule.yaml"])
    return set(re.findall(r"\bray_(?:liveserve|serve)_[a-z_]+[a-z]", text))


def scraped_names(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in body.splitlines() if line and line[0] != "#"}


def export_interval_s() -> float:
    import ray

    return max(1.0, ray._config.metrics_report_interval_ms() / 1000)


def test_every_dashboard_series_stays_in_a_steady_state_scrape(ray_app):
    wanted = dashboard_series() - EVENT_ONLY
    assert {"ray_liveserve_sessions_active", "ray_liveserve_replies_in_progress",
            "ray_liveserve_perception_queue_depth"} <= wanted
    window_s = 2 * export_interval_s()  # Ray's agent keeps a gauge this long after its last report
    assert window_s <= 5, "the application should export every second here (tests/conftest.py)"
    # The counters the dashboards read that only calls going wrong make: one refused Open, one bad frame.
    with pytest.raises(grpc.RpcError):
        stream(ray_app.address, [pb.ClientMessage(open=pb.Open(threshold=1.5))])
    calls = [LiveCall(ray_app.address, pb.Open(fps=2.0, threshold=0.0, max_new_tokens=4)) for _ in range(2)]
    stop = threading.Event()

    def steady(call: LiveCall, seed: int) -> None:
        """2 fps for as long as the test scrapes; a query now and then, so replies come and go."""
        frame = 0
        while not stop.is_set():
            call.send(pb.ClientMessage(frame=pb.Frame(timestamp=frame * 0.5, image=jpeg(seed + frame % 4))))
            if frame % 8 == 1:
                call.send(pb.ClientMessage(query=pb.Query(timestamp=frame * 0.5, text="what now")))
            frame += 1
            stop.wait(0.5)

    senders = [threading.Thread(target=steady, args=(call, 10 * i), daemon=True) for i, call in enumerate(calls)]
    try:
        for call in calls:
            call.wait_for(lambda: call.of_kind("opened"))
        calls[0].send(pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=b"not an image")))
        last_open = time.monotonic()
        for sender in senders:
            sender.start()
        for call in calls:
            call.wait_for(lambda: call.of_kind("response_done"), timeout=60)
        # Nothing opens or closes from here on: wait out three of Ray's windows, then every scrape over two
        # more must have every series.
        stop.wait(max(0.0, last_open + 3 * window_s - time.monotonic()))
        missing = []
        deadline = time.monotonic() + 2 * window_s
        while time.monotonic() < deadline:
            missing.append(sorted(wanted - scraped_names(ray_app.metrics_url)))
            stop.wait(0.5)
        assert len(missing) >= 3 and not any(missing), missing
    finally:
        stop.set()
        for sender in senders:
            sender.join(5)
        for call in calls:
            call.close()
