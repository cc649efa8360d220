"""Start the liveserve Serve application: local Ray (or RAY_ADDRESS), Redis (REDIS_URL or an embedded
server), then the deployments from a Serve config, and wait until every one is running.

The config is Ray Serve's own format (orchestration/serve_config.yaml), so the same file runs here and
inside a KubeRay RayService. Local runs override a few fields: the address the Gateway replicas serve the
public gRPC API on, the HTTP proxy's port (a free one, on 127.0.0.1), application args and replica
counts, and REDIS_URL in the application's runtime environment.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from liveserve.services.state.redis_server import EmbeddedRedis, free_port
from liveserve.services.settings import ServiceSettings

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).with_name("serve_config.yaml")
APP_NAME = "liveserve"
# The custom resources the Serve config's deployments are placed by (one unit per replica); a local Ray
# offers enough of each for any replica count a workstation can run.
POOL_RESOURCES = {f"liveserve_{pool}": 256 for pool in ("gateway", "perception", "decision", "reaction")}


class LaunchError(RuntimeError):
    """The application could not be started; the message says what failed and where to look."""


def load_config(path: str | Path | None = None, *, address: str | None = None, args: dict | None = None,
                replicas: dict[str, int] | None = None, deployments: dict[str, dict] | None = None,
                env: dict[str, str] | None = None, max_replicas: int | None = None) -> dict:
    """The Serve config at `path` (default: the bundled one) with local overrides applied and checked:
    the public API's `address` (host:port the Gateway replicas listen on), application `args`, fixed
    `replicas` per deployment (replacing its autoscaling), other deployment options by name (e.g. an
    autoscaling_config), environment variables for every replica, and a cap on every pool's replicas."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path) if path else DEFAULT_CONFIG
    config = _read_config(path)
    app = _app(config, path)
    app["args"] = {**(app.get("args") or {}), **(args or {})}
    if address is not None:
        app["args"]["address"] = address
    try:
        served = ServiceSettings.from_dict(app["args"]).served_models()
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"bad application args in {path}: {exc}") from None
    # A commentary model has no Reaction pool: options for one (the bundled config has a "Reaction" entry)
    # would name a deployment the application does not have, which Serve refuses.
    absent = {model.reaction_pool for model in served if model.family != "live"}
    app["deployments"] = [entry for entry in app.get("deployments") or [] if entry.get("name") not in absent]
    for name, options in (deployments or {}).items():
        _entry(app, name).update(options)
    for name, count in (replicas or {}).items():
        entry = _entry(app, name)
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = count
    if max_replicas is not None:
        for entry in app["deployments"]:
            scaling = entry.get("autoscaling_config")
            if not scaling:
                continue
            scaling["max_replicas"] = min(scaling.get("max_replicas", 1), max_replicas)
            scaling["min_replicas"] = min(scaling.get("min_replicas", 1), scaling["max_replicas"])
            if scaling["min_replicas"] == scaling["max_replicas"]:  # nothing left to scale: no policy to run
                entry["num_replicas"] = entry.pop("autoscaling_config")["max_replicas"]
    if env:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as exc:
        raise LaunchError(f"{path} is not a valid Serve config: {exc}") from None
    return config


def _entry(app: dict, name: str) -> dict:
    for entry in app["deployments"]:
        if entry["name"] == name:
            return entry
    app["deployments"].append({"name": name})
    return app["deployments"][-1]


def application_args(path: str | Path) -> dict:
    """The application `args` (ServiceSettings) of the Serve config at `path`, for `serve --local`, which
    runs the same settings in one process."""
    path = Path(path)
    return dict(_app(_read_config(path) or {}, path).get("args") or {})


