"""Smoke runs of every `liveserve bench` command and of `liveserve loadtest`, at the smallest sizes: each
must finish within seconds (every wait in them is bounded) and write every key the docs' tables read."""

from __future__ import annotations

import time

import pytest

from liveserve.bench.service import BenchStalled, _frames, drive
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings


@pytest.fixture(scope="module")
def local_server(tiny_model):
    """The single-process server with the settings a deployment gets (its ingress limit included)."""
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(pool_mb=64))
    yield server
    server.stop(grace_s=1)


def test_a_load_the_ingress_limit_drops_fails_at_once_saying_why(local_server, tiny_model):
    """Streams declaring 2 fps may burst 8 frames, then 4 a second: lockstep rounds outrun that, and the
    bench fails on the server's FRAME_DROPPED warning instead of waiting for decisions that never come."""
    started = time.monotonic()
    with pytest.raises(BenchStalled) as stalled:
        drive(local_server.address, sessions=1, rounds=40, warmup=0, frames=_frames(tiny_model), wait_s=30, fps=2.0)
    assert time.monotonic() - started < 15  # the drop is reported within a second or so, not after wait_s
    message = str(stalled.value)
    assert message.startswith("round ") and "WARNING_CODE_FRAME_DROPPED" in message, message
    assert "faster than 4 a second" in message and "declared fps of 2" in message, message
