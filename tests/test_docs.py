"""docs/architecture.md names real code: every file, class, function and method it mentions in backticks
exists, so the walk of a frame and a reply through the services cannot drift from the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import transformers  # the doc names a few of its classes

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
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
    return {m.group(1) for path in (ROOT / "protos").rglob("*.proto")
            for m in re.finditer(r"^\s*(?:message|service|enum)\s+(\w+)", path.read_text(), re.M)}


def _problems(text: str) -> list[str]:
    classes, functions, modules = _index()
    protos = _proto_messages()
    problems = []
    for span in sorted(set(re.findall(r"`([^`\n]+)`", text))):
        name = span.rstrip(")").removesuffix("(")
        if re.fullmatch(r"[\w./-]+\.(py|yaml|proto|md|json)", span) or re.fullmatch(r"[\w-]+(/[\w.-]+)+/?", span):
            if not any((base / span).exists() for base in (ROOT, ROOT / "liveserve")):
                problems.append(f"no file {span}")
        elif re.fullmatch(r"\w+\.\w+(\.\w+)*", name):
            owner, *attrs = name.split(".")
            if owner in classes:
                if attrs[0] not in classes[owner]:
                    problems.append(f"{owner} has no {attrs[0]} ({span})")
            elif owner in modules:
                if attrs[0] not in modules[owner]:
                    problems.append(f"module {owner} has no {attrs[0]} ({span})")
            elif owner not in protos:
                problems.append(f"{owner} is no class, module or message ({span})")
        elif span.endswith("()") and re.fullmatch(r"\w+", name):
            if name not in functions:
                problems.append(f"no function {span}")
        elif re.fullmatch(r"_?[A-Z][a-z]+[A-Za-z]*", span) and not (span in classes or span in protos
                                                                  or hasattr(transformers, span)):
            problems.append(f"no class or message {span}")
    return problems


def test_every_name_in_the_architecture_doc_exists():
    problems = _problems(DOC.read_text())
    assert not problems, "docs/architecture.md names what the code does not have:\n" + "\n".join(problems)


def test_the_check_catches_a_renamed_function():
    assert _problems("the gateway calls `StreamSession.receive_frames` and `services/nowhere.py`") == [
        "StreamSession has no receive_frames (StreamSession.receive_frames)", "no file services/nowhere.py"]
