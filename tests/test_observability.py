"""Operating the application: traces across the services over real OTLP, Prometheus metrics from every
service, GPU metrics absent without a GPU, and autoscaling (a pool scaling up under load, then down)."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.deploy.autoscaling import SessionScaling
from liveserve.services.observability.gpu import read_gpus
from stream_helpers import jpeg, kinds, session_messages, stream

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def wait_for(check, timeout_s: float, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval_s)


def test_a_frame_and_its_reply_are_traced_across_all_four_services(ray_app, otlp_collector):
    metadata = [("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01")]
    replies = stream(ray_app.address, session_messages(3, threshold=1.0), metadata=metadata)
    assert kinds(replies)[-1] == "closed" and replies[-1].closed.responses >= 1

    wanted = {"frame", "perception.encode", "decision.decide", "reply", "reaction.respond"}
    spans = wait_for(lambda: (s := otlp_collector.in_trace(TRACE_ID)) and wanted <= {x.name for x in s} and s, 30)
    assert spans, f"spans seen: {sorted({x.name for x in otlp_collector.in_trace(TRACE_ID)})}"
    services = {s.name: s.service for s in spans}
    assert services["frame"] == "liveserve-gateway" and services["perception.encode"] == "liveserve-perception"
    assert services["decision.decide"] == "liveserve-decision" and services["reaction.respond"] == "liveserve-reaction"
    assert services["reply"] == "liveserve-gateway"  # the gateway has the reply written and relays it

    by_id = {s.span_id: s for s in spans}
    frames = {s.attributes["liveserve.frame_timestamp"]: s for s in spans if s.name == "frame"}
    assert frames[0.0].parent_span_id == "00f067aa0ba902b7"  # the client's context is the root
    for name in ("perception.encode", "decision.decide"):
        for span in (s for s in spans if s.name == name):
            assert by_id[span.parent_span_id].name == "frame"
    reply = next(s for s in spans if s.name == "reply")
    assert by_id[reply.parent_span_id].name == "decision.decide"  # under the frame that fired
    respond = next(s for s in spans if s.name == "reaction.respond")
    assert respond.parent_span_id == reply.span_id and respond.attributes["liveserve.tokens"] >= 1


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_every_service_reports_prometheus_metrics_and_no_gpu_means_no_gpu_series(ray_app):
    stream(ray_app.address, session_messages(4, threshold=1.0, queries=[(0.5, "what do you see")]))
    expected = ["ray_liveserve_sessions_opened_total", "ray_liveserve_frames_received_total",  # gateway
                "ray_liveserve_frame_to_decision_seconds_bucket", "ray_liveserve_time_to_first_token_seconds_bucket",
                "ray_liveserve_gateway_tick_frames_bucket", "ray_liveserve_gateway_push_commands_bucket",
                "ray_liveserve_perception_batch_size_bucket", "ray_liveserve_frames_encoded_total",  # perception
                "ray_liveserve_frames_decided_total", "ray_liveserve_decision_latency_seconds_bucket",  # decision
                "ray_liveserve_decision_kv_pool_reserved_ratio", "ray_liveserve_responses_total",
                "ray_liveserve_decision_batch_size_bucket",
                "ray_liveserve_reaction_time_to_first_token_seconds_bucket", "ray_liveserve_replies_total"]  # reaction

    def decided_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("ray_liveserve_frames_decided_total{")]

    def complete(text: str) -> bool:
        """Every series there, and this test's frames counted: Ray exports every few seconds, and earlier
        tests' sessions may have made the series exist already."""
        decided = [line for line in decided_lines(text) if 'deployment="Decision"' in line]
        return all(m in text for m in expected) and sum(float(line.rsplit(" ", 1)[1]) for line in decided) >= 4

    body = wait_for(lambda: (text := scrape(ray_app.metrics_url)) and complete(text) and text, 60, 1)
    assert body, ([m for m in expected if m not in scrape(ray_app.metrics_url)],
                  decided_lines(scrape(ray_app.metrics_url)))
    has_gpu = bool(read_gpus())
    assert ("ray_liveserve_gpu_memory_total_bytes" in body) == has_gpu  # absent without a GPU, and no error


def series_labels(body: str, name: str) -> list[dict[str, str]]:
    """The label sets of the scraped samples of `name`."""
    return [dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}") + 1]))
            for line in body.splitlines() if line.startswith(name + "{")]


