"""The live status line on stderr: one update per second while a level runs.

On a terminal the line rewrites itself in place; in a log (CI, `2> file`) each update is its own line,
so the history stays readable.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from liveserve.loadtest.metrics import LiveStats


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}ms"


def status_line(stats: LiveStats, elapsed_s: float, label: str = "") -> str:
    """e.g. '[4 sessions] 12s  active 4/4  frames sent 96 decided 95 dropped 0  p50 21ms p99 48ms  errors 0'."""
    latency = stats.latency
    prefix = f"[{label}] " if label else ""
    return (f"{prefix}{elapsed_s:.0f}s  active {stats.sessions_active}/{stats.level_sessions}  "
            f"frames sent {stats.frames_sent} decided {stats.frames_decided} dropped {stats.frames_dropped}  "
            f"p50 {_ms(latency.percentile(50))} p99 {_ms(latency.percentile(99))}  errors {stats.errors}")


class Progress:
    """Prints `status_line` every `interval_s` until stopped; does nothing when `out` is None (--quiet)."""

    def __init__(self, out: TextIO | None = sys.stderr, interval_s: float = 1.0) -> None:
        self.out, self.interval_s = out, interval_s
        self.tty = bool(out is not None and hasattr(out, "isatty") and out.isatty())
        self._task: asyncio.Task | None = None
        self._started = 0.0

    def message(self, text: str) -> None:
        """A one-off line (level starting, notes) that does not fight the status line."""
        if self.out is not None:
            self.out.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.out.flush()

    def start(self, stats: LiveStats, label: str) -> None:
        """Begin ticking (call from the running event loop)."""
        self._started = time.perf_counter()
        if self.out is not None:
            self._task = asyncio.create_task(self._tick(stats, label))

    async def stop(self, stats: LiveStats, label: str) -> None:
        """Stop ticking and leave the final figures on screen."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._write(status_line(stats, time.perf_counter() - self._started, label), final=True)

    async def _tick(self, stats: LiveStats, label: str) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._write(status_line(stats, time.perf_counter() - self._started, label), final=False)

    def _write(self, line: str, final: bool) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()
