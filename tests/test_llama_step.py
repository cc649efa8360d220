"""The direct Llama forward of engine steps (model/forward/llama_step.py) against the Hugging Face forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine_helpers import frame_bank, steered
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.live.session import Session
from liveserve.model.forward.llama_step import unsupported
from liveserve.model.loading import load_model


def _stream(model, direct: bool, frames: int = 24) -> tuple[list, list]:
    """Every step's logits and events of one session: frames, a query, replies and evictions."""
    model.direct_forward = direct
    cache = CacheConfig(policy="sink_window", window_frames=6, evict_frames=2, text_window_tokens=20)
    config = SessionConfig(threshold=0.5, max_new_tokens=4, cache=cache)
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
    assert model.forward_path == "direct"  # it ran
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


class _CausalAttention:
    """The attention of one plain sequence (no cache): the KVStep a whole-sequence forward would use."""

    def attend(self, layer, query, key, value, scaling):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_direct_layers_with_biases_equal_the_hugging_face_model(tiny_model, model_type):
    """Qwen2's q/k/v biases (and Llama's optional attention and MLP biases) go through the direct layers:
    the same logits as the Hugging Face model over one sequence."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from liveserve.model.forward.llama_step import LlamaStep

    base = tiny_model.lm.config.to_dict()
    extra = {"attention_bias": True, "mlp_bias": True} if model_type == "llama" else {"use_sliding_window": False}
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")
    config = AutoConfig.for_model(model_type, **{k: base[k] for k in keep}, **extra)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)  # biases start at zero: make them count
        embeds = torch.randn(9, config.hidden_size)
        want = lm(inputs_embeds=embeds[None]).logits[0]
        got = LlamaStep(lambda: (lm.model, lm.lm_head))(embeds, torch.arange(9), _CausalAttention(), torch.arange(9))
    assert lm.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_direct_layers_turn_m_rope_as_qwen2_5_vl_does(qwen):
    """Qwen2.5-VL's text stack with M-RoPE: each frequency band turns with its own row (time, height,
    width) of the positions. Attention is sharpened so that a band turned with the wrong row shows."""
    from liveserve.model.forward.llama_step import LlamaStep

    model = copy.deepcopy(qwen)
    decoder, head = model.decoder_and_head()
    with torch.no_grad():
        for layer in decoder.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(8.0)
                projection.bias.mul_(8.0)
        embeds = torch.randn(24, decoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
        grid = model.grid(2)
        positions = torch.cat([torch.arange(4).expand(3, 4), model.vision_positions(4, grid, 1.0),
                               torch.arange(8, 8 + 24 - 4 - grid.num_tokens).expand(3, -1)], 1)
        assert not torch.equal(positions[0], positions[1])  # the vision tokens' rows differ
        want = head(decoder(inputs_embeds=embeds[None], position_ids=positions[:, None]).last_hidden_state[0])
        got = LlamaStep(lambda: (decoder, head))(embeds, positions, _CausalAttention(), torch.arange(24))
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_models_it_does_not_take_keep_the_hugging_face_forward(tiny_model, release_dir):
    config = copy.deepcopy(tiny_model.lm.config)
    config.hidden_act = "gelu"
    assert "SiLU" in unsupported(LlamaForCausalLM(config).model)
    config = LlamaConfig(**{**tiny_model.lm.config.to_dict(), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert "changes with the sequence length" in unsupported(LlamaForCausalLM(config).model)
    unmerged = load_model(release_dir, device="cpu", dtype=torch.float32, merge_lora=False)
    logits, _ = _stream(unmerged, True, frames=2)
    assert unmerged.forward_path == "hf" and "adapters" in unmerged.direct_forward_unsupported


def _replay_eagerly(fn):
    """A stand-in for CUDA graph capture on the CPU: `replay` recomputes the piece from the same input
    buffers into the same output tensors, which is what replaying a captured graph does. It checks what
    the graphed forward owns (buckets, static buffers, padding, the pieces' order); tests/test_gpu.py
    replays real CUDA graphs."""
    outputs = fn()

    def replay():
        for held, fresh in zip(outputs, fn()):
            held.copy_(fresh)

    return replay, outputs


@pytest.mark.parametrize("max_tokens", [512, 4])
def test_graphed_pieces_over_static_buffers_equal_the_direct_forward(tiny_dir, max_tokens):
    """Frame steps, a query's prompt, reply tokens and evictions through the bucketed pieces (with 4, frame
    steps are too large for a bucket and run eagerly while reply tokens replay): the same logits."""
    model = steered(load_model(tiny_dir, device="cpu", dtype=torch.float32), interval_bias=8.0, eos_bias=7.8)
    eager, eager_events = _stream(model, True)
    model.use_cuda_graphs(capture=_replay_eagerly, max_tokens=max_tokens)
    assert model.forward_path == "graphed"
    graphed, graphed_events = _stream(model, True)
    assert graphed_events == eager_events and "ResponseDone" in eager_events
    captured = sorted(model._graphed._graphs)  # bucket sizes replayed: reply tokens (1) always
    assert captured[0] == 1 and captured[-1] <= max_tokens and (max_tokens == 4 or captured[-1] >= 16)
    pieces = model._graphed
    model.use_cuda_graphs(capture=_replay_eagerly, max_tokens=max_tokens)  # as the next engine on it does
    assert model._graphed is pieces and sorted(pieces._graphs) == captured  # nothing captured again
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_graphed_pieces_take_m_rope_positions(qwen):
    """The commentary family's steps (a chunk's turn, reply tokens) through the bucketed pieces, M-RoPE's
    [3, T] positions in the static buffers: the same logits as the direct forward run eagerly."""
    from liveserve.config import CommentaryConfig
    from liveserve.engine.commentary.session import CommentarySession

    model = copy.deepcopy(qwen)
    g = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, model.frame_size, model.frame_size), dtype=torch.uint8, generator=g)
              for _ in range(6)]
    logits = []
    for graphed in (False, True):
        model.use_cuda_graphs(graphed, capture=_replay_eagerly)
        session = CommentarySession(model, SessionConfig(mode="commentary",
                                                         commentary=CommentaryConfig(max_tokens_per_chunk=3)))
        session.trace = []
        for i, image in enumerate(images):
            session.push_frame(i * 0.5, image)
        list(session.process())
        logits.append(torch.stack([row for _, row in session.trace]))
    assert model.forward_path == "graphed" and 1 in model._graphed._graphs
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_cuda_graphs_are_refused_where_they_cannot_run(tiny_dir):
    from liveserve.config import EngineConfig, PoolConfig
    from liveserve.engine.batch import BatchEngine

    model = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        BatchEngine(model, EngineConfig(pool=PoolConfig(budget_tokens=1024), cuda_graphs=True))
    model.direct_forward = False
    with pytest.raises(ValueError, match="the direct forward is off"):
        model.use_cuda_graphs(capture=_replay_eagerly)