def test_the_series_dashboards_and_alerts_rely_on_are_scraped_as_they_expect(ray_app):
    """k8s/grafana and k8s/prometheusrule.yaml use Ray Serve's replica and autoscaling gauges, the Redis
    pings of the gateways' health checks and the 250 ms bucket: the real scrape has them, so labelled."""
    stream(ray_app.address, session_messages(2, threshold=1.0))
    wanted = {"ray_serve_deployment_replica_healthy": {"deployment", "replica", "application"},
              "ray_serve_autoscaling_target_replicas": {"deployment", "application"},
              "ray_serve_autoscaling_desired_replicas": {"deployment", "application"},
              "ray_liveserve_redis_pings_total": {"result", "deployment", "replica", "application"},
              "ray_liveserve_frame_to_decision_seconds_bucket": {"le", "deployment", "replica", "application"}}
    # The second model ("terse") has its own Decision and Reaction pools and shares quiet's Perception; the
    # commentary model ("narrator") has its own Perception and Decision pools and no Reaction.
    deployments = {"Gateway", "Perception", "Decision", "Reaction", "Decision-terse", "Reaction-terse",
                   "Perception-narrator", "Decision-narrator"}

    def healthy(text: str) -> set[str]:
        return {s["deployment"] for s in series_labels(text, "ray_serve_deployment_replica_healthy")}

    # Each replica exports its gauges on its own schedule: wait until every series and every pool is there.
    body = wait_for(lambda: (text := scrape(ray_app.metrics_url)) and all(series_labels(text, n) for n in wanted)
                    and healthy(text) == deployments and text, 90, 1)
    assert body, ([n for n in wanted if not series_labels(text := scrape(ray_app.metrics_url), n)], healthy(text))
    for name, labels in wanted.items():
        assert all(labels <= set(sample) for sample in series_labels(body, name)), (name, series_labels(body, name))
    assert {"Perception"} <= {s["deployment"] for s in series_labels(body, "ray_serve_autoscaling_desired_replicas")}
    assert any(s["result"] == "ok" and s["deployment"] == "Decision"
               for s in series_labels(body, "ray_liveserve_redis_pings_total"))
    assert "0.25" in {s["le"] for s in series_labels(body, "ray_liveserve_frame_to_decision_seconds_bucket")}


def test_gpu_readings_are_empty_without_a_gpu_and_complete_with_one():
    import torch

    readings = read_gpus()
    if not torch.cuda.is_available():
        assert readings == []
        return
    assert len(readings) >= 1
    for gpu in readings:
        assert gpu.uuid.startswith("GPU-") and 0 < gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert 0.0 <= gpu.utilization <= 1.0


def perception_replicas() -> int:
    from ray import serve

    status = serve.status().applications["liveserve"].deployments["Perception"]
    return status.replica_states.get("RUNNING", 0)


def test_the_perception_pool_scales_up_under_load_and_back_down_after(ray_app):
    assert wait_for(lambda: perception_replicas() == 1, 60), "the pool should idle at its minimum first"
    stop = threading.Event()

    def camera(seed: int) -> None:
        def messages():
            yield pb.ClientMessage(open=pb.Open(threshold=0.0, decisions_only=True, fps=10.0))
            i = 0
            while not stop.is_set():
                yield pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.1, image=jpeg(seed * 1000 + i % 50)))
                i += 1
                time.sleep(0.1)  # 10 fps per camera: more work in flight than one replica is meant to hold
            yield pb.ClientMessage(close=pb.Close())
        stream(ray_app.address, messages(), timeout=120)

    cameras = [threading.Thread(target=camera, args=(k,)) for k in range(6)]
    for thread in cameras:
        thread.start()
    try:
        scaled_up = wait_for(lambda: perception_replicas() >= 2, 90)  # a new replica loads its model first
    finally:
        stop.set()
        for thread in cameras:
            thread.join(60)
    assert scaled_up, "Perception did not scale up under load"
    assert wait_for(lambda: perception_replicas() == 1, 60), "Perception did not scale back down after the load"


def test_decision_scaling_follows_sessions_and_memory_and_keeps_replicas_holding_sessions():
    policy = SessionScaling(target_sessions=4, target_kv_fraction=0.5)
    assert policy.desired([0.0], [0.0]) == 1
    assert policy.desired([4.0, 5.0], [0.1, 0.1]) == 3  # 9 sessions at 4 per replica
    assert policy.desired([1.0, 1.0], [0.6, 0.6]) == 3  # 1.2 pools' worth of KV at 50% each
    assert policy.desired([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == 3  # cannot drop a replica holding a session
    assert policy.desired([2.0, 0.0, 0.0], [0.1, 0.0, 0.0]) == 1  # idle replicas can go
    with pytest.raises(ValueError):
        SessionScaling(target_sessions=0)


def test_the_bundled_serve_config_names_real_policies_and_routers():
    import importlib

    from liveserve.orchestration.launch import load_config

    def resolve(path: str):
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)

    app = load_config()["applications"][0]
    policies = [entry["autoscaling_config"]["policy"] for entry in app["deployments"]
                if "policy" in entry.get("autoscaling_config", {})]
    assert policies
    for policy in policies:
        resolve(policy["policy_function"])(**policy.get("policy_kwargs", {}))  # constructs with the config's kwargs


def test_decision_counts_redis_pings_answered_and_not(tiny_model, redis_url):
    """The gateways' health checks reach Redis through a Decision replica's ping; each outcome is counted,
    which is what the RedisUnreachable alert (k8s/prometheusrule.yaml) watches."""
    import asyncio

    import prometheus_client
    import redis

    from liveserve.services.decision.service import DecisionService
    from liveserve.services.state.redis_server import free_port
    from liveserve.services.state.registry import SessionRegistry
    from liveserve.services.settings import ServiceSettings

    def count(result: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value("liveserve_redis_pings_total", {"result": result}) or 0.0

    def ping(url: str) -> BaseException | None:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        service = DecisionService(tiny_model, ServiceSettings(pool_mb=8), "d", registry=SessionRegistry(client))
        try:
            asyncio.run(service.ping())
        except redis.RedisError as exc:
            return exc
        finally:
            service.stop()

    before = count("ok"), count("error")
    assert ping(redis_url) is None
    assert isinstance(ping(f"redis://127.0.0.1:{free_port()}/0"), redis.ConnectionError)
    assert (count("ok"), count("error")) == (before[0] + 1, before[1] + 1)
