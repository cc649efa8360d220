"""PyTorch FlexAttention over the pool in place: nothing is gathered. The keys and values are the pool's
own tensors; a block mask, built once per step from the block tables, lists per block of packed queries
the pool blocks of the sessions those queries belong to, and a mask function keeps each query to its own
session's tokens up to itself. Compiled on CUDA; on the CPU it runs eagerly and reads the pool densely
(there it is for testing). Needs a pool zeroed at start (the unwritten tail of a block is read, masked)
and blocks of a multiple of 16 tokens."""

from __future__ import annotations

import importlib.util

import torch

from liveserve.engine.kernels import StepLayout
from liveserve.engine.kv_pool import KVPool, upload

Q_BLOCK = 128  # packed queries per block of flex's block mask (its kernels' query tile)


class FlexKernel:
    name = "flex"

    def __init__(self, pool: KVPool) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self.pool = pool
        # compiled once per engine, with dynamic shapes (the step's token count changes every step)
        self.flex = torch.compile(flex_attention, dynamic=True) if pool.device.type == "cuda" else flex_attention
        pool.zero()

    @staticmethod
    def unavailable(pool: KVPool) -> str | None:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "torch.nn.attention.flex_attention needs PyTorch >= 2.5"
        if pool.block_size % 16:
            return f"FlexAttention needs a pool block_size that is a multiple of 16, got {pool.block_size}"
        return None

    def plan(self, layout: StepLayout) -> _FlexPlan:
        return _FlexPlan(self, layout)


class _FlexPlan:
    def __init__(self, kernel: FlexKernel, layout: StepLayout) -> None:
        self.flex = kernel.flex
        self.block_mask = _block_mask(layout)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        out = self.flex(query, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], block_mask=self.block_mask,
                        scale=scaling, enable_gqa=keys.shape[1] != query.shape[1])
        return out.transpose(1, 2)  # [1, T, heads, dim]


def _block_mask(layout: StepLayout):
    """Packed query t (of session owner[t]) may see pool slot s iff s holds a token of the same session at
    a position <= position[t] (its cache and its own new tokens up to itself)."""
    from torch.nn.attention.flex_attention import BlockMask

    pool, owner, limit = layout.pool, layout.owner, layout.position
    device, size = pool.device, pool.block_size
    sessions = len(layout.tables)
    # Per pool block: the session it belongs to (-1: none of this step's) and its first token's position.
    blocks = torch.tensor([block for table in layout.tables for block in table], dtype=torch.long)
    held = torch.tensor([len(table) for table in layout.tables])
    first = torch.cumsum(held, 0) - held
    rank = torch.arange(blocks.numel()) - torch.repeat_interleave(first, held)
    by_block = torch.full((2, pool.allocated_blocks), -1, dtype=torch.long)
    by_block[0, blocks] = torch.repeat_interleave(torch.arange(sessions), held)
    by_block[1, blocks] = rank * size
    # The block lists: per block of queries, every pool block of the sessions whose queries it holds (a
    # session's queries are contiguous). flex's layout: a row per query block, its first kv_num_blocks listed.
    total = sum(layout.sizes)
    q_blocks = (total + Q_BLOCK - 1) // Q_BLOCK
    lists: list[list[int]] = [[] for _ in range(q_blocks)]
    start = 0
    for table, n in zip(layout.tables, layout.sizes):
        for q_block in range(start // Q_BLOCK, (start + n - 1) // Q_BLOCK + 1):
            lists[q_block].extend(table)
        start += n
    kv_indices = torch.zeros(q_blocks, pool.allocated_blocks, dtype=torch.long)
    for row, listed in enumerate(lists):
        kv_indices[row, :len(listed)] = torch.tensor(listed, dtype=torch.long)
    kv_num_blocks = torch.tensor([len(listed) for listed in lists], dtype=torch.long)
    # one copy for all of it
    uploaded = upload(torch.cat([by_block.flatten(), kv_indices.flatten(), kv_num_blocks]), device)
    by_block_t, kv_indices_t, kv_num_blocks_t = uploaded.split([by_block.numel(), kv_indices.numel(), q_blocks])
    block_owner, block_start = by_block_t.view(2, -1)

    def same_session_up_to_itself(b, h, q, kv):
        block = kv // size
        return (block_owner[block] == owner[q]) & (block_start[block] + kv % size <= limit[q])

    return BlockMask.from_kv_blocks(kv_num_blocks_t.to(torch.int32)[None, None],
                                    kv_indices_t.view(q_blocks, -1).to(torch.int32)[None, None],
                                    BLOCK_SIZE=(Q_BLOCK, size), mask_mod=same_session_up_to_itself,
                                    seq_lengths=(total, pool.allocated_blocks * size))
