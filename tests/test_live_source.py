"""Live inputs: a real MPEG-TS over HTTP source on 127.0.0.1 (tests/live_helpers.py), fed from the bundled
sample at real-time pace, read by LiveSource, `liveserve run` and `liveserve client`; reconnection after
the source is killed and restarted; clear errors for unknown schemes, missing devices and unreachable hosts."""

from __future__ import annotations

import io
import signal
import socket
import statistics
import threading
import time

import pytest

from live_helpers import LiveTsServer, serve_directory, write_hls
from liveserve.cli import main
from liveserve.config import SessionConfig
from liveserve.engine.events import FrameDecision
from liveserve.live_source import (
    LiveSource,
    ReconnectPolicy,
    SourceUnavailable,
    check_live_source,
    is_live_source,
    open_frame_source,
)
from liveserve.run import Printer, run_video
from liveserve.video import SAMPLE_VIDEO, VideoError

FPS = 4.0  # sampled from a 10 fps source
QUICK = ReconnectPolicy(attempts=6, max_delay_s=1.0, timeout_s=5.0)


class RecordingPrinter(Printer):
    """Keeps when each decided frame had arrived (decision time less its lag: the engine's own pauses on a busy
    host do not count) and every source event, on top of the usual output."""

    def __init__(self) -> None:
        super().__init__(None, io.StringIO(), io.StringIO())
        self.arrived_at: list[float] = []
        self.source_events = []
        self.event_at: list[float] = []

    def event(self, event) -> None:
        if isinstance(event, FrameDecision):
            self.arrived_at.append(time.monotonic() - event.lag_s)
        super().event(event)

    def source_event(self, event) -> None:
        self.source_events.append(event)
        self.event_at.append(time.monotonic())
        super().source_event(event)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_real_time(arrivals: list[float], fps: float) -> None:
    """Frames came about 1/fps apart: never a burst faster than the source, nor much slower."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    span = arrivals[-1] - arrivals[0]
    expected = (len(arrivals) - 1) / fps
    assert span >= expected - 0.15, (span, gaps)  # not faster than real time (one slot's jitter allowed)
    assert span <= expected * 1.6 + 1.0, (span, gaps)  # and keeping up
    assert abs(statistics.median(gaps) - 1 / fps) < 0.1, gaps


@pytest.fixture
def live_server():
    with LiveTsServer(rate=10) as server:
        yield server


# --- classification and errors -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rtsp://cam/stream", "rtmp://h/app/key", "srt://h:9000", "http://h/live.m3u8",
                                  "https://h/manifest.mpd", "udp://@:1234", "/dev/video0"])
def test_urls_and_devices_are_live(name):
    assert is_live_source(name)


@pytest.mark.parametrize("name", [str(SAMPLE_VIDEO), "clip.mp4", f"file://{SAMPLE_VIDEO}"])
def test_paths_are_files(name):
    assert not is_live_source(name)


def test_an_unknown_scheme_is_a_clear_error():
    with pytest.raises(VideoError, match=r"gopher://h/x: unknown scheme 'gopher' \(live inputs: .*rtsp"):
        is_live_source("gopher://h/x")


def test_a_missing_device_is_a_clear_error():
    with pytest.raises(VideoError, match=r"^/dev/video-missing: no such device$"):
        check_live_source("/dev/video-missing")
    with pytest.raises(VideoError, match=r"^/dev/shm: not a video device$"):
        open_frame_source("/dev/shm", fps=2, size=64, realtime=True)


def test_an_unreachable_source_fails_after_its_retries():
    policy = ReconnectPolicy(attempts=2, first_delay_s=0.2, max_delay_s=0.3, timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"http://127\.0\.0\.1:\d+/x: unreachable after 3 attempts \(.*refused"):
        open_frame_source(f"http://127.0.0.1:{free_port()}/x", fps=2, size=64, realtime=True, reconnect=policy)
    assert time.monotonic() - started >= 0.2 + 0.3  # it did wait between attempts


def test_a_protocol_the_ffmpeg_build_lacks_is_named():
    policy = ReconnectPolicy(attempts=0, timeout_s=1.0)
    try:
        source = open_frame_source("srt://127.0.0.1:9", fps=2, size=64, realtime=True, reconnect=policy)
    except SourceUnavailable:
        pytest.skip("this PyAV build reads srt://")
    except VideoError as exc:
        assert str(exc) == "srt://127.0.0.1:9: the FFmpeg that PyAV was built with cannot read srt:// URLs"
    else:
        source.frames.close()
        pytest.skip("this PyAV build reads srt://")


def test_backoff_doubles_up_to_its_cap():
    policy = ReconnectPolicy(first_delay_s=0.5, max_delay_s=3.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_cli_errors_for_live_inputs_are_one_line(capsys):
    assert main(["run", "gopher://h/x"]) == 2
    assert capsys.readouterr().err.startswith("liveserve: error: gopher://h/x: unknown scheme 'gopher'")
    assert main(["client", "http://127.0.0.1:1/x", "--fast"]) == 2
    assert "is a live source, read at its own pace" in capsys.readouterr().err
    assert main(["client", "/dev/video-missing"]) == 2
    assert capsys.readouterr().err == "liveserve: error: /dev/video-missing: no such device\n"


# --- a real source -------------------------------------------------------------------------------------

def test_frames_of_a_live_source_arrive_at_its_pace_sampled_to_fps(live_server):
    source = LiveSource(live_server.url, fps=FPS, size=64, max_frames=10, reconnect=QUICK).open()
    frames, arrivals = [], []
    for frame in source:
        arrivals.append(time.monotonic())
        frames.append(frame)
    assert [f.index for f in frames] == list(range(10))
    assert [f.timestamp for f in frames] == [k / FPS for k in range(10)]
    assert all(f.pixels.shape == (3, 64, 64) for f in frames)
    assert_real_time(arrivals, FPS)
    assert source.counters.frames == 10 and source.counters.dropped == 0 and source.counters.reconnects == 0


def test_an_hls_playlist_is_spread_out_to_real_time_from_its_first_segment(tmp_path):
    """Segments arrive whole, as fast as HTTP goes; frames still come at the stream's pace, none lost."""
    write_hls(tmp_path, seconds=3, segment_s=1)
    server = serve_directory(tmp_path)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.m3u8"
        source = LiveSource(url, fps=FPS, size=64, reconnect=ReconnectPolicy(attempts=0)).open()
        arrivals, stamps = [], []
        for frame in source:
            arrivals.append(time.monotonic())
            stamps.append(frame.timestamp)
    finally:
        server.shutdown()
        server.server_close()
    assert stamps == [k / FPS for k in range(12)]  # 3 s at 4 fps, from the first segment on
    assert_real_time(arrivals, FPS)


