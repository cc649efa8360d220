"""`liveserve run`: stream a video file or live source through one session and print what the model says, as it
says it."""

from __future__ import annotations

import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from liveserve.config import SessionConfig
from liveserve.engine.commentary.session import CommentarySession
from liveserve.engine.events import ChunkDone, FrameDecision, ResponseDelta, ResponseDone, ResponseStarted
from liveserve.engine.live.session import Session
from liveserve.engine.sessions import new_session
from liveserve.model.live import LiveModel
from liveserve.live_source import ReconnectPolicy, SourceEvent, open_frame_source
from liveserve.video import VideoFrame, paced

DEFAULT_QUERY = (0.0, "Please narrate the video in real time.")


@dataclass(slots=True)
class RunStats:
    frames: int = 0
    fired: int = 0
    responses: int = 0
    busy_s: float = 0.0  # time spent encoding and stepping (the reference's "processing FPS" basis)
    peak_cache_bytes: int = 0
    max_lag_s: float = 0.0
    source_dropped: int = 0  # live sources: sampling slots with no frame (the source stalled or was away)
    source_reconnects: int = 0
    interrupted: bool = False  # a live source stopped by Ctrl-C (its frames already read were still decided)


class Printer:
    """Timestamped, streamed output on stdout; a progress line on stderr. `total_frames` None: a live source,
    whose progress is reported every `LIVE_REPORT_S` seconds. Safe to call from several threads (a live
    source reports its losses from the thread that reads it)."""

    LIVE_REPORT_S = 10.0

    def __init__(self, total_frames: int | None, out=None, err=None) -> None:
        # Resolve the streams now, not at import: callers may have redirected them since.
        self.total, self.out, self.err = total_frames, out or sys.stdout, err or sys.stderr
        self.tty = self.err.isatty()
        self._open_line = False
        self._next_report = 0.1
        self._next_live_report = time.monotonic() + self.LIVE_REPORT_S
        self._lock = threading.RLock()

    def event(self, event) -> None:
        with self._lock:
            self._event(event)

    def _event(self, event) -> None:
        if isinstance(event, ResponseStarted):
            self._clear_progress()
            if event.query is not None:
                self.out.write(f"[{event.timestamp:7.2f}s] User: {event.query}\n")
            self.out.write(f"[{event.timestamp:7.2f}s] Assistant:")
        elif isinstance(event, ResponseDelta):
            self.out.write(event.text.replace("\n", " "))
        elif isinstance(event, ResponseDone):
            self.out.write(f"  ({event.num_tokens} tokens, {event.finish_reason}, ttft {event.ttft_s * 1e3:.0f} ms)\n")
        self.out.flush()

    def progress(self, stats: RunStats, cache_tokens: int | None = None) -> None:
        with self._lock:
            self._progress(stats, cache_tokens)

    def _progress(self, stats: RunStats, cache_tokens: int | None) -> None:
        fps = stats.frames / stats.busy_s if stats.busy_s else 0.0
        cache = "" if cache_tokens is None else f"cache {cache_tokens} tok  "  # unknown to a remote client
        total = "" if self.total is None else f"/{self.total}"
        line = (f"frames {stats.frames}{total}  fired {stats.fired}  responses {stats.responses}  "
                f"{cache}{fps:.1f} FPS")
        if self.tty:
            self.err.write(f"\r{line}")
            self._open_line = True
        elif self.total is None:
            if (now := time.monotonic()) >= self._next_live_report:
                self.err.write(f"{line}\n")
                self._next_live_report = now + self.LIVE_REPORT_S
        elif (done := stats.frames / max(self.total, 1)) >= self._next_report or stats.frames == self.total:
            self.err.write(f"{line}\n")
            self._next_report = done + 0.1
        self.err.flush()

    def warn(self, text: str) -> None:
        with self._lock:
            self._clear_progress()
            self.err.write(f"liveserve: warning: {text}\n")
            self.err.flush()

    def source_event(self, event: SourceEvent) -> None:
        """A live source's loss, reconnection or give-up, as a line on stderr."""
        self.warn(event.message)

    def finish(self) -> None:
        with self._lock:
            self._clear_progress()

    def _clear_progress(self) -> None:
        if self._open_line:
            self.err.write("\r\033[K")
            self._open_line = False


