"""The application's Prometheus metrics, written once for both serving modes.

On Ray (`liveserve serve`) they are recorded through Ray's metrics API and exported on every node's
metrics port (8080 in the Kubernetes manifests; `/metrics`), tagged with the deployment and replica,
under Ray's `ray_` namespace: `liveserve_frames_decided_total` is scraped as
`ray_liveserve_frames_decided_total`. In one process (`liveserve serve --local`) the same metrics live
in a prometheus_client registry served by `serve_metrics` (`--metrics-port`), without the prefix.
Names follow Prometheus conventions (base units, `_total` counters, `_seconds` histograms). Each
service creates only the metrics it records.

Ray's metrics agent drops a gauge series that no report refreshed for two export intervals (20 s by
default), so a gauge set only when it changes (sessions open, replies in progress, a queue's depth) would
vanish from dashboards exactly when the platform is steadily busy. Every Ray gauge of a process is
therefore re-reported with its last values twice per export interval (`GaugeRefresher`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from liveserve.services.observability.gpu import read_gpus

log = logging.getLogger(__name__)
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

_backend = "prometheus"  # "ray" inside Serve replicas (use_ray_metrics)
_metrics: dict[str, _Metric] = {}  # one object per name and process: several servers may share a process
_lock = threading.Lock()


def use_ray_metrics() -> None:
    """Record through Ray's metrics API from now on (a Serve replica calls this before creating metrics)."""
    global _backend
    _backend = "ray"


@dataclass(frozen=True)
class MetricSpec:
    """What a metric is, as dashboards and alerting rules see it."""

    kind: str  # "counter", "gauge" or "histogram"
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()  # a histogram's bucket upper bounds (its `le` values, +Inf aside)


