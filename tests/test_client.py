"""`liveserve client` against a single-process server on 127.0.0.1, with the bundled sample video."""

from __future__ import annotations

import io

import pytest

from engine_helpers import steered
from liveserve.run import Printer
from liveserve.services.client.stream import ClientError, stream_video
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings
from liveserve.video import SAMPLE_VIDEO


@pytest.fixture(scope="module")
def local_server(tiny_model):
    model = steered(tiny_model, interval_bias=8.0, eos_bias=7.8)
    server = start_local(model, "127.0.0.1:0", ServiceSettings(pool_mb=64, max_lag_s=600.0))
    yield server
    server.stop(grace_s=1)


def test_client_streams_the_sample_and_prints_decisions_and_replies(local_server):
    out, err = io.StringIO(), io.StringIO()
    result = stream_video(local_server.address, str(SAMPLE_VIDEO), fps=2, max_frames=6, size=128,
                          queries=[(0.0, "Please narrate the video in real time.")], printer=Printer(6, out, err))
    assert result.session_id and result.decisions == 6 and not result.warnings
    text = out.getvalue()
    assert "User: Please narrate the video in real time." in text and "Assistant:" in text
    assert len(result.responses) >= 1  # the query is always answered
    assert "frames 6/6" in err.getvalue()


def test_client_reports_the_servers_status(local_server):
    with pytest.raises(ClientError, match="INVALID_ARGUMENT: bad open: threshold must be in"):
        stream_video(local_server.address, str(SAMPLE_VIDEO), threshold=2.0, max_frames=1,
                     printer=Printer(1, io.StringIO(), io.StringIO()))


def test_client_fails_fast_on_a_missing_video(local_server):
    from liveserve.video import VideoError

    with pytest.raises((VideoError, FileNotFoundError)):
        stream_video(local_server.address, "/nonexistent.mp4")


def test_a_query_at_a_frames_time_is_sent_after_that_frame():
    from liveserve.api.v1 import live_stream_pb2 as pb
    from liveserve.services.client.stream import requests

    from liveserve.video import iter_video_frames

    frames = iter_video_frames(SAMPLE_VIDEO, fps=2, size=64, max_frames=3)
    sent = list(requests(frames, open_message=pb.Open(), queries=[(0.0, "a"), (0.5, "b"), (0.7, "c"), (9.0, "late")]))
    order = [(m.WhichOneof("kind"), m.frame.timestamp if m.HasField("frame") else m.query.text) for m in sent]
    assert order == [("open", ""), ("frame", 0.0), ("query", "a"), ("frame", 0.5), ("query", "b"), ("query", "c"),
                     ("frame", 1.0), ("query", "late"), ("close", "")]
