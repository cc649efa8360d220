"""Shared test helpers: steering a tiny random model's decisions, and exact reference computations."""

from __future__ import annotations

import copy

import torch

from liveserve.engine.live.session import ForwardTrace


def steered(model, interval_bias: float = 0.0, eos_bias: float = 0.0):
    """A copy of `model` whose interval and eos logits are raised, so a random model produces a useful mix
    of silent frames, replies and reply lengths."""
    model = copy.deepcopy(model)
    interval, eos = model.template.interval_id, model.template.eos_id

    def hook(_module, _inputs, output):
        output[..., interval] += interval_bias
        output[..., eos] += eos_bias
        return output

    model.lm.lm_head.register_forward_hook(hook)
    return model


def frame_bank(model, n: int, seed: int = 0, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(model.layout.num_tokens, model.vision_hidden_size, generator=g) * scale for _ in range(n)]


@torch.no_grad()
def streaming_mask_oracle(model, trace: list[ForwardTrace]) -> torch.Tensor:
    """One plain forward over every token ever fed, where each token may see exactly the tokens that were
    in the cache when it was processed (original positions). Returns the logits at each forward's last token."""
    embeds = torch.cat([t.embeds for t in trace])
    n = embeds.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for t in trace:
        for p in t.positions.tolist():
            visible = t.kept_positions[t.kept_positions <= p]
            mask[p, visible] = True
    logits = model.lm(inputs_embeds=embeds[None], position_ids=torch.arange(n)[None],
                      attention_mask=mask[None, None]).logits[0].float()
    return logits[torch.tensor([int(t.positions[-1]) for t in trace])]
