"""Rotary position embedding helpers: the half-split rotation, and re-rotating cached keys when positions
shift.

Keys are cached after RoPE. When an eviction moves a kept token from position p to p - d, its key must
read as if it had been rotated at p - d. RoPE is a rotation, so rotating the cached key by -d is exact;
it is done in fp32 so repeated shifts of bf16 keys do not accumulate rounding (evictions are batched for
the same reason). Any attention scaling folded into cos/sin is already in the cached key and is kept.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_keys(keys: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate `keys` [..., tokens, head_dim] back by `shift` [tokens] positions (HF half-split RoPE layout)."""
    angles = -shift.to(torch.float32)[:, None] * inv_freq.to(device=keys.device, dtype=torch.float32)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    k = keys.to(torch.float32)
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)
