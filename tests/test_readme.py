"""The examples of the README and of the docs pages it links run as written: the Python examples execute,
and every `liveserve` command line in their shell blocks is one the command accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from liveserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The pages whose shell blocks hold `liveserve` command lines to check.
PAGES = ("README.md", "docs/cli.md", "docs/api.md", "docs/configuration.md", "docs/models.md",
         "docs/kubernetes.md", "docs/security.md", "docs/benchmarks.md")


def test_readme_python_example_runs(tiny_dir, monkeypatch, capsys):
    block = re.search(r"## Python API\n+```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S).group(1)
    monkeypatch.setenv("LIVESERVE_CACHE", str(tiny_dir.parent))  # tiny_checkpoint() writes/reuses here
    exec(compile(block, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("P(silent)=") == 6
    assert "tokens," in out


def test_readme_batched_engine_example_runs(tiny_dir, monkeypatch, capsys):
    block = re.search(r"## Many streams.*?```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S).group(1)
    monkeypatch.setenv("LIVESERVE_CACHE", str(tiny_dir.parent))
    exec(compile(block, "docs/api.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("cam-1 FrameDecision") for line in lines) == 4
    assert sum(line.startswith("cam-2 FrameDecision") for line in lines) == 4
    assert "cam-2 ResponseStarted" in lines  # the query is answered


def test_readme_commentary_example_runs(qwen_dir, monkeypatch, capsys):
    block = re.search(r"## Qwen2.5-VL models.*?```python\n(.*?)```", (DOCS / "models.md").read_text(), re.S).group(1)
    monkeypatch.setattr("liveserve.model.tiny.tiny_commentary_checkpoint", lambda root=None: qwen_dir)
    exec(compile(block, "docs/models.md", "exec"), {})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 3 and all(re.search(r"\[\d-\d+s: (silent|said)\]$", line) for line in lines), lines


def _command_lines(text: str) -> list[str]:
    """The `liveserve ...` commands of a page's ```bash blocks, one per command: comments and a trailing `&`
    cut off, continued lines joined, shell variables given a value."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.replace("$", "X"), comments=True)
            if words and words[-1] == "&":
                words.pop()
            if words[:1] == ["liveserve"]:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("page", PAGES)
def test_every_command_line_in_the_docs_parses(page, capsys):
    commands = _command_lines((ROOT / page).read_text())
    refused = []
    for words in commands:
        try:
            build_parser().parse_args(words)
        except SystemExit:
            refused.append(" ".join(words) + ": " + capsys.readouterr().err.strip().splitlines()[-1])
    assert not refused, f"{page}: liveserve refuses\n" + "\n".join(refused)


def test_the_readme_has_an_example_of_each_command():
    commands = _command_lines(README.read_text())
    assert {"run", "serve", "client", "loadtest"} <= {words[0] for words in commands}
    assert "kubectl apply -k k8s/" in README.read_text()


def test_the_command_line_check_catches_a_wrong_option(capsys):
    words = _command_lines("```bash\nliveserve run game.mp4 --frames-per-second 2   # no such option\n```\n")[0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(words)
    assert "--frames-per-second" in capsys.readouterr().err


def _synopsis() -> dict[str, set[str]]:
    """docs/cli.md's synopsis: command (`run`, `bench capacity`, ...) -> the options it lists."""
    block = re.search(r"## Synopsis\n+```text\n(.*?)```", (DOCS / "cli.md").read_text(), re.S).group(1)
    commands: dict[str, set[str]] = {}
    name = ""
    for line in block.splitlines():
        if line.startswith("liveserve "):
            name = " ".join(re.match(r"liveserve ((?:[a-z]+ ?)+)", line).group(1).split())
        commands.setdefault(name, set()).update(re.findall(r"(?<![\w-])--[a-z][\w-]*", line))
    return commands


def _options(parser, name: str) -> set[str]:
    for word in name.split():
        parser = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[word]
    return set(parser._option_string_actions)


def test_every_option_in_the_cli_synopsis_exists():
    synopsis = _synopsis()
    assert {"run", "bench engine", "bench capacity", "serve", "client", "loadtest", "demo", "tiny"} <= set(synopsis)
    unknown = {name: sorted(flags - _options(build_parser(), name)) for name, flags in synopsis.items()}
    assert not {name: flags for name, flags in unknown.items() if flags}, unknown
