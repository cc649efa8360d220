"""The figures of docs/benchmarks.md: recorded into docs/benchmarks/*.json, rendered into its tables.

    python scripts/render_benchmarks.py                # rewrite every table from the result files
    python scripts/render_benchmarks.py --check        # exit 1 when a table differs from its rendering (CI)
    python scripts/render_benchmarks.py record service -- liveserve bench service --sessions 1,8,32 --ray --json {json}
    python scripts/render_benchmarks.py record loadtest-local --server "liveserve serve --local --model default" \\
        -- liveserve loadtest --sweep-max 256 --duration 10 --ramp-up 2 --queries-per-min 6 --quiet --json {json}

`record NAME` runs the command (`{json}` is where it writes its report; `liveserve` is this interpreter's
package), optionally against a server it starts first and stops after, and writes docs/benchmarks/NAME.json:
the date, the machine (CPU model, cores, torch), the load average before and after, the exact commands,
and the report itself. A table lives between `<!-- bench:BLOCK -->` and `<!-- /bench:BLOCK -->` in the
docs and is rendered from the files BLOCKS names, so a figure in the docs is always one some command
measured, and a report missing a key the table reads fails here (and in tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "docs" / "benchmarks"
SERVER_START_S = 600.0  # a Ray application on two shared cores can take minutes to run
SERVER_STOP_S = 120.0


# ---- numbers as the tables print them -------------------------------------------------------------------------

def _ms(value: float) -> str:
    if value < 10:
        return f"{value:.2f} ms"
    return f"{value:.1f} ms" if value < 1000 else f"{value:,.0f} ms"


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _pair(p50: float, p99: float) -> str:
    return f"{_ms(p50)[:-3]} / {_ms(p99)}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _load(record: dict) -> str:
    before, after = record["load_average"]["before"][0], record["load_average"]["after"][0]
    return f"load average {before:.1f} before, {after:.1f} after"


def _caption(record: dict) -> str:
    machine = record["machine"]
    commands = " against ".join(f"`{command}`" for command in (record["command"], record.get("server")) if command)
    return (f"{commands}: {record['date'][:10]}, {machine['cpu']} ({machine['cores']} cores), "
            f"torch {machine['torch']}, {_load(record)}.")


# ---- one renderer per table: (records) -> lines ----------------------------------------------------------------

def render_engine(records: list[dict]) -> list[str]:
    (record,) = records
    report = record["report"]
    lengths = [str(length) for length in report["lengths"]]
    header = ["policy", *(f"p50 at frame {int(length):,}" for length in lengths), "`latency_ratio`",
              f"cache at {int(lengths[-1]):,}", "frames/s"]
    rows = []
    for policy, result in report["policies"].items():
        at = result["latency_ms_at_length"]
        last = at[lengths[-1]]
        rows.append([f"`{policy}`", *(_ms(at[length]["p50_ms"]) for length in lengths),
                     f"{result['latency_ratio']:.2f}",
                     f"{last['cache_tokens']:,} tokens ({_mib(last['cache_bytes'])} allocated)",
                     _rate(result["frames_per_s"])])
    return [_caption(record), "", *_table(header, rows)]


def render_batch(records: list[dict]) -> list[str]:
    (record,) = records
    report = record["report"]
    rows = [[str(result["sessions"]), _rate(result["batched"]["frames_per_s"]),
             _pair(result["batched"]["p50_ms"], result["batched"]["p99_ms"]),
             _rate(result["sequential"]["frames_per_s"]),
             _pair(result["sequential"]["p50_ms"], result["sequential"]["p99_ms"]), f"{result['speedup']:.2f}x"]
            for result in report["results"]]
    header = ["sessions", "batched frames/s", "p50 / p99", "sequential frames/s", "p50 / p99", "speedup"]
    return [_caption(record) + f" Input: {report['input']}, {report['rounds']} measured rounds.", "",
            *_table(header, rows)]


def render_service(records: list[dict]) -> list[str]:
    (record,) = records
    report = record["report"]
    served = [("grpc", "overhead", "single process, gRPC"), ("ray", "ray_overhead", "Ray Serve services")]
    served = [entry for entry in served if entry[0] in report["results"][0]]
    header = ["sessions", "in-process frames/s", "p50 / p99"]
    for _, _, title in served:
        header += [title, "p50 / p99"]
    rows = []
    for result in report["results"]:
        engine = result["in_process"]
        row = [str(result["sessions"]), _rate(engine["frames_per_s"]), _pair(engine["p50_ms"], engine["p99_ms"])]
        for path, ratio, _ in served:
            row += [f"{_rate(result[path]['frames_per_s'])} ({result[ratio]['throughput_ratio']:.2f}x)",
                    _pair(result[path]["p50_ms"], result[path]["p99_ms"])]
        rows.append(row)
    load = report["load"]
    return [_caption(record) + f" {report['repeats']} repeats of {report['rounds']} rounds; load: {load['note']}.",
            "", *_table(header, rows)]


def _levels(levels: list[dict], passed: bool) -> str:
    chosen = [level for level in levels if level["meets_slo"] == passed]
    doubling = [level for level in chosen if level["sessions"] & (level["sessions"] - 1) == 0]
    parts = []
    if passed and len(doubling) > 1 and doubling[0]["sessions"] == 1:
        worst = max(level["p99_ms"] for level in doubling)
        parts.append(f"1 to {doubling[-1]['sessions']} (<= {_ms(worst)})")
        chosen = [level for level in chosen if level not in doubling]
    for level in chosen:
        dropped = f", {level['dropped']:,} dropped" if level["dropped"] else ""
        parts.append(f"{level['sessions']} ({_ms(level['p99_ms'])}{dropped})")
    return ", ".join(parts) or "none"


def render_capacity(records: list[dict]) -> list[str]:
    rows = []
    for record in records:
        report = record["report"]
        single = report["single_stream"]
        run = f"`{record['command'].split(' --json')[0].removeprefix('liveserve bench capacity ')}`, {_load(record)}"
        rows.append([f"{report['input']}, {report['forward']} forward", run, _levels(report["levels"], True),
                     _levels(report["levels"], False),
                     f">= {report['capacity']}" if report["capacity_is_lower_bound"] else str(report["capacity"]),
                     f"{report['single_stream_speedup']:.2f}x ({single['engine_frames_per_s']:.0f} vs "
                     f"{single['reference_frames_per_s']:.0f} frames/s)"])
    header = ["input", "run", "levels passed (p99)", "misses (p99, drops)", "`capacity`", "`single_stream_speedup`"]
    dates = sorted({record["date"][:10] for record in records})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    machine = records[0]["machine"]
    return [f"`liveserve bench capacity`, {when}, {machine['cpu']} ({machine['cores']} cores), torch "
            f"{machine['torch']}:", "", *_table(header, rows)]


def render_loadtest(records: list[dict]) -> list[str]:
    (record,) = records
    report = record["report"]
    replies = any(level["tpot_ms"]["count"] for level in report["levels"])
    header = ["sessions", "decided/s", "p50", "p99", f"SLO attainment ({report['slo_ms']:g} ms)", "TTFT p50 / p99"]
    header += ["TPOT p50"] if replies else []
    rows = []
    for level in report["levels"]:
        latency, ttft = level["latency_ms"], level["ttft_ms"]
        row = [str(level["sessions"]), _rate(level["decided_per_s"]), _ms(latency["p50_ms"]), _ms(latency["p99_ms"]),
               f"{level['slo_attainment']:.1%}".replace(".0%", "%"),
               _pair(ttft["p50_ms"], ttft["p99_ms"]) if ttft["count"] else "none"]
        row += [_ms(level["tpot_ms"]["p50_ms"]) if level["tpot_ms"]["count"] else "none"] if replies else []
        rows.append(row)
    capacity, largest = report["capacity"], max(level["sessions"] for level in report["levels"])
    bound = "at least " if capacity == largest else ""  # the sweep stopped before a level missed
    said = (f" Capacity: {bound}{capacity} concurrent streams with {report['slo_target']:.0%} of frames within "
            f"{report['slo_ms']:g} ms." if report["sweep"] and capacity is not None else "")
    return [_caption(record) + said, "", *_table(header, rows)]


# block name -> (renderer, the result files it reads, in order)
BLOCKS: dict[str, tuple[Callable[[list[dict]], list[str]], tuple[str, ...]]] = {
    "engine": (render_engine, ("engine",)),
    "batch": (render_batch, ("batch",)),
    "service": (render_service, ("service",)),
    "capacity": (render_capacity, ("capacity-features", "capacity-pixels", "capacity-features-hf")),
    "loadtest-local": (render_loadtest, ("loadtest-local",)),
    "loadtest-ray": (render_loadtest, ("loadtest-ray",)),
}


def render_block(name: str, results: Path = RESULTS) -> str:
    """What goes between the block's markers: its lines, each ending in a newline."""
    renderer, files = BLOCKS[name]
    records = [json.loads((results / f"{file}.json").read_text()) for file in files]
    return "".join(f"{line}\n" for line in renderer(records))


