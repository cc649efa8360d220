"""Named models: 'tiny' (random weights, written on first use), 'default' (the bundled trained narrator) and
'tiny-commentary' (a random-weight Qwen2.5-VL in StreamingVLM's layout, for commentary mode).

The default model is a small LIVE architecture trained on synthetic shape clips by
scripts/build_default_model.sh; `default_sizes()` is its shape and `write_default_init` writes it untrained.
"""

from __future__ import annotations

import json
from pathlib import Path

# Plain constants up here: the command line asks `default_model_available` before importing torch.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default-model"
DEFAULT_IMAGE_SIZE = 128  # the synthetic clips' size: frames reach the tower unscaled
DEFAULT_MAX_POSITIONS = 8192
MODEL_NAMES = ("tiny", "default", "tiny-commentary")
_LIVE_CONFIG = "live_config.json"  # liveserve.model.loading.LIVE_CONFIG


def default_sizes():
    from liveserve.model.tiny import TinySizes

    return TinySizes(lm_hidden=192, lm_intermediate=512, lm_layers=4, lm_heads=6, lm_kv_heads=2, vision_hidden=96,
                     vision_intermediate=192, vision_layers=2, vision_heads=4, patch_size=16)


def default_model_available() -> bool:
    return (DEFAULT_MODEL_DIR / _LIVE_CONFIG).is_file()


def resolve_model(name: str | Path) -> Path:
    """'tiny', 'default', 'tiny-commentary' or a model directory -> the directory `load_model` takes."""
    if str(name) == "tiny":
        from liveserve.model.tiny import tiny_checkpoint

        return tiny_checkpoint()
    if str(name) == "tiny-commentary":
        from liveserve.model.tiny import tiny_commentary_checkpoint

        return tiny_commentary_checkpoint()
    if str(name) == "default":
        if not default_model_available():
            from liveserve.model.checkpoint import CheckpointError

            raise CheckpointError(f"the default model is not built ({DEFAULT_MODEL_DIR} has no {_LIVE_CONFIG}); "
                                  "run scripts/build_default_model.sh")
        return DEFAULT_MODEL_DIR
    return Path(name)


def write_default_init(out: str | Path, seed: int = 0) -> Path:
    """The default model's architecture with random weights (what training starts from)."""
    from liveserve.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(out, seed=seed, image_size=DEFAULT_IMAGE_SIZE, max_positions=DEFAULT_MAX_POSITIONS,
                                 sizes=default_sizes())


def model_family(model: str | Path, unknown: str | None = "live") -> str | None:
    """The family of a model as `resolve_model` takes it, from its config.json without loading it (no torch
    import): "qwen2_5_vl" for a Qwen2.5-VL directory or 'tiny-commentary', "qwen2_vl" for a Qwen2-VL directory
    (both commentary mode), else "live";
    `unknown` where there is no config.json to read (a LIVE layout has none at the top, or the directory is
    not on this host)."""
    if str(model) == "tiny-commentary":
        return "qwen2_5_vl"
    if str(model) in MODEL_NAMES:
        return "live"
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return unknown
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if model_type in ("qwen2_5_vl", "qwen2_vl") else "live"
