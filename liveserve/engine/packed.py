"""A packed multi-session forward over a KVPool.

The new tokens of every scheduled session are packed into one [1, T] sequence (each with its own
positions, so RoPE is per session). A `PackedStep` lays the step out once: what it needs from the host
(every session's new token count, cached length and block table, the model's token ids and positions,
and frame features pushed as host tensors) goes to the device in one copy per dtype, and per packed
token its session and cache position are derived there. Per layer, `attend` writes all new keys and
values into their sessions' pool slots in one write, then the attention kernel (engine/kernels) attends
each session's queries over that session's cache only; the kernel plans once per step and that plan
serves every layer.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from liveserve.engine import kv_pool
from liveserve.engine.kernels import AttentionKernel, KernelPlan, StepLayout
from liveserve.engine.kernels.sdpa import InOrderPlan, SdpaKernel
from liveserve.engine.kv_pool import KVPool, PagedCache


class PackedStep:
    def __init__(self, pool: KVPool, parts: list[tuple[PagedCache, int]], kernel: AttentionKernel | None = None,
                 inputs: dict[str, torch.Tensor] | None = None) -> None:
        """`kernel`: the engine's attention kernel (default: the SDPA reference). `inputs`: what else the
        step needs on the device, planned on the host (the model's token ids and positions, host frame
        features: LiveModel.step_inputs): its integers go in the same copy as the layout, anything else in
        one copy per dtype, and `self.inputs` has it all on the device."""
        self.pool = pool
        self._host_inputs = inputs or {}
        device = pool.device
        sizes = [n for _, n in parts]
        lengths = [cache.length for cache, _ in parts]  # host ints: no device sync
        tables = [cache.blocks for cache, _ in parts]  # unchanged while the step runs (the step lock)
        self.span: int | None = None
        if (kernel is None or kernel.name == "sdpa") and len(parts) == 1 and tables[0] == list(range(len(tables[0]))):
            # One session on the pool's first blocks, in order (stepped alone): slots are token indices.
            self.start, self.span = lengths[0], lengths[0] + sizes[0]
            self.last_index = self._upload(torch.tensor([sizes[0] - 1]))
            self.plan: KernelPlan = InOrderPlan(pool, lengths[0], sizes[0])
            return
        block_start = list(accumulate((len(table) for table in tables[:-1]), initial=0))
        flat = [block for table in tables for block in table]
        planned = torch.tensor([*sizes, *lengths, *block_start, *flat])
        counts, before, starts, blocks = self._upload(planned).split([len(parts)] * 3 + [len(flat)])
        total = sum(sizes)
        # Packed token t belongs to session owner[t] and goes to that session's cache at position[t]; the
        # output size is known on the host, so the device is not asked for it.
        owner = torch.repeat_interleave(torch.arange(len(parts), device=device), counts, output_size=total)
        offsets = counts.cumsum(0) - counts
        position = before[owner] + torch.arange(total, device=device) - offsets[owner]
        layout = StepLayout(pool, sizes, lengths, tables, counts, before, blocks, starts, owner, position)
        self.write_slots = layout.slots(owner, position)
        self.last_index = counts.cumsum(0) - 1  # each session's last packed token: where its logits are read
        self.plan = (kernel or SdpaKernel(pool)).plan(layout)

    def _upload(self, planned: torch.Tensor) -> torch.Tensor:
        """`planned` and the step's inputs to the device, one copy per dtype (the indices, ids and positions
        together; host frame features apart); the inputs land in `self.inputs`."""
        host = {"": planned, **self._host_inputs}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, tensor in host.items():
            by_dtype.setdefault(tensor.dtype, []).append(name)
        on_device = {}
        for names in by_dtype.values():
            pieces = [host[name].reshape(-1) for name in names]
            joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            uploaded = kv_pool.upload(joined, self.pool.device).split([piece.numel() for piece in pieces])
            on_device.update({name: piece.view(host[name].shape) for name, piece in zip(names, uploaded)})
        self.inputs = on_device
        return self.inputs.pop("")

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        # query [1, heads, T, dim]; key/value [1, kv_heads, T, dim] -> output [1, T, heads, dim]
        keys, values = self.pool.keys[layer], self.pool.values[layer]  # [slots, kv_heads, dim] views
        if self.span is not None:
            keys[self.start:self.span] = key[0].transpose(0, 1)
            values[self.start:self.span] = value[0].transpose(0, 1)
        else:
            keys.index_copy_(0, self.write_slots, key[0].transpose(0, 1))
            values.index_copy_(0, self.write_slots, value[0].transpose(0, 1))
        return self.plan.attend(query, keys, values, scaling)


def forward_alone(model, cache: PagedCache, step) -> torch.Tensor:
    """One session's step as a batch of one: the same cache and attention path as many sessions share.
    Returns the fp32 logits at the step's last token, [1, vocab]."""
    return forward(model, cache.pool, [(cache, step)])


def forward(model, pool: KVPool, planned: list, kernel: AttentionKernel | None = None) -> torch.Tensor:
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

