"""The teacher-forced forward over a whole dialogue, shared by training and evaluation.

Inputs are what a Session feeds, in one sequence: token embeddings with the <v> slots replaced, in frame
order, by the connector's outputs (`LiveModel.embed_frames`). The LM runs as a plain causal model: without a
`kv_step` the "liveserve" attention falls back to SDPA with a causal mask.
"""

from __future__ import annotations

import torch

from liveserve.data.labels import Example
from liveserve.model.live import LiveModel


def input_embeddings(model: LiveModel, input_ids: torch.Tensor, frame_positions: torch.Tensor,
                     features: torch.Tensor) -> torch.Tensor:
    """[N] ids, [F, tokens] <v> slots, [F, tokens, vision_hidden] features -> [N, hidden] embeddings."""
    if features.shape[0] != frame_positions.shape[0]:
        raise ValueError(f"{frame_positions.shape[0]} frames in the sequence but {features.shape[0]} feature rows")
    ids = input_ids.to(model.device)
    # <v> may lie outside the embedding matrix (as in the reference); its rows are overwritten below anyway.
    ids = ids.masked_fill(ids == model.template.v_id, 0)
    embeds = model.lm.get_input_embeddings()(ids)
    if frame_positions.numel():
        slots = frame_positions.reshape(-1).to(model.device)
        embeds = embeds.index_put((slots,), model.embed_frames(features))  # what a Session feeds
    return embeds


def hidden_states(model: LiveModel, embeds: torch.Tensor) -> torch.Tensor:
    """[N, hidden] input embeddings -> [N, hidden] final hidden states (causal, one sequence)."""
    out = model.lm.model(inputs_embeds=embeds[None], use_cache=False)
    return out.last_hidden_state[0]


def logits_at(model: LiveModel, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 logits [len(positions), vocab] at `positions` (the LM head runs only where it is read)."""
    return model.lm.lm_head(hidden[positions.to(hidden.device)]).float()


def example_hidden(model: LiveModel, example: Example, features: torch.Tensor) -> torch.Tensor:
    return hidden_states(model, input_embeddings(model, example.input_ids, example.frame_positions, features))
