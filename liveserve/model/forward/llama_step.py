"""A Llama-style decoder stack run directly for the engine's packed steps, without the Hugging Face
module machinery around it: Llama, Qwen2, and Qwen2.5-VL's and Qwen2-VL's text models (M-RoPE included).

A step of a few sessions is a few dozen tokens: there the cost of a forward is not the arithmetic but
the calls around it (module `__call__`s, attribute lookups, hooks and output bookkeeping, the rotary
module per call; on a GPU, a kernel launch for each small op). This runs the same weights, read from
the Hugging Face modules at every call (so weights loaded, merged or changed in place are what it
uses), with the same arithmetic: RMSNorm, q/k/v projections (with their biases, as Qwen2 has them),
rotary embedding, the engine's attention, the output projection, the SiLU-gated MLP, the final norm on
the rows whose logits are read, and the LM head module itself (so hooks on it, like a decision bias,
still apply). On the tiny model it halves the forward's time on a CPU; its logits equal the Hugging
Face path's (tests/test_llama_step.py, tests/test_commentary.py).

It takes those stacks only (`unsupported` says why not): another activation, RoPE that changes with the
sequence length, adapters not merged into nn.Linear or hooks on the layers keep the Hugging Face forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from liveserve.model.attention import KVStep
from liveserve.model.forward.rope import rotate_half

STACKS = ("llama", "qwen2", "qwen2_5_vl_text", "qwen2_vl_text")  # model_type of the decoder's config
STATIC_ROPE = ("default", "linear", "llama3")  # inv_freq fixed at load: no per-length update


def unsupported(decoder: nn.Module) -> str | None:
    """Why the decoder stack `decoder` (a Hugging Face `*Model` with layers, norm and rotary_emb) cannot
    run here (None: it can)."""
    config = decoder.config
    if getattr(config, "model_type", None) not in STACKS:
        return f"not a Llama-style stack ({getattr(config, 'model_type', None)}; takes {', '.join(STACKS)})"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "activation other than SiLU, or tensor-parallel pretraining slices"
    rope = getattr(decoder.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"RoPE type {rope!r} changes with the sequence length"
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(p) is not nn.Linear for p in projections):
            return "projections that are not plain nn.Linear (adapters beside their weights)"
        if layer._forward_hooks or layer._forward_pre_hooks or attention._forward_hooks or mlp._forward_hooks:
            return "hooks on the decoder layers"
    return None


class LlamaStep:
    def __init__(self, modules: Callable[[], tuple[nn.Module, nn.Module]]) -> None:
        """`modules()`: the decoder stack and LM head, looked up at every use, so a module replaced on the
        model (a head wrapped by a test, say) is the one that runs."""
        self.modules = modules
        decoder = self.decoder
        why = unsupported(decoder)
        if why:
            raise ValueError(f"the direct forward cannot run this model: {why}")
        config = decoder.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        rotary = decoder.rotary_emb
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        # M-RoPE (Qwen2.5-VL): positions are [3, T]; frequency band j turns with row mrope_row[j]
        sections = getattr(rotary, "mrope_section", None)
        self.mrope_row = None if sections is None else torch.cat(
            [torch.full((n,), i % 3) for i, n in enumerate(sections)])

    @property
    def decoder(self) -> nn.Module:
        return self.modules()[0]

    @property
    def lm_head(self) -> nn.Module:
        return self.modules()[1]

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, kv_step: KVStep,
                 logits_at: torch.Tensor) -> torch.Tensor:
        """embeds [T, hidden] at `positions` [T] -> fp32 logits at the packed indices `logits_at`."""
        x = embeds
        cos, sin = self.rotary(positions, x.dtype)
        for index in range(len(self.decoder.layers)):
            q, k, v = self.before_attention(index, x, cos, sin)
            x = self.after_attention(index, x, self.attend(kv_step, index, q, k, v))
        return self.logits(x, logits_at)

    # The pieces of a step, in order; graphed_step.py captures all but the attention in CUDA graphs.

    def before_attention(self, index: int, x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `index` up to its attention: q [T, heads, dim], k and v [T, kv_heads, dim], rotated."""
        layer, tokens, dim = self.decoder.layers[index], x.shape[0], self.head_dim
        attention = layer.self_attn
        h = _rms_norm(x, layer.input_layernorm.weight, self.eps)
        q = _linear(h, attention.q_proj).view(tokens, self.heads, dim)
        k = _linear(h, attention.k_proj).view(tokens, self.kv_heads, dim)
        v = _linear(h, attention.v_proj).view(tokens, self.kv_heads, dim)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def attend(self, kv_step: KVStep, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The engine's attention (it writes k/v into the sessions' caches): -> [T, heads * dim]."""
        out = kv_step.attend(index, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             self.scaling)  # [1, T, heads, dim]
        return out.reshape(q.shape[0], self.heads * self.head_dim)

    def after_attention(self, index: int, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Layer `index` from its attention's output: the output projection and the MLP, both residual."""
        layer = self.decoder.layers[index]
        mlp = layer.mlp
        x = x + _linear(attended, layer.self_attn.o_proj)
        h = _rms_norm(x, layer.post_attention_layernorm.weight, self.eps)
        gated = F.silu(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj)
        return x + _linear(gated, mlp.down_proj)

    def logits(self, x: torch.Tensor, logits_at: torch.Tensor) -> torch.Tensor:
        """The final norm on the rows whose logits are read, then the LM head module (its hooks apply)."""
        return self.lm_head(_rms_norm(x[logits_at], self.decoder.norm.weight, self.eps)).float()

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, dim] for `_rotate` from positions [T] (or M-RoPE's [3, T]), in fp32
        then cast, as the Hugging Face module computes them."""
        inv_freq = self.decoder.rotary_emb.inv_freq.float()
        freqs = positions[..., None].float() * inv_freq  # [T, dim/2] or [3, T, dim/2]
        if self.mrope_row is not None:
            if self.mrope_row.device != freqs.device:
                self.mrope_row = self.mrope_row.to(freqs.device)  # once
            index = self.mrope_row[None, None].expand(1, freqs.shape[1], -1)
            freqs = freqs.gather(0, index)[0]  # band j turns with positions row mrope_row[j]
        cos, sin = freqs.cos() * self.rope_scaling, freqs.sin() * self.rope_scaling
        return torch.cat([cos, cos], -1).to(dtype)[:, None], torch.cat([sin, sin], -1).to(dtype)[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Llama applies it."""
    return x * cos + rotate_half(x) * sin


def _linear(x: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
    return F.linear(x, projection.weight, projection.bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalized in fp32, cast back, then scaled (the order matters in bf16)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
