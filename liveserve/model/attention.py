"""The attention backend the engine's models run with: Hugging Face layers compute q/k/v and RoPE; the
engine owns KV storage and attention.

A forward packs the new tokens of one or more sessions into one [1, tokens] sequence. Models are loaded
with attn_implementation="liveserve"; each layer calls `liveserve_attention`, which hands the layer's
queries, keys and values to the `kv_step` passed through the model's kwargs (the engine's PackedStep:
it writes the keys/values into the sessions' caches and attends each query over its own session).
Without one (training, reference passes) it is plain SDPA with the mask Hugging Face prepared. Defined
here, in the model layer, so that loading a model does not depend on the engine.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_IMPLEMENTATION = "liveserve"


class KVStep(Protocol):
    """What a forward's `kv_step` does for each layer (engine/packed.py: PackedStep)."""

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """query [1, heads, T, dim]; key/value [1, kv_heads, T, dim] -> output [1, T, heads, dim]."""
        ...


def liveserve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: KVStep | None = kwargs.pop("kv_step", None)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return step.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, liveserve_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
