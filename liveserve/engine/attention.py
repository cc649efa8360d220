"""The attention backend: Hugging Face layers compute q/k/v and RoPE; we own KV storage and attention.

A forward packs the new tokens of one or more caches into one [1, tokens] sequence. The LM is loaded
with attn_implementation="liveserve"; each layer calls `liveserve_attention`, which finds the
`StepContext` passed through the model's kwargs, appends that layer's keys/values to each cache and
attends every query over its own cache. Without a StepContext (training, oracle passes) it is plain
SDPA with the mask Hugging Face prepared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from liveserve.engine.kv_cache import KVCache

ATTN_IMPLEMENTATION = "liveserve"


class StepContext:
    """The caches a forward appends to, in packing order, with the number of new tokens of each."""

    def __init__(self, parts: list[tuple[KVCache, int]]) -> None:
        self.parts = parts

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        # query [1, heads, T, dim]; key/value [1, kv_heads, T, dim] -> output [1, T, heads, dim]
        outputs, start = [], 0
        for cache, n in self.parts:
            end = start + n
            keys, values = cache.write(layer, key[0, :, start:end], value[0, :, start:end])
            outputs.append(_attend_one(query[:, :, start:end], keys, values, scaling))
            start = end
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return out.transpose(1, 2)


def _attend_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """New queries see every cached token and, among themselves, only earlier ones."""
    n, total = query.shape[2], keys.shape[1]
    mask = None
    if n > 1:
        mask = torch.ones(n, total, dtype=torch.bool, device=query.device).tril(diagonal=total - n)
    return F.scaled_dot_product_attention(query, keys[None], values[None], attn_mask=mask, scale=scaling,
                                          enable_gqa=keys.shape[0] != query.shape[1])


def liveserve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepContext | None = kwargs.pop("kv_step", None)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return step.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, liveserve_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
