"""Admission by capacity, not by memory alone: a Decision replica admits the figure its settings record,
else the one recorded for a bundled model, else a conservative fallback, and logs which and why. Under a
load test at CI size against `serve --local`, the default refuses the sessions beyond it cleanly and the
admitted ones keep the 250 ms SLO."""

from __future__ import annotations

import logging

from loadtest.config import LoadConfig
from loadtest.progress import Progress
from loadtest.runner import run
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import FALLBACK_CAPACITY_STREAMS, RECORDED_CAPACITY, ServiceSettings


def test_the_limit_comes_from_a_capacity_figure_and_says_which():
    tiny = RECORDED_CAPACITY["tiny"]["cpu"]
    assert ServiceSettings(model="tiny").admission_limit("cpu").sessions == tiny
    assert "bundled 'tiny' model on cpu" in ServiceSettings(model="tiny").admission_limit("cpu").reason
    unknown = ServiceSettings(model="/models/mine").admission_limit("cpu")
    assert unknown.sessions == FALLBACK_CAPACITY_STREAMS and "capacity_streams" in unknown.reason
    assert ServiceSettings(model="tiny").admission_limit("cuda").sessions == FALLBACK_CAPACITY_STREAMS  # not measured
    assert ServiceSettings(model="tiny", capacity_streams=40).admission_limit("cpu").sessions == 40
    assert ServiceSettings(capacity_streams=40, max_sessions_per_replica=4).admission_limit("cpu").sessions == 4
    memory = ServiceSettings(capacity_streams=40, max_sessions_per_replica=0).admission_limit("cpu")
    assert memory.sessions is None and "KV pool" in memory.reason  # memory alone only when asked for


def test_the_default_refuses_beyond_capacity_and_the_admitted_keep_the_slo(tiny_model, tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="liveserve.services.decision.service")
    # A checkpoint of its own, with no figure recorded: the fallback is what this server admits.
    server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(model=str(tiny_dir), pool_mb=64))
    try:
        assert any(f"admits at most {FALLBACK_CAPACITY_STREAMS} sessions: no capacity figure" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        sessions = FALLBACK_CAPACITY_STREAMS + 8
        config = LoadConfig(address=server.address, sessions=sessions, duration_s=4.0, fps=2, ramp_up_s=1.0,
                            seed=5, frame_size=64, slo_ms=250)
        (level,) = run(config, progress=Progress(None)).levels
    finally:
        server.stop(grace_s=1)
    assert level.sessions_sustained == FALLBACK_CAPACITY_STREAMS, (level.sessions_sustained, level.errors)
    assert level.errors == {"RESOURCE_EXHAUSTED": sessions - FALLBACK_CAPACITY_STREAMS}, level.errors
    assert level.frames_decided > 0 and level.latency_ms.p99_ms <= 250, level.latency_ms