class _Metric:
    """One metric with the same calls on either backend: inc / set / observe, with optional tags."""

    def __init__(self, kind: str, name: str, description: str, tags: tuple[str, ...], boundaries=None) -> None:
        self.spec = MetricSpec(kind, tags, tuple(boundaries or ()))
        self.kind, self.tags = kind, tags
        self._last: dict[tuple, tuple[float, dict[str, str] | None]] = {}  # a Ray gauge's values, re-reported
        if _backend == "ray":
            from ray.serve import metrics  # adds the deployment and replica tags

            options = {"boundaries": boundaries} if kind == "histogram" else {}
            self._ray = getattr(metrics, kind.capitalize())(name, description=description, tag_keys=tags, **options)
            self._prom = None
        else:
            import prometheus_client

            cls = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
                   "histogram": prometheus_client.Histogram}[kind]
            options = {"buckets": boundaries} if kind == "histogram" else {}
            self._prom, self._ray = cls(name, description, labelnames=tags, **options), None

    def _record(self, method: str, value: float, tags: dict[str, str] | None) -> None:
        if self._ray is not None:
            getattr(self._ray, method)(value, tags=tags)
            return
        target = self._prom.labels(**tags) if self.tags else self._prom
        getattr(target, method)(value)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if value > 0:  # Ray refuses a zero increment
            self._record("inc", value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        if self._ray is None:
            self._record("set", value, tags)
            return
        with _lock:  # with report_again: a value re-reported is never older than one just set
            self._record("set", value, tags)
            self._last[tuple(sorted((tags or {}).items()))] = (value, tags)
        _refresher.start()

    def report_again(self) -> None:
        """A Ray gauge: every value it was last set to, reported again (before Ray's agent drops it)."""
        with _lock:
            for value, tags in self._last.values():
                self._record("set", value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record("observe", value, tags)


def ray_export_interval_s() -> float:
    """How often Ray's workers export metrics to the node's agent (its `metrics_report_interval_ms`, at
    least 1 s); the agent drops a gauge no export refreshed for twice this."""
    try:
        import ray

        return max(1.0, ray._config.metrics_report_interval_ms() / 1000)
    except Exception:  # not on Ray, or an older Ray without the setting: its default
        return 10.0


class GaugeRefresher:
    """One daemon thread per process re-reporting every Ray gauge's last values twice per export
    interval, started by the first Ray gauge set; a thread rather than a task, as gauges are set from
    engine threads and event loops alike."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self.period_s = 0.0

    def start(self) -> None:
        if self._thread is not None:
            return
        with _lock:
            if self._thread is None:
                self.period_s = ray_export_interval_s() / 2
                self._thread = threading.Thread(target=self._run, name="gauge-refresh", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.period_s)
            with _lock:
                gauges = [m for m in _metrics.values() if m.kind == "gauge"]
            for gauge in gauges:
                try:
                    gauge.report_again()
                except Exception:
                    log.warning("re-reporting gauge values failed", exc_info=True)


_refresher = GaugeRefresher()


def _metric(kind: str, name: str, description: str, tags: tuple[str, ...] = (), boundaries=None) -> _Metric:
    with _lock:
        if name not in _metrics:
            _metrics[name] = _Metric(kind, name, description, tags, boundaries)
        return _metrics[name]


def _counter(name: str, description: str, tags: tuple[str, ...] = ()) -> _Metric:
    return _metric("counter", name, description, tags)


def _gauge(name: str, description: str, tags: tuple[str, ...] = ()) -> _Metric:
    return _metric("gauge", name, description, tags)


def _histogram(name: str, description: str, boundaries: list[float]) -> _Metric:
    return _metric("histogram", name, description, (), boundaries)


def serve_metrics(address: str) -> int:
    """Serve this process's metrics at http://ADDRESS/metrics (one-process mode); returns the port."""
    import prometheus_client

    host, _, port = address.rpartition(":")
    try:
        server, _ = prometheus_client.start_http_server(int(port), addr=host or "127.0.0.1")
    except OSError as exc:
        raise ValueError(f"cannot serve metrics on {address}: {exc.strerror}; choose another --metrics-port, "
                         "or 0 to serve none") from None
    return server.server_port


class GatewayMetrics:
    def __init__(self) -> None:
        self.sessions_active = _gauge("liveserve_sessions_active", "Sessions with an open LiveStream call, by model.",
                                      ("model",))
        self.sessions_opened = _counter("liveserve_sessions_opened_total", "Sessions opened, by model.", ("model",))
        self.frames_received = _counter("liveserve_frames_received_total", "Frames received from clients.")
        self.errors = _counter("liveserve_errors_total", "Calls ended with an error status, by gRPC code.", ("code",))
        self.warnings = _counter("liveserve_warnings_total", "Warnings sent to clients, by code.", ("code",))
        self.frame_to_decision = _histogram("liveserve_frame_to_decision_seconds",
                                            "Gateway receipt of a frame to its decision back at the gateway.",
                                            LATENCY_S)
        self.ttft = _histogram("liveserve_time_to_first_token_seconds",
                               "Trigger (its decision at the gateway) to the reply's first token at the gateway.",
                               LATENCY_S)
        self.tick_frames = _histogram("liveserve_gateway_tick_frames", "Frames per Perception call.", SIZES)
        self.push_commands = _histogram("liveserve_gateway_push_commands",
                                        "Commands per push to a Decision or Reaction replica.", SIZES)
        self.recoveries = _counter("liveserve_sessions_recovered_total",
                                   "Sessions moved to another Decision replica after theirs died or drained.")


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
        self.frames_replayed = _counter("liveserve_frames_replayed_total",
                                        "Frames re-appended after a reply to keep the trained token order.")
        self.decision_latency = _histogram("liveserve_decision_latency_seconds",
                                           "A frame's arrival at its Decision replica to its decision.", LATENCY_S)
        self.responses = _counter("liveserve_responses_total", "Replies requested, by trigger.", ("trigger",))
        self.redis_pings = _counter("liveserve_redis_pings_total",
                                    "PINGs to the session registry's Redis (the gateways' health checks), by result.",
                                    ("result",))


class ReactionMetrics(EngineMetrics):
    def __init__(self) -> None:
        super().__init__("reaction")
        self.replies_in_progress = _gauge("liveserve_replies_in_progress", "Replies being written.")
        self.ttft = _histogram("liveserve_reaction_time_to_first_token_seconds",
                               "Respond received by the replica to the reply's first token.", LATENCY_S)
        self.tpot = _histogram("liveserve_time_per_output_token_seconds", "Mean time per reply token after the "
                               "first.", TOKEN_S)
        self.replies = _counter("liveserve_replies_total", "Replies written, by finish reason.", ("finish",))


class GpuMetrics:
    """Per-device readings, keyed by UUID; nothing is exported where there is no GPU."""

    def __init__(self) -> None:
        tags = ("gpu_uuid", "gpu_index", "gpu_name")
        self.utilization = _gauge("liveserve_gpu_utilization_ratio", "GPU busy share.", tags)
        self.memory_used = _gauge("liveserve_gpu_memory_used_bytes", "GPU memory in use.", tags)
        self.memory_total = _gauge("liveserve_gpu_memory_total_bytes", "GPU memory.", tags)
        self.power = _gauge("liveserve_gpu_power_watts", "GPU board power draw.", tags)

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


def catalog() -> dict[str, MetricSpec]:
    """Every metric the services export, by name (creating them in this process's backend if need be): what
    dashboards and alerting rules may use; tests/test_k8s.py checks k8s/ against it."""
    GatewayMetrics(), PerceptionMetrics(), DecisionMetrics(), ReactionMetrics(), GpuMetrics()
    with _lock:
        return {name: metric.spec for name, metric in _metrics.items()}


async def sample_periodically(sample, period_s: float = 5.0) -> None:
    """Run `sample()` every `period_s` on the caller's loop (in a thread: NVML calls block)."""
    while True:
        try:
            await asyncio.to_thread(sample)
        except Exception:
            log.warning("metrics sample failed", exc_info=True)
        await asyncio.sleep(period_s)
