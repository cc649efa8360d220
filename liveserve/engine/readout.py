"""What a step's sessions need from their logits, read back to the host in one transfer per step.

A frame's decision needs P(interval) and two argmaxes (with and without the interval token, for the
threshold); a greedy reply token needs the logits' argmax. Computed on the device for every row of
the step and copied back together, so the step waits on the device once, not once per session (each
`float(t)` or `int(t)` of a device tensor is a sync). Sampling (temperature > 0) and traces still read
their own row: they are opt-in and per session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Readout:
    p_silent: float  # softmax probability of the interval token ("," : stay silent)
    argmax: int  # the most likely token
    argmax_speaking: int  # the most likely token other than the interval token
    greedy: int  # argmax of the raw logits (a reply's next token at temperature 0)
    logits: torch.Tensor  # the row itself, on the device: for sampling and traces only


def sample(readout: Readout, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A reply's next token: the greedy one at temperature 0, else drawn (nucleus `top_p`) with the session's
    own seeded generator."""
    if temperature == 0.0:
        return readout.greedy
    probs = (readout.logits / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def read_out(logits: torch.Tensor, interval_id: int) -> list[Readout]:
    """`logits`: [rows, vocab] fp32, one row per session of the step."""
    probs = logits.softmax(-1)
    speaking = probs.clone()
    speaking[:, interval_id] = 0.0  # a Python index: nothing to upload
    # Token ids are exact in fp32 below 2**24 (vocabularies are far smaller): one tensor, one copy.
    summary = torch.stack([probs[:, interval_id], probs.argmax(-1).to(probs.dtype),
                           speaking.argmax(-1).to(probs.dtype), logits.argmax(-1).to(probs.dtype)], 1)
    rows = summary.cpu().tolist()
    return [Readout(row[0], int(row[1]), int(row[2]), int(row[3]), logits[i]) for i, row in enumerate(rows)]
