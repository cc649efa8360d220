"""The Kubernetes manifests in k8s/: schema validation (vendored JSON Schemas, no network) and the
cross-file promises: the RayService embeds orchestration/serve_config.yaml verbatim, every pool's custom
resource is offered by exactly one worker group, GPU pools get GPUs, every Ray container finds Redis,
the gRPC Service reaches only the gateway pods on the Gateway replicas' own port (the serve config's
`address`) behind a gRPC readiness probe, the ServiceMonitor points at ports that exist, and kustomize
lists every manifest and dashboard. The Grafana dashboards and the PrometheusRule use only metrics the
services (or Ray Serve) export, with labels those series carry (see "Dashboards and alerts" below).

Each consistency check returns a list of problems; the tests assert it is empty for the real manifests
and not empty for a deliberately broken copy, so every check is known to bite.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
SERVE_CONFIG = ROOT / "orchestration" / "serve_config.yaml"
SCHEMA_FOR = {
    ("v1", "Namespace"): "namespace.json",
    ("v1", "Service"): "service.json",
    ("apps/v1", "Deployment"): "deployment.json",
    ("ray.io/v1", "RayService"): "rayservice.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.json",
}
SHARED_SCHEMAS = {"k8s-core.json"}
GPU_POOLS = {"perception", "decision", "reaction"}
POOL_PREFIX = "liveserve_"
MANIFESTS = sorted(K8S.glob("*.yaml"))
DASHBOARDS = sorted((K8S / "grafana").glob("*.json"))


# ---------------------------------------------------------------------------------------------- loading

@cache
def _documents(path: Path) -> tuple:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def documents(path: Path) -> list[dict]:
    return copy.deepcopy(list(_documents(path)))


def all_documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in documents(path)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@cache
def _registry() -> Registry:
    resources = []
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


@cache
def _validator(filename: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / filename).read_text())
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def schema_errors(doc: object) -> list[str]:
    """Why `doc` is not a valid manifest of its kind; a kind without a vendored schema is an error."""
    if not isinstance(doc, dict):
        return [f"not a mapping: {doc!r:.60}"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in SCHEMA_FOR:
        return [f"no schema for apiVersion {key[0]!r} kind {key[1]!r}"]
    errors = _validator(SCHEMA_FOR[key]).iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ------------------------------------------------------------------------------------------- helpers

def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def cluster(rayservice: dict) -> dict:
    return rayservice["spec"]["rayClusterConfig"]


def ray_templates(rayservice: dict) -> list[tuple[str, dict]]:
    """(group, pod template) for the head ("head") and every worker group."""
    spec = cluster(rayservice)
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(owner, pod template) of every workload in `docs`."""
    out = []
    for doc in docs:
        if doc.get("kind") == "Deployment":
            out.append((f"Deployment/{doc['metadata']['name']}", doc["spec"]["template"]))
        elif doc.get("kind") == "RayService":
            out += [(f"RayService/{doc['metadata']['name']}/{group}", t) for group, t in ray_templates(doc)]
    return out


def labels_of(template: dict) -> dict:
    return (template.get("metadata") or {}).get("labels") or {}


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def matches_label_selector(selector: dict, labels: dict) -> bool:
    ok = matches(selector.get("matchLabels") or {}, labels) if selector.get("matchLabels") else True
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok &= {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
               "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()
    return ok and bool(selector)


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"]
            for p in c.get("ports", []) if "name" in p}


def has_container_port(template: dict, port: int | str) -> bool:
    if isinstance(port, str):
        return port in container_ports(template)
    return any(p["containerPort"] == port for c in template["spec"]["containers"] for p in c.get("ports", []))


def offered_resources(ray_start_params: dict) -> dict[str, float]:
    """rayStartParams.resources, written for `ray start --resources` as '"{\\"name\\": n}"'."""
    text = ray_start_params.get("resources")
    if text is None:
        return {}
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"')
    return json.loads(text)


def requested_pools(config: dict) -> dict[str, tuple[str, int]]:
    """liveserve_* resource -> (deployment, most replicas it can have), from the serve config."""
    out = {}
    for app in config["applications"]:
        for dep in app.get("deployments", []):
            resources = (dep.get("ray_actor_options") or {}).get("resources") or {}
            most = (dep.get("autoscaling_config") or {}).get("max_replicas", dep.get("num_replicas", 1))
            for name, amount in resources.items():
                if name.startswith(POOL_PREFIX):
                    out[name] = (dep["name"], most * amount)
    return out


