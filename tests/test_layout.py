"""The tree says where the code lives: setup.py's one mapping table, and the serving stack's roles.

The top-level folders services/, loadtest/ and orchestration/ install as liveserve.services,
liveserve.loadtest and liveserve.orchestration (setup.py's MAPPED; docs/architecture.md, "Where the code
lives"). Inside services/ each sub-package is one role, and a role imports only the roles below it.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The serving stack's roles, lowest first: a role may import only roles before it in this list.
ROLES = ["observability", "wire", "security", "state", "settings", "replica", "perception", "decision", "reaction",
         "gateway", "client", "deploy"]
MAX_FILES_PER_ROLE = 12


def _mapped() -> dict[str, str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    tables = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "MAPPED" for t in node.targets)]
    assert len(tables) == 1, "setup.py keeps one MAPPED table"
    return ast.literal_eval(tables[0])


def test_the_mapping_table_is_what_is_installed():
    mapped = _mapped()
    assert mapped == {"liveserve.services": "services", "liveserve.loadtest": "loadtest",
                      "liveserve.orchestration": "orchestration"}
    for name, folder in mapped.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            package = ".".join([name, *init.parent.relative_to(ROOT / folder).parts])
            module = importlib.import_module(package)
            assert Path(module.__file__).resolve() == init.resolve(), f"{package} is not {init}"
        for source in sorted((ROOT / folder).rglob("*.py")):
            assert (source.parent / "__init__.py").exists(), f"{source} is outside any package"


def test_docs_name_the_same_table():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for name, folder in _mapped().items():
        assert f"`{folder}/` | {name} |" in text, f"docs/architecture.md does not map {folder}/ to {name}"


def _role(path: Path) -> str:
    parts = path.relative_to(ROOT / "services").parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported_roles(path: Path) -> set[str]:
    roles = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if match := re.match(r"liveserve\.services\.(\w+)", name):
                roles.add(match.group(1))
            elif name == "liveserve.services" and isinstance(node, ast.ImportFrom):
                roles.update(alias.name for alias in node.names)
    return roles


def test_every_role_imports_only_the_roles_below_it():
    sources = [p for p in (ROOT / "services").rglob("*.py") if p != ROOT / "services" / "__init__.py"]
    found = {_role(p) for p in sources}
    assert found == set(ROLES), f"roles in services/ differ from the list here: {sorted(found ^ set(ROLES))}"
    upward = []
    for path in sources:
        role = _role(path)
        for other in _imported_roles(path) - {role}:
            if ROLES.index(other) > ROLES.index(role):
                upward.append(f"{path.relative_to(ROOT)} ({role}) imports {other}")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_the_rules_above_catch_an_upward_import(tmp_path):
    """The check reads real import statements: an upward one is reported."""
    probe = ROOT / "services" / "wire" / "contracts.py"
    assert "gateway" not in _imported_roles(probe)
    fake = tmp_path / "fake.py"
    fake.write_text("from liveserve.services.gateway.service import Gateway\nfrom liveserve.services import settings\n")
    assert _imported_roles(fake) == {"gateway", "settings"}


def test_each_role_is_a_small_room():
    for folder in sorted(p for p in (ROOT / "services").iterdir() if p.is_dir() and p.name != "__pycache__"):
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_FILES_PER_ROLE, f"services/{folder.name}/ has {len(modules)} modules"


def test_the_engine_core_imports_no_serving_stack():
    """The engine and model layers stay usable without Ray, gRPC, Redis or the services."""
    serving = re.compile(r"^\s*(from|import)\s+(ray|grpc|redis|liveserve\.services)\b", re.M)
    for folder in ("engine", "model"):
        for path in sorted((ROOT / "liveserve" / folder).rglob("*.py")):
            assert not serving.search(path.read_text()), f"{path.relative_to(ROOT)} imports the serving stack"
