"""The run's report as JSON (for machines), a self-contained HTML page with plots (for people), the
plots as PNG files next to it, and a text summary for the terminal."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path

from liveserve.loadtest.metrics import Distribution, LevelReport, RunReport

SCHEMA = "liveserve.loadtest/v1"


def to_dict(report: RunReport) -> dict:
    return {"schema": SCHEMA, **dataclasses.asdict(report)}


def write_json(report: RunReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(report), indent=2) + "\n")
    return path


# ---- text ------------------------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _load_row(level: LevelReport) -> list[str]:
    lat = level.latency_ms
    return [str(level.sessions), f"{level.sessions_sustained}/{level.sessions}", str(level.frames_sent),
            str(level.frames_decided), str(level.frames_dropped), _f(level.decided_per_s), _f(lat.p50_ms),
            _f(lat.p90_ms), _f(lat.p99_ms), _f(level.lag_ms.p99_ms), f"{level.slo_attainment:.2%}",
            str(sum(level.errors.values()))]


_LOAD_HEADER = ["sessions", "sustained", "sent", "decided", "dropped", "decided/s", "p50 ms", "p90 ms", "p99 ms",
                "lag p99", "SLO", "errors"]


def _reply_row(level: LevelReport) -> list[str]:
    return [str(level.sessions), str(level.queries_sent), str(level.responses), str(level.response_tokens),
            _f(level.ttft_ms.p50_ms), _f(level.ttft_ms.p99_ms), _f(level.ttft_query_ms.p50_ms),
            _f(level.ttft_proactive_ms.p50_ms), _f(level.tpot_ms.p50_ms, 2), _f(level.tpot_ms.p99_ms, 2)]


_REPLY_HEADER = ["sessions", "queries", "replies", "tokens", "TTFT p50", "TTFT p99", "query p50", "proactive p50",
                 "TPOT p50", "TPOT p99"]


def summary_text(report: RunReport) -> str:
    lines = [f"liveserve loadtest  target {report.target}  started {report.started_at}",
             f"frames: {report.frames}",
             f"SLO: frame decided within {report.slo_ms:g} ms of being sent, target {report.slo_target:.2%} of frames",
             "", "frame -> decision (ms)", *_table(_LOAD_HEADER, [_load_row(lv) for lv in report.levels]),
             "", "replies (ms)", *_table(_REPLY_HEADER, [_reply_row(lv) for lv in report.levels])]
    for level in report.levels:
        if level.errors or level.warnings:
            errors = ", ".join(f"{k} x{v}" for k, v in level.errors.items()) or "none"
            warnings = ", ".join(f"{k} x{v}" for k, v in level.warnings.items()) or "none"
            lines.append(f"{level.sessions} sessions: errors {errors}; warnings {warnings}")
            lines += [f"  {m}" for m in level.error_messages]
    for level in report.levels:
        if level.resumes:
            lines.append(f"{level.sessions} sessions: {level.resumes} resume(s) after a broken connection, p50 "
                         f"{_f(level.resume_ms.p50_ms)} ms, max {_f(level.resume_ms.max_ms)} ms; "
                         f"{level.inputs_resent} input(s) sent again")
    for level in report.levels:
        for model, figures in level.by_model.items():
            lines.append(f"{level.sessions} sessions, model {model}: {figures['sessions']} sessions "
                         f"({figures['sessions_sustained']} sustained), {figures['frames_decided']} frames decided, "
                         f"p50 {_f(figures['latency_p50_ms'])} ms, p99 {_f(figures['latency_p99_ms'])} ms, "
                         f"SLO {figures['slo_attainment']:.2%}")
    if report.sweep:
        lines += ["", capacity_sentence(report)]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def capacity_sentence(report: RunReport) -> str:
    target = f"{report.slo_target:.2%} of frames decided within {report.slo_ms:g} ms"
    if report.capacity is None:
        return f"capacity: no level tested met {target}"
    return f"capacity: {report.capacity} concurrent streams ({target})"


# ---- plots -----------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_latency_over_time(report: RunReport, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, level in enumerate(report.levels):
        points = [p for p in level.timeline if p.p50_ms is not None]
        x = [p.t_s + p.width_s / 2 for p in points]
        colour = colours[i % len(colours)]
        label = f"{level.sessions} session{'s' if level.sessions != 1 else ''}"
        ax.plot(x, [p.p50_ms for p in points], color=colour, label=f"{label} p50")
        ax.plot(x, [p.p99_ms for p in points], color=colour, linestyle="--", label=f"{label} p99")
    ax.axhline(report.slo_ms, color="tab:red", linestyle=":", label=f"SLO {report.slo_ms:g} ms")
    values = [v for level in report.levels for p in level.timeline for v in (p.p50_ms, p.p99_ms) if v]
    wide = bool(values) and max(values) > 30 * min(values)  # a collapsed level would flatten the healthy ones
    if wide:
        ax.set_yscale("log")
    ax.set_xlabel("seconds since the level started (by decision arrival)")
    ax.set_ylabel("frame -> decision latency (ms)")
    ax.set_title("Frame-to-decision latency over time")
    if len(report.levels) == 1:
        level = report.levels[0]
        twin = ax.twinx()
        twin.step([p.t_s for p in level.timeline], [p.sessions_active for p in level.timeline], where="post",
                  color="grey", alpha=0.5, label="sessions streaming")
        twin.set_ylabel("sessions streaming")
        twin.set_ylim(0, max(level.sessions, 1) * 1.15)
    if not wide:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    _legend_below(fig, fig.axes)
    fig.savefig(path)
    plt.close(fig)
    return path


def _legend_below(fig, axes) -> None:
    """One legend under the plot, where it cannot hide a line."""
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=4, fontsize="small")


def plot_latency_vs_load(report: RunReport, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100, layout="constrained")
    levels = sorted(report.levels, key=lambda lv: lv.sessions)
    x = [lv.sessions for lv in levels]
    for name, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-")):
        ax.plot(x, [getattr(lv.latency_ms, name) for lv in levels], style, label=f"latency {name[:3]}")
    ax.axhline(report.slo_ms, color="tab:red", linestyle=":", label=f"SLO {report.slo_ms:g} ms")
    if report.capacity is not None:
        ax.axvline(report.capacity, color="tab:green", linestyle="-.", label=f"capacity {report.capacity}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(n) for n in x])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("frame -> decision latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(x, [lv.slo_attainment * 100 for lv in levels], "d--", color="tab:purple", label="SLO attainment")
    twin.axhline(report.slo_target * 100, color="tab:purple", linestyle=":", alpha=0.6,
                 label=f"target {report.slo_target:.0%}")
    twin.set_ylabel("frames within SLO (%)")
    twin.set_ylim(0, 105)
    ax.set_title("Latency and SLO attainment versus load")
    _legend_below(fig, [ax, twin])
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(report: RunReport, html_path: Path) -> list[Path]:
    """PNGs next to the HTML page: <stem>-latency.png, and <stem>-sweep.png for more than one level."""
    stem = html_path.with_suffix("")
    paths = [plot_latency_over_time(report, Path(f"{stem}-latency.png"))]
    if len(report.levels) > 1:
        paths.append(plot_latency_vs_load(report, Path(f"{stem}-sweep.png")))
    return paths


# ---- HTML ------------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.ok{color:#176b2c}.bad{color:#a31515}
.box{padding:.6em 1em;border-radius:6px;background:#f5f7fa;display:inline-block}img{max-width:100%}
code{background:#f3f3f3;padding:0 .2em}"""


