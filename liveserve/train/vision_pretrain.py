"""Teach a vision tower to see the synthetic shapes before the LM learns to read it.

Trained only through the narration loss, a small tower learns colour but hardly shape: the shape is one
token of a sentence, too little signal. Here the tower and a throwaway linear head on its frame tokens
learn, frame by frame, which shapes and which colours are in view (multi-label), from labels derived from
the synthetic annotation alone. The head is dropped: the model is written back in the liveserve layout
with only the tower changed, ready for LM training with the tower frozen (its features cached).

    python -m liveserve.train.vision_pretrain --data DIR --model DIR --out DIR [--steps 800] [--batch 64]

OUT/vision_pretrain_log.jsonl   one JSON line per logged step (loss, elapsed_s)
OUT/                            the model, loadable with load_model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from liveserve.data.dialogue import Dialogue, load_dialogues
from liveserve.data.synthetic import COLOURS, DATASET_DIALOGUES, SHAPES, parse_narration

PRETRAIN_LOG = "vision_pretrain_log.jsonl"
LABELS = (*SHAPES, *COLOURS)  # multi-hot: the shapes in view, then their colours
TIME_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class VisionPretrainConfig:
    data: str  # synthetic dataset directory (dialogues.json + videos)
    model: str  # model directory whose tower is trained
    out: str  # where the model with the trained tower is written
    steps: int = 800
    batch: int = 64  # frames per step
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 50
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.log_every < 1:
            raise ValueError("steps, batch and log_every must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def frame_labels(dialogue: Dialogue) -> torch.Tensor:
    """float [num_frames, len(LABELS)]: per frame, the shapes in view and their colours, from the events.

    An event shows from the first frame at or after its time (liveserve.data.synthetic)."""
    events = sorted((e.time, parse_narration(e.text)) for e in dialogue.events)
    in_view: dict[str, str] = {}  # shape -> colour; shapes in view are of different kinds
    labels = torch.zeros(dialogue.num_frames, len(LABELS))
    j = 0
    for k in range(dialogue.num_frames):
        while j < len(events) and events[j][0] <= k / dialogue.fps + TIME_EPS:
            n = events[j][1]
            if n.kind is None or n.shape is None:
                raise ValueError(f"{dialogue.video}: event {events[j][0]:g} s is not a synthetic narration")
            if n.kind == "appears":
                in_view[n.shape] = n.colours[0]
            elif n.kind == "turns":
                in_view[n.shape] = n.colours[-1]
            elif n.kind == "leaves":
                in_view.pop(n.shape, None)
            j += 1
        for shape, colour in in_view.items():
            labels[k, LABELS.index(shape)] = 1.0
            labels[k, LABELS.index(colour)] = 1.0
    return labels


def _log(msg: str) -> None:
    print(f"liveserve vision-pretrain: {msg}", file=sys.stderr, flush=True)


def pretrain_vision(config: VisionPretrainConfig, log: Callable[[str], None] = _log) -> Path:
    """Train the tower of `config.model` on frame labels; write the model with it to `config.out`."""
    from liveserve.model.loading import load_model
    from liveserve.train.features import load_frames
    from liveserve.train.trainer import save_model

    if config.threads:
        torch.set_num_threads(config.threads)
    model = load_model(config.model, device="cpu", dtype=torch.float32)
    if model.vision is None:
        raise ValueError(f"model {config.model!r} has no vision tower to train")
    dialogues = load_dialogues(Path(config.data) / DATASET_DIALOGUES)
    frames = load_frames(model, config.data, dialogues,
                         lambda done, total, _: log(f"frames {done}/{total}") if done % 200 == 0 else None)
    pixels = torch.cat([frames[d.video] for d in dialogues])
    labels = torch.cat([frame_labels(d) for d in dialogues])
    torch.manual_seed(config.seed)
    vision = model.vision
    head = torch.nn.Linear(model.layout.num_tokens * model.vision_hidden_size, len(LABELS))
    model.requires_grad_(False)
    vision.requires_grad_(True)
    vision.train()
    optimizer = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=config.lr)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"{len(pixels)} frames of {len(dialogues)} videos, {config.steps} steps x {config.batch} frames")
    started = time.perf_counter()
    with (out / PRETRAIN_LOG).open("w") as log_file:
        for step in range(1, config.steps + 1):
            index = torch.randint(0, len(pixels), (config.batch,))
            loss = F.binary_cross_entropy_with_logits(head(vision(pixels[index]).flatten(1)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % config.log_every == 0 or step == config.steps:
                record = {"step": step, "loss": float(loss.detach()), "elapsed_s": round(time.perf_counter() - started, 2)}
                log_file.write(json.dumps(record) + "\n")
                log(f"step {step}/{config.steps} loss {record['loss']:.4f} {record['elapsed_s']:.0f}s")
    vision.requires_grad_(False)
    model.eval()
    return save_model(model, out)


def main(argv: list[str] | None = None) -> int:
    d = VisionPretrainConfig("", "", "")
    parser = argparse.ArgumentParser(prog="python -m liveserve.train.vision_pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="synthetic dataset directory")
    parser.add_argument("--model", required=True, help="model directory whose vision tower is trained")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"frames per step (default: {d.batch})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default: {d.lr:g})")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default: 0)")
    parser.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    args = parser.parse_args(argv)
    try:
        config = VisionPretrainConfig(args.data, args.model, args.out, args.steps, args.batch, args.lr, args.seed,
                                      args.log_every, args.threads)
        pretrain_vision(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"liveserve vision-pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