def env_value(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def services(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") == "Service"]


# ----------------------------------------------------------------------------------------- checks

def pool_problems(docs: list[dict]) -> list[str]:
    """Every liveserve_* resource a deployment requests is offered by exactly one worker group, which
    offers no other pool's, is named after the pool and can host the deployment's most replicas."""
    rayservice = one(docs, "RayService")
    requested = requested_pools(serve_config(rayservice))
    spec = cluster(rayservice)
    problems = []
    if not requested:
        problems.append("the serve config requests no liveserve_* resource")
    head_offers = offered_resources(spec["headGroupSpec"].get("rayStartParams") or {})
    if any(name.startswith(POOL_PREFIX) for name in head_offers):
        problems.append(f"the head offers pool resources {sorted(head_offers)}")
    if spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("the head must not run work: rayStartParams num-cpus should be \"0\"")
    offered_by: dict[str, list[tuple[str, float, int]]] = {}
    for group in spec.get("workerGroupSpecs", []):
        pools = {k: v for k, v in offered_resources(group.get("rayStartParams") or {}).items()
                 if k.startswith(POOL_PREFIX)}
        if len(pools) != 1:
            problems.append(f"group {group['groupName']} offers {len(pools)} pool resources, expected one")
        for name, units in pools.items():
            offered_by.setdefault(name, []).append((group["groupName"], units, group["maxReplicas"]))
            if name != POOL_PREFIX + group["groupName"]:
                problems.append(f"group {group['groupName']} offers {name}, expected {POOL_PREFIX}{group['groupName']}")
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"group {group['groupName']}: replicas outside minReplicas..maxReplicas")
    for name, (deployment, most) in requested.items():
        groups = offered_by.get(name, [])
        if len(groups) != 1:
            problems.append(f"{name} (requested by {deployment}) is offered by {len(groups)} worker groups")
        elif groups[0][1] * groups[0][2] < most:
            problems.append(f"group {groups[0][0]} holds at most {groups[0][1] * groups[0][2]:g} units of {name}; "
                            f"{deployment} may need {most}")
    for name, groups in offered_by.items():
        if name not in requested:
            problems.append(f"{name} is offered by {[g for g, *_ in groups]} but no deployment requests it")
    return problems


def gpu_problems(docs: list[dict]) -> list[str]:
    """GPU pools' pods request and limit nvidia.com/gpu and tolerate GPU nodes; the others ask for none."""
    problems = []
    groups = {name for name, _ in ray_templates(one(docs, "RayService"))}
    if not GPU_POOLS <= groups:
        problems.append(f"missing GPU worker groups: {sorted(GPU_POOLS - groups)}")
    for group, template in ray_templates(one(docs, "RayService")):
        resources = template["spec"]["containers"][0].get("resources") or {}
        limit = (resources.get("limits") or {}).get("nvidia.com/gpu")
        request = (resources.get("requests") or {}).get("nvidia.com/gpu", limit)
        if group in GPU_POOLS:
            if not limit or int(limit) < 1 or request != limit:
                problems.append(f"{group}: the ray container must request and limit nvidia.com/gpu (>= 1, equal)")
            if not any(t.get("key") == "nvidia.com/gpu" for t in template["spec"].get("tolerations", [])):
                problems.append(f"{group}: no toleration for nvidia.com/gpu nodes")
        elif limit:
            problems.append(f"{group}: a CPU group requests nvidia.com/gpu")
    return problems


def redis_problems(docs: list[dict]) -> list[str]:
    """Every container of the RayService has REDIS_URL, naming a port of the Redis Service."""
    redis_services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in services(docs)
                      if any(matches(s["spec"].get("selector") or {}, labels_of(t)) and
                             any(c["name"] == "redis" for c in t["spec"]["containers"])
                             for _, t in pod_templates(docs))}
    if not redis_services:
        return ["no Service selects the Redis pods"]
    problems = []
    for group, template in ray_templates(one(docs, "RayService")):
        for container in template["spec"]["containers"]:
            url = env_value(container, "REDIS_URL")
            if not url:
                problems.append(f"{group}/{container['name']}: no REDIS_URL")
                continue
            parts = urlsplit(url)
            if parts.scheme not in ("redis", "rediss") or parts.port not in redis_services.get(parts.hostname, ()):
                problems.append(f"{group}/{container['name']}: REDIS_URL {url} names no Redis Service port "
                                f"({redis_services})")
    return problems


def grpc_address_port(config: dict) -> int | None:
    """The port of the application arg `address`, where each Gateway replica serves the public API."""
    address = str(config["applications"][0].get("args", {}).get("address", ""))
    host, sep, port = address.rpartition(":")
    return int(port) if sep and host and port.isdigit() else None


def gateway_group(rayservice: dict) -> str | None:
    """The worker group offering the Gateway deployment's pool resource (pool_problems checks it is one)."""
    pools = [name for name, (deployment, _) in requested_pools(serve_config(rayservice)).items()
             if deployment == "Gateway"]
    groups = [g["groupName"] for g in cluster(rayservice).get("workerGroupSpecs", [])
              if set(offered_resources(g.get("rayStartParams") or {})) & set(pools)]
    return groups[0] if len(groups) == 1 else None


def grpc_service_problems(docs: list[dict]) -> list[str]:
    """The gRPC Service forwards the port of the serve config's `address` to the gateway group's pods and
    no other pod: each Gateway replica serves the API itself there, and only gateway pods run one. Those
    pods declare the port as `grpc` and are Ready only while the replica answers a gRPC health probe on
    it; the other workers keep the Serve HTTP readiness probe and declare no gRPC port."""
    rayservice = one(docs, "RayService")
    config = serve_config(rayservice)
    if "grpc_options" in config:
        return ["the serve config has grpc_options: the Gateway replicas serve gRPC themselves on `address`"]
    grpc_port = grpc_address_port(config)
    if not grpc_port:
        return [f"the serve config's application arg address must be host:port with a fixed port (the Service "
                f"and probes name it), got {config['applications'][0].get('args', {}).get('address')!r}"]
    http_port = config["http_options"]["port"]
    gateway = gateway_group(rayservice)
    if gateway is None:
        return ["no single worker group offers the Gateway deployment's pool resource"]
    templates = dict(ray_templates(rayservice))
    grpc = [s for s in services(docs) if any(p.get("appProtocol") == "grpc" for p in s["spec"]["ports"])]
    if len(grpc) != 1:
        return [f"expected one Service with an appProtocol grpc port, found {len(grpc)}"]
    service = grpc[0]
    name = service["metadata"]["name"]
    port = next(p for p in service["spec"]["ports"] if p.get("appProtocol") == "grpc")
    problems = []
    target = port.get("targetPort", port["port"])
    target_port = container_ports(templates[gateway]).get(target) if isinstance(target, str) else target
    if port["port"] != grpc_port or target_port != grpc_port:
        problems.append(f"{name} must forward port {grpc_port} to the Gateway's port {grpc_port}, "
                        f"got {port['port']} -> {target!r} ({target_port})")
    selector = service["spec"].get("selector") or {}
    selected = {owner for owner, t in pod_templates(docs) if matches(selector, labels_of(t))}
    expected = {f"RayService/{rayservice['metadata']['name']}/{gateway}"}
    if selected != expected:
        problems.append(f"{name} selects {sorted(selected)}, expected only the gateway pods {sorted(expected)}")
    for group, template in ray_templates(rayservice):
        ports = container_ports(template)
        container = template["spec"]["containers"][0]
        probe = container.get("readinessProbe") or {}
        if group == gateway:
            if ports.get("grpc") != grpc_port or ports.get("serve") != http_port:
                problems.append(f"{group}: container ports grpc/serve should be {grpc_port}/{http_port}, got {ports}")
            grpc_probe = probe.get("grpc") or {}
            if grpc_probe.get("port") != grpc_port or grpc_probe.get("service", "") != "":
                problems.append(f"{group}: readinessProbe should be grpc on port {grpc_port} (service \"\"), "
                                f"got {probe}")
            continue
        if "grpc" in ports or grpc_port in ports.values():
            problems.append(f"{group}: declares gRPC port {ports.get('grpc', grpc_port)} but runs no Gateway")
        if group == "head":
            continue  # KubeRay's own probes; the head is in no Service that carries traffic
        if ports.get("serve") != http_port:
            problems.append(f"{group}: container port serve should be {http_port}, got {ports}")
        http = probe.get("httpGet") or {}
        if http.get("path") != "/-/healthz" or http.get("port") not in (http_port, "serve"):
            problems.append(f"{group}: readinessProbe should GET /-/healthz on the Serve HTTP port {http_port}")
    return problems


