"""A well-behaved neighbour keeps its latency while other clients send hostile input: for each class of
the corpus (tests/hostile_corpus.py), its frames' p99 send -> decision stays within the 250 ms SLO, on a
single-process server (`serve --local`) with the default limits."""

from __future__ import annotations

import pytest

from hostile_corpus import corpus, measure, p99
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings

SLO_S = 0.25
SETTINGS = ServiceSettings(pool_mb=64, max_new_tokens=6, window_frames=8)
CLASSES = corpus(SETTINGS.max_frame_bytes)


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_local(tiny_model, "127.0.0.1:0", SETTINGS)
    yield server
    server.stop(grace_s=1)


@pytest.mark.parametrize("name", list(CLASSES))
def test_the_neighbours_p99_stays_within_the_slo(server, name):
    results = measure(server.address, {name: CLASSES[name]}, rest_s=3.0, baseline=False)
    figures = {which: f"p99 {p99(latencies) * 1000:.0f} ms over {len(latencies)} frames"
               for which, latencies in results.items()}
    assert p99(results[name]) <= SLO_S, figures
    assert len(results[name]) >= 10, figures
