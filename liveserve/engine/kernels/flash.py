"""flash-attn's varlen kernel: every session's keys gathered back to back (no padding), per-session
cumulative lengths, causal aligned bottom-right (a session's new queries are the last of its keys).
CUDA, fp16/bf16, with the optional `flash-attn` package."""

from __future__ import annotations

import importlib.util
from itertools import accumulate

import torch

from liveserve.engine.kernels import StepLayout
from liveserve.engine.kv_pool import KVPool, upload


class FlashKernel:
    name = "flash"

    def __init__(self, pool: KVPool) -> None:
        from flash_attn import flash_attn_varlen_func

        self.pool, self.varlen = pool, flash_attn_varlen_func

    @staticmethod
    def unavailable(pool: KVPool) -> str | None:
        if pool.device.type != "cuda" or pool.dtype not in (torch.float16, torch.bfloat16):
            return "flash-attn needs CUDA and fp16/bf16 weights"
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed"
        return None

    def plan(self, layout: StepLayout) -> _FlashPlan:
        return _FlashPlan(self, layout)


class _FlashPlan:
    def __init__(self, kernel: FlashKernel, layout: StepLayout) -> None:
        self.varlen = kernel.varlen
        device, totals = layout.pool.device, layout.totals
        # Key k of the gather belongs to session `session[k]`, at its position `k - start[session]`; sizes
        # are host ints, so nothing here waits for the device.
        cumulative = torch.tensor([*accumulate(totals, initial=0), *accumulate(layout.sizes, initial=0)],
                                  dtype=torch.int32)
        self.cu_k, self.cu_q = upload(cumulative, device).split(len(totals) + 1)
        session = torch.repeat_interleave(torch.arange(len(totals), device=device),
                                          (self.cu_k[1:] - self.cu_k[:-1]).long(), output_size=sum(totals))
        position = torch.arange(sum(totals), device=device) - self.cu_k[:-1].long()[session]
        self.kv_slots = layout.slots(session, position)
        self.max_q, self.max_k = max(layout.sizes), max(totals)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        q = query[0].transpose(0, 1)  # [T, heads, dim]
        out = self.varlen(q, keys[self.kv_slots], values[self.kv_slots], self.cu_q, self.cu_k, self.max_q,
                          self.max_k, softmax_scale=scaling, causal=True)
        return out[None]