def metrics_problems(docs: list[dict]) -> list[str]:
    """The ServiceMonitor selects a Service whose named port exists, and that Service reaches Ray's
    metrics export port on every Ray pod."""
    rayservice = one(docs, "RayService")
    monitor = one(docs, "ServiceMonitor")
    selected = [s for s in services(docs)
                if matches_label_selector(monitor["spec"]["selector"], s["metadata"].get("labels") or {})]
    if not selected:
        return [f"ServiceMonitor {monitor['metadata']['name']} selects no Service"]
    problems = []
    ray_pods = ray_templates(rayservice)
    for endpoint in monitor["spec"]["endpoints"]:
        for service in selected:
            name = service["metadata"]["name"]
            port = next((p for p in service["spec"]["ports"] if p.get("name") == endpoint.get("port")), None)
            if port is None:
                problems.append(f"Service {name} has no port named {endpoint.get('port')!r}")
                continue
            target = port.get("targetPort", port["port"])
            pods = [(o, t) for o, t in pod_templates(docs) if matches(service["spec"].get("selector") or {}, labels_of(t))]
            if len(pods) != len(ray_pods):
                problems.append(f"Service {name} selects {len(pods)} pod templates, expected all {len(ray_pods)} Ray ones")
            for owner, template in pods:
                if not has_container_port(template, target):
                    problems.append(f"{owner} has no container port {target!r} for Service {name}")
    for group in [cluster(rayservice)["headGroupSpec"]] + cluster(rayservice).get("workerGroupSpecs", []):
        exported = group.get("rayStartParams", {}).get("metrics-export-port")
        ports = container_ports(group["template"])
        if exported is None or ports.get("metrics") != int(exported):
            problems.append(f"{group.get('groupName', 'head')}: metrics-export-port {exported} vs container "
                            f"port 'metrics' {ports.get('metrics')}")
    return problems


def selector_problems(docs: list[dict]) -> list[str]:
    """Deployments select their own pods, and every Service selects some pod of these manifests."""
    problems = []
    for doc in docs:
        if doc.get("kind") == "Deployment" and not matches_label_selector(doc["spec"]["selector"],
                                                                         labels_of(doc["spec"]["template"])):
            problems.append(f"Deployment {doc['metadata']['name']}: selector does not match its template")
    for service in services(docs):
        selector = service["spec"].get("selector") or {}
        if not any(matches(selector, labels_of(t)) for _, t in pod_templates(docs)):
            problems.append(f"Service {service['metadata']['name']} selects no pod")
    return problems


def kustomization_problems(kustomization: dict) -> list[str]:
    listed = kustomization.get("resources") or []
    expected = sorted(p.name for p in MANIFESTS if p.name != "kustomization.yaml")
    problems = [f"kustomization lists {r}, which does not exist" for r in listed if not (K8S / r).is_file()]
    problems += [f"kustomization does not list {name}" for name in expected if name not in listed]
    generated = [f for generator in kustomization.get("configMapGenerator") or [] for f in generator.get("files") or []]
    problems += [f"configMapGenerator names {f}, which does not exist" for f in generated if not (K8S / f).is_file()]
    problems += [f"no configMapGenerator ships dashboard {p.name}" for p in DASHBOARDS
                 if str(p.relative_to(K8S)) not in generated]
    if generated and not any((g.get("options") or {}).get("labels", {}).get("grafana_dashboard")
                             for g in kustomization["configMapGenerator"]):
        problems.append("the dashboards' ConfigMap lacks the grafana_dashboard label the Grafana sidecar watches")
    return problems


CHECKS = {
    "pools": pool_problems,
    "gpus": gpu_problems,
    "redis": redis_problems,
    "grpc": grpc_service_problems,
    "metrics": metrics_problems,
    "selectors": selector_problems,
}


# ------------------------------------------------------------------------------------- schema tests

def test_schemas_are_valid_and_all_used():
    for path in SCHEMAS.glob("*.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))
    on_disk = {p.name for p in SCHEMAS.glob("*.json")}
    assert on_disk == set(SCHEMA_FOR.values()) | SHARED_SCHEMAS


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"kustomization.yaml", "rayservice.yaml", "redis.yaml", "service.yaml", "servicemonitor.yaml",
            "prometheusrule.yaml"} <= names
    assert [p.name for p in DASHBOARDS] == ["liveserve-overview.json"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates(path):
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert schema_errors(doc) == [], f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"


def test_unknown_kinds_are_refused():
    assert schema_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}})
    assert schema_errors({"apiVersion": "ray.io/v1alpha1", "kind": "RayService", "metadata": {"name": "x"}})
    assert schema_errors(["not", "a", "mapping"])


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _groups(docs):
    return cluster(one(docs, "RayService"))["workerGroupSpecs"]


def _rules(docs):
    return [rule for group in one(docs, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]]


def _gateway_probe(docs):
    return next(g for g in _groups(docs) if g["groupName"] == "gateway")["template"]["spec"]["containers"][0][
        "readinessProbe"]


