"""What every benchmark shares: forced silence, device sync, the environment block, and the JSON report."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from liveserve.model.live import LiveModel


def force_silence(model: LiveModel):
    """A logit bias that makes every frame silent, so every step is a frame step (the common case in
    production) and replies do not blur the numbers. Returns the hook handle; `.remove()` it after."""
    interval = model.template.interval_id

    def hook(_module, _inputs, output):
        output[..., interval] += 100.0
        return output

    return model.lm.lm_head.register_forward_hook(hook)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(model: LiveModel) -> dict:
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"model": model.name, "family": model.family, "device": str(device), "device_name": name, "dtype": str(model.dtype),
            "torch_threads": torch.get_num_threads()}


def write_report(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
