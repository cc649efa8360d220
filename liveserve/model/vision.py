"""Vision tower + frame token layout: a frame becomes [pooled token, k x k average-pooled patch grid].

SigLIP: the pooled token is the attention-pool head's `pooler_output`, the grid is every patch.
CLIP: the pooled token is the CLS position of the last hidden state, the grid is the patches after it.
Pixels are uint8 [N, 3, S, S] already resized and padded (see liveserve.video); normalisation uses the
tower's own mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_KINDS = ("siglip", "clip")


@dataclass(frozen=True, slots=True)
class FrameLayout:
    """Tokens per frame: the pooled token (optional) plus a pooled x pooled patch grid."""

    cls_token: bool = True
    pooled: int = 3

    @property
    def num_tokens(self) -> int:
        return int(self.cls_token) + self.pooled * self.pooled


class VisionEncoder(nn.Module):
    def __init__(self, tower: nn.Module, kind: str, layout: FrameLayout, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if kind not in VISION_KINDS:
            raise ValueError(f"vision tower kind must be one of {VISION_KINDS}, got {kind!r}")
        self.tower, self.kind, self.layout, self.image_size = tower, kind, layout, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def hidden_size(self) -> int:
        return self.tower.config.hidden_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> features [N, tokens_per_frame, hidden]."""
        x = (pixels.to(self.mean.device, torch.float32) / 255.0 - self.mean) / self.std
        out = self.tower(pixel_values=x.to(self.tower.dtype))
        hidden = out.last_hidden_state
        if self.kind == "clip":
            cls, patches = hidden[:, :1], hidden[:, 1:]
        else:
            cls, patches = out.pooler_output[:, None], hidden
        parts = [cls] if self.layout.cls_token else []
        if self.layout.pooled:
            side = math.isqrt(patches.shape[1])
            grid = patches.reshape(patches.shape[0], side, side, -1).permute(0, 3, 1, 2)
            pooled = F.adaptive_avg_pool2d(grid.float(), self.layout.pooled).to(hidden.dtype)
            parts.append(pooled.flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=1)


class VisionModel(nn.Module):
    """What a Perception replica needs of a LIVE model: the vision tower and the frame layout, no LM.

    Perception sends vision features (before the connector) and each Decision/Reaction model applies its
    own connector, so neither the LM nor the connector is loaded here. Same `encode_frames` as LiveModel.
    """

    family = "live"

    def __init__(self, vision: VisionEncoder, *, frame_size: int, name: str = "") -> None:
        super().__init__()
        self.vision, self.layout, self.frame_size, self.name = vision, vision.layout, frame_size, name
        self.vision_hidden_size = vision.hidden_size

    @property
    def device(self) -> torch.device:
        return self.vision.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.tower.dtype

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, S, S] -> vision features [N, tokens_per_frame, vision_hidden]."""
        return self.vision(pixels.to(self.device))
