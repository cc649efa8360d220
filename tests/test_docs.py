"""The docs name real code: every file, class, function, method, proto message and field, and settings path
that docs/architecture.md, the other docs pages, the README and the READMEs of the code folders mention in
backticks exists, so the walk of a frame and a reply through the services, the option tables and the module
tables cannot drift from the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import transformers  # the doc names a few of its classes

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
# Every page checked, with the folders its bare file names are relative to (besides the root and liveserve/).
PAGES = {
    "README.md": (), "services/README.md": ("services",), "loadtest/README.md": ("loadtest",),
    "k8s/README.md": ("k8s",), "orchestration/README.md": ("orchestration",),
    **{f"docs/{name}.md": ("docs",) for name in ("cli", "api", "configuration", "models", "benchmarks", "security")},
    "docs/kubernetes.md": ("docs", "k8s"),
}
# Names in backticks that are not this repository's code, each with what it is. Every one must still occur in
# some page (test_every_name_that_is_not_code_is_still_mentioned), so the list cannot go stale.
NOT_CODE = {
    "grpc.health.v1": "gRPC's health-checking service",
    "grafana.sidecar.dashboards.searchNamespace": "a value of Grafana's Helm chart",
    "mit-han-lab/StreamingVLM": "a Hugging Face repository id",
    "config.json": "a checkpoint file", "live_config.json": "a checkpoint file",
    "preprocessor_config.json": "a checkpoint file", "connector.safetensors": "a checkpoint file",
    "gpu.txt": "written by scripts/gpu_check.sh", "tests.log": "written by scripts/gpu_check.sh",
    "User": "a speaker in a transcript", "Assistant": "a speaker in a transcript",
    "LoadBalancer": "a Kubernetes Service type", "None": "Python's None",
}
CODE = [ROOT / "liveserve", ROOT / "services", ROOT / "loadtest", ROOT / "orchestration"]
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def _index() -> tuple[dict[str, set[str]], set[str], dict[str, set[str]]]:
    """(class -> its attributes, its project base classes' included; every function and method name;
    module name -> its top-level names)."""
    classes: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    functions: set[str] = set()
    modules: dict[str, set[str]] = {}
    for folder in CODE:
        for path in folder.rglob("*.py"):
            if path.name.endswith(GENERATED):
                continue
            tree = ast.parse(path.read_text())
            modules.setdefault(path.stem, set()).update(_top_level(tree))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions.add(node.name)
                elif isinstance(node, ast.ClassDef):
                    classes.setdefault(node.name, set()).update(_members(node))
                    bases.setdefault(node.name, []).extend(b.id for b in node.bases if isinstance(b, ast.Name))

    def inherited(name: str, seen: frozenset = frozenset()) -> set[str]:
        members = set(classes.get(name, ()))
        for base in bases.get(name, ()):
            if base in classes and base not in seen:
                members |= inherited(base, seen | {name})
        return members

    return {name: inherited(name) for name in classes}, functions, modules


def _top_level(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _members(cls: ast.ClassDef) -> set[str]:
    """Methods, class-level fields and the attributes its methods assign on self."""
    members = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            members.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members.add(node.target.id)
        elif isinstance(node, ast.Assign):
            members.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            members.add(node.attr)
    return members


def _proto_messages() -> set[str]:
    """Messages, services, enums and rpcs."""
    return {m.group(1) for path in (ROOT / "protos").rglob("*.proto")
            for m in re.finditer(r"^\s*(?:message|service|enum|rpc)\s+(\w+)", path.read_text(), re.M)}


def _proto_fields() -> dict[str, dict[str, str]]:
    """message -> {field: its type's last name}, oneof members included."""
    fields: dict[str, dict[str, str]] = {}
    for path in (ROOT / "protos").rglob("*.proto"):
        stack: list[str | None] = []
        for line in path.read_text().splitlines():
            line = line.split("//")[0]
            if m := re.match(r"\s*message\s+(\w+)\s*\{", line):
                stack.append(m.group(1))
                fields.setdefault(m.group(1), {})
                if line.rstrip().endswith("}"):
                    stack.pop()
                continue
            if re.match(r"\s*(oneof|enum|service)\b.*\{", line):
                stack.append(None)
            elif (m := re.match(r"\s*(?:repeated\s+|optional\s+)?([\w.]+|map<[^>]+>)\s+(\w+)\s*=\s*\d+", line)) \
                    and (owner := next((s for s in reversed(stack) if s), None)):
                fields[owner][m.group(2)] = m.group(1).rsplit(".", 1)[-1]
            stack = stack[:len(stack) - line.count("}")] if "}" in line else stack
    return fields


def _is_proto_path(name: str, fields: dict[str, dict[str, str]]) -> bool:
    """`Decision.lag_s` (a message's field) or `limits.max_frame_bytes` (a field, then its message's field)."""
    first, *rest = name.split(".")
    starts = [first] if first in fields else [f[first] for f in fields.values() if first in f]
    for message in starts:
        for part in rest:
            if part not in fields.get(message, {}):
                break
            message = fields[message][part]
        else:
            return True
    return False


def _is_settings_path(name: str) -> bool:
    """`pool.block_size`, `scheduler.max_lag_s`: a field of EngineConfig or SessionConfig, then of its value."""
    from liveserve import EngineConfig, SessionConfig

    first, *rest = name.split(".")
    for config in (EngineConfig(), SessionConfig()):
        value = config
        for part in (first, *rest):
            if not hasattr(value, part):
                break
            value = getattr(value, part)
        else:
            return True
    return False


def _is_package_path(name: str, protos: set[str], modules: dict[str, set[str]]) -> bool:
    """`liveserve.model.loading`, `liveserve.services`, `liveserve.api.v1.LiveStream`: an importable package or
    module, then optionally a name it defines (or a proto message of a proto package)."""
    parts = name.split(".")
    if parts[0] != "liveserve":
        return False
    folder, rest = (ROOT / parts[1], parts[2:]) if parts[1:2] and parts[1] in ("services", "loadtest",
                                                                               "orchestration") else \
        (ROOT / "liveserve", parts[1:])
    while rest and (folder / rest[0]).is_dir():
        folder, rest = folder / rest[0], rest[1:]
    if not rest:
        return True
    if (folder / f"{rest[0]}.py").exists():
        return len(rest) == 1 or rest[1] in modules.get(rest[0], set())
    return len(rest) == 1 and (rest[0] in protos or rest[0] in _top_level(ast.parse((folder / "__init__.py").read_text()))
                               if (folder / "__init__.py").exists() else rest[0] in protos)


def _kubernetes_kinds() -> set[str]:
    return {m.group(1) for path in (ROOT / "k8s").rglob("*.yaml")
            for m in re.finditer(r"^kind:\s*(\w+)", path.read_text(), re.M)}


def _alerts() -> set[str]:
    return set(re.findall(r"alert:\s*(\w+)", (ROOT / "k8s" / "prometheusrule.yaml").read_text()))


def _problems(text: str, folders: tuple[str, ...] = ()) -> list[str]:
    classes, functions, modules = _index()
    protos = _proto_messages()
    fields = _proto_fields()
    kinds = _kubernetes_kinds() | _alerts()
    bases = (ROOT, ROOT / "liveserve", *(ROOT / folder for folder in folders))
    problems = []
    for span in sorted(set(re.findall(r"`([^`\n]+)`", text))):
        name = span.rstrip(")").removesuffix("(")
        if span in NOT_CODE or re.fullmatch(r"[\d.:]+", span) or span.startswith("out/"):
            continue  # not code; an address or a number; a run's output
        if re.fullmatch(r"[\w./-]+\.(py|yaml|proto|md|json)", span) or re.fullmatch(r"[\w-]+(/[\w.-]+)+/?", span):
            if not any((base / span).exists() for base in bases):
                problems.append(f"no file {span}")
        elif re.fullmatch(r"\w+\.\w+(\.\w+)*", name):
            owner, *attrs = name.split(".")
            if _is_package_path(name, protos, modules) or _is_proto_path(name, fields):
                continue
            if owner in classes:
                if attrs[0] not in classes[owner]:
                    problems.append(f"{owner} has no {attrs[0]} ({span})")
            elif _is_settings_path(name):
                continue
            elif owner in modules:
                if attrs[0] not in modules[owner]:
                    problems.append(f"module {owner} has no {attrs[0]} ({span})")
            elif owner not in protos:
                problems.append(f"{owner} is no class, module or message ({span})")
        elif span.endswith("()") and re.fullmatch(r"\w+", name):
            if name not in functions and name not in classes:
                problems.append(f"no function {span}")
        elif re.fullmatch(r"_?[A-Z][a-z]+[A-Za-z]*", span) and not (span in classes or span in protos
                                                                  or span in kinds or hasattr(transformers, span)):
            problems.append(f"no class or message {span}")
    return problems


def test_every_name_in_the_architecture_doc_exists():
    problems = _problems(DOC.read_text(), ("docs",))
    assert not problems, "docs/architecture.md names what the code does not have:\n" + "\n".join(problems)


def test_the_check_catches_a_renamed_function():
    assert _problems("the gateway calls `StreamSession.receive_frames` and `services/nowhere.py`") == [
        "StreamSession has no receive_frames (StreamSession.receive_frames)", "no file services/nowhere.py"]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_name_in_the_other_pages_exists(page):
    problems = _problems((ROOT / page).read_text(), PAGES[page])
    assert not problems, f"{page} names what the code does not have:\n" + "\n".join(problems)


def test_every_name_that_is_not_code_is_still_mentioned():
    text = "".join((ROOT / page).read_text() for page in (*PAGES, "docs/architecture.md"))
    assert not [name for name in NOT_CODE if f"`{name}`" not in text]


def test_the_check_catches_a_wrong_field_setting_and_module():
    assert _problems("`Decision.lag_ms`, `pool.block_bytes`, `liveserve.model.nowhere`, `gateway/nowhere.py`",
                     ("services",)) == [
        "Decision has no lag_ms (Decision.lag_ms)", "no file gateway/nowhere.py",
        "liveserve is no class, module or message (liveserve.model.nowhere)", "pool is no class, module or message (pool.block_bytes)"]


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings (outside code blocks)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file")
        elif anchor and anchor not in _anchors(linked.read_text()):
            broken.append(f"{target}: no such section")
    return broken


@pytest.mark.parametrize("page", sorted({*PAGES, "docs/architecture.md", "docs/operations.md", "docs/training.md"}))
def test_every_link_leads_to_a_page_and_section(page):
    broken = _broken_links(ROOT / page)
    assert not broken, f"{page}: broken links\n" + "\n".join(broken)


def test_the_link_check_catches_a_moved_section(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n## Load testing\n\nsee [b](b.md), [here](#load-testing), [gone](#benchmarks)\n")
    assert _broken_links(tmp_path / "a.md") == ["b.md: no file", "#benchmarks: no such section"]
