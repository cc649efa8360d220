"""`liveserve loadtest`: the math and settings in isolation, the session accounting with exact times, and
real loads against a single-process server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import re

import pytest
from PIL import Image

from engine_helpers import steered
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.cli import build_parser, main
from liveserve.loadtest.config import MAX_SESSIONS, ConfigError, LoadConfig, doubling_levels, parse_levels
from liveserve.loadtest.metrics import (Distribution, LiveHistogram, LiveStats, capacity, capacity_notes, meets_target,
                                        percentile, slo_attainment)
from liveserve.loadtest.progress import Progress, status_line
from liveserve.loadtest.runner import LoadTestError, run
from liveserve.services.state.redis_server import free_port
from liveserve.loadtest.session import SessionDriver
from liveserve.loadtest.workload import QUERIES, query_schedule, stream_plan, synthetic_bank
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings

# A reservation of the tiny model's sink_window session is ~2.4k KV tokens; 2 MiB (4,096 of its 512-byte
# tokens) admit exactly one.
ONE_SESSION_POOL_MB = 2



@pytest.fixture(scope="module")
def server(tiny_model):
    # Mostly-silent decisions with some replies, as a deployed model behaves.
    model = steered(tiny_model, interval_bias=8.0, eos_bias=7.8)
    server = start_local(model, "127.0.0.1:0", ServiceSettings(pool_mb=64))
    yield server
    server.stop(grace_s=1)


@pytest.fixture(scope="module")
def one_session_server(tiny_model):
    server = start_local(steered(tiny_model, interval_bias=20.0), "127.0.0.1:0",
                         ServiceSettings(pool_mb=ONE_SESSION_POOL_MB))
    yield server
    server.stop(grace_s=1)


# ---- percentiles, SLO, capacity -------------------------------------------------------------------------------

def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (0, 1, 50, 90, 99, 100)] == [1, 1, 50, 90, 99, 100]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # an observed value, not 2.5
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_is_in_milliseconds_and_ordered():
    d = Distribution.of([0.010, 0.030, 0.020, 0.100] + [0.015] * 96)
    assert d.count == 100 and d.max_ms == pytest.approx(100.0)
    assert d.p50_ms == pytest.approx(15.0) and d.p99_ms == pytest.approx(30.0)
    assert d.p50_ms <= d.p90_ms <= d.p99_ms <= d.max_ms
    assert Distribution.of([]) == Distribution(count=0)


def test_slo_attainment_counts_missing_frames_as_misses():
    assert slo_attainment([0.1, 0.2, 0.3, 0.4], 0.25, 4) == 0.5
    assert slo_attainment([0.1, 0.2], 0.25, 4) == 0.5  # two frames never decided: misses
    assert slo_attainment([0.25], 0.25, 1) == 1.0  # on the deadline meets it
    assert slo_attainment([], 0.25, 0) == 0.0


def test_capacity_is_the_largest_level_meeting_the_target():
    assert capacity([(1, 1.0), (2, 0.995), (4, 0.98), (8, 0.5)], 0.99) == 2
    assert capacity([(1, 0.99), (2, 0.989)], 0.99) == 1  # exactly on target passes
    assert meets_target(99 / 100, 0.99) and meets_target(297 / 300, 0.99) and not meets_target(0.9899, 0.99)
    assert capacity([(1, 0.5), (2, 0.1)], 0.99) is None
    assert capacity([], 0.99) is None
    assert capacity([(1, 0.95), (2, 1.0)], 0.99) == 2
    assert any("noisy" in n for n in capacity_notes([(1, 0.95), (2, 1.0), (4, 0.2)], 0.99))
    assert any("at least 4" in n for n in capacity_notes([(1, 1.0), (4, 1.0)], 0.99))
    assert any("below 1 sessions" in n for n in capacity_notes([(1, 0.1)], 0.99))


def test_live_histogram_tracks_exact_percentiles_within_its_resolution():
    import random

    rng = random.Random(3)
    values = [rng.lognormvariate(-4, 1) for _ in range(5000)]
    hist = LiveHistogram()
    for v in values:
        hist.add(v)
    ordered = sorted(values)
    for q in (50, 90, 99):
        exact = percentile(ordered, q)
        assert exact <= hist.percentile(q) <= exact * 1.021
    assert LiveHistogram().percentile(50) is None


# ---- settings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"sessions": MAX_SESSIONS + 1}, "--sessions is 1001; the hard cap is 1000"),
    ({"sessions": 0}, "--sessions must be a whole number >= 1"),
    ({"duration_s": 7200}, "--duration is 7200 s; the hard cap is 3600 s"),
    ({"duration_s": 0}, "--duration must be > 0"),
    ({"fps": float("nan")}, "--fps must be > 0"),
    ({"fps": 120}, "--fps is 120; the hard cap is 60"),
    ({"ramp_up_s": -1}, "--ramp-up must be >= 0"),
    ({"slo_target": 1.5}, "--slo-target must be > 0 and <= 1"),
    ({"slo_ms": 0}, "--slo-ms must be > 0"),
    ({"threshold": 2.0}, "--threshold must be >= 0 and <= 1"),
    ({"address": "localhost"}, "--address must be HOST:PORT"),
    ({"address": "127.0.0.1:99999"}, "--address must be HOST:PORT"),
    ({"frame_size": 63}, "--frame-size must be an even number"),
    ({"image_format": "gif"}, "--image-format must be one of jpeg, png"),
    ({"sweep": (1, 2), "sweep_max": 8}, "either --sweep or --sweep-max"),
    ({"sweep": (1, 5000)}, "--sweep level is 5000; the hard cap is 1000"),
    ({"sweep": tuple(range(1, 18))}, "--sweep has 17 levels; the cap is 16"),
])
def test_config_rejects_bad_settings_naming_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        LoadConfig(**kwargs)


def test_config_levels_and_frame_counts():
    assert LoadConfig(sessions=3).levels == (3,) and not LoadConfig().is_sweep
    assert LoadConfig(sweep=(8, 2, 2, 4)).levels == (2, 4, 8)
    assert LoadConfig(sweep_max=12).levels == (1, 2, 4, 8, 12) == doubling_levels(12)
    assert doubling_levels(1) == (1,) and doubling_levels(8) == (1, 2, 4, 8)
    assert parse_levels(" 1, 2,4 ,") == (1, 2, 4)
    with pytest.raises(ConfigError, match="'x' is not one"):
        parse_levels("1,x")
    assert LoadConfig(duration_s=2, fps=4).frames_per_session == 8  # t = 0 .. 1.75
    assert LoadConfig(duration_s=2.1, fps=4).frames_per_session == 9  # t = 2.0 < 2.1
    assert LoadConfig(duration_s=0.1, fps=2).frames_per_session == 1


# ---- workload -----------------------------------------------------------------------------------------------

def test_query_arrivals_are_poisson_and_deterministic():
    a = query_schedule(seed=7, session=0, per_minute=60, duration_s=3000)
    assert a == query_schedule(seed=7, session=0, per_minute=60, duration_s=3000)
    assert a != query_schedule(seed=7, session=1, per_minute=60, duration_s=3000)
    assert a != query_schedule(seed=8, session=0, per_minute=60, duration_s=3000)
    assert abs(len(a) - 3000) < 3000 * 0.06  # 1 per second on average
    times = [q.timestamp for q in a]
    assert times == sorted(set(times)) and 0 < times[0] and times[-1] < 3000
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert sum(g < 1.0 for g in gaps) / len(gaps) == pytest.approx(1 - 2.718281828 ** -1, abs=0.03)  # exponential
    assert {q.text for q in a} == set(QUERIES)
    assert query_schedule(seed=7, session=0, per_minute=0, duration_s=3000) == []


def test_stream_plan_puts_a_query_after_the_frame_at_its_time():
    from liveserve.loadtest.workload import ScheduledQuery

    plan = list(stream_plan(2.0, 3, [ScheduledQuery(0.0, "a"), ScheduledQuery(0.7, "b"), ScheduledQuery(1.2, "c")]))
    assert plan == [(0.0, 0, ""), (0.0, None, "a"), (0.5, 1, ""), (0.7, None, "b"), (1.0, 2, ""), (1.2, None, "c")]


@pytest.mark.parametrize("image_format, magic", [("jpeg", b"\xff\xd8"), ("png", b"\x89PNG")])
def test_synthetic_frames_are_deterministic_images(image_format, magic):
    bank = synthetic_bank(seed=1, size=64, image_format=image_format, clips=2)
    assert [len(c) for c in bank.clips] == [len(c) for c in synthetic_bank(1, 64, image_format, clips=2).clips]
    assert bank.clips == synthetic_bank(1, 64, image_format, clips=2).clips
    assert bank.clips != synthetic_bank(2, 64, image_format, clips=2).clips
    frame = bank.frame(session=1, index=3, fps=4.0)
    assert frame.startswith(magic) and Image.open(io.BytesIO(frame)).size == (64, 64)
    assert bank.frame(0, 0, 4.0) != bank.frame(1, 0, 4.0)  # neighbouring sessions stream different clips


def test_video_frames_follow_the_stream_rate_and_loop():
    from liveserve.loadtest.workload import FrameBank, video_bank
    from liveserve.video import SAMPLE_VIDEO, VideoError, probe_video

    bank = video_bank(str(SAMPLE_VIDEO), fps=1.0, size=64, image_format="jpeg")
    (clip,) = bank.clips
    assert len(clip) == probe_video(SAMPLE_VIDEO).num_frames_at(1.0)
    assert Image.open(io.BytesIO(clip[0])).size == (64, 64)
    assert bank.frame(0, len(clip) + 2, 1.0) == clip[2]  # loops
    frames = FrameBank([[bytes([k]) for k in range(10)]], content_fps=3.0, description="")
    assert [frames.frame(0, k, 3.0) for k in range(10)] == [bytes([k]) for k in range(10)]  # no 6.999 -> 6
    assert frames.frame(0, 7, 6.0) == bytes([3])  # content at 3 fps, sent at 6: each frame twice
    with pytest.raises(VideoError, match="no such file"):
        video_bank("/nonexistent.mp4", fps=1.0, size=64, image_format="jpeg")


# ---- one session's accounting, with exact times ------------------------------------------------------------------

class _FakeCall:
    def __init__(self, messages, clock, times):
        self.messages, self.clock, self.times = list(messages), clock, list(times)

    async def write(self, message) -> None:
        pass

    async def read(self):
        import grpc

        if not self.messages:
            return grpc.aio.EOF
        self.clock.now = self.times.pop(0)
        return self.messages.pop(0)

    def done(self) -> bool:
        return not self.messages

    def cancel(self) -> None:
        self.messages = []


class _FakeStub:
    def __init__(self, call: _FakeCall) -> None:
        self.call = call

    def Stream(self, **kwargs) -> _FakeCall:
        return self.call


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _driver() -> SessionDriver:
    return SessionDriver(0, LoadConfig(duration_s=1.5, fps=2), stub=None, bank=None, live=LiveStats(), origin=9.0,
                         start_delay_s=0, stop=asyncio.Event(), run_id="t")


def test_session_matches_decisions_replies_and_drops_by_frame_index():
    driver = _driver()
    driver.clock = clock = _Clock()
    driver._t0 = 10.0
    driver._sent_at = {0: 10.0, 1: 10.5, 2: 11.0, 3: 11.0}  # frames 2 and 3 share a timestamp
    driver._query_sent_at.append(10.8)
    m = pb.ServerMessage
    messages = [
        m(decision=pb.Decision(timestamp=0.0, frame_index=0, fired=True, lag_s=0.05)),  # at 10.1: latency 100 ms
        m(response_started=pb.ResponseStarted(timestamp=0.0, trigger=pb.TRIGGER_PROACTIVE)),
        m(response_delta=pb.ResponseDelta(timestamp=0.0, text="a")),  # at 10.3: TTFT 200 ms after the decision
        m(response_delta=pb.ResponseDelta(timestamp=0.0, text="b")),
        m(response_done=pb.ResponseDone(timestamp=0.0, num_tokens=3, ttft_s=0.15)),  # TPOT (10.5 - 10.3) / 2
        m(warning=pb.Warning(code=pb.WARNING_CODE_FRAME_DROPPED, timestamps=[0.5], frame_indexes=[1])),
        m(response_started=pb.ResponseStarted(timestamp=0.75, trigger=pb.TRIGGER_QUERY, query="q")),
        m(response_delta=pb.ResponseDelta(timestamp=0.75, text="c")),  # at 10.85: TTFT 50 ms after the query
        m(response_done=pb.ResponseDone(timestamp=0.75, num_tokens=1, ttft_s=0.04)),
        m(decision=pb.Decision(timestamp=1.0, frame_index=3)),  # at 11.0: the second frame at 1.0 s
        m(decision=pb.Decision(timestamp=9.0, frame_index=9)),  # not a frame this session sent: ignored
        m(closed=pb.SessionClosed()),
    ]
    times = [10.1, 10.2, 10.3, 10.5, 10.6, 10.7, 10.8, 10.85, 10.9, 11.05, 11.0, 11.1]
    asyncio.run(driver._receive(_FakeCall(messages, clock, times)))
    r = driver.record
    assert list(r.latency_s) == pytest.approx([0.1, 0.05]) and list(r.decided_at) == pytest.approx([1.1, 2.05])
    assert list(r.lag_s) == pytest.approx([0.1, 0.05]) and list(r.server_lag_s) == pytest.approx([0.05, 0.0])
    assert r.ttft == [("proactive", pytest.approx(0.2)), ("query", pytest.approx(0.05))]
    assert r.tpot_s == [pytest.approx(0.1)]  # the one-token reply has no inter-token time
    assert r.server_ttft_s == [pytest.approx(0.15), pytest.approx(0.04)]
    assert r.dropped == {1} and r.warnings == {"FRAME_DROPPED": 1}
    assert set(driver._sent_at) == {2}  # sent, neither decided nor dropped: counted undecided at the end
    assert r.responses == 2 and r.response_tokens == 4 and r.closed


def test_a_server_that_answers_open_with_something_else_fails_the_session():
    driver = _driver()
    driver.clock = clock = _Clock()
    driver.stub = _FakeStub(_FakeCall([pb.ServerMessage(decision=pb.Decision())], clock, [1.0]))
    asyncio.run(driver.run())
    assert driver.record.status == "UNKNOWN" and driver.record.detail == "expected SessionOpened first, got decision"
    assert not driver.record.sustained and driver.record.frames_sent == 0


# ---- real loads on 127.0.0.1 --------------------------------------------------------------------------------------

def test_a_short_load_against_a_real_server(server):
    config = LoadConfig(address=server.address, sessions=3, duration_s=2.0, fps=4, ramp_up_s=0.5,
                        queries_per_min=90, seed=3, frame_size=64, max_new_tokens=4, slo_ms=5000)
    err = io.StringIO()
    report = run(config, progress=Progress(err))
    (level,) = report.levels
    queries = sum(len(query_schedule(3, k, 90, 2.0)) for k in range(3))
    assert queries > 0 and level.queries_sent == queries
    assert level.sessions == 3 and level.sessions_sustained == 3 and level.errors == {}
    assert level.frames_scheduled == level.frames_sent == 3 * 8
    assert 0 < level.frames_decided <= level.frames_sent
    assert level.frames_decided + level.frames_dropped_by_server + level.frames_undecided == level.frames_sent
    lat = level.latency_ms
    assert lat.count == level.frames_decided and 0 < lat.p50_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
    assert level.lag_ms.count == level.frames_decided and level.server_lag_ms.p50_ms >= 0
    assert level.open_ms.count == 3
    assert 0 <= level.slo_attainment <= level.frames_decided / level.frames_scheduled <= 1
    assert level.responses >= queries and level.ttft_query_ms.count == queries  # every query is answered
    assert level.ttft_ms.p50_ms > 0 and level.tpot_ms.count > 0 and level.server_ttft_ms.count == level.responses
    assert sum(p.decided for p in level.timeline) == level.frames_decided
    assert max(p.sessions_active for p in level.timeline) == 3
    assert report.capacity is None and not report.sweep
    lines = err.getvalue().splitlines()
    assert any(line.startswith("[3 sessions]") and "active" in line and "p99" in line for line in lines)
    assert "frames sent 24" in lines[-1]  # the final line: every scheduled frame went out


def test_sweep_from_the_command_line_writes_json_html_and_pngs(server, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["loadtest", "--address", server.address, "--sweep", "2,1", "--duration", "1", "--fps", "4",
                 "--frame-size", "64", "--max-new-tokens", "4", "--slo-ms", "5000", "--quiet",
                 "--json", str(out / "lt.json"), "--html", str(out / "lt.html")])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    data = json.loads((out / "lt.json").read_text())
    assert data["schema"] == "liveserve.loadtest/v1" and data["sweep"] is True
    assert [lv["sessions"] for lv in data["levels"]] == [1, 2]
    points = [(lv["sessions"], lv["slo_attainment"]) for lv in data["levels"]]
    assert data["capacity"] == capacity(points, 0.99)
    for level in data["levels"]:
        assert level["frames_decided"] > 0 and 0 <= level["slo_attainment"] <= 1
        assert level["latency_ms"]["p50_ms"] <= level["latency_ms"]["p90_ms"] <= level["latency_ms"]["p99_ms"]
    pngs = [out / "lt-latency.png", out / "lt-sweep.png"]
    for png in pngs:
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = (out / "lt.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "src=\"http" not in page and "<script" not in page
    assert "capacity:" in page and "frame -&gt; decision" in page
    assert "frame -> decision (ms)" in stdout and "capacity: " in stdout
    assert "[1 session]" not in stderr  # --quiet: no progress line


def test_sweep_capacity_stops_where_the_server_refuses_sessions(one_session_server):
    """The pool admits one session: at 2 the second is refused (RESOURCE_EXHAUSTED), so at most half the
    scheduled frames can be decided and the capacity is 1, however fast the server is."""
    config = LoadConfig(address=one_session_server.address, sweep=(1, 2), duration_s=1.0, fps=4, frame_size=64,
                        slo_ms=5000, slo_target=0.9)
    report = run(config)
    one, two = report.levels
    assert one.sessions_sustained == 1 and one.errors == {} and one.slo_met
    assert two.sessions_sustained == 1 and two.errors == {"RESOURCE_EXHAUSTED": 1}
    assert "no room for a new session" in two.error_messages[0]
    assert two.frames_scheduled == 8 and two.frames_sent == 4 and two.slo_attainment <= 0.5 and not two.slo_met
    assert report.capacity == 1


def test_doubling_sweep_stops_at_the_first_level_missing_the_target(one_session_server):
    report = run(LoadConfig(address=one_session_server.address, sweep_max=8, duration_s=0.5, fps=4, frame_size=64,
                            slo_ms=5000, slo_target=0.9))
    assert [lv.sessions for lv in report.levels] == [1, 2] and report.capacity == 1
    assert any("doubling stopped at 2 sessions" in n for n in report.notes)


def test_an_unreachable_target_is_a_clear_error(capsys):
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(LoadTestError, match=f"cannot reach {address}: no connection within 0.5 s"):
        run(LoadConfig(address=address, connect_timeout_s=0.5, frame_size=64))
    code = main(["loadtest", "--address", address, "--connect-timeout", "0.5", "--frame-size", "64", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"liveserve: error: cannot reach {address}: no connection within 0.5 s " \
                                "(is the server running? check --address)\n"


def test_cli_rejects_over_cap_settings_in_one_line(capsys):
    assert main(["loadtest", "--sessions", "5000"]) == 2
    assert capsys.readouterr().err == "liveserve: error: --sessions is 5000; the hard cap is 1000\n"


def test_cli_checks_report_paths_before_running(tmp_path, capsys):
    # The address is unreachable: a path error must come first, before any connection attempt.
    assert main(["loadtest", "--address", f"127.0.0.1:{free_port()}", "--html", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"liveserve: error: --html {tmp_path} is a directory; give a file name\n"


def test_help_explains_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["loadtest"]
    text = sub.format_help()
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, action.dest
        assert all(option in text for option in action.option_strings)
    for word in ("frame -> decision", "SLO attainment", "capacity", "hard caps", "exit status"):
        assert word in text


def test_status_line_shows_progress_figures():
    stats = LiveStats(level_sessions=4, sessions_active=3, frames_sent=20, frames_decided=18, frames_dropped=1,
                      errors=2)
    for v in (0.010, 0.020, 0.300):
        stats.latency.add(v)
    line = status_line(stats, 12.4, "4 sessions")
    # Live percentiles come from ~2%-wide histogram buckets: at most 2% above the exact 20 and 300 ms.
    assert re.fullmatch(r"\[4 sessions\] 12s  active 3/4  frames sent 20 decided 18 dropped 1  "
                        r"p50 2[01]ms p99 30[0-6]ms  errors 2", line), line