def _marked(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.S)


def render_doc(text: str, results: Path = RESULTS) -> str:
    """`text` with every marked block replaced by its rendering; a block BLOCKS names must be in it."""
    for name in BLOCKS:
        marked = _marked(name)
        if not marked.search(text):
            raise ValueError(f"{DOC.name} has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
        rendered = render_block(name, results)
        text = marked.sub(lambda match: match.group(1) + rendered + match.group(3), text)
    return text


def stale_blocks(text: str, results: Path = RESULTS) -> list[str]:
    """The blocks of `text` that differ from their rendering (or are missing)."""
    return [name for name in BLOCKS
            if not (found := _marked(name).search(text)) or found.group(2) != render_block(name, results)]


# ---- recording ----------------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}


def wrap(name: str, report: dict, command: str, server: str | None, before: tuple, after: tuple,
         wall_s: float) -> dict:
    """A result file: where, when and how `report` was measured, and the report."""
    return {"name": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "command": command, "server": server, "load_average": {"before": list(before), "after": list(after)},
            "wall_s": round(wall_s, 1), "report": report}


def _argv(words: list[str]) -> list[str]:
    """`liveserve ...` runs this interpreter's package, so the recorded command is the one that ran."""
    return [sys.executable, "-m", "liveserve", *words[1:]] if words[0] == "liveserve" else words


def _wait_serving(address: str, server: subprocess.Popen, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before serving")
        with grpc.insecure_channel(address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(1.0)
    raise RuntimeError(f"the server did not serve on {address} within {timeout_s:.0f} s")


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)  # serve drains its sessions and, on Ray, shuts its cluster down
    try:
        server.wait(SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


def record(name: str, command: list[str], server: str | None = None, address: str = "127.0.0.1:50051",
           results: Path = RESULTS) -> Path:
    """Run `command` (against `server`, started first) and write results/NAME.json."""
    if "{json}" not in command:
        raise ValueError("the command must write its report to {json} (a word of its own)")
    shown = shlex.join(f"out/benchmarks/{name}.json" if word == "{json}" else word for word in command)
    with tempfile.TemporaryDirectory(prefix="liveserve-record-") as tmp:
        out = Path(tmp) / f"{name}.json"
        running = None
        try:
            if server:
                running = subprocess.Popen(_argv(shlex.split(server)))
                _wait_serving(address, running, SERVER_START_S)
            before, started = os.getloadavg(), time.monotonic()
            subprocess.run(_argv([str(out) if word == "{json}" else word for word in command]), check=True)
            wall_s, after = time.monotonic() - started, os.getloadavg()
        finally:
            if running is not None:
                _stop(running)
        report = json.loads(out.read_text())
    path = results / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wrap(name, report, shown, server, before, after, wall_s), indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["record"]:
        if "--" not in argv:
            raise SystemExit("usage: render_benchmarks.py record NAME [--server CMD] [--address H:P] -- COMMAND ...")
        split = argv.index("--")
        parser = argparse.ArgumentParser(prog="render_benchmarks.py record")
        parser.add_argument("name", choices=sorted({file for _, files in BLOCKS.values() for file in files}))
        parser.add_argument("--server", help="a server command to start first (and stop after)")
        parser.add_argument("--address", default="127.0.0.1:50051", help="where that server serves")
        args = parser.parse_args(argv[1:split])
        record(args.name, argv[split + 1:], args.server, args.address)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a table differs from its rendering")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    if args.check:
        stale = stale_blocks(text)
        for name in stale:
            print(f"{DOC.relative_to(ROOT)}: the {name} table differs from docs/benchmarks/; run "
                  f"python scripts/render_benchmarks.py", file=sys.stderr)
        return 1 if stale else 0
    rendered = render_doc(text)
    if rendered != text:
        DOC.write_text(rendered)
        print(f"rewrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