BROKEN = {
    "worker group: minReplicas misspelled": lambda d: _rename(_groups(d)[0], "minReplicas", "minReplica"),
    "worker group: replicas as a string": lambda d: _groups(d)[1].__setitem__("replicas", "1"),
    "rayStartParams: a number, not a string": lambda d: cluster(one(d, "RayService"))["headGroupSpec"][
        "rayStartParams"].__setitem__("num-cpus", 0),
    "autoscaler: unknown upscalingMode": lambda d: cluster(one(d, "RayService"))["autoscalerOptions"].__setitem__(
        "upscalingMode", "Fast"),
    "spec: serveConfigV2 misspelled": lambda d: _rename(one(d, "RayService")["spec"], "serveConfigV2", "serveConfig"),
    "serveConfigV2 as a mapping": lambda d: one(d, "RayService")["spec"].__setitem__("serveConfigV2", {"a": 1}),
    "container: env misspelled": lambda d: _rename(_groups(d)[2]["template"]["spec"]["containers"][0], "env", "envs"),
    "container port: name over 15 characters": lambda d: _groups(d)[0]["template"]["spec"]["containers"][0][
        "ports"][0].__setitem__("name", "serve-http-proxy-port"),
    "pod label: a boolean value": lambda d: labels_of(_groups(d)[0]["template"]).__setitem__("liveserve.io/ray", True),
    "resources: a bad quantity": lambda d: _groups(d)[1]["template"]["spec"]["containers"][0]["resources"][
        "limits"].__setitem__("memory", "32 GB"),
    "grpc probe: a named port": lambda d: _gateway_probe(d)["grpc"].__setitem__("port", "grpc"),
    "grpc probe: port missing": lambda d: _gateway_probe(d)["grpc"].pop("port"),
    "grpc probe: an HTTP field": lambda d: _gateway_probe(d)["grpc"].__setitem__("path", "/"),
    "probe: grpc and httpGet at once": lambda d: _gateway_probe(d).__setitem__(
        "httpGet", {"path": "/-/healthz", "port": 8000}),
    "Deployment: replicas as a string": lambda d: one(d, "Deployment")["spec"].__setitem__("replicas", "1"),
    "Deployment: probe without a handler": lambda d: one(d, "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["readinessProbe"].pop("exec"),
    "Service: port as a string": lambda d: services(d)[0]["spec"]["ports"][0].__setitem__("port", "6379"),
    "Service: selector misspelled": lambda d: _rename(services(d)[0]["spec"], "selector", "selectors"),
    "ServiceMonitor: bad interval": lambda d: one(d, "ServiceMonitor")["spec"]["endpoints"][0].__setitem__(
        "interval", "15 seconds"),
    "ServiceMonitor: endpoints missing": lambda d: one(d, "ServiceMonitor")["spec"].pop("endpoints"),
    "PrometheusRule: alert without expr": lambda d: _rules(d)[-1].pop("expr"),
    "PrometheusRule: a recording rule with for": lambda d: _rules(d)[0].__setitem__("for", "5m"),
    "PrometheusRule: recording and alerting at once": lambda d: _rules(d)[-1].__setitem__("record", "x:y"),
    "PrometheusRule: bad for duration": lambda d: _rules(d)[-1].__setitem__("for", "two minutes"),
    "PrometheusRule: a label value as a number": lambda d: _rules(d)[-1]["labels"].__setitem__("severity", 1),
    "PrometheusRule: group without rules": lambda d: one(d, "PrometheusRule")["spec"]["groups"][0].pop("rules"),
    "Kustomization: resources misspelled": lambda d: _rename(one(d, "Kustomization"), "resources", "resource"),
}


@pytest.mark.parametrize("mutate", BROKEN.values(), ids=BROKEN.keys())
def test_broken_copies_fail_validation(mutate):
    docs = all_documents()
    mutate(docs)
    broken = [doc for doc in docs if schema_errors(doc)]
    assert len(broken) == 1, "the broken copy should fail validation (and nothing else should)"


# ------------------------------------------------------------------------------ serve config tests

def test_serve_config_embedded_verbatim():
    rayservice = one(documents(K8S / "rayservice.yaml"), "RayService")
    text = SERVE_CONFIG.read_text()
    assert rayservice["spec"]["serveConfigV2"] == text, "run: python k8s/sync_serve_config.py"
    assert serve_config(rayservice) == yaml.safe_load(text)


def test_embedded_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(one(documents(K8S / "rayservice.yaml"), "RayService"))
    schema = ServeDeploySchema.model_validate(config)
    assert [d.name for d in schema.applications[0].deployments] == ["Gateway", "Perception", "Decision", "Reaction"]
    broken = copy.deepcopy(config)
    broken["applications"][0]["deployments"][0]["num_replicas"] = "many"
    with pytest.raises(ValueError):  # pydantic's ValidationError
        ServeDeploySchema.model_validate(broken)


@pytest.fixture(scope="module")
def sync():
    sys.path.insert(0, str(K8S))
    try:
        import sync_serve_config
    finally:
        sys.path.remove(str(K8S))
    return sync_serve_config


def test_sync_script_repairs_a_stale_copy(sync, tmp_path):
    current = (K8S / "rayservice.yaml").read_text()
    assert sync.main(["--check"]) == 0
    stale = current.replace("max_new_tokens: 64", "max_new_tokens: 65", 1)
    assert stale != current
    (tmp_path / "rayservice.yaml").write_text(stale)
    assert sync.main(["--check", "--manifest", str(tmp_path / "rayservice.yaml")]) == 1
    assert sync.main(["--manifest", str(tmp_path / "rayservice.yaml")]) == 0
    assert (tmp_path / "rayservice.yaml").read_text() == current


@pytest.mark.parametrize("config", ["a: 1\n", "a: 1", "a: 1\n\n\n", "# head\n\nb:\n  - 2   \n", "  a: 1\n"])
def test_sync_embeds_any_text_verbatim(sync, config):
    manifest = sync.embed((K8S / "rayservice.yaml").read_text(), config)
    assert yaml.safe_load(manifest)["spec"]["serveConfigV2"] == config
    assert yaml.safe_load(manifest)["spec"]["rayClusterConfig"] == cluster(one(documents(K8S / "rayservice.yaml"),
                                                                              "RayService"))


def test_sync_fills_a_new_overlay_patch(sync, tmp_path):
    patch = tmp_path / "serve-config-patch.yaml"
    patch.write_text("apiVersion: ray.io/v1\nkind: RayService\nmetadata:\n  name: liveserve\nspec:\n"
                     "  serveConfigV2: \"\"\n")
    config = tmp_path / "serve_config.yaml"
    config.write_text(SERVE_CONFIG.read_text().replace("model: default", "model: /models/mine", 1))
    assert sync.main(["--config", str(config), "--manifest", str(patch)]) == 0
    doc = yaml.safe_load(patch.read_text())
    assert doc["spec"]["serveConfigV2"] == config.read_text()
    assert doc["metadata"] == {"name": "liveserve"}
    assert sync.main(["--check", "--config", str(config), "--manifest", str(patch)]) == 0


# --------------------------------------------------------------------------------- consistency tests

@pytest.mark.parametrize("name", CHECKS)
def test_consistency(name):
    assert CHECKS[name](all_documents()) == []


def _drop_group(docs, group):
    specs = _groups(docs)
    specs[:] = [g for g in specs if g["groupName"] != group]


def _worker(docs, group):
    return next(g for g in _groups(docs) if g["groupName"] == group)


def _ray_container(docs, group):
    return _worker(docs, group)["template"]["spec"]["containers"][0]


def _set_resources(docs, group, value):
    _worker(docs, group)["rayStartParams"]["resources"] = value


def _grpc_service(docs):
    return next(s for s in services(docs) if any(p.get("appProtocol") == "grpc" for p in s["spec"]["ports"]))


def _grpc_port(docs):
    return next(p for p in _grpc_service(docs)["spec"]["ports"] if p.get("appProtocol") == "grpc")


def _port(docs, group, name):
    return next(p for p in _ray_container(docs, group)["ports"] if p.get("name") == name)


def _drop_port(docs, group, name):
    _ray_container(docs, group)["ports"].remove(_port(docs, group, name))


def _edit_serve_config(docs, old, new):
    spec = one(docs, "RayService")["spec"]
    assert old in spec["serveConfigV2"], f"the serve config no longer holds {old!r}"
    spec["serveConfigV2"] = spec["serveConfigV2"].replace(old, new, 1)


BROKEN_CONSISTENCY = [
    ("pools", "decision group gone", lambda d: _drop_group(d, "decision")),
    ("pools", "gateway also offers decision",
     lambda d: _set_resources(d, "gateway", '"{\\"liveserve_gateway\\": 4, \\"liveserve_decision\\": 1}"')),
    ("pools", "a group offers an unrequested pool", lambda d: _set_resources(d, "reaction", '"{\\"liveserve_x\\": 1}"')),
    ("pools", "too few units for max replicas", lambda d: _worker(d, "decision").__setitem__("maxReplicas", 2)),
    ("pools", "too few gateway pods for the Gateway's max replicas",
     lambda d: _worker(d, "gateway").__setitem__("maxReplicas", 2)),
    ("pools", "head offers a pool", lambda d: cluster(one(d, "RayService"))["headGroupSpec"]["rayStartParams"]
     .__setitem__("resources", '"{\\"liveserve_gateway\\": 1}"')),
    ("pools", "head takes work", lambda d: cluster(one(d, "RayService"))["headGroupSpec"]["rayStartParams"].pop("num-cpus")),
    ("gpus", "decision without GPU", lambda d: _ray_container(d, "decision")["resources"]["limits"].pop("nvidia.com/gpu")),
    ("gpus", "reaction without toleration", lambda d: _worker(d, "reaction")["template"]["spec"].pop("tolerations")),
    ("gpus", "gateway with a GPU", lambda d: _ray_container(d, "gateway")["resources"]["limits"]
     .__setitem__("nvidia.com/gpu", 1)),
    ("redis", "perception without REDIS_URL", lambda d: _ray_container(d, "perception").pop("env")),
    ("redis", "REDIS_URL to a wrong host", lambda d: _ray_container(d, "reaction")["env"][0]
     .__setitem__("value", "redis://redis:6379/0")),
    ("grpc", "gRPC Service on another port", lambda d: _grpc_port(d).__setitem__("port", 9000)),
    ("grpc", "gRPC Service forwards to the Serve HTTP port", lambda d: _grpc_port(d).__setitem__("targetPort", 8000)),
    ("grpc", "gRPC Service forwards to a port name the gateway lacks",
     lambda d: _grpc_port(d).__setitem__("targetPort", "serve")),
    ("grpc", "gRPC Service selects every worker pod", lambda d: _grpc_service(d)["spec"].__setitem__(
        "selector", {"app.kubernetes.io/part-of": "liveserve", "liveserve.io/ray-node": "worker"})),
    ("grpc", "gRPC Service selects every Ray pod", lambda d: _grpc_service(d)["spec"].__setitem__(
        "selector", {"liveserve.io/ray": "true"})),
    ("grpc", "gRPC Service selects the decision pool", lambda d: _grpc_service(d)["spec"]["selector"].__setitem__(
        "liveserve.io/pool", "decision")),
    ("grpc", "serve config moves the Gateway's port", lambda d: _edit_serve_config(
        d, "address: 0.0.0.0:50051", "address: 0.0.0.0:50052")),
    ("grpc", "serve config lets the Gateway pick a port", lambda d: _edit_serve_config(
        d, "address: 0.0.0.0:50051", "address: 0.0.0.0:0")),
    ("grpc", "serve config brings back Serve's gRPC proxy", lambda d: _edit_serve_config(
        d, "proxy_location: EveryNode\n", "proxy_location: EveryNode\ngrpc_options: {port: 50051}\n")),
    ("grpc", "the gateway without the grpc port", lambda d: _drop_port(d, "gateway", "grpc")),
    ("grpc", "the gateway's grpc port on another number", lambda d: _port(d, "gateway", "grpc")
     .__setitem__("containerPort", 50052)),
    ("grpc", "the gateway without a readiness probe", lambda d: _ray_container(d, "gateway").pop("readinessProbe")),
    ("grpc", "the gateway with the Serve proxy probe", lambda d: _ray_container(d, "gateway").__setitem__(
        "readinessProbe", {"httpGet": {"path": "/-/healthz", "port": 8000}})),
    ("grpc", "the gateway probes another port", lambda d: _ray_container(d, "gateway")["readinessProbe"]["grpc"]
     .__setitem__("port", 8000)),
    ("grpc", "the gateway probes a service the server does not report",
     lambda d: _ray_container(d, "gateway")["readinessProbe"]["grpc"].__setitem__("service", "liveserve")),
    ("grpc", "a GPU worker declares the grpc port", lambda d: _ray_container(d, "decision")["ports"].append(
        {"name": "grpc", "containerPort": 50051})),
    ("grpc", "the head declares the Gateway's port", lambda d: cluster(one(d, "RayService"))["headGroupSpec"][
        "template"]["spec"]["containers"][0]["ports"].append({"name": "api", "containerPort": 50051})),
    ("grpc", "a GPU worker without the proxy readiness probe", lambda d: _ray_container(d, "reaction")
     .pop("readinessProbe")),
    ("grpc", "the gateway pool gone", lambda d: _set_resources(d, "gateway", '"{\\"liveserve_x\\": 1}"')),
    ("metrics", "ServiceMonitor selects nothing", lambda d: one(d, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
     .__setitem__("app.kubernetes.io/component", "nope")),
    ("metrics", "ServiceMonitor scrapes a port name that does not exist",
     lambda d: one(d, "ServiceMonitor")["spec"]["endpoints"][0].__setitem__("port", "prometheus")),
    ("metrics", "a Ray pod without the metrics port", lambda d: _drop_port(d, "reaction", "metrics")),
    ("metrics", "metrics-export-port differs", lambda d: _worker(d, "perception")["rayStartParams"]
     .__setitem__("metrics-export-port", "9090")),
    ("selectors", "Deployment selector off its pods", lambda d: one(d, "Deployment")["spec"]["selector"]["matchLabels"]
     .__setitem__("app.kubernetes.io/name", "other")),
    ("selectors", "Service selects nothing", lambda d: one(d, "Service", "liveserve-redis")["spec"]
     .__setitem__("selector", {"app": "nothing"})),
]


@pytest.mark.parametrize("check,mutate", [(c, m) for c, _, m in BROKEN_CONSISTENCY],
                         ids=[f"{c}: {what}" for c, what, _ in BROKEN_CONSISTENCY])
def test_consistency_checks_catch_broken_copies(check, mutate):
    docs = all_documents()
    mutate(docs)
    assert CHECKS[check](docs), "the check should report the broken copy"


def test_kustomization_lists_every_manifest():
    kustomization = one(documents(K8S / "kustomization.yaml"), "Kustomization")
    assert kustomization_problems(kustomization) == []
    partial = copy.deepcopy(kustomization)
    partial["resources"] = [r for r in partial["resources"] if r != "servicemonitor.yaml"] + ["missing.yaml"]
    assert len(kustomization_problems(partial)) == 2
    unshipped = copy.deepcopy(kustomization)
    unshipped["configMapGenerator"][0]["files"] = ["grafana/missing.json"]
    assert len(kustomization_problems(unshipped)) == 2
    unlabelled = copy.deepcopy(kustomization)
    unlabelled["configMapGenerator"][0]["options"]["labels"] = {}
    assert len(kustomization_problems(unlabelled)) == 1


def test_image_is_the_same_on_every_ray_pod():
    rayservice = one(all_documents(), "RayService")
    images = {c["image"] for _, t in ray_templates(rayservice) for c in t["spec"]["containers"]}
    assert len(images) == 1, images
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", images.pop())


# ------------------------------------------------------------------------------ dashboards and alerts
#
# Every PromQL expression in k8s/grafana/*.json and k8s/prometheusrule.yaml may name only series that are
# really scraped: the services' metrics (services/observability/telemetry.py's catalog) under Ray's `ray_` prefix (a
# histogram as _bucket/_sum/_count), Ray Serve's own metrics listed below, and the PrometheusRule's own
# recording rules. Labels must be ones those series carry, and a histogram's `le` one of its boundaries.

# Ray Serve's metrics the dashboards and alerts use: name -> (the ray package file defining it, its tags).
# test_ray_serve_metrics_exist_in_the_installed_ray checks each against the installed Ray.
RAY_SERVE_METRICS = {
    "serve_deployment_replica_healthy": ("serve/_private/deployment_state.py", ("deployment", "replica", "application")),
    "serve_autoscaling_target_replicas": ("serve/_private/deployment_state.py", ("deployment", "application")),
    "serve_autoscaling_desired_replicas": ("serve/_private/autoscaling_state.py", ("deployment", "application")),
}
SERVE_TAGS = {"deployment", "replica", "application"}  # ray.serve.metrics adds them to every application metric
# Labels Prometheus (Operator) puts on every scraped series: the target's, plus the ServiceMonitor's relabelings.
TARGET_LABELS = {"instance", "job", "namespace", "service", "endpoint", "pod", "container"}
PROMQL_FUNCTIONS = {"sum", "max", "min", "avg", "count", "topk", "bottomk", "rate", "irate", "increase", "delta",
                    "histogram_quantile", "clamp_max", "clamp_min", "absent", "absent_over_time", "max_over_time",
                    "min_over_time", "avg_over_time", "label_replace", "vector", "scalar", "time"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


@dataclass(frozen=True)
class Series:
    labels: frozenset[str]
    boundaries: tuple[float, ...] = ()  # a histogram's _bucket: its `le` values


@cache
def scraped_series() -> dict[str, Series]:
    """Every series name the ServiceMonitor scrapes from the Ray pods, with the labels it carries."""
    from liveserve.services.observability.telemetry import catalog

    monitor = one(documents(K8S / "servicemonitor.yaml"), "ServiceMonitor")
    relabelled = {r["targetLabel"] for e in monitor["spec"]["endpoints"] for r in e.get("relabelings", [])}
    common = TARGET_LABELS | relabelled
    series = {}
    for name, spec in catalog().items():
        labels = frozenset(set(spec.tags) | SERVE_TAGS | common)
        if spec.kind == "histogram":
            series[f"ray_{name}_bucket"] = Series(labels | {"le"}, spec.boundaries)
            series[f"ray_{name}_sum"] = series[f"ray_{name}_count"] = Series(labels)
        else:
            series[f"ray_{name}"] = Series(labels)
    for name, (_, tags) in RAY_SERVE_METRICS.items():
        series[f"ray_{name}"] = Series(frozenset(set(tags) | common))
    return series


def recorded_series(rule_doc: dict) -> dict[str, Series]:
    """The recording rules' outputs (they aggregate everything away but their own labels)."""
    return {rule["record"]: Series(frozenset(rule.get("labels", {})))
            for group in rule_doc["spec"]["groups"] for rule in group["rules"] if "record" in rule}


def promql_problems(expr: str, known: dict[str, Series], grouped: set[str] = frozenset()) -> list[str]:
    """What in a PromQL expression is not a real series, label, bucket or function. `grouped`: extra labels
    the expression's text may mention (a Grafana legend's {{label}})."""
    problems, labels = [], set(grouped)
    depth = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            depth.append(char)
        elif char in ")]}" and (not depth or "([{"[")]}".index(char)] != depth.pop()):
            return [f"unbalanced {char!r} in {expr!r}"]
    if depth:
        return [f"unclosed {depth[-1]!r} in {expr!r}"]
    for clause in GROUPING.findall(expr):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    rest = GROUPING.sub(" ", expr)
    for metric, body in SELECTOR.findall(rest):
        matched = 0
        for label, value in MATCHER.findall(body):
            matched += 1
            labels.add(label)
            series = known.get(metric)
            if label == "le" and series is not None and series.boundaries and float(value) not in series.boundaries:
                problems.append(f"{metric}: le={value!r} is not a bucket boundary {series.boundaries}")
        if matched != body.count("="):
            problems.append(f"unparsed label matchers {{{body}}}")
    rest = re.sub(r"\[[^\]]*\]", " ", SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", rest))
    metrics = set()
    for name, call in IDENTIFIER.findall(rest):
        if name.lower() in PROMQL_WORDS:
            continue
        if call and name not in PROMQL_FUNCTIONS:
            problems.append(f"unknown function {name}()")
        elif not call:
            metrics.add(name)
    for name in sorted(metrics - known.keys()):
        hint = " (scraped from Ray with the ray_ prefix)" if f"ray_{name}" in known else ""
        problems.append(f"{name} is not a scraped series{hint}")
    carried = set().union(*(known[m].labels for m in metrics if m in known)) if metrics else set()
    problems += [f"label {label!r} is on none of {sorted(metrics)}" for label in sorted(labels - carried)]
    if not metrics:
        problems.append("the expression names no series")
    return problems


def dashboard_targets(dashboard: dict) -> list[tuple[str, dict]]:
    """(panel title, target) for every query of every panel, rows' collapsed panels included."""
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [(p.get("title", "?"), t) for p in panels for t in p.get("targets", [])]


def dashboard_problems(dashboard: dict) -> list[str]:
    """The shape Grafana's dashboard JSON model needs, one Prometheus data source variable used by every
    query, panels on the 24-column grid without overlapping, and only real series in the queries."""
    problems = []
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list), ("templating", dict)):
        if not isinstance(dashboard.get(key), kind):
            problems.append(f"dashboard {key} should be a {kind.__name__}")
    if problems:
        return problems
    if not re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"]):
        problems.append(f"uid {dashboard['uid']!r} is not a Grafana uid")
    variables = {v.get("name"): v for v in dashboard["templating"].get("list", [])}
    source = variables.get("datasource") or {}
    if source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append("no `datasource` variable of Prometheus data sources")
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        problems.append(f"panel ids should be distinct integers: {ids}")
    cells = {}
    for panel in panels:
        title, pos = panel.get("title", "?"), panel.get("gridPos") or {}
        if not all(isinstance(pos.get(k), int) for k in "hwxy") or pos["x"] < 0 or pos["x"] + pos["w"] > 24:
            problems.append(f"{title}: gridPos {pos} is not on the 24-column grid")
            continue
        for cell in ((x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])):
            if cell in cells:
                problems.append(f"{title} overlaps {cells[cell]}")
                break
            cells[cell] = title
        if panel.get("type") == "row":
            continue
        if panel.get("type") not in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}:
            problems.append(f"{title}: unexpected panel type {panel.get('type')!r}")
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if not refs or len(set(refs)) != len(refs):
            problems.append(f"{title}: queries need distinct refIds, got {refs}")
        for target in [panel, *panel.get("targets", [])]:
            if target.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                problems.append(f"{title}: data source should be the dashboard's ${{datasource}}")
    for title, target in dashboard_targets(dashboard):
        expr = target.get("expr") or ""
        grafana = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat") or ""))
        problems += [f"{title}: {p}" for p in promql_problems(grafana, scraped_series(), legend)]
        grouped = {l.strip() for clause in GROUPING.findall(expr) for l in clause.split(",")}
        problems += [f"{title}: legend label {l!r} is aggregated away" for l in sorted(legend - grouped)]
    return problems


