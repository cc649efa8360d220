"""CUDA graphs of the direct Llama forward (llama_step.py), piecewise, for bucketed token counts.

On a GPU a small step is bound by kernel launches and the Python that issues them, not by arithmetic:
a Llama layer is some twenty small kernels. Everything of a layer but its attention is fixed-shape
given the step's token count, so for each bucket of token counts (1, 2, 4, ... `max_tokens`) the
rotary tables and, per layer, the part before and the part after the attention are captured once as
CUDA graphs over static buffers; a step copies its embeddings and positions into the bucket's buffers
(padding rows zeroed), replays the pieces and runs the engine's attention eagerly between them, on the
step's real rows only (its block tables and lengths change every step, so it is not captured). The
final norm and the LM head run eagerly on the rows whose logits are read. A step larger than the
largest bucket runs eagerly; padding rows only ever meet row-wise arithmetic, so they never reach a
real row.

Capture is lazy, per bucket, at its first step (a few milliseconds a graph); all graphs share one
memory pool. Turned on by `EngineConfig.cuda_graphs` (CUDA only, models the direct forward takes: both
families, M-RoPE positions included).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from liveserve.model.attention import KVStep
from liveserve.model.forward.llama_step import LlamaStep

# capture(fn) runs `fn` and returns (replay, outputs): after replay(), `outputs` (the tensors fn returned)
# hold what fn would compute now from the same input buffers.
Capture = Callable[[Callable[[], Sequence[torch.Tensor]]], tuple[Callable[[], None], Sequence[torch.Tensor]]]

MAX_GRAPH_TOKENS = 512  # past this a step is compute-bound: launches no longer matter


def cuda_capture(pool) -> Capture:
    """Capture into CUDA graphs sharing `pool`, each after one warm-up run on a side stream (as CUDA
    graph capture requires: lazy initialisation, cuBLAS workspaces)."""

    def capture(fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's perception thread keeps using the device on its own stream meanwhile
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = fn()
        return graph.replay, outputs

    return capture


@dataclass
class _Bucket:
    """One token count's static buffers and captured pieces."""

    embeds: torch.Tensor  # [tokens, hidden], the step's embeddings then zeros
    positions: torch.Tensor  # [tokens], or M-RoPE's [3, tokens]
    attended: list[torch.Tensor]  # per layer [tokens, heads * dim]: the eager attention's output goes here
    rotary: Callable[[], None]
    before: list[tuple[Callable[[], None], Sequence[torch.Tensor]]]  # per layer: replay, (q, k, v)
    after: list[Callable[[], None]]  # per layer
    hidden: torch.Tensor  # the last layer's output


class GraphedLlamaStep:
    def __init__(self, direct: LlamaStep, capture: Capture | None = None, max_tokens: int = MAX_GRAPH_TOKENS) -> None:
        """`capture`: how a piece is captured (default: CUDA graphs in a pool of their own)."""
        self.direct, self.requested_capture = direct, capture
        self._capture = capture or cuda_capture(torch.cuda.graph_pool_handle())
        self.max_tokens = max_tokens
        self.buckets = [1 << i for i in range(max_tokens.bit_length()) if 1 << i <= max_tokens]
        self._graphs: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, kv_step: KVStep,
                 logits_at: torch.Tensor) -> torch.Tensor:
        # The buffers are one per bucket: engines sharing a model (Decision and Reaction in one process)
        # take turns.
        with self._lock:
            return self._run(embeds, positions, kv_step, logits_at)

    def _run(self, embeds: torch.Tensor, positions: torch.Tensor, kv_step: KVStep,
             logits_at: torch.Tensor) -> torch.Tensor:
        tokens = embeds.shape[0]
        size = next((bucket for bucket in self.buckets if bucket >= tokens), None)
        if size is None:
            return self.direct(embeds, positions, kv_step, logits_at)
        bucket = self._graphs.get(size) or self._build(size, embeds, positions)
        bucket.embeds[:tokens].copy_(embeds)
        bucket.embeds[tokens:].zero_()
        bucket.positions[..., :tokens].copy_(positions)
        bucket.positions[..., tokens:].zero_()
        bucket.rotary()
        for index, ((replay_before, (q, k, v)), replay_after) in enumerate(zip(bucket.before, bucket.after)):
            replay_before()
            bucket.attended[index][:tokens].copy_(
                self.direct.attend(kv_step, index, q[:tokens], k[:tokens], v[:tokens]))
            replay_after()
        return self.direct.logits(bucket.hidden[:tokens], logits_at)

    def _build(self, size: int, like: torch.Tensor, like_positions: torch.Tensor) -> _Bucket:
        direct, capture = self.direct, self._capture
        embeds = torch.zeros(size, like.shape[1], dtype=like.dtype, device=like.device)
        # [size], or M-RoPE's [3, size]
        positions = torch.zeros(*like_positions.shape[:-1], size, dtype=torch.long, device=like.device)
        rotary, (cos, sin) = capture(lambda: direct.rotary(positions, like.dtype))
        before, after, attended, x = [], [], [], embeds
        for index in range(len(direct.decoder.layers)):
            before.append(capture(lambda i=index, x=x: direct.before_attention(i, x, cos, sin)))
            attended.append(torch.zeros(size, direct.heads * direct.head_dim, dtype=like.dtype, device=like.device))
            replay, (x,) = capture(lambda i=index, x=x, a=attended[-1]: (direct.after_attention(i, x, a),))
            after.append(replay)
        bucket = _Bucket(embeds, positions, attended, rotary, before, after, x)
        self._graphs[size] = bucket
        return bucket