def _html_table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    def cell(tag: str, i: int, value: str) -> str:
        return f"<{tag}{' class=l' if i < left else ''}>{html.escape(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _dist_rows(level: LevelReport) -> list[list[str]]:
    fields = [("frame -> decision", level.latency_ms), ("decision lag behind wall clock", level.lag_ms),
              ("server receive -> decide", level.server_lag_ms), ("open -> session opened", level.open_ms),
              ("TTFT (all)", level.ttft_ms), ("TTFT after query", level.ttft_query_ms),
              ("TTFT after fired decision", level.ttft_proactive_ms), ("TPOT", level.tpot_ms),
              ("server TTFT (ResponseDone.ttft_s)", level.server_ttft_ms),
              ("client send slip", level.send_slip_ms)]
    return [[name, str(d.count), *(_f(getattr(d, f), 2) for f in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms"))]
            for name, d in fields if isinstance(d, Distribution)]


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def render_html(report: RunReport, images: list[Path]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>liveserve loadtest {esc(report.target)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>liveserve load test</h1><p>Target <code>{esc(report.target)}</code>, started "
             f"{esc(report.started_at)}{' (interrupted)' if report.interrupted else ''}. "
             f"Frames: {esc(report.frames)}.</p>",
             f"<p>SLO: a frame is decided within {report.slo_ms:g} ms of being sent; target: "
             f"{report.slo_target:.2%} of scheduled frames (dropped and undecided frames count as misses).</p>"]
    if report.sweep:
        cls = "ok" if report.capacity is not None else "bad"
        parts.append(f'<p class="box {cls}"><b>{esc(capacity_sentence(report))}</b></p>')
    if report.notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    parts += ["<h2>Frame to decision</h2>", _html_table(_LOAD_HEADER, [_load_row(lv) for lv in report.levels]),
              "<h2>Replies</h2>", _html_table(_REPLY_HEADER, [_reply_row(lv) for lv in report.levels])]
    names = {"latency": "latency over time", "sweep": "latency versus load"}
    for path in images:
        kind = path.stem.rsplit("-", 1)[-1]
        parts += [f"<h2>{esc(names.get(kind, kind).capitalize())}</h2>", _image(path, names.get(kind, kind))]
    for level in report.levels:
        parts.append(f"<h2>{level.sessions} sessions: details</h2>")
        parts.append(_html_table(["metric (ms)", "count", "mean", "p50", "p90", "p99", "max"], _dist_rows(level), 1))
        counts = [["frames scheduled", str(level.frames_scheduled)], ["frames sent", str(level.frames_sent)],
                  ["frames decided", str(level.frames_decided)],
                  ["dropped by the server", str(level.frames_dropped_by_server)],
                  ["sent but never decided", str(level.frames_undecided)],
                  ["wall time (s)", _f(level.wall_s, 2)], ["SLO attainment", f"{level.slo_attainment:.3%}"]]
        counts += [[f"error {k}", str(v)] for k, v in level.errors.items()]
        counts += [[f"warning {k}", str(v)] for k, v in level.warnings.items()]
        counts += [["error detail", m] for m in level.error_messages]
        parts.append(_html_table(["count", "value"], counts, 2))
        if level.by_model:
            rows = [[model, str(f["sessions"]), str(f["sessions_sustained"]), str(f["frames_decided"]),
                     _f(f["latency_p50_ms"]), _f(f["latency_p99_ms"]), f"{f['slo_attainment']:.3%}",
                     ", ".join(f"{k} x{v}" for k, v in f["errors"].items()) or "none"]
                    for model, f in level.by_model.items()]
            parts.append(_html_table(["model", "sessions", "sustained", "decided", "p50 ms", "p99 ms", "SLO",
                                      "errors"], rows, 1))
    config_rows = [[k, json.dumps(v)] for k, v in report.config.items()]
    env_rows = [[k, str(v)] for k, v in report.environment.items()]
    parts += ["<h2>Settings</h2>", _html_table(["setting", "value"], config_rows, 2),
              "<h2>Client</h2>", _html_table(["", ""], env_rows, 2), "</body></html>"]
    return "\n".join(parts)


def write_html(report: RunReport, path: str | Path) -> list[Path]:
    """The HTML page (plots embedded, no external references) and the PNGs beside it; returns all paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = write_plots(report, path)
    path.write_text(render_html(report, images))
    return [path, *images]
