"""The direct Llama forward of engine steps (model/llama_step.py) against the Hugging Face forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine_helpers import frame_bank, steered
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.session import Session
from liveserve.model.llama_step import unsupported
from liveserve.model.loading import load_model


def _stream(model, direct: bool, frames: int = 24) -> tuple[list, list]:
    """Every step's logits and events of one session: frames, a query, replies and evictions."""
    model.direct_forward = direct
    config = SessionConfig(threshold=0.5, max_new_tokens=4,
                           cache=CacheConfig(policy="sink_window", window_frames=6, evict_frames=2, text_window_tokens=20))
    session = Session(model, config)
    session.trace = []
    bank = frame_bank(model, 6, seed=3)
    for i in range(frames):
        session.push_frame(i * 0.5, bank[i % len(bank)].to(model.dtype))
        if i == 9:
            session.push_query(i * 0.5, "what is on the table")
    events = [type(event).__name__ for event in session.process()]
    return [trace.logits for trace in session.trace], events


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_forward_equals_the_hugging_face_forward(tiny_dir, dtype):
    model = steered(load_model(tiny_dir, device="cpu", dtype=dtype), interval_bias=8.0, eos_bias=7.8)
    direct, direct_events = _stream(model, True)
    assert model._direct is not None  # it ran
    hf, hf_events = _stream(model, False)
    assert direct_events == hf_events and "ResponseDone" in hf_events and len(direct) == len(hf)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(direct, hf):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_direct_forward_reads_weights_changed_in_place(tiny_dir):
    model = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    before, _ = _stream(model, True, frames=3)
    with torch.no_grad():
        model.lm.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    after, _ = _stream(model, True, frames=3)
    reference, _ = _stream(model, False, frames=3)
    assert not torch.allclose(before[-1], after[-1])
    torch.testing.assert_close(after[-1], reference[-1], atol=1e-5, rtol=1e-5)


def test_models_it_does_not_take_keep_the_hugging_face_forward(tiny_model, release_dir):
    config = copy.deepcopy(tiny_model.lm.config)
    config.attention_bias = True
    assert "biases" in unsupported(LlamaForCausalLM(config))
    config = LlamaConfig(**{**tiny_model.lm.config.to_dict(), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert "changes with the sequence length" in unsupported(LlamaForCausalLM(config))
    unmerged = load_model(release_dir, device="cpu", dtype=torch.float32, merge_lora=False)
    logits, _ = _stream(unmerged, True, frames=2)
    assert unmerged._direct is None and unmerged.direct_forward_unsupported  # an adapter beside its weights
