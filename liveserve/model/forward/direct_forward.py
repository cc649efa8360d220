"""How a model's engine steps run its LM: the Hugging Face forward, the direct forward (llama_step.py),
or CUDA graphs of the direct forward (graphed_step.py). Both model families mix this in and name their
decoder stack and LM head."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from liveserve.model.attention import KVStep
from liveserve.model.forward.graphed_step import MAX_GRAPH_TOKENS, GraphedLlamaStep
from liveserve.model.forward.llama_step import LlamaStep, unsupported


class DirectForward:
    """The switch (`direct_forward`, on by default), the choice of the direct forward, made once at the
    first step (the weights are final then: adapters merged), and the CUDA graphs over it."""

    direct_forward: bool = True
    _graphed: GraphedLlamaStep | None = None

    def decoder_and_head(self) -> tuple[nn.Module, nn.Module]:
        """The Hugging Face decoder stack and LM head the engine's steps run."""
        raise NotImplementedError

    def direct_step(self) -> LlamaStep | None:
        """The direct forward, when it is on and takes this model."""
        choice = self.__dict__.get("_direct_choice")
        if choice is None:
            why = unsupported(self.decoder_and_head()[0])
            choice = self._direct_choice = (None if why else LlamaStep(self.decoder_and_head), why)
        return choice[0] if self.direct_forward else None

    @property
    def direct_forward_unsupported(self) -> str | None:
        """Why the direct forward does not take this model (None: it does)."""
        self.direct_step()
        return self._direct_choice[1]

    def step_forward(self) -> Callable[[torch.Tensor, torch.Tensor, KVStep, torch.Tensor], torch.Tensor] | None:
        """What runs an engine step's forward: the graphed or the direct forward; None for Hugging Face's."""
        direct = self.direct_step()
        return None if direct is None else self._graphed or direct

    def use_cuda_graphs(self, on: bool = True, capture=None, max_tokens: int = MAX_GRAPH_TOKENS) -> None:
        """With `on`, engine steps of up to `max_tokens` tokens replay CUDA graphs of the direct forward's
        fixed-shape pieces (graphed_step.py); raises ValueError when they cannot run here. `capture`: see
        graphed_step.Capture (tests)."""
        if not on:
            self._graphed = None
            return
        if capture is None and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        direct = self.direct_step()
        if direct is None:
            why = "the direct forward is off" if not self.direct_forward else self.direct_forward_unsupported
            raise ValueError(f"CUDA graphs need the direct forward: {why}")
        graphed = self._graphed
        if graphed is None or graphed.requested_capture is not capture or graphed.max_tokens != max_tokens:
            # graphs already captured stay: every engine made on this model asks again (bench runs, in turn)
            self._graphed = GraphedLlamaStep(direct, capture, max_tokens)

    @property
    def forward_path(self) -> str:
        """How engine steps run the LM: "graphed" (CUDA graphs of the direct forward), "direct"
        (llama_step.py) or "hf" (the Hugging Face forward)."""
        return "hf" if self.direct_step() is None else "graphed" if self._graphed else "direct"
