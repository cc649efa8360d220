"""What a checkpoint is refused for, before its weights are loaded, whatever its family: the error
every loader raises (its message names the missing or malformed piece) and the check that the engine
computes the LM the way its own code does."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint is missing or malformed; the message names the missing piece."""


def check_supported(config: dict, where: Path) -> None:
    """Refuse LMs whose attention or logits the engine would compute differently from the model's own code,
    before loading their weights: the engine's attention is full causal attention with plain softmax, and
    its logits are the LM head's, unscaled."""
    problems = []
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            problems.append(f"{key}={config[key]} (logit soft-capping, e.g. Gemma-2)")
    layer_types = config.get("layer_types") or []
    sliding = [i for i, kind in enumerate(layer_types) if "sliding" in str(kind)]
    if sliding:
        problems.append(f"sliding-window attention in layers {sliding[:8]}{'...' if len(sliding) > 8 else ''}")
    elif config.get("sliding_window") and config.get("use_sliding_window", True) and not layer_types:
        problems.append(f"sliding_window={config['sliding_window']} (sliding-window attention, e.g. Mistral)")
    if problems:
        raise CheckpointError(f"{where / 'config.json'}: the engine does not implement {'; '.join(problems)}; "
                              f"it serves LMs with full causal attention (Llama, Qwen2)")
