"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tiny_dir, monkeypatch, capsys):
    block = re.search(r"## Python API\n+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.setenv("LIVESERVE_CACHE", str(tiny_dir.parent))  # tiny_checkpoint() writes/reuses here
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("P(silent)=") == 6
    assert "tokens," in out


def test_readme_batched_engine_example_runs(tiny_dir, monkeypatch, capsys):
    block = re.search(r"## Many streams.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.setenv("LIVESERVE_CACHE", str(tiny_dir.parent))
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("cam-1 FrameDecision") for line in lines) == 4
    assert sum(line.startswith("cam-2 FrameDecision") for line in lines) == 4
    assert "cam-2 ResponseStarted" in lines  # the query is answered


def test_readme_commentary_example_runs(qwen_dir, monkeypatch, capsys):
    block = re.search(r"### Qwen2.5-VL models.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.setattr("liveserve.model.tiny.tiny_commentary_checkpoint", lambda root=None: qwen_dir)
    exec(compile(block, "README.md", "exec"), {})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 3 and all(re.search(r"\[\d-\d+s: (silent|said)\]$", line) for line in lines), lines