def rule_problems(rule_doc: dict) -> list[str]:
    """Every rule's expression uses real series; alerts have a severity, a `for`, a summary, a description
    and a runbook_url at a section of docs/operations.md; names are unique."""
    known = scraped_series() | recorded_series(rule_doc)
    anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", (ROOT / "docs" / "operations.md").read_text(), re.M)}
    problems, names = [], []
    groups = rule_doc["spec"]["groups"]
    if len({g["name"] for g in groups}) != len(groups):
        problems.append("rule group names repeat")
    for rule in (r for g in groups for r in g["rules"]):
        name = rule.get("alert") or rule.get("record")
        names.append(name)
        problems += [f"{name}: {p}" for p in promql_problems(rule["expr"], known)]
        if "alert" not in rule:
            continue
        if rule.get("labels", {}).get("severity") not in {"critical", "warning", "info"}:
            problems.append(f"{name}: severity should be critical, warning or info")
        if not rule.get("for"):
            problems.append(f"{name}: no `for:` (one bad scrape would page)")
        notes = rule.get("annotations", {})
        problems += [f"{name}: no {key} annotation" for key in ("summary", "description") if not notes.get(key)]
        page, _, anchor = notes.get("runbook_url", "").partition("#")
        if page != "docs/operations.md" or anchor not in anchors:
            problems.append(f"{name}: runbook_url {notes.get('runbook_url')!r} is no section of docs/operations.md")
    if len(set(names)) != len(names):
        problems.append("rule names repeat")
    return problems


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prometheus_rule() -> dict:
    return one(documents(K8S / "prometheusrule.yaml"), "PrometheusRule")


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def test_ray_serve_metrics_exist_in_the_installed_ray():
    import ray

    for name, (path, tags) in RAY_SERVE_METRICS.items():
        source = (Path(ray.__file__).parent / path).read_text()
        found = re.search(r"metrics\.(Gauge|Counter|Histogram)\(\s*\"" + name + r"\".*?tag_keys=(\([^)]*\))", source, re.S)
        assert found, f"Ray {ray.__version__} defines no metric {name} in {path}"
        assert set(re.findall(r"\"(\w+)\"", found.group(2))) <= set(tags), (name, found.group(2))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_use_only_scraped_series(path):
    assert dashboard_problems(load_dashboard(path)) == []
    assert len(path.read_bytes()) < 256 * 1024, "kubectl apply keeps a copy in a 256 KiB annotation"