def _read_config(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LaunchError(f"cannot read the Serve config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise LaunchError(f"{path} is not valid YAML: {exc}") from None


def _app(config: dict, path: Path) -> dict:
    apps = [a for a in config.get("applications") or [] if a.get("name") == APP_NAME]
    if not apps:
        raise LaunchError(f"{path} has no application named {APP_NAME!r}")
    return apps[0]


@dataclass
class RunningApp:
    """A started application; `stop` tears down what this process started (and only that)."""

    address: str  # host:port to reach the public gRPC API from this host
    redis_url: str
    config: dict
    redis: EmbeddedRedis | None = None
    started_ray: bool = False
    metrics_url: str = ""  # this node's Prometheus endpoint (Ray's metrics export)
    http_url: str = ""  # the browser page on the Serve HTTP proxy (the Gateway's ingress) of this host
    stopped: bool = field(default=False, init=False)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        import ray
        from ray import serve

        try:
            serve.delete(APP_NAME)  # replicas shut down gracefully; a Ray we started then goes as a whole
        finally:
            if self.started_ray:
                ray.shutdown()
            if self.redis is not None:
                self.redis.stop()


def start(config: dict, *, ray_address: str | None = None, redis_url: str | None = None, timeout_s: float = 600.0,
          progress: Callable[[str], None] = log.info, log_to_driver: bool = False,
          metrics_port: int | None = None, http_port: int | None = None) -> RunningApp:
    """Deploy `config` (see load_config) and wait for it to run. Joins `ray_address` or RAY_ADDRESS when
    given, else starts a local Ray (its Prometheus metrics on `metrics_port`, default a free port; its HTTP
    proxy, the browser front, on 127.0.0.1:`http_port`, default a free port); uses
    `redis_url` or REDIS_URL when set, else starts an embedded Redis."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(config)
    redis_server = None
    redis_url = redis_url or os.environ.get("REDIS_URL", "")
    if not redis_url:
        redis_server = EmbeddedRedis().start().keep_alive()
        redis_url = redis_server.url
        progress(f"started an embedded Redis at {redis_url}")
    app = _app(config, Path("<config>"))
    env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env.setdefault("REDIS_URL", redis_url)
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    started_ray = not ray.is_initialized()
    running = None
    try:
        if started_ray:
            progress(f"joining Ray at {address}" if address else "starting a local Ray")
            metrics_port = metrics_port or free_port()
            init_ray(address, metrics_port, log_to_driver)
        http = {**(config.get("http_options") or {})}
        if not address:
            http.update(host="127.0.0.1", port=http_port or free_port())  # local: no fixed port to collide on
        elif http_port:
            http["port"] = http_port
        serve.start(proxy_location=config.get("proxy_location", "EveryNode"), http_options=HTTPOptions(**http))
        running = RunningApp(_reachable(ServiceSettings.from_dict(app.get("args")).address), redis_url, config,
                             redis_server, started_ray,
                             metrics_url=f"http://127.0.0.1:{metrics_port}/metrics" if started_ray and not address
                             else _metrics_url(), http_url=f"http://127.0.0.1:{http.get('port', 8000)}/")
        progress(f"deploying {APP_NAME} ({', '.join(d['name'] for d in app['deployments'])})")
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        _wait_running(timeout_s, progress)
        return running
    except BaseException:
        if running is not None:
            running.stop()
        else:
            if started_ray and ray.is_initialized():
                ray.shutdown()
            if redis_server is not None:
                redis_server.stop()
        raise


def init_ray(address: str | None, metrics_port: int, log_to_driver: bool = False) -> None:
    """Join the cluster at `address`, or start a local Ray of this process's own.

    Without an address, `ray.init` would attach to a cluster that `ray start` left running on this host
    (and then refuse the local pools' resources); "local" always starts a fresh one, so a user who already
    runs Ray here can still try `serve` and `demo`. Joining a cluster is always explicit (`--ray-address`,
    RAY_ADDRESS)."""
    import ray

    local = {} if address else {"resources": POOL_RESOURCES, "_metrics_export_port": metrics_port}
    ray.init(address=address or "local", namespace="serve", include_dashboard=False, log_to_driver=log_to_driver,
             configure_logging=False, **local)


def host_replica_cap() -> int:
    """Replicas per pool a local Ray on this host may run: four pools share its CPUs, and replicas beyond
    what the cores can run would only compete for them."""
    return max(1, (os.cpu_count() or 1) // 4)


def _reachable(address: str) -> str:
    """The Gateways' listening address as this host dials it (a wildcard host means this host)."""
    host, _, port = address.rpartition(":")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{port}"


def _metrics_url() -> str:
    """The head node's Prometheus endpoint (each Ray node serves its own replicas' metrics)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return ""


def _wait_running(timeout_s: float, progress: Callable[[str], None]) -> None:
    from ray import serve

    deadline, last = time.monotonic() + timeout_s, ""
    while True:
        app = serve.status().applications.get(APP_NAME)
        state = str(app.status) if app else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
            raise LaunchError(f"deploying {APP_NAME} failed: {app.message or state}")
        if app is not None:
            summary = ", ".join(f"{name} {str(d.status).rsplit('.', 1)[-1].lower()}"
                                for name, d in sorted(app.deployments.items()))
            if summary and summary != last:
                progress(summary)
                last = summary
        if time.monotonic() > deadline:
            raise LaunchError(f"{APP_NAME} was not running after {timeout_s:.0f}s ({state}); see the replica "
                              "logs under /tmp/ray/session_latest/logs/serve/")
        time.sleep(0.5)
