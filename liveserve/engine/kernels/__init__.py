"""Attention kernels over the paged KV pool, behind one small interface.

A packed step (engine/packed.py) lays its sessions out once (`StepLayout`: who owns which packed token,
every session's block table, how much each had cached) and writes the step's keys and values into the
pool; a kernel then attends each session's queries over that session's cache only: causal among its own
new tokens, everything it cached before. A kernel object lives as long as its engine (FlashInfer keeps a
workspace); `plan` is called once per step, and the plan it returns serves every layer of that step.

    sdpa        torch SDPA over a padded gather of every session's cache (the reference; runs anywhere)
    flash       flash-attn's varlen kernel over keys gathered back to back (CUDA, fp16/bf16, flash-attn)
    flex        PyTorch FlexAttention over the pool in place, a block mask from the block tables
    flashinfer  FlashInfer's paged prefill over the pool in place, pages = the pool's blocks (CUDA, fp16/bf16,
                the `gpu` extra)

`select_kernel("auto", pool)` takes the first of flashinfer, flash, sdpa that can run here: the in-place
paged kernel first, as the serving engines do. flex only when asked for (`attention="flex"`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from liveserve.config import ATTENTION_KERNELS
from liveserve.engine.kv_pool import KVPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepLayout:
    """A packed step's sessions, planned on the host and uploaded with the step's inputs in one copy.

    Host (lists, one entry per session): `sizes` new tokens, `lengths` tokens cached before the step,
    `tables` block tables. Device: the same as tensors, plus per packed token its session (`owner`) and its
    position in that session's cache (`position`), and `blocks` (every block table back to back, its
    session's share starting at `block_start`)."""

    pool: KVPool
    sizes: list[int]
    lengths: list[int]
    tables: list[list[int]]
    counts: torch.Tensor
    before: torch.Tensor
    blocks: torch.Tensor
    block_start: torch.Tensor
    owner: torch.Tensor
    position: torch.Tensor

    @property
    def totals(self) -> list[int]:
        """Each session's cache length once the step's tokens are in (host)."""
        return [before + n for before, n in zip(self.lengths, self.sizes)]

    def slots(self, session: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Pool slots of the tokens at `position` of the sessions `session` (device, any equal shapes)."""
        size = self.pool.block_size
        return self.blocks[self.block_start[session] + position // size] * size + position % size


class KernelPlan(Protocol):
    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [1, heads, T, dim] (the packed step's); keys/values: one layer of the pool, [slots, kv_heads,
        dim], the step's own already written -> [1, T, heads, dim]."""
        ...


class AttentionKernel(Protocol):
    name: str

    def plan(self, layout: StepLayout) -> KernelPlan:
        ...


def _kernel_classes() -> dict[str, type]:
    from liveserve.engine.kernels.flash import FlashKernel
    from liveserve.engine.kernels.flashinfer import FlashInferKernel
    from liveserve.engine.kernels.flex import FlexKernel
    from liveserve.engine.kernels.sdpa import SdpaKernel

    return {"sdpa": SdpaKernel, "flash": FlashKernel, "flex": FlexKernel, "flashinfer": FlashInferKernel}


AUTO_ORDER = ("flashinfer", "flash", "sdpa")


def select_kernel(requested: str, pool: KVPool) -> AttentionKernel:
    """The kernel `requested` (or, for "auto", the first of AUTO_ORDER that runs here). A kernel asked for
    by name that cannot run here is an error that says why."""
    if requested not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {requested!r}")
    classes = _kernel_classes()
    if requested != "auto":
        why = classes[requested].unavailable(pool)
        if why:
            raise ValueError(f"attention {requested!r} cannot run here: {why}")
        return classes[requested](pool)
    for name in AUTO_ORDER[:-1]:
        if classes[name].unavailable(pool) is None:
            try:
                return classes[name](pool)
            except Exception as exc:  # installed but unusable (a broken build, say): the next one serves
                log.warning("attention kernel %s is installed but failed to start (%s: %s); trying the next",
                            name, type(exc).__name__, exc)
    return classes[AUTO_ORDER[-1]](pool)  # sdpa runs anywhere


def kernel_availability(pool: KVPool) -> dict[str, str | None]:
    """Per kernel, why it cannot run with `pool` (None: it can): what `liveserve` logs at start."""
    return {name: cls.unavailable(pool) for name, cls in _kernel_classes().items()}
