"""Smoke runs of every `liveserve bench` command and of `liveserve loadtest` (one level and a sweep), at the
smallest sizes: each finishes within seconds, every wait in it is bounded, and its report renders through
the same code as docs/benchmarks.md's tables, so a key the docs read going missing fails here. The docs'
tables themselves must equal the rendering of the committed result files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from liveserve.bench.batch import run_batch_bench
from liveserve.bench.capacity import run_capacity_bench
from liveserve.bench.capacity_settings import CapacitySettings
from liveserve.bench.engine import run_engine_bench
from liveserve.bench.service import BenchStalled, _frames, drive, run_service_bench
from liveserve.cli import main
from liveserve.loadtest.config import LoadConfig
from liveserve.loadtest.report import to_dict
from liveserve.loadtest.runner import run
from liveserve.model.presets import build_preset_model
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 180  # a command run as its own process: model load, server start and the run itself


@pytest.fixture(scope="module")
def render():
    """scripts/render_benchmarks.py as a module."""
    spec = importlib.util.spec_from_file_location("render_benchmarks", ROOT / "scripts" / "render_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def local_server(tiny_model):
    """The single-process server with the settings a deployment gets (its ingress limit included)."""
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(pool_mb=64))
    yield server
    server.stop(grace_s=1)


def rendered(render, renderer, report: dict, command: str = "liveserve bench", server: str | None = None) -> str:
    """The table `renderer` makes of a fresh `report`, wrapped as a committed result file is."""
    record = render.wrap("smoke", report, command, server, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)
    return "\n".join(renderer([json.loads(json.dumps(record))]))  # as read back from its file


def table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:] if set(row[0].strip()) != {"-"}]


# ---- the benchmarks ------------------------------------------------------------------------------------------

def test_bench_engine(tiny_model, render, tmp_path):
    report = run_engine_bench(tiny_model, lengths=[4, 8], policies=["full", "sink_window"], window=2,
                              out=str(tmp_path / "engine.json"))
    rows = table_rows(rendered(render, render.render_engine, report))
    assert [row[0] for row in rows] == ["`full`", "`sink_window`"] and all(len(row) == 6 for row in rows)


@pytest.mark.parametrize("model", ["tiny_model", "qwen"])
def test_bench_batch_live_and_commentary(model, render, tmp_path, request):
    report = run_batch_bench(request.getfixturevalue(model), sessions=[1, 2], rounds=1, warmup=0, input_kind="pixels",
                             out=str(tmp_path / "batch.json"), max_tokens_per_chunk=2)
    assert report["mode"] == ("live" if model == "tiny_model" else "commentary")
    assert [row[0] for row in table_rows(rendered(render, render.render_batch, report))] == ["1", "2"]


def test_bench_service_from_the_command_line_lifts_the_limit_and_says_so(tiny_dir, render, tmp_path):
    """The CLI path, as its own process under a timeout: the single-process server it starts lifts the
    ingress limit, and both the report and the printed summary say so."""
    out = tmp_path / "service.json"
    done = subprocess.run([sys.executable, "-m", "liveserve", "bench", "service", "--model", str(tiny_dir),
                           "--sessions", "1", "--rounds", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["load"]["ingress_factor"] == {"grpc": 1000.0} and report["load"]["ingress_limit_lifted"]
    assert "ingress limit lifted on grpc (ingress_factor 1000" in done.stderr
    (row,) = table_rows(rendered(render, render.render_service, report))
    assert row[0] == "1" and len(row) == 5


def test_bench_service_with_ray_on_running_servers(tiny_model, tiny_dir, local_server, ray_app, render, tmp_path):
    """Both served paths on the session's running servers: nothing is started, and their own ingress limits
    apply (3 frames a stream are well within a 60 fps stream's burst)."""
    report = run_service_bench(tiny_model, model_ref=str(tiny_dir), sessions=[1], rounds=2, warmup=1,
                               out=str(tmp_path / "service.json"), ray=True, repeats=1, wait_s=30,
                               servers={"grpc": local_server.address, "ray": ray_app.address})
    assert report["paths"] == "in_process, grpc, ray"
    assert report["load"]["ingress_factor"] == {"grpc": None, "ray": None}
    assert not report["load"]["ingress_limit_lifted"] and "already running, with their own ingress limits" in report["load"]["note"]
    (row,) = table_rows(rendered(render, render.render_service, report))
    assert len(row) == 7 and row[5].endswith("x)")


def test_a_load_the_ingress_limit_drops_fails_at_once_saying_why(local_server, tiny_model):
    """Streams declaring 2 fps may burst 8 frames, then 4 a second: lockstep rounds outrun that, and the
    bench fails on the server's FRAME_DROPPED warning instead of waiting for decisions that never come."""
    started = time.monotonic()
    with pytest.raises(BenchStalled) as stalled:
        drive(local_server.address, sessions=1, rounds=40, warmup=0, frames=_frames(tiny_model), wait_s=30, fps=2.0)
    assert time.monotonic() - started < 15  # the drop is reported within a second or so, not after wait_s
    message = str(stalled.value)
    assert message.startswith("round ") and "WARNING_CODE_FRAME_DROPPED" in message, message
    assert "faster than 4 a second" in message and "declared fps of 2" in message, message


def test_bench_capacity_sweep(render, tmp_path):
    """tests/test_capacity.py checks the report's levels; here, that a sweep's report renders."""
    settings = CapacitySettings(duration_s=0.5, warmup_s=0.0, prefill_frames=2, single_stream_frames=4, drain_s=2.0)
    report = run_capacity_bench(build_preset_model("tiny", device="cpu"), levels=[1, 2], settings=settings,
                                out=str(tmp_path / "capacity.json"), preset="tiny", sweep=True)
    (row,) = table_rows(rendered(render, render.render_capacity, report,
                                 command="liveserve bench capacity --sweep-max 2 --json x.json"))
    assert row[0] == "features, direct forward" and row[4].removeprefix(">= ") == str(report["capacity"])


# ---- liveserve loadtest ------------------------------------------------------------------------------------------

def test_loadtest_one_level_from_the_command_line(ray_app, render, tmp_path):
    out = tmp_path / "lt.json"
    assert main(["loadtest", "--address", ray_app.address, "--sessions", "1", "--duration", "1", "--fps", "4",
                 "--frame-size", "64", "--slo-ms", "5000", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sweep"] is False and report["levels"][0]["frames_decided"] > 0
    (row,) = table_rows(rendered(render, render.render_loadtest, report, "liveserve loadtest", "liveserve serve"))
    assert row[0] == "1"


def test_loadtest_sweep(local_server, render):
    report = to_dict(run(LoadConfig(address=local_server.address, sweep=(1, 2), duration_s=1.0, fps=4,
                                    frame_size=64, slo_ms=5000)))
    text = rendered(render, render.render_loadtest, report, "liveserve loadtest", "liveserve serve --local")
    assert [row[0] for row in table_rows(text)] == ["1", "2"] and "Capacity: " in text


# ---- the docs' tables --------------------------------------------------------------------------------------------

def test_docs_tables_equal_the_rendering_of_the_committed_results(render):
    assert render.stale_blocks(render.DOC.read_text()) == [], "run: python scripts/render_benchmarks.py"


def test_check_names_a_table_edited_by_hand(render):
    text = render.render_doc(render.DOC.read_text())
    block = render.render_block("service")
    assert render.stale_blocks(text) == []
    assert render.stale_blocks(text.replace(block, block.replace("|", "| 1", 1))) == ["service"]
