"""The engine on a CUDA device: same decisions as the CPU reference path. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import frame_bank, steered
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.events import FrameDecision
from liveserve.engine.session import Session
from liveserve.model.loading import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("policy", ["full", "sink_window"])
def test_cuda_session_matches_cpu(tiny_dir, policy):
    cpu = steered(load_model(tiny_dir, device="cpu", dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
    gpu = steered(load_model(tiny_dir, device="cuda", dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
    cache = CacheConfig(policy=policy, window_frames=4, evict_frames=2, text_window_tokens=16)
    results = []
    for model in (cpu, gpu):
        session = Session(model, SessionConfig(threshold=0.5, max_new_tokens=3, cache=cache))
        for i, features in enumerate(frame_bank(model, 20)):
            session.push_frame(i * 0.5, features)
        results.append([(e.p_silent, e.fired) for e in session.process() if isinstance(e, FrameDecision)])
    assert [f for _, f in results[0]] == [f for _, f in results[1]]
    for (p, _), (q, _) in zip(*results):
        assert p == pytest.approx(q, abs=1e-3)
