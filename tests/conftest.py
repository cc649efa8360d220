"""Shared fixtures: tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from liveserve.model.loading import load_model
from liveserve.model.tiny import write_tiny_checkpoint


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A liveserve-layout checkpoint: Llama LM + SigLIP vision tower."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-live"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2.5-VL checkpoint in StreamingVLM's release layout (commentary mode)."""
    from liveserve.model.tiny import write_tiny_qwen2_5_vl

    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny")


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    return load_model(qwen_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def quiet_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with its interval token's output row scaled up, so it stays silent on most frames
    and speaks on some (as a trained model does), with no hooks: servers in other processes load it."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-quiet")
    shutil.copytree(tiny_dir, out, dirs_exist_ok=True)
    interval = load_model(tiny_dir, device="cpu", dtype=torch.float32).template.interval_id
    weights_path = out / "llm" / "model.safetensors"
    weights = load_file(weights_path)
    weights["lm_head.weight"][interval] *= 50.0
    save_file(weights, weights_path, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def quiet_model(quiet_dir):
    return load_model(quiet_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory) -> Path:
    """A VideoLLM-online release layout (base/, vision/, adapter/); returns adapter/."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-release"), layout="videollm-online")


@pytest.fixture(scope="session")
def redis_url():
    """REDIS_URL when set, else one embedded redis-server on 127.0.0.1 for the whole test session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from liveserve.services.state.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def otlp_collector():
    """A real OTLP/gRPC trace collector on 127.0.0.1 that keeps every span it is sent."""
    from otlp_collector import start_collector

    collector = start_collector()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def ray_app(quiet_dir, qwen_dir, redis_url, otlp_collector):
    """The Serve application on one local Ray cluster for the whole test session: two Gateway and two
    Decision replicas, the quiet tiny model (and a second model, "terse", and a tiny Qwen2.5-VL,
    "narrator", in commentary mode), short record TTLs so expiry is observable, traces exported to the
    test collector, and a Perception pool that autoscales within seconds."""
    pytest.importorskip("ray.serve")
    from liveserve.orchestration.launch import free_port, load_config, start

    # Three models: "quiet" (the default, the deployments' plain names); "terse", the same checkpoint with
    # its own Decision and Reaction pools and settings, sharing quiet's Perception pool; "narrator", a
    # commentary model with its own Perception and Decision pools and no Reaction.
    models = {"quiet": {"path": str(quiet_dir)},
              "terse": {"path": str(quiet_dir), "perception": "quiet", "max_new_tokens": 4, "threshold": 0.5},
              "narrator": {"path": str(qwen_dir)}}
    args = {"models": models, "max_new_tokens": 8, "window_frames": 8, "max_lag_s": 30.0, "pool_mb": 64,
            "max_frame_bytes": 64 << 10, "heartbeat_s": 0.5, "session_ttl_s": 10.0, "closed_ttl_s": 3.0,
            "reaction_sync_frames": 4,
            "capacity_streams": 64}  # recorded, as a deployment records its own: the tests never near it
    busy = {"policy_function": "liveserve.services.deploy.autoscaling:BusyScaling", "policy_kwargs": {"target_busy": 0.02}}
    perception = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0.5,
                                         "downscale_delay_s": 3.0, "look_back_period_s": 11.0, "policy": busy}}
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "200",  # export spans within a fraction of a second
           # report load to the autoscaler twice a second (the default is every 10 s)
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    config = load_config(address=f"127.0.0.1:{free_port()}", args=args, replicas={"Gateway": 2, "Decision": 2},
                         deployments={"Perception": perception}, env=env)
    # Ray's workers export metrics every second rather than every 10 s, and Serve's controller re-reports
    # its replica health as often, so gauges that are not re-reported drop out of a scrape within seconds
    # (Ray drops a gauge after two export intervals): tests/test_gauges.py sees it without waiting 20 s.
    export = {"RAY_metrics_report_interval_ms": "1000", "RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S": "0.5"}
    saved = {name: os.environ.get(name) for name in export}
    os.environ.update(export)  # read by the Ray processes this starts, the agent and the controller included
    try:
        app = start(config, redis_url=redis_url, timeout_s=300, progress=lambda message: None)
        yield app
        app.stop()
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def pytest_collection_modifyitems(config, items) -> None:
    """Chaos tests go last: they kill replicas of the one Ray application the session shares, and a pool
    Serve has just replaced may still be settling (routing) when the next test places sessions. Soak
    tests run for minutes: only when LIVESERVE_SOAK_MINUTES asks for them (reported as skipped)."""
    items.sort(key=lambda item: item.path.name == "test_chaos.py")  # stable: the rest keep their order
    if os.environ.get("LIVESERVE_SOAK_MINUTES"):
        return
    skip = pytest.mark.skip(reason="soak test: set LIVESERVE_SOAK_MINUTES to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