def test_rules_use_only_scraped_series_and_document_every_alert():
    rule_doc = prometheus_rule()
    assert rule_problems(rule_doc) == []
    alerts = {r["alert"] for g in rule_doc["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"LiveserveSLOBurnFast", "LiveserveFramesDropped", "LiveserveKVPoolNearFull",
            "LiveservePoolAtMaxReplicas", "LiveserveRedisUnreachable"} <= alerts


def _first_expr(dashboard):
    return dashboard_targets(dashboard)[0][1]


def _set_expr(doc, old, new):
    rule = next(r for g in doc["spec"]["groups"] for r in g["rules"] if old in r["expr"])
    rule["expr"] = rule["expr"].replace(old, new, 1)


BROKEN_DASHBOARD = {
    "a misspelled metric": lambda d: _first_expr(d).__setitem__("expr", "sum(ray_liveserve_session_active)"),
    "a local-mode name without ray_": lambda d: _first_expr(d).__setitem__("expr", "sum(liveserve_sessions_active)"),
    "a histogram without _bucket": lambda d: _first_expr(d).__setitem__(
        "expr", "histogram_quantile(0.9, sum by (le) (rate(ray_liveserve_frame_to_decision_seconds[5m])))"),
    "a label no series has": lambda d: _first_expr(d).__setitem__("expr", "sum by (pool_name) (ray_liveserve_decision_sessions)"),
    "a matcher on a missing label": lambda d: _first_expr(d).__setitem__("expr", 'sum(ray_liveserve_errors_total{status="x"})'),
    "a legend label aggregated away": lambda d: _first_expr(d).__setitem__("legendFormat", "{{replica}}"),
    "a misspelled function": lambda d: _first_expr(d).__setitem__("expr", "summ(ray_liveserve_sessions_active)"),
    "an unclosed parenthesis": lambda d: _first_expr(d).__setitem__("expr", "sum(rate(ray_liveserve_frames_decided_total[5m])"),
    "a stray bracket": lambda d: _first_expr(d).__setitem__("expr", "sum(ray_liveserve_sessions_active])"),
    "another data source": lambda d: _first_expr(d).__setitem__("datasource", {"type": "prometheus", "uid": "prom"}),
    "overlapping panels": lambda d: d["panels"][2]["gridPos"].update(d["panels"][1]["gridPos"]),
    "off the grid": lambda d: d["panels"][1]["gridPos"].__setitem__("x", 20),
    "no datasource variable": lambda d: d["templating"].__setitem__("list", []),
    "repeated panel ids": lambda d: d["panels"][2].__setitem__("id", d["panels"][1]["id"]),
}


@pytest.mark.parametrize("mutate", BROKEN_DASHBOARD.values(), ids=BROKEN_DASHBOARD.keys())
def test_dashboard_check_catches_broken_copies(mutate):
    dashboard = load_dashboard(DASHBOARDS[0])
    mutate(dashboard)
    assert dashboard_problems(dashboard)


BROKEN_RULES = {
    "a misspelled metric": lambda d: _set_expr(d, "ray_liveserve_frames_dropped_total", "ray_liveserve_frame_dropped_total"),
    "an unrecorded rule": lambda d: _set_expr(d, "liveserve:frames_within_slo:ratio_rate1h", "liveserve:slo:ratio_rate1h"),
    "an le that is no bucket": lambda d: _set_expr(d, 'le="0.25"', 'le="0.3"'),
    "a Serve metric Ray lacks": lambda d: _set_expr(d, "ray_serve_autoscaling_desired_replicas", "ray_serve_max_replicas"),
    "a label the series lacks": lambda d: _set_expr(d, 'result="ok"', 'outcome="ok"'),
    "no severity": lambda d: d["spec"]["groups"][1]["rules"][0]["labels"].pop("severity"),
    "no for": lambda d: d["spec"]["groups"][1]["rules"][0].pop("for"),
    "a runbook that is no section": lambda d: d["spec"]["groups"][1]["rules"][0]["annotations"].__setitem__(
        "runbook_url", "docs/operations.md#nowhere"),
    "a repeated alert": lambda d: d["spec"]["groups"][1]["rules"].append(copy.deepcopy(d["spec"]["groups"][1]["rules"][0])),
}


@pytest.mark.parametrize("mutate", BROKEN_RULES.values(), ids=BROKEN_RULES.keys())
def test_rule_check_catches_broken_copies(mutate):
    rule_doc = prometheus_rule()
    mutate(rule_doc)
    assert rule_problems(rule_doc)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_dashboards_configmap_and_the_rules():
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    config_map = one(docs, "ConfigMap", "liveserve-grafana-dashboards")
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert config_map["metadata"]["namespace"] == "liveserve"
    assert config_map["data"] == {p.name: p.read_text() for p in DASHBOARDS}
    assert one(docs, "PrometheusRule")["spec"] == prometheus_rule()["spec"]