def test_run_decides_a_live_source_at_real_time_pace_and_reconnects(tiny_model, live_server):
    printer = RecordingPrinter()
    lost = threading.Event()

    def restart_after_loss() -> None:
        if lost.wait(timeout=30):
            live_server.start()  # same port: the camera is back

    def kill_once(event) -> None:
        if event.kind == "lost":
            lost.set()

    printer.source_event = lambda event: (kill_once(event), RecordingPrinter.source_event(printer, event))
    restarter = threading.Thread(target=restart_after_loss, daemon=True)
    restarter.start()
    killed = threading.Event()

    def progress(stats, cache_tokens=None) -> None:
        Printer.progress(printer, stats, cache_tokens)
        if stats.frames == 6 and not killed.is_set():
            killed.set()
            live_server.stop()  # the source dies mid-stream

    printer.progress = progress
    config = SessionConfig(threshold=0.725, max_new_tokens=1)
    stats = run_video(tiny_model, live_server.url, fps=FPS, config=config, queries=[(0.0, "Hi")], max_frames=12,
                      printer=printer, reconnect=QUICK)
    restarter.join(timeout=5)
    assert stats.frames == 12
    assert [e.kind for e in printer.source_events] == ["lost", "reconnected"], printer.source_events
    assert stats.source_reconnects == 1 and stats.source_dropped > 0
    err = printer.err.getvalue()
    assert "liveserve: warning: source lost (" in err and "liveserve: warning: source reconnected after" in err
    lost_at, back_at = printer.event_at
    before = [t for t in printer.arrived_at if t < lost_at]
    after = [t for t in printer.arrived_at if t > back_at]
    # (A frame read just before the loss may arrive just after the loss is reported.)
    assert len(before) >= 6 and len(after) >= 4 and len(before) + len(after) >= 11
    assert_real_time(before, FPS)
    assert_real_time(after, FPS)  # decisions resumed, at the source's pace


def test_run_command_on_a_live_url_reports_its_source(tiny_dir, live_server, capsys):
    code = main(["run", live_server.url, "--model", str(tiny_dir), "--fps", "4", "--max-frames", "4",
                 "--max-new-tokens", "1", "--query", "0:Hi", "--reconnect-attempts", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"video {live_server.url} live at 4 fps" in err
    assert err.rstrip("\n").split("\n")[-1].startswith("liveserve: 4 frames, ")
    assert err.rstrip("\n").endswith("; source: 0 reconnects, 0 frames dropped")
    assert out.startswith("[   0.00s] User: Hi\n")


def test_ctrl_c_ends_a_live_run_with_its_frames_decided(tiny_model, live_server):
    printer = RecordingPrinter()

    def progress(stats, cache_tokens=None) -> None:
        Printer.progress(printer, stats, cache_tokens)
        if stats.frames == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, on the main thread

    printer.progress = progress
    previous = signal.getsignal(signal.SIGINT)
    stats = run_video(tiny_model, live_server.url, fps=FPS, config=SessionConfig(max_new_tokens=1), queries=[],
                      printer=printer, reconnect=QUICK)  # no --max-frames: only Ctrl-C ends it
    assert stats.interrupted and 3 <= stats.frames <= 5
    assert "interrupted: deciding the frames already read" in printer.err.getvalue()
    assert signal.getsignal(signal.SIGINT) is previous


def test_client_streams_a_live_source_to_a_local_server_at_its_pace(tiny_model, live_server):
    from engine_helpers import steered
    from liveserve.services.client.stream import stream_video
    from liveserve.services.deploy.local import start_local
    from liveserve.services.settings import ServiceSettings

    server = start_local(steered(tiny_model, interval_bias=8.0, eos_bias=7.8), "127.0.0.1:0",
                         ServiceSettings(pool_mb=64, max_lag_s=600.0))
    try:
        printer = RecordingPrinter()
        result = stream_video(server.address, live_server.url, fps=FPS, size=128, max_frames=8, printer=printer,
                              reconnect=QUICK)
    finally:
        server.stop(grace_s=1)
    assert result.live and result.decisions == 8 and not result.warnings
    assert result.source_reconnects == 0 and result.source_dropped == 0
    # From the second frame: the first is sent at once but reaches the engine only once the session is open.
    assert_real_time(printer.arrived_at[1:], FPS)


def test_a_source_that_accepts_but_sends_nothing_times_out():
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        policy = ReconnectPolicy(attempts=0, timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match=r"unreachable after 1 attempt \(nothing received for 1 s\)$"):
            open_frame_source(f"http://127.0.0.1:{silent.getsockname()[1]}/x", fps=2, size=64, realtime=True,
                              reconnect=policy)
        assert 0.9 <= time.monotonic() - started < 10
