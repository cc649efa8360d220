"""`liveserve loadtest`: drive many concurrent streams through a LiveStream server and report how it held up.

Only argparse lives here; the load tester itself is `liveserve.loadtest` (imported when the command
runs, so `liveserve --help` stays fast).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from liveserve.cli.connection import add_connection_options
from liveserve.loadtest.config import (DEFAULT_ADDRESS, MAX_DURATION_S, MAX_FPS, MAX_QUERIES_PER_MIN, MAX_RAMP_UP_S,
                                       MAX_SESSIONS, MAX_SWEEP_LEVELS, ConfigError, LoadConfig, parse_levels)

_D = LoadConfig()

EPILOG = f"""\
examples:
  liveserve loadtest --sessions 16 --duration 60 --fps 2 --json out/lt.json --html out/lt.html
  liveserve loadtest --address gateway:443 --tls --api-key $KEY --sessions 64 --ramp-up 30
  liveserve loadtest --address gateway:50051 --ca ca.pem --cert client.pem --key client.key --sessions 8
  liveserve loadtest --sweep 1,2,4,8,16 --duration 30 --slo-ms 250 --slo-target 0.99 --html out/sweep.html
  liveserve loadtest --sweep-max 64 --queries-per-min 2 --video clip.mp4

metrics:
  frame -> decision   client send of a frame -> arrival of its Decision (matched by frame timestamp)
  lag                 arrival of a Decision - the wall-clock time its frame was due (behind the live edge)
  dropped             frames the server reported dropped + frames sent but never decided
  TTFT                fired Decision arrival (or Query send) -> first ResponseDelta; TPOT: per later token
  SLO attainment      frames decided within --slo-ms / frames scheduled (misses include dropped frames)
  capacity            sweeps: the largest session count whose SLO attainment reaches --slo-target

