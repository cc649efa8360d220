"""The Qwen2-VL family (LiveCC's base: LiveCC-7B is Qwen2-VL-7B fine-tuned on live-commentary transcripts).

It is Qwen2.5-VL's shape one generation earlier, and the engine meets it with the same model class
(qwen_vl.py): ChatML, a chunk of `temporal_patch_size` frames per temporal group, a merger turning each 2x2
block of 14-px patches into one LM token, M-RoPE over (temporal, height, width). What differs:

  vision tower   full attention in every block (no window attention), LayerNorm blocks with a QuickGELU MLP,
                 and a merger (LayerNorm, Linear, GELU, Linear) from `embed_dim` to the LM's width; all of
                 it is transformers' own `Qwen2VisionTransformerPretrainedModel`, run as it is.
  M-RoPE         the temporal position advances one per temporal group, whatever the frame rate: Qwen2-VL's
                 get_rope_index has no tokens_per_second or seconds per grid.
  config.json    the release's is flat (the text model's fields at the top level).

Its commentary conventions (the `Time=` label, the " ..." silence marker, the query, the decoding) are
StreamingVLM's, which LiveCC's chunking (2 FPS, 1 s chunks, the chunk's vision tokens in the user turn)
shares; docs/models.md lists them and what configures each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from liveserve.model.qwen_vl import QwenVLModel, load_qwen_vl

FAMILY = "qwen2_vl"


class Qwen2VLModel(QwenVLModel):
    family = FAMILY

    def temporal_interval(self, seconds_per_grid: float) -> float:
        return 1.0


def load_qwen2_vl(path: Path, device: torch.device, dtype: torch.dtype, *, frame_size: int | None = None) -> Qwen2VLModel:
    """A Qwen2-VL checkpoint in the plain Hugging Face layout (LiveCC's release, Qwen2-VL-*-Instruct)."""
    from transformers import Qwen2VLForConditionalGeneration

    return load_qwen_vl(path, device, dtype, frame_size=frame_size, hf_class=Qwen2VLForConditionalGeneration,
                        model_class=Qwen2VLModel, what="Qwen2-VL")
