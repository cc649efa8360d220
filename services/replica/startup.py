"""What every model replica does at start: pin its CPU threads, load its model onto its device."""

from __future__ import annotations

import logging

import torch

from liveserve.model.live import LiveModel

log = logging.getLogger(__name__)


def load_replica_model(model: str, *, vision: bool, threads: int = 1) -> LiveModel:
    """Load `model` ("default", "tiny", "tiny-commentary" or a checkpoint directory; a Qwen2.5-VL model
    always with its tower: it encodes its chunks where it decides) on CUDA in bfloat16 when there is a GPU,
    else on CPU in float32. `threads` caps torch's CPU threads: replicas sharing a host must not each
    spawn one thread per core."""
    from liveserve.model.loading import load_model
    from liveserve.model.registry import resolve_model

    torch.set_num_threads(max(1, threads))
    cuda = torch.cuda.is_available()
    loaded = load_model(resolve_model(model), device="cuda" if cuda else "cpu",
                        dtype=torch.bfloat16 if cuda else torch.float32, load_vision=vision)
    log.info("loaded %s on %s (vision tower: %s)", loaded.name, loaded.device, "yes" if vision else "no")
    return loaded


def replica_id() -> str:
    """This Serve replica's id: the name sessions are routed by."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id
