"""The application's Prometheus metrics, recorded through Ray Serve's metrics API.

Ray exports them on every node's metrics port (8080 in the Kubernetes manifests; `/metrics`), tagged
with the deployment and replica, under Ray's `ray_` namespace: `liveserve_frames_decided_total` is
scraped as `ray_liveserve_frames_decided_total`. Names follow Prometheus conventions (base units,
`_total` counters, `_seconds` histograms). Each service creates only the metrics it records.
"""

from __future__ import annotations

import asyncio
import logging

from liveserve.services.gpu import read_gpus

log = logging.getLogger(__name__)
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _counter(name: str, description: str, tags: tuple[str, ...] = ()):
    from ray.serve import metrics

    return metrics.Counter(name, description=description, tag_keys=tags)


def _gauge(name: str, description: str, tags: tuple[str, ...] = ()):
    from ray.serve import metrics

    return metrics.Gauge(name, description=description, tag_keys=tags)


def _histogram(name: str, description: str, boundaries: list[float]):
    from ray.serve import metrics

    return metrics.Histogram(name, description=description, boundaries=boundaries)


class GatewayMetrics:
    def __init__(self) -> None:
        self.sessions_active = _gauge("liveserve_sessions_active", "Sessions with an open LiveStream call.")
        self.sessions_opened = _counter("liveserve_sessions_opened_total", "Sessions opened.")
        self.frames_received = _counter("liveserve_frames_received_total", "Frames received from clients.")
        self.errors = _counter("liveserve_errors_total", "Calls ended with an error status, by gRPC code.", ("code",))
        self.warnings = _counter("liveserve_warnings_total", "Warnings sent to clients, by code.", ("code",))


class PerceptionMetrics:
    def __init__(self) -> None:
        self.frames_encoded = _counter("liveserve_frames_encoded_total", "Frames through the vision tower.")
        self.batch_size = _histogram("liveserve_perception_batch_size", "Frames per vision-tower batch.", SIZES)
        self.queue_depth = _gauge("liveserve_perception_queue_depth", "Frames waiting or being encoded.")


class EngineMetrics:
    """Decision and Reaction replicas: their batched engine and KV pool."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.batch_size = _histogram(f"liveserve_{role}_batch_size", "Sessions per engine forward.", SIZES)
        self.queue_depth = _gauge(f"liveserve_{role}_queue_depth", "Frames queued in the engine, all sessions.")
        self.kv_pool_used = _gauge(f"liveserve_{role}_kv_pool_used_ratio", "Share of the KV pool's blocks in use.")
        self.kv_pool_reserved = _gauge(f"liveserve_{role}_kv_pool_reserved_ratio",
                                       "Share of the KV pool reserved by admitted sessions.")
        self.sessions = _gauge(f"liveserve_{role}_sessions", "Sessions held by the replica.")

    def record_step(self, engine) -> None:
        """After each engine step (engine thread)."""
        if engine.last_batch:
            self.batch_size.observe(len(engine.last_batch))

    def record_state(self, engine) -> None:
        pool = engine.pool
        self.kv_pool_used.set(pool.used_fraction)
        self.kv_pool_reserved.set(pool.reserved_fraction)
        self.queue_depth.set(sum(s.backlog for s in engine.sessions))
        self.sessions.set(len(engine.sessions))


class DecisionMetrics(EngineMetrics):
    def __init__(self) -> None:
        super().__init__("decision")
        self.frames_decided = _counter("liveserve_frames_decided_total", "Frames decided.")
        self.frames_dropped = _counter("liveserve_frames_dropped_total", "Frames dropped to stay real-time.")
        self.frame_to_decision = _histogram("liveserve_frame_to_decision_seconds",
                                            "Gateway receipt of a frame to its decision.", LATENCY_S)
        self.responses = _counter("liveserve_responses_total", "Replies requested, by trigger.", ("trigger",))


class ReactionMetrics(EngineMetrics):
    def __init__(self) -> None:
        super().__init__("reaction")
        self.replies_in_progress = _gauge("liveserve_replies_in_progress", "Replies being written.")
        self.ttft = _histogram("liveserve_time_to_first_token_seconds", "Trigger to first reply token.", LATENCY_S)
        self.tpot = _histogram("liveserve_time_per_output_token_seconds", "Mean time per reply token after the "
                               "first.", TOKEN_S)
        self.replies = _counter("liveserve_replies_total", "Replies written, by finish reason.", ("finish",))


class GpuMetrics:
    """Per-device readings, keyed by UUID; nothing is exported where there is no GPU."""

    def __init__(self) -> None:
        from ray.util import metrics

        tags = ("gpu_uuid", "gpu_index", "gpu_name")
        self.utilization = metrics.Gauge("liveserve_gpu_utilization_ratio", "GPU busy share.", tag_keys=tags)
        self.memory_used = metrics.Gauge("liveserve_gpu_memory_used_bytes", "GPU memory in use.", tag_keys=tags)
        self.memory_total = metrics.Gauge("liveserve_gpu_memory_total_bytes", "GPU memory.", tag_keys=tags)
        self.power = metrics.Gauge("liveserve_gpu_power_watts", "GPU board power draw.", tag_keys=tags)

    def sample(self) -> int:
        readings = read_gpus()
        for gpu in readings:
            tags = {"gpu_uuid": gpu.uuid, "gpu_index": str(gpu.index), "gpu_name": gpu.name}
            self.utilization.set(gpu.utilization, tags=tags)
            self.memory_used.set(gpu.memory_used_bytes, tags=tags)
            self.memory_total.set(gpu.memory_total_bytes, tags=tags)
            if gpu.power_watts is not None:
                self.power.set(gpu.power_watts, tags=tags)
        return len(readings)


async def sample_periodically(sample, period_s: float = 5.0) -> None:
    """Run `sample()` every `period_s` on the replica's loop (in a thread: NVML calls block)."""
    while True:
        try:
            await asyncio.to_thread(sample)
        except Exception:
            log.warning("metrics sample failed", exc_info=True)
        await asyncio.sleep(period_s)
