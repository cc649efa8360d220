"""What several commands share: argument types, the model options and loading the model they name."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch/transformers take seconds to import; the CLI imports them only when needed
    from liveserve.model.live import LiveModel


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def default_model() -> str:
    """'default' (the bundled trained narrator) when it is built, else the random-weight 'tiny'."""
    from liveserve.model.registry import default_model_available

    return "default" if default_model_available() else "tiny"


def add_model_options(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default,
                       help="model directory (liveserve or VideoLLM-online layout), 'default' for the bundled "
                            "trained narrator or 'tiny' for a random-weight model (default: %(default)s)")
    group.add_argument("--base-model", help="local base LLM directory for a VideoLLM-online adapter")
    group.add_argument("--vision-model", help="local SigLIP/CLIP directory for a VideoLLM-online adapter")
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def load(args) -> LiveModel:
    from liveserve.model.loading import load_model
    from liveserve.model.registry import resolve_model

    return load_model(resolve_model(args.model), base_model=args.base_model, vision_model=args.vision_model,
                      device=args.device)


def load_live(args, what: str) -> LiveModel:
    """`load`, for the commands that take LIVE models only."""
    from liveserve.model.loading import require_live

    return require_live(load(args), what)
