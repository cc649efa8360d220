"""Random-weight LIVE models of named real sizes, built in memory (no checkpoint on disk), for benchmarks.

  tiny               the test model's sizes (TinySizes), 64 px frames
  llama3.2-1b-siglip Llama-3.2-1B's sizes + SigLIP-so400m (384 px, patch 14): 1.7B parameters
  llama3-8b-siglip   VideoLLM-online-8B's sizes: Llama-3-8B + SigLIP-so400m (384 px, patch 14)

Weights are created directly on the target device in the target dtype (modules are constructed under
`torch.device(device)` with that default dtype), so an 8B model never exists in host memory. The
tokenizer is the tiny byte-level one (its ids fit any vocabulary): the stream template only needs
",", "]\\n", eos and <v>, and random weights make the text meaningless anyway.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ModelPreset:
    lm_hidden: int
    lm_intermediate: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    vocab: int | None  # None: the tiny tokenizer's size, rounded up to 64
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int

    def parameters(self) -> int:
        """Approximate parameter count (LM + tower), for logs and reports."""
        h, i, layers = self.lm_hidden, self.lm_intermediate, self.lm_layers
        kv = h // self.lm_heads * self.lm_kv_heads
        lm = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + (1 if self.tie_embeddings else 2) * (self.vocab or 0) * h
        v = self.vision_hidden
        return lm + self.vision_layers * (4 * v * v + 2 * v * self.vision_intermediate)


_SIGLIP_SO400M = dict(vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16,
                      image_size=384, patch_size=14)
PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(lm_hidden=64, lm_intermediate=128, lm_layers=2, lm_heads=4, lm_kv_heads=2, vocab=None,
                        rope_theta=500000.0, max_positions=131072, tie_embeddings=False, vision_hidden=32,
                        vision_intermediate=64, vision_layers=2, vision_heads=2, image_size=64, patch_size=8),
    "llama3.2-1b-siglip": ModelPreset(lm_hidden=2048, lm_intermediate=8192, lm_layers=16, lm_heads=32, lm_kv_heads=8,
                                      vocab=128256, rope_theta=500000.0, max_positions=131072, tie_embeddings=True,
                                      **_SIGLIP_SO400M),
    "llama3-8b-siglip": ModelPreset(lm_hidden=4096, lm_intermediate=14336, lm_layers=32, lm_heads=32, lm_kv_heads=8,
                                    vocab=128256, rope_theta=500000.0, max_positions=8192, tie_embeddings=False,
                                    **_SIGLIP_SO400M),
}


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    """Parameters created inside land on `device` in `dtype` directly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_preset_model(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       seed: int = 0):
    """A LiveModel of preset `name` with random weights (seeded), on `device` (bf16 on CUDA, fp32 on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from liveserve.model.attention import ATTN_IMPLEMENTATION
    from liveserve.model.live import LiveModel, build_connector
    from liveserve.model.loading import default_dtype
    from liveserve.model.template import DEFAULT_SYSTEM_PROMPT, StreamTemplate
    from liveserve.model.tiny import build_tiny_tokenizer
    from liveserve.model.vision import SIGLIP_MEAN, SIGLIP_STD, FrameLayout, VisionEncoder

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    preset, device = PRESETS[name], torch.device(device)
    dtype = dtype or default_dtype(device)
    tokenizer = build_tiny_tokenizer()
    layout = FrameLayout()
    template = StreamTemplate.from_tokenizer(tokenizer, layout.num_tokens)  # adds <v> to the tokenizer
    vocab = preset.vocab or ((len(tokenizer) + 63) // 64) * 64
    lm_config = LlamaConfig(vocab_size=vocab, hidden_size=preset.lm_hidden, intermediate_size=preset.lm_intermediate,
                            num_hidden_layers=preset.lm_layers, num_attention_heads=preset.lm_heads,
                            num_key_value_heads=preset.lm_kv_heads, max_position_embeddings=preset.max_positions,
                            rope_theta=preset.rope_theta, tie_word_embeddings=preset.tie_embeddings,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.eos_token_id)
    lm_config._attn_implementation = ATTN_IMPLEMENTATION
    tower_config = SiglipVisionConfig(hidden_size=preset.vision_hidden, intermediate_size=preset.vision_intermediate,
                                      num_hidden_layers=preset.vision_layers,
                                      num_attention_heads=preset.vision_heads, image_size=preset.image_size,
                                      patch_size=preset.patch_size)
    torch.manual_seed(seed)
    with _building(device, dtype), torch.no_grad():
        lm = LlamaForCausalLM(lm_config)
        tower = SiglipVisionModel(tower_config)
        connector = build_connector(preset.vision_hidden, preset.lm_hidden)
    vision = VisionEncoder(tower, "siglip", layout, preset.image_size, SIGLIP_MEAN, SIGLIP_STD).to(device)
    model = LiveModel(lm, connector, template, layout, vision, vision_hidden_size=preset.vision_hidden,
                      frame_size=preset.image_size, system_prompt=DEFAULT_SYSTEM_PROMPT, name=f"preset:{name}")
    return model.eval().requires_grad_(False)
