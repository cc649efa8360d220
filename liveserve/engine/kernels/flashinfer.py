"""FlashInfer's batch prefill/append over the paged pool, read in place: a FlashInfer page is one of the
pool's blocks (page size = block size, NHD layout: a layer's keys [slots, kv_heads, dim] viewed as
[blocks, block_size, kv_heads, dim]), GQA native, causal aligned bottom-right (a session's new queries
are the last of its keys). Planned once per step (at the first layer, which brings the softmax scale)
and reused by every layer. CUDA, fp16/bf16, head sizes FlashInfer compiles (64, 128, 256), and the
`flashinfer-python` package (`pip install 'liveserve[gpu]'`); its kernels are compiled on first use."""

from __future__ import annotations

import importlib.util
from itertools import accumulate

import torch

from liveserve.engine.kernels import StepLayout
from liveserve.engine.kv_pool import KVPool

WORKSPACE_BYTES = 128 << 20  # FlashInfer's split-k scratch, as its docs recommend
HEAD_DIMS = (64, 128, 256)


class FlashInferKernel:
    name = "flashinfer"

    def __init__(self, pool: KVPool) -> None:
        import flashinfer

        self.pool = pool
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")

    @staticmethod
    def unavailable(pool: KVPool) -> str | None:
        if pool.device.type != "cuda" or pool.dtype not in (torch.float16, torch.bfloat16):
            return "FlashInfer needs CUDA and fp16/bf16 weights"
        if pool.keys.shape[-1] not in HEAD_DIMS:
            return f"FlashInfer's prefill kernels take head sizes {HEAD_DIMS}, this model's is {pool.keys.shape[-1]}"
        if importlib.util.find_spec("flashinfer") is None:
            return "the flashinfer-python package is not installed (pip install 'liveserve[gpu]')"
        return None

    def plan(self, layout: StepLayout) -> _FlashInferPlan:
        return _FlashInferPlan(self, layout)


def page_arrays(layout: StepLayout) -> tuple[list[int], list[int], list[int]]:
    """FlashInfer's host-side description of a step: query offsets (qo_indptr), page offsets into the
    step's block tables laid back to back (paged_kv_indptr), and the tokens in each session's last page."""
    size = layout.pool.block_size
    pages = [len(table) for table in layout.tables]
    last_page = [total - (count - 1) * size for total, count in zip(layout.totals, pages)]
    return list(accumulate(layout.sizes, initial=0)), list(accumulate(pages, initial=0)), last_page


class _FlashInferPlan:
    def __init__(self, kernel: FlashInferKernel, layout: StepLayout) -> None:
        self.kernel, self.layout = kernel, layout
        self.scaling: float | None = None

    def _plan(self, heads: int, scaling: float) -> None:
        layout, pool = self.layout, self.kernel.pool
        qo_indptr, kv_indptr, last_page = (torch.tensor(values, dtype=torch.int32) for values in page_arrays(layout))
        # Host arrays stay on the host (FlashInfer plans the work split there); the page ids are on the device
        # already, uploaded with the step's inputs.
        self.kernel.wrapper.plan(qo_indptr, kv_indptr, layout.blocks.to(torch.int32), last_page, heads,
                                 pool.keys.shape[2], pool.keys.shape[3], pool.block_size, causal=True,
                                 sm_scale=scaling, q_data_type=pool.dtype, kv_data_type=pool.dtype)
        self.scaling = scaling

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        if self.scaling != scaling:  # the step's first layer (every layer of a model shares the scale)
            self._plan(query.shape[1], scaling)
        size = self.kernel.pool.block_size
        pages = (keys.view(-1, size, *keys.shape[1:]), values.view(-1, size, *values.shape[1:]))
        out = self.kernel.wrapper.run(query[0].transpose(0, 1).contiguous(), pages)  # [T, heads, dim]
        return out[None]
