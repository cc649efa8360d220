"""Live video inputs: RTSP, RTMP, SRT, HLS/DASH and other HTTP streams, UDP/TCP and V4L2 devices.

A live source is read at its own pace and never faster than real time: frames are sampled to `fps`
by their stream time, and released no earlier than their timestamps allow after the previous one
(a burst, such as an HLS segment arriving whole, is spread out again). When the source drops or
ends, it is reopened with exponential backoff; the gap shows as sampling slots with no frame
("dropped") and the stream time keeps following the wall clock, so timestamps stay increasing.

`open_frame_source` is the one entry point for `run` and `client`: files go through
`iter_video_frames` (finite, may be read as fast as possible), everything else through LiveSource.
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import av

from liveserve.frame_format import FrameFormat
from liveserve.video import VideoError, VideoFrame, _check_positive, _rgb_frame, iter_video_frames, paced, probe_video

# Schemes FFmpeg reads as a stream with no end known in advance. HLS and DASH are http(s) URLs.
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "srt", "http", "https", "udp", "tcp", "rtp"})

# Demuxer options per scheme. RTSP over TCP: UDP loses packets (and whole frames) on busy hosts.
_SCHEME_OPTIONS: dict[str, dict[str, str]] = {
    "rtsp": {"rtsp_transport": "tcp"},
    "rtsps": {"rtsp_transport": "tcp"},
    "rtmp": {"rtmp_live": "live"},
    "rtmps": {"rtmp_live": "live"},
}
# Start quickly: probe at most 1 s of the stream before the first frame.
_LOW_DELAY_OPTIONS = {"flags": "low_delay", "analyzeduration": "1000000", "probesize": "1000000"}
# Continuous streams also skip what was read while probing, to start at the live edge rather than a probe
# behind it. Not HLS/DASH playlists: their probe reads a whole segment, which would be lost.
_SEGMENTED_SUFFIXES = (".m3u8", ".mpd")

# A gap between two decoded frames longer than this is a stall: the slots it skips count as dropped.
# (Shorter gaps are a source slower than the requested fps, not a loss.)
_STALL_S = 1.0
# Timestamps this far ahead of arrival (or going backwards) are a discontinuity, not a reason to wait.
_MAX_AHEAD_S = 2.0
_EPS = 1e-6


class SourceUnavailable(VideoError):
    """A live source could not be opened, even after the reconnect attempts."""


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Waits between attempts double from `first_delay_s` up to `max_delay_s`; after `attempts`
    consecutive failures the source is given up (0: never reopen)."""

    attempts: int = 10
    max_delay_s: float = 10.0
    first_delay_s: float = 0.5
    timeout_s: float = 10.0  # opening, and any read that returns nothing for this long

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"reconnect attempts must be >= 0, got {self.attempts!r}")
        for name in ("max_delay_s", "first_delay_s", "timeout_s"):
            _check_positive(name, getattr(self, name))

    def delay_s(self, attempt: int) -> float:
        """Wait before attempt number `attempt` (1-based)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))


@dataclass(frozen=True, slots=True)
class SourceEvent:
    kind: str  # "lost", "reconnected" or "gave_up"
    message: str  # one line for the user


@dataclass(slots=True)
class SourceCounters:
    frames: int = 0  # frames released
    dropped: int = 0  # sampling slots that got no frame because the source stalled or was away
    reconnects: int = 0  # successful reopenings


def is_live_source(name: str) -> bool:
    """True for a stream URL or a device; False for a file. Unknown URL schemes are refused here."""
    if name.startswith("/dev/"):
        return True
    if "://" not in name:
        return False
    scheme = urlsplit(name).scheme.lower()
    if scheme in LIVE_SCHEMES:
        return True
    if scheme == "file":
        return False
    raise VideoError(f"{name}: unknown scheme '{scheme}' (live inputs: {', '.join(sorted(LIVE_SCHEMES))} URLs, "
                     "or a /dev/videoN device)")


def check_live_source(name: str) -> None:
    """Refuse what can never open, before connecting: an unknown scheme or a missing device."""
    is_live_source(name)
    if name.startswith("/dev/"):
        _check_device(name)


def _file_path(name: str) -> str:
    return urlsplit(name).path if name.startswith("file://") else name


def _check_device(name: str) -> None:
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise VideoError(f"{name}: no such device") from None
    except OSError as exc:
        raise VideoError(f"{name}: cannot open the device ({exc.strerror})") from None
    if not stat.S_ISCHR(mode):
        raise VideoError(f"{name}: not a video device")


def _open_live(name: str, timeout_s: float) -> av.container.InputContainer:
    """Open once; av.FFmpegError/OSError mean "try again later", VideoError means "never will"."""
    options = dict(_LOW_DELAY_OPTIONS)
    kwargs = {}
    if name.startswith("/dev/"):
        _check_device(name)
        kwargs["format"] = "video4linux2"
    else:
        url = urlsplit(name)
        options.update(_SCHEME_OPTIONS.get(url.scheme.lower(), {}))
    if name.startswith("/dev/") or not url.path.lower().endswith(_SEGMENTED_SUFFIXES):
        options["fflags"] = "nobuffer"
    # PyAV's timeout (an interrupt callback) bounds opening and every read, whatever the protocol.
    try:
        container = av.open(name, mode="r", options=options, timeout=(timeout_s, timeout_s), **kwargs)
    except av.error.ProtocolNotFoundError:
        raise VideoError(f"{name}: the FFmpeg that PyAV was built with cannot read {urlsplit(name).scheme}:// "
                         "URLs") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: the source has no video stream")
    return container


def _describe(exc: BaseException, timeout_s: float) -> str:
    """One line for why a read or an open failed (PyAV's timeout shows as "Immediate exit requested")."""
    if isinstance(exc, av.error.ExitError):
        return f"nothing received for {timeout_s:g} s"
    return str(exc)


class LiveSource:
    """Frames of a live source sampled to `fps`, at the source's pace, reopened when it drops.

    Open with `open()` (raises SourceUnavailable after the policy's attempts), then iterate once.
    `on_event` is called from the iterating thread on every loss, reconnection and final give-up.
    """

    def __init__(self, name: str, *, fps: float, size: int | FrameFormat,
                 reconnect: ReconnectPolicy = ReconnectPolicy(), max_frames: int | None = None,
                 on_event: Callable[[SourceEvent], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        _check_positive("fps", fps)
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames!r}")
        self.name, self.fps, self.size, self.reconnect = name, fps, size, reconnect
        self.max_frames, self.counters = max_frames, SourceCounters()
        self._on_event = on_event or (lambda event: None)
        self._clock, self._sleep = clock, sleep
        self._container: av.container.InputContainer | None = None

    def open(self) -> LiveSource:
        reason = ""
        for attempt in range(self.reconnect.attempts + 1):
            if attempt:
                self._sleep(self.reconnect.delay_s(attempt))
            try:
                self._container = _open_live(self.name, self.reconnect.timeout_s)
                return self
            except (av.FFmpegError, OSError) as exc:
                reason = _describe(exc, self.reconnect.timeout_s)
        tries = self.reconnect.attempts + 1
        raise SourceUnavailable(f"{self.name}: unreachable after {tries} attempt{'s' * (tries > 1)} ({reason})")

    def __iter__(self) -> Iterator[VideoFrame]:
        if self._container is None:
            self.open()
        return self._frames()

    def _reopen(self, reason: str) -> av.container.InputContainer | None:
        """Reopen with backoff; None once the attempts are spent (reported as "gave_up")."""
        policy = self.reconnect
        if policy.attempts == 0:
            self._on_event(SourceEvent("gave_up", f"source ended ({reason}); not reconnecting"))
            return None
        self._on_event(SourceEvent("lost", f"source lost ({reason}); reconnecting, up to {policy.attempts} "
                                           f"attempts"))
        for attempt in range(1, policy.attempts + 1):
            self._sleep(policy.delay_s(attempt))
            try:
                return _open_live(self.name, policy.timeout_s)
            except (av.FFmpegError, OSError) as exc:
                reason = _describe(exc, policy.timeout_s)
            except VideoError as exc:  # e.g. the device was unplugged: retrying cannot help
                self._on_event(SourceEvent("gave_up", str(exc)))
                return None
        self._on_event(SourceEvent("gave_up", f"source gone after {policy.attempts} reconnect attempts ({reason})"))
        return None

    def _frames(self) -> Iterator[VideoFrame]:
        container, self._container = self._container, None
        fps, counters = self.fps, self.counters
        next_slot = 0  # sampling slot k covers stream time k / fps
        last_t = -math.inf  # stream time of the latest decoded frame
        last_wall = 0.0  # when it was decoded
        # A segment maps source timestamps to stream time: t = seg_base + (t_src - seg_src0). A new segment
        # starts at every (re)connection and at every timestamp discontinuity.
        seg_base, seg_src0 = 0.0, None
        anchor_wall = anchor_t = 0.0  # pacing: a frame at stream time t is due at anchor_wall + (t - anchor_t)
        lost_at: float | None = None
        dropped_at_loss = 0
        try:
            while container is not None and self.max_frames != 0:
                try:
                    for frame in container.decode(video=0):
                        now = self._clock()
                        t_src = frame.time
                        # Where the wall clock puts this frame if the stream simply went on since the last one.
                        by_wall = 0.0 if last_t == -math.inf else last_t + max(now - last_wall, _EPS)
                        if t_src is None:  # no timestamp: arrival is all there is
                            t, anchor_wall, anchor_t = by_wall, now, by_wall
                        elif seg_src0 is None:  # first frame of a segment
                            seg_base, seg_src0 = by_wall, t_src
                            t, anchor_wall, anchor_t = by_wall, now, by_wall
                        else:
                            t = seg_base + (t_src - seg_src0)
                            if t <= last_t or anchor_wall + (t - anchor_t) - now > _MAX_AHEAD_S:
                                # Discontinuity (a looped or restarted encoder): continue from the wall clock.
                                seg_base, seg_src0 = by_wall, t_src
                                t, anchor_wall, anchor_t = by_wall, now, by_wall
                        stalled = t - last_t > _STALL_S or last_t == -math.inf
                        last_t, last_wall = t, now
                        if t < next_slot / fps - _EPS:
                            continue  # between two sampling slots
                        slot = math.floor(t * fps + _EPS)
                        if stalled and next_slot:
                            counters.dropped += slot - next_slot
                        next_slot = slot + 1
                        if lost_at is not None:
                            counters.reconnects += 1
                            self._on_event(SourceEvent(
                                "reconnected", f"source reconnected after {now - lost_at:.1f} s; "
                                               f"{counters.dropped - dropped_at_loss} frames dropped meanwhile"))
                            lost_at = None
                        # Never faster than real time; a late frame moves the anchor rather than rushing later ones.
                        delay = anchor_wall + (t - anchor_t) - now
                        if delay > 0:
                            self._sleep(delay)
                        else:
                            anchor_wall, anchor_t = now, t
                        yield VideoFrame(counters.frames, slot / fps, _rgb_frame(frame, self.size))
                        counters.frames += 1
                        if counters.frames == self.max_frames:
                            return
                    reason = "end of stream"
                except (av.FFmpegError, OSError) as exc:
                    reason = _describe(exc, self.reconnect.timeout_s)
                container.close()
                container = None  # not closed twice if reopening is interrupted
                if lost_at is None:
                    lost_at, dropped_at_loss = self._clock(), counters.dropped
                seg_src0 = None
                # The slots that pass while the source is away count as dropped at its first frame back.
                container = self._reopen(reason)
        finally:
            if container is not None:
                container.close()


@dataclass(slots=True)
class FrameSource:
    """Frames to stream, whichever kind of input: `total` is None for a live source (no known end)."""

    name: str
    live: bool
    frames: Iterator[VideoFrame]
    total: int | None
    description: str  # for the start-up line: "128x128 14.0s" or "live"
    counters: SourceCounters = field(default_factory=SourceCounters)


def open_frame_source(name: str, *, fps: float, size: int | FrameFormat, realtime: bool, max_frames: int | None = None,
                      reconnect: ReconnectPolicy = ReconnectPolicy(),
                      on_event: Callable[[SourceEvent], None] | None = None) -> FrameSource:
    """Open a file or live input, failing now (VideoError) on a bad file, scheme, device or unreachable source.

    Files are read as fast as the consumer takes them unless `realtime`; live sources always at their own pace.
    """
    _check_positive("fps", fps)
    if not is_live_source(name):
        path = _file_path(name)
        info = probe_video(path)
        total = info.num_frames_at(fps) if max_frames is None else min(max_frames, info.num_frames_at(fps))
        frames = iter_video_frames(path, fps=fps, size=size, max_frames=max_frames)
        return FrameSource(path, False, paced(frames) if realtime else frames, total,
                           f"{info.width}x{info.height} {info.duration_s:.1f}s")
    source = LiveSource(name, fps=fps, size=size, reconnect=reconnect, max_frames=max_frames,
                        on_event=on_event).open()
    return FrameSource(name, True, iter(source), max_frames, "live", source.counters)