hard caps: {MAX_SESSIONS} sessions, {MAX_DURATION_S:g} s per level, {MAX_RAMP_UP_S:g} s ramp-up, {MAX_FPS:g} fps,
{MAX_QUERIES_PER_MIN:g} queries/min per session, {MAX_SWEEP_LEVELS} sweep levels.
exit status: 0 done; 1 with --strict when the SLO target was missed or a session failed (a sweep: no level met
the target); 2 bad option, unreadable video or unreachable target.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `loadtest` on the `liveserve` sub-command parser."""
    p = subparsers.add_parser(
        "loadtest", help="load-test a LiveStream server with many concurrent streams (latency, SLO, capacity)",
        description="Drive concurrent video sessions through the public LiveStream gRPC API at a steady frame rate "
                    "and measure frame-to-decision latency, lag, dropped frames, reply latency and SLO attainment; "
                    "a sweep finds the capacity.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("target")
    target.add_argument("--address", default=_D.address,
                        help=f"server host:port (default: {DEFAULT_ADDRESS}, this machine)")
    target.add_argument("--credential", action="append", default=[], metavar="KEY=VALUE",
                        help="sent in Open.credentials, e.g. api_key=...; repeatable (values are redacted in reports)")
    target.add_argument("--connect-timeout", type=float, default=_D.connect_timeout_s, metavar="S",
                        help="give up when the server does not answer within S seconds (default: %(default)g)")

    add_connection_options(p)

    load = p.add_argument_group("load")
    levels = load.add_mutually_exclusive_group()
    levels.add_argument("--sessions", type=int, default=_D.sessions, metavar="N",
                        help=f"concurrent sessions (default: %(default)s; cap {MAX_SESSIONS})")
    levels.add_argument("--sweep", metavar="N,N,...",
                        help="run each session count in turn, e.g. 1,2,4,8, and report the capacity")
    levels.add_argument("--sweep-max", type=int, metavar="N",
                        help="sweep 1, 2, 4, ... up to N, stopping at the first level that misses the SLO target")
    load.add_argument("--duration", type=float, default=_D.duration_s, metavar="S",
                      help=f"seconds each session streams, per level (default: %(default)g; cap {MAX_DURATION_S:g})")
    load.add_argument("--fps", type=float, default=_D.fps, help="frames per second per session (default: %(default)g)")
    load.add_argument("--ramp-up", type=float, default=_D.ramp_up_s, metavar="S",
                      help="spread session starts evenly over S seconds (default: %(default)g: all at once)")
    load.add_argument("--queries-per-min", type=float, default=_D.queries_per_min, metavar="R",
                      help="Poisson rate of user queries per session per minute, from a built-in list "
                           "(default: %(default)g: none)")
    load.add_argument("--seed", type=int, default=_D.seed,
                      help="seed of the synthetic frames and the query arrivals (default: %(default)s)")
    load.add_argument("--streams-per-connection", type=int, default=_D.streams_per_connection, metavar="N",
                      help="sessions multiplexed on one HTTP/2 connection (default: %(default)s)")
    load.add_argument("--resume-attempts", type=int, default=_D.resume_attempts, metavar="N",
                      help="a session whose connection breaks (UNAVAILABLE: the network, or a Gateway stopping) "
                           "reconnects and resumes up to N times in a row, resending the frames not yet decided; "
                           "the report counts the resumes (default: %(default)s; 0: the session ends there)")

    frames = p.add_argument_group("frames")
    frames.add_argument("--video", metavar="PATH",
                        help="stream this video file, looped (default: synthetic clips of moving coloured shapes)")
    frames.add_argument("--frame-size", type=int, default=_D.frame_size, metavar="PX",
                        help="frames are PX x PX pixels, even, 64-2048 (default: %(default)s)")
    frames.add_argument("--image-format", choices=("jpeg", "png"), default=_D.image_format,
                        help="frame encoding (default: %(default)s)")

    session = p.add_argument_group("session options (sent in Open)")
    session.add_argument("--threshold", type=float, help="streaming threshold in [0, 1] (default: the server's)")
    session.add_argument("--max-new-tokens", type=int, default=_D.max_new_tokens, metavar="N",
                         help="reply length cap (default: 0, the server's)")
    session.add_argument("--cache", choices=("full", "sink_window"), help="KV cache policy (default: the server's)")
    session.add_argument("--model", action="append", default=[], metavar="NAME",
                         help="served model the sessions run (`liveserve models`); repeat to mix models, taken in "
                              "turn by the sessions, and the report breaks the figures down by model (default: "
                              "the deployment's default model)")

    slo = p.add_argument_group("SLO and timeouts")
    slo.add_argument("--slo-ms", type=float, default=_D.slo_ms, metavar="MS",
                     help="deadline for a frame's decision, from its send (default: %(default)g)")
    slo.add_argument("--slo-target", type=float, default=_D.slo_target, metavar="F",
                     help="share of frames that must meet the deadline, in (0, 1] (default: %(default)g)")
    slo.add_argument("--open-timeout", type=float, default=_D.open_timeout_s, metavar="S",
                     help="a session fails (DEADLINE_EXCEEDED) when not opened within S seconds (default: %(default)g)")
    slo.add_argument("--drain-timeout", type=float, default=_D.drain_timeout_s, metavar="S",
                     help="after Close, wait up to S seconds for outstanding decisions (default: %(default)g)")

    out = p.add_argument_group("output")
    out.add_argument("--json", dest="json_out", metavar="PATH", help="write the full report as JSON")
    out.add_argument("--html", dest="html_out", metavar="PATH",
                     help="write a self-contained HTML report, with its plots also as PNG files beside it")
    out.add_argument("--quiet", action="store_true", help="no progress line on stderr (the summary still prints)")
    out.add_argument("--strict", action="store_true",
                     help="exit 1 when the SLO target is missed or a session fails; for a sweep, when no level meets "
                          "the target (for CI gates)")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    credentials = []
    for item in args.credential:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--credential takes KEY=VALUE, got {item!r}")
        credentials.append((key.strip(), value))
    if args.api_key and not any(key == "api_key" for key, _ in credentials):
        credentials.append(("api_key", args.api_key))
    return LoadConfig(
        address=args.address, sessions=args.sessions, duration_s=args.duration, fps=args.fps,
        ramp_up_s=args.ramp_up, queries_per_min=args.queries_per_min, seed=args.seed, video=args.video,
        frame_size=args.frame_size, image_format=args.image_format, threshold=args.threshold,
        max_new_tokens=args.max_new_tokens, cache_policy=args.cache or "", models=tuple(args.model),
        credentials=tuple(credentials),
        tls=args.tls, tls_ca=args.ca, tls_cert=args.cert, tls_key=args.key, slo_ms=args.slo_ms,
        slo_target=args.slo_target,
        sweep=parse_levels(args.sweep) if args.sweep else (), sweep_max=args.sweep_max,
        connect_timeout_s=args.connect_timeout, open_timeout_s=args.open_timeout,
        drain_timeout_s=args.drain_timeout, streams_per_connection=args.streams_per_connection,
        resume_attempts=args.resume_attempts)


def _check_writable(flag: str, path: str | None) -> None:
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot create {target.parent}: {exc.strerror}") from None
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"{flag}: {target.parent} is not writable")


def cmd_loadtest(args: argparse.Namespace) -> int:
    from liveserve.loadtest.progress import Progress
    from liveserve.loadtest.report import summary_text, write_html, write_json
    from liveserve.loadtest.runner import LoadTestError, run
    from liveserve.video import VideoError

    try:
        config = config_from_args(args)
        for flag, path in (("--json", args.json_out), ("--html", args.html_out)):
            _check_writable(flag, path)  # before the run, not after an hour of it
        report = run(config, progress=Progress(None if args.quiet else sys.stderr), handle_signals=True)
    except (ConfigError, LoadTestError, VideoError) as exc:
        print(f"liveserve: error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(report))
    written = []
    try:
        if args.json_out:
            written.append(write_json(report, args.json_out))
        if args.html_out:
            written += write_html(report, args.html_out)
    except OSError as exc:
        print(f"liveserve: error: cannot write the report: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if report.sweep:
        failed = report.capacity is None
    else:
        failed = any(not level.slo_met or level.errors for level in report.levels)
    return 1 if args.strict and failed else 0
