"""Attention for a packed multi-session forward over a KVPool.

The new tokens of every scheduled session are packed into one [1, T] sequence (each with its own
positions, so RoPE is per session). Per layer, `PackedStep.attend` scatters all new keys/values into
their sessions' pool slots in one write, then each session's queries attend over that session's
cache only: causal among its own new tokens, everything it cached before.

Two kernels:
  sdpa   the reference path (CPU, and GPU without flash-attn): gathers each session's K/V into a
         padded [sessions, kv_heads, longest, dim] batch and runs torch SDPA with a per-session mask.
  flash  flash-attn's varlen kernel (CUDA, fp16/bf16, when the optional `flash-attn` is installed):
         K/V gathered back to back without padding, causal alignment bottom-right per session.
  flex   PyTorch FlexAttention over the pool itself: nothing is gathered. The keys and values are the
         pool's own tensors; a block mask lists, per block of packed queries, the pool blocks of the
         sessions those queries belong to, and a mask function keeps each query to its own session's
         tokens up to itself. Compiled on CUDA; on the CPU it runs eagerly (dense, for testing).
All index tensors (and flex's block mask) are built once per step and shared by every layer.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from liveserve.config import ATTENTION_KERNELS
from liveserve.engine import kv_pool
from liveserve.engine.kv_pool import KVPool, PagedCache


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


FLEX_Q_BLOCK = 128  # packed queries per block of flex's block mask (its kernels' query tile)


def resolve_kernel(requested: str, pool: KVPool) -> str:
    """auto -> flash when it can run here, else sdpa; an explicit "flash" or "flex" that cannot run is an
    error. flex is taken only when asked for: it has not been measured against the others on a GPU."""
    if requested not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {requested!r}")
    if requested == "flex":
        if not flex_attention_available():
            raise ValueError("attention 'flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5)")
        if pool.block_size % 16:
            raise ValueError(f"attention 'flex' needs a pool block_size that is a multiple of 16, got {pool.block_size}")
        return "flex"
    usable = pool.device.type == "cuda" and pool.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    if requested == "flash" and not usable:
        raise ValueError("attention 'flash' needs CUDA, fp16/bf16 weights and the flash-attn package")
    return "flash" if requested == "flash" or (requested == "auto" and usable) else "sdpa"


class PackedStep:
    def __init__(self, pool: KVPool, parts: list[tuple[PagedCache, int]], kernel: str = "sdpa",
                 inputs: dict[str, torch.Tensor] | None = None) -> None:
        """`inputs`: what else the step needs on the device, planned on the host (the model's token ids and
        positions, LiveModel.step_inputs): it goes in the same copy as the attention indices, and
        `self.inputs` has it on the device."""
        self.pool, self.parts, self.kernel = pool, parts, kernel
        self._host_inputs = inputs or {}
        device, size = pool.device, pool.block_size
        sizes = [n for _, n in parts]
        lengths = [cache.length for cache, _ in parts]
        widest, longest = max(sizes), max(b + n for b, n in zip(lengths, sizes))  # host ints: no device sync
        # Every session's block table, padded with its own first block: [sessions, most blocks]
        tables = [cache.blocks for cache, _ in parts]
        self.span = None
        if kernel == "sdpa" and len(parts) == 1 and tables[0] == list(range(len(tables[0]))):
            self._one_in_order(lengths[0], sizes[0])
            return
        width = max(len(t) for t in tables)
        # What the step needs from the host goes over in one copy (pinned and asynchronous on CUDA); the
        # rest of the indices are derived from it on the device.
        planned = [*sizes, *lengths, *(block for t in tables for block in t + t[:1] * (width - len(t)))]
        counts, before, table = self._upload(torch.tensor(planned)).split([len(parts), len(parts),
                                                                           len(parts) * width])
        table = table.view(len(parts), width)
        self.last_index = counts.cumsum(0) - 1  # each session's last packed token: where its logits are read
        totals = before + counts
        column = torch.arange(longest, device=device)
        kv_slots = table[:, column // size] * size + column % size  # [sessions, longest]
        valid = column[None] < totals[:, None]
        # Padding keys point at the session's own first slot (real data, never NaN); the mask hides them.
        self.gather = torch.where(valid, kv_slots, kv_slots[:, :1])
        # Packed token t belongs to session `owner[t]` and is its `rank[t]`-th new token.
        owner = torch.repeat_interleave(torch.arange(len(parts), device=device), counts)
        offsets = counts.cumsum(0) - counts
        rank = torch.arange(owner.numel(), device=device) - offsets[owner]
        self.write_slots = self.gather[owner, before[owner] + rank]
        if kernel == "flex":
            self.block_mask = _flex_block_mask(pool, parts, owner, before[owner] + rank)
            self.flex = _flex_attention(device)
            return
        if kernel == "flash":
            self.kv_slots = kv_slots[valid]  # back to back, session by session
            self.cu_q = _cumulative(counts)
            self.cu_k = _cumulative(totals)
            self.max_q, self.max_k = widest, longest
            return
        rows = torch.arange(widest, device=device)
        self.query_index = offsets[:, None] + torch.where(rows[None] < counts[:, None], rows[None], 0)
        # Query j of a session sees keys 0 .. before + j; padding rows see the whole (valid) cache.
        limit = torch.minimum(before[:, None] + rows[None], totals[:, None] - 1)
        self.mask = (column[None, None, :] <= limit[:, :, None])[:, None]
        self.unpack = owner * widest + rank

    def _one_in_order(self, before: int, n: int) -> None:
        """One session whose blocks are the pool's first ones, in order (a session stepped alone, on a pool
        of its own): its tokens sit in slots 0.. as they are, so the step needs no index at all. Keys and
        values are written into a slice and attention reads a view of the pool; a single new token (a
        reply's decoding) needs no mask either."""
        device = self.pool.device
        self.start, self.span = before, before + n
        self.last_index = self._upload(torch.tensor([n - 1]))
        self.mask = None if n == 1 else torch.ones(n, self.span, dtype=torch.bool, device=device).tril(before)

    def _upload(self, planned: torch.Tensor) -> torch.Tensor:
        """`planned` and the step's inputs to the device in one copy; the inputs land in `self.inputs`."""
        pieces = [planned, *(tensor.reshape(-1) for tensor in self._host_inputs.values())]
        sizes = [piece.numel() for piece in pieces]
        uploaded = kv_pool.upload(torch.cat(pieces), self.pool.device).split(sizes)
        self.inputs = {name: piece.view(tensor.shape)
                       for (name, tensor), piece in zip(self._host_inputs.items(), uploaded[1:])}
        return uploaded[0]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        # query [1, heads, T, dim]; key/value [1, kv_heads, T, dim] -> output [1, T, heads, dim]
        keys, values = self.pool.keys[layer], self.pool.values[layer]  # [slots, kv_heads, dim] views
        if self.span is not None:  # one session in order (_one_in_order)
            keys[self.start:self.span] = key[0].transpose(0, 1)
            values[self.start:self.span] = value[0].transpose(0, 1)
            out = F.scaled_dot_product_attention(query, keys[: self.span].transpose(0, 1)[None],
                                                 values[: self.span].transpose(0, 1)[None], attn_mask=self.mask,
                                                 scale=scaling, enable_gqa=keys.shape[1] != query.shape[1])
            return out.transpose(1, 2)
        keys.index_copy_(0, self.write_slots, key[0].transpose(0, 1))
        values.index_copy_(0, self.write_slots, value[0].transpose(0, 1))
        if self.kernel == "flex":
            out = self.flex(query, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                               block_mask=self.block_mask, scale=scaling,
                                               enable_gqa=keys.shape[1] != query.shape[1])
            return out.transpose(1, 2)  # [1, T, heads, dim]
        q = query[0].transpose(0, 1)  # [T, heads, dim]
        if self.kernel == "flash":
            from flash_attn import flash_attn_varlen_func

            out = flash_attn_varlen_func(q, keys[self.kv_slots], values[self.kv_slots], self.cu_q, self.cu_k,
                                         self.max_q, self.max_k, softmax_scale=scaling, causal=True)
            return out[None]
        heads, dim = q.shape[1], q.shape[2]
        padded_q = q[self.query_index].transpose(1, 2)  # [sessions, heads, widest, dim]
        padded_k = keys[self.gather].transpose(1, 2)  # [sessions, kv_heads, longest, dim]
        padded_v = values[self.gather].transpose(1, 2)
        out = F.scaled_dot_product_attention(padded_q, padded_k, padded_v, attn_mask=self.mask, scale=scaling,
                                             enable_gqa=padded_k.shape[1] != heads)
        return out.transpose(1, 2).reshape(-1, heads, dim)[self.unpack][None]


def forward_alone(model, cache: PagedCache, step) -> torch.Tensor:
    """One session's step as a batch of one: the same cache and attention path as many sessions share.
    Returns the fp32 logits at the step's last token, [1, vocab]."""
    return forward(model, cache.pool, [(cache, step)])


def forward(model, pool: KVPool, planned: list, kernel: str = "sdpa") -> torch.Tensor:
    """One packed forward of `planned` [(cache, step)]: every session's step, their token ids and positions
    and the attention indices planned on the host and sent to the device in one copy. Returns the fp32
    logits at each session's last token, [sessions, vocab]."""
    steps = [step for _, step in planned]
    packed = PackedStep(pool, [(cache, step.num_tokens) for cache, step in planned], kernel,
                        model.step_inputs(steps))
    with torch.inference_mode():
        embeds = model.embed_step(steps, packed.inputs)
        return model.forward_step(embeds, packed.inputs["positions"], packed, packed.last_index)


def private_cache(model, max_tokens: int) -> PagedCache:
    """A cache for a session stepped on its own: a pool of its own that grows with it (kv_pool.py)."""
    return KVPool.for_session(model, max_tokens).open_cache(max_tokens)


def _cumulative(counts: torch.Tensor) -> torch.Tensor:
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def _flex_block_mask(pool: KVPool, parts: list[tuple[PagedCache, int]], owner: torch.Tensor,
                     limit: torch.Tensor):
    """Packed query t (of session owner[t]) may see pool slot s iff s holds a token of the same session
    at a position <= limit[t] (its cache and its own new tokens up to itself). The block lists come
    from the block tables on the host: per block of queries, every pool block of the sessions in it."""
    from torch.nn.attention.flex_attention import BlockMask

    device, size = pool.device, pool.block_size
    # Per pool block: the session it belongs to (-1: none of this step's) and its first token's position.
    blocks = torch.tensor([block for cache, _ in parts for block in cache.blocks], dtype=torch.long)
    held = torch.tensor([len(cache.blocks) for cache, _ in parts])
    first = torch.cumsum(held, 0) - held
    rank = torch.arange(blocks.numel()) - torch.repeat_interleave(first, held)
    by_block = torch.full((2, pool.allocated_blocks), -1, dtype=torch.long)
    by_block[0, blocks] = torch.repeat_interleave(torch.arange(len(parts)), held)
    by_block[1, blocks] = rank * size
    block_owner_t, block_start_t = kv_pool.upload(by_block, device)

    def same_session_up_to_itself(b, h, q, kv):
        block = kv // size
        return (block_owner_t[block] == owner[q]) & (block_start_t[block] + kv % size <= limit[q])

    counts = [n for _, n in parts]
    total = sum(counts)
    q_blocks = (total + FLEX_Q_BLOCK - 1) // FLEX_Q_BLOCK
    lists: list[list[int]] = [[] for _ in range(q_blocks)]
    start = 0
    for (cache, _), n in zip(parts, counts):  # a session's queries are contiguous: the q blocks they touch
        for q_block in range(start // FLEX_Q_BLOCK, (start + n - 1) // FLEX_Q_BLOCK + 1):
            lists[q_block].extend(cache.blocks)
        start += n
    # flex's layout: a column per kv block of the pool, the first kv_num_blocks of each row listed.
    kv_indices = torch.zeros(q_blocks, pool.allocated_blocks, dtype=torch.int32)
    for row, listed in enumerate(lists):
        kv_indices[row, :len(listed)] = torch.tensor(listed, dtype=torch.int32)
    kv_indices = kv_pool.upload(kv_indices, device)[None, None]
    kv_num_blocks = kv_pool.upload(torch.tensor([len(listed) for listed in lists], dtype=torch.int32), device)[None, None]
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(FLEX_Q_BLOCK, size),
                                    mask_mod=same_session_up_to_itself,
                                    seq_lengths=(total, pool.allocated_blocks * size))


_COMPILED_FLEX = None


def _flex_attention(device: torch.device):
    """flex_attention compiled for CUDA (once per process, dynamic shapes); eager elsewhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX
