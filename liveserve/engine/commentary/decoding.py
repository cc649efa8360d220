"""How a commentary reply picks its next token: never a token the model cannot validly say, then
StreamingVLM's decoding rule (a repetition penalty over the reply so far, temperature, nucleus top-p,
drawn with the session's own seeded generator) or greedy.

Never valid as output: the vision pads, `<|vision_start|>`/`<|vision_end|>`, `<|im_start|>` and the LM's
padding rows past the tokenizer's vocabulary. A reply that fed a `<|video_pad|>` back would have no
frame to fill it and fail the forward; the others would write a turn the model was never trained on. What
the model samples must never end a served session, so they are masked before every pick.

The repetition penalty is transformers' rule (RepetitionPenaltyLogitsProcessor): a logit of a token
already in the reply is divided by the penalty when positive and multiplied by it when negative. Plain
greedy steps whose argmax is valid take the batched readout's argmax, as every other session does; the
rest read their own logits row.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from liveserve.config import SessionConfig
from liveserve.engine.readout import Readout, sample


def penalize(logits: torch.Tensor, tokens: list[int], penalty: float) -> torch.Tensor:
    """`logits` [vocab] with the repetition penalty applied at `tokens` (a copy)."""
    if penalty == 1.0 or not tokens:
        return logits
    index = torch.tensor(sorted(set(tokens)), device=logits.device)
    seen = logits[index]
    return logits.index_copy(0, index, torch.where(seen > 0, seen / penalty, seen * penalty))


class ReplyDecoder:
    def __init__(self, never_said: tuple[int, ...], config: SessionConfig) -> None:
        self.temperature, self.top_p = config.temperature, config.top_p
        self.penalty = config.commentary.repetition_penalty
        self.never_said = frozenset(never_said)
        self._never = torch.tensor(sorted(self.never_said), dtype=torch.long)
        self.generator = torch.Generator().manual_seed(config.seed)

    @property
    def plain_greedy(self) -> bool:
        return self.temperature == 0.0 and self.penalty == 1.0

    def logits(self, row: torch.Tensor, reply: list[int]) -> torch.Tensor:
        """The row a pick reads: never-valid tokens masked, the reply so far penalized."""
        if self._never.device != row.device:
            self._never = self._never.to(row.device)
        return penalize(row.float().index_fill(0, self._never, -torch.inf), reply, self.penalty)

    def pick(self, readout: Readout, reply: list[int]) -> int:
        """The next token after `reply` (the tokens this reply has said so far)."""
        if self.plain_greedy and readout.greedy not in self.never_said:
            return readout.greedy
        logits = self.logits(readout.logits, reply)
        if self.temperature == 0.0:
            return int(logits.argmax())
        return sample(replace(readout, logits=logits), self.temperature, self.top_p, self.generator)
