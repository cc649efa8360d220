"""scripts/gpu_check.sh, the one script a GPU machine runs: checked here on the CPU (ALLOW_CPU=1, the tiny
preset), where its GPU tests skip, so its plumbing (a private install without the serving stack, the
tests, one capacity run per kernel) is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "ALLOW_CPU": "1", "PRESET": "tiny", "SWEEP_MAX": "1", "OUT": str(tmp_path),
           "DURATION": "1", "WARMUP": "0.25", "SINGLE_FRAMES": "8",  # the plumbing, not the figures
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped" in (tmp_path / "tests.log").read_text()  # no CUDA here: the gpu tests ran and skipped
    for kernel, used in (("auto", "sdpa"), ("flex", "flex")):
        report = json.loads((tmp_path / f"capacity-{kernel}.json").read_text())
        assert report["attention"] == used and report["preset"] == "tiny"
        assert "capacity" in report and report["single_stream_speedup"] > 0


def test_gpu_check_refuses_a_machine_without_cuda_unless_asked(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("ALLOW_CPU", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
