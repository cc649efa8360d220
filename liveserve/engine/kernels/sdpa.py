"""The reference kernel: every session's cache gathered into a padded [sessions, kv_heads, longest, dim]
batch, torch SDPA with a per-session mask. Runs on any device and dtype; on a GPU it copies every
session's cache once per layer per step, which is what the in-place kernels avoid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liveserve.engine.kernels import StepLayout
from liveserve.engine.kv_pool import KVPool


class SdpaKernel:
    name = "sdpa"

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    @staticmethod
    def unavailable(pool: KVPool) -> str | None:
        return None

    def plan(self, layout: StepLayout) -> _SdpaPlan:
        return _SdpaPlan(layout)


class _SdpaPlan:
    def __init__(self, layout: StepLayout) -> None:
        device = layout.pool.device
        sessions = len(layout.sizes)
        widest, longest = max(layout.sizes), max(layout.totals)  # host ints: no device sync
        counts, before = layout.counts, layout.before
        totals = before + counts
        column = torch.arange(longest, device=device)
        # Padding keys read the session's own first token (real data, never NaN); the mask hides them.
        column_in = torch.where(column[None] < totals[:, None], column[None], 0)  # [sessions, longest]
        self.gather = layout.slots(torch.arange(sessions, device=device)[:, None], column_in)
        rows = torch.arange(widest, device=device)
        offsets = counts.cumsum(0) - counts
        self.query_index = offsets[:, None] + torch.where(rows[None] < counts[:, None], rows[None], 0)
        # Query j of a session sees keys 0 .. before + j; padding rows see the whole (valid) cache.
        limit = torch.minimum(before[:, None] + rows[None], totals[:, None] - 1)
        self.mask = (column[None, None, :] <= limit[:, :, None])[:, None]
        self.unpack = layout.owner * widest + (layout.position - before[layout.owner])

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        q = query[0].transpose(0, 1)  # [T, heads, dim]
        heads, dim = q.shape[1], q.shape[2]
        padded_q = q[self.query_index].transpose(1, 2)  # [sessions, heads, widest, dim]
        padded_k = keys[self.gather].transpose(1, 2)  # [sessions, kv_heads, longest, dim]
        padded_v = values[self.gather].transpose(1, 2)
        out = F.scaled_dot_product_attention(padded_q, padded_k, padded_v, attn_mask=self.mask, scale=scaling,
                                             enable_gqa=padded_k.shape[1] != heads)
        return out.transpose(1, 2).reshape(-1, heads, dim)[self.unpack][None]


class InOrderPlan:
    """One session whose blocks are the pool's first ones, in order (a session stepped alone, on a pool of
    its own): its tokens sit in slots 0.. as they are, so attention reads a view of the pool with no
    index at all, and a single new token (a reply's decoding) needs no mask either. The step's keys are
    written by PackedStep before `attend`, like every kernel's."""

    def __init__(self, pool: KVPool, before: int, n: int) -> None:
        self.span = before + n
        self.mask = None if n == 1 else torch.ones(n, self.span, dtype=torch.bool, device=pool.device).tril(before)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(query, keys[: self.span].transpose(0, 1)[None],
                                             values[: self.span].transpose(0, 1)[None], attn_mask=self.mask,
                                             scale=scaling, enable_gqa=keys.shape[1] != query.shape[1])
        return out.transpose(1, 2)