def run_video(model: LiveModel, video: str, *, fps: float, config: SessionConfig, queries: list[tuple[float, str]],
              realtime: bool = False, max_frames: int | None = None, printer: Printer | None = None,
              reconnect: ReconnectPolicy = ReconnectPolicy()) -> RunStats:
    """`video`: a file, or a live source (URL or device), which is always read at its own pace."""
    # The printer is bound before the source reports anything: events only come once frames are read. A
    # commentary session's frames are sized as its CommentaryConfig says (once: the session keeps them so).
    size = model.frame_format(config.commentary) if config.mode == "commentary" else model.frame_size
    source = open_frame_source(video, fps=fps, size=size, realtime=False, max_frames=max_frames,
                               reconnect=reconnect, on_event=lambda event: printer.source_event(event))
    printer = printer or Printer(source.total)
    session = new_session(model, config, session_id="run")
    due = sorted(queries)  # each query enters the stream when the video reaches its time
    stats = RunStats()
    frames = source.frames

    def handle_events() -> None:
        last = time.perf_counter()
        for event in session.process():
            now = time.perf_counter()
            stats.busy_s, last = stats.busy_s + now - last, now
            if isinstance(event, FrameDecision):
                stats.frames += 1
                stats.fired += event.fired
                stats.max_lag_s = max(stats.max_lag_s, event.lag_s)
                stats.peak_cache_bytes = max(stats.peak_cache_bytes, session.cache.nbytes)
                printer.progress(stats, event.cache_tokens)
            elif isinstance(event, ChunkDone):  # commentary: a chunk's frames were watched and answered
                stats.frames += len(event.frame_ids)
                stats.fired += not event.silent
                stats.max_lag_s = max(stats.max_lag_s, event.lag_s)
                stats.peak_cache_bytes = max(stats.peak_cache_bytes, session.cache.nbytes)
                printer.progress(stats, event.cache_tokens)
            elif isinstance(event, ResponseDone):
                stats.responses += 1
            printer.event(event)

    if source.live:  # paced by the source itself; Ctrl-C is how a stream with no end stops
        stats.interrupted = _run_realtime(session, frames, due, handle_events, stop_on_interrupt=True)
        if stats.interrupted:
            printer.warn("interrupted: deciding the frames already read, then stopping (Ctrl-C again to quit now)")
    elif realtime:
        _run_realtime(session, paced(frames), due, handle_events)
    else:
        for frame in frames:
            _push(session, frame, due)
            handle_events()
    for timestamp, text in due:  # queries timed after the last frame
        session.push_query(timestamp, text)
    session.flush()  # the end of the stream (a commentary session's last, partly filled chunk)
    handle_events()
    printer.finish()
    stats.source_dropped, stats.source_reconnects = source.counters.dropped, source.counters.reconnects
    return stats


def _push(session: Session | CommentarySession, frame: VideoFrame, due: list[tuple[float, str]]) -> None:
    while due and due[0][0] <= frame.timestamp:
        session.push_query(*due.pop(0))
    session.push_frame(frame.timestamp, frame.pixels)


def _run_realtime(session: Session | CommentarySession, frames, due, handle_events, stop_on_interrupt: bool = False) -> bool:
    """Frames arrive at wall-clock pace from a reader thread; whatever queued up during a reply is
    processed afterwards, in order, and its lag shows in the decisions.

    With `stop_on_interrupt`, Ctrl-C stops taking frames and returns True once those already pushed are
    processed; the reader is left to notice at its next frame (it may be waiting on the source for seconds).
    """
    done, stop = threading.Event(), threading.Event()
    push_lock = threading.Lock()  # once `stop` is set, nothing more is pushed
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            for frame in frames:
                with push_lock:
                    if stop.is_set():
                        return
                    _push(session, frame, due)
        except BaseException as exc:  # surfaced on the main thread
            failure.append(exc)
        finally:
            done.set()

    interrupted = threading.Event()
    previous = None
    if stop_on_interrupt and threading.current_thread() is threading.main_thread():
        # Ctrl-C becomes a flag checked between steps, never an exception in the middle of one; a second
        # Ctrl-C (the previous handler again) quits at once.
        def on_interrupt(signum, frame) -> None:
            interrupted.set()
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, on_interrupt)
    thread = threading.Thread(target=reader, name="video-reader", daemon=True)
    thread.start()
    try:
        while (not done.is_set() or session.backlog) and not interrupted.is_set():
            handle_events()
            time.sleep(0.002)
        if interrupted.is_set():
            with push_lock:
                stop.set()
            while session.backlog:
                handle_events()
            return True
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)
    thread.join()
    if failure:
        raise failure[0]
    return False


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def parse_query(spec: str) -> tuple[float, str]:
    """'12.5:What is he holding?' -> (12.5, 'What is he holding?')."""
    time_part, sep, text = spec.partition(":")
    try:
        timestamp = float(time_part)
    except ValueError:
        timestamp = float("nan")
    if not sep or not text.strip() or not timestamp >= 0:
        raise ValueError(f"--query must look like 'SECONDS:text' with SECONDS >= 0, got {spec!r}")
    return timestamp, text.strip()
