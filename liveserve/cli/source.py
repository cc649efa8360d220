"""Command-line options for live sources, shared by `run` and `client` (no heavy imports: argparse only)."""

from __future__ import annotations

import argparse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def add_reconnect_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live sources (URLs and devices)")
    group.add_argument("--reconnect-attempts", type=_non_negative_int, default=10,
                       help="attempts to reopen a live source that dropped or ended, and to open it at the start, "
                            "before giving up (default: 10; 0: never reopen)")
    group.add_argument("--reconnect-max-s", type=_positive_seconds, default=10.0,
                       help="longest wait between attempts: waits double from 0.5 s up to this (default: 10)")
    group.add_argument("--source-timeout-s", type=_positive_seconds, default=10.0,
                       help="a live source that takes longer to open, or sends nothing for this long, has dropped "
                            "(default: 10)")


def reconnect_policy(args: argparse.Namespace):
    from liveserve.live_source import ReconnectPolicy

    return ReconnectPolicy(attempts=args.reconnect_attempts, max_delay_s=args.reconnect_max_s,
                           timeout_s=args.source_timeout_s)
