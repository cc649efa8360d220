"""Train a LIVE model on a streaming-dialogue dataset (VideoLLM-online's recipe, batch 1 + accumulation).

Each example is one dialogue (liveserve.data.labels.build_example) over cached frozen vision features
(liveserve.train.features). The loss is per-token cross-entropy at the labelled positions, weighted by
`stream_loss_weight` at decision positions and 1 at reply positions, divided by the number of labelled
tokens. Modes: "lora" (PEFT LoRA on the LM, connector trained in full) or "full". The vision tower is
frozen (its features precomputed) unless `train_vision`: then it is trained in full, and the decoded frames
are kept in memory and encoded at every step, since its features change with every update.

OUT/train_log.jsonl   one JSON line per logged step (loss, stream_loss, lm_loss, lr, elapsed_s)
OUT/checkpoint.pt     the latest resumable state: trainable weights, optimizer, scheduler, step, rng
OUT/model/            the final model in the liveserve layout (LoRA merged), loadable with load_model
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from liveserve.data.dialogue import Dialogue, load_dialogues
from liveserve.data.labels import Example, build_example
from liveserve.data.synthetic import DATASET_DIALOGUES
from liveserve.model.live import LiveModel
from liveserve.model.loading import load_model, write_liveserve_layout
from liveserve.model.registry import resolve_model
from liveserve.train.config import TrainConfig
from liveserve.train.features import load_features, load_frames
from liveserve.train.forward import example_hidden, logits_at

CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"
MODEL_DIR = "model"


@dataclass(frozen=True, slots=True, eq=False)
class Sample:
    video: str
    example: Example
    features: torch.Tensor | None  # cached [frames, tokens, vision_hidden]; None when the tower trains
    pixels: torch.Tensor | None = None  # uint8 [frames, 3, S, S], encoded at every step when the tower trains


@dataclass(slots=True)
class TrainResult:
    model_dir: Path
    steps: int
    wall_s: float
    log: list[dict] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Loss:
    total: torch.Tensor  # what backward sees
    stream: float  # mean CE at decision positions (NaN when none)
    lm: float  # mean CE at reply positions (NaN when none)
    num_stream: int
    num_lm: int


def load_samples(model: LiveModel, data_dir: str | Path, dialogues: list[Dialogue] | None = None,
                 progress: Callable[[str], None] | None = None, *, frames: bool = False) -> list[Sample]:
    """Examples and cached features for every dialogue of the dataset in `data_dir`; with `frames`, decoded
    frames instead of features (for training the vision tower)."""
    data_dir = Path(data_dir)
    if dialogues is None:
        file = data_dir / DATASET_DIALOGUES
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (expected a dataset directory; see `liveserve data synth`)")
        dialogues = load_dialogues(file)
    if not dialogues:
        raise ValueError(f"{data_dir}: the dataset has no dialogues")

    def report(done: int, total: int, cached: bool) -> None:
        if progress is not None and (done == total or (not cached and done % 50 == 0)):
            progress(f"{'frames' if frames else 'features'} {done}/{total}")

    if frames:
        pixels = load_frames(model, data_dir, dialogues, report)
        return [Sample(d.video, build_example(d, model.template, model.system_prompt), None, pixels[d.video])
                for d in dialogues]
    features = load_features(model, data_dir, dialogues, report)
    return [Sample(d.video, build_example(d, model.template, model.system_prompt), features[d.video])
            for d in dialogues]


def sample_features(model: LiveModel, sample: Sample) -> torch.Tensor:
    """The sample's vision features: cached, or encoded now by the tower in training (gradients flow into it)."""
    if sample.pixels is None:
        return sample.features
    if model.vision is None:
        raise RuntimeError(f"{sample.video}: the sample holds frames, but model {model.name!r} has no vision tower")
    return model.vision(sample.pixels)


def compute_loss(model: LiveModel, sample: Sample, stream_loss_weight: float = 1.0) -> Loss:
    ex = sample.example
    hidden = example_hidden(model, ex, sample_features(model, sample))
    positions = torch.cat([ex.decision_positions, ex.lm_positions])
    if positions.numel() == 0:
        raise ValueError(f"{sample.video}: the dialogue has no labelled positions")
    logits = logits_at(model, hidden, positions)
    ce = F.cross_entropy(logits, ex.labels[positions].to(logits.device), reduction="none")
    d = ex.decision_positions.numel()
    weights = torch.ones_like(ce)
    weights[:d] = stream_loss_weight
    total = (ce * weights).sum() / positions.numel()
    stream = float(ce[:d].detach().mean()) if d else math.nan
    lm = float(ce[d:].detach().mean()) if positions.numel() > d else math.nan
    return Loss(total, stream, lm, d, positions.numel() - d)


def prepare_model(model: LiveModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Make the configured parts trainable (LoRA adapters injected in place); returns them."""
    model.requires_grad_(False)
    if config.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets))
        model.lm = inject_adapter_in_model(lora, model.lm)
        for name, p in model.lm.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        model.lm.requires_grad_(True)
    model.connector.requires_grad_(True)
    if config.train_vision:
        if model.vision is None:
            raise ValueError(f"train_vision needs a vision tower, but model {model.name!r} was loaded without one")
        model.vision.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def merged_lm(model: LiveModel):
    """The LM with any LoRA adapters folded into the base weights."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.lm.modules() if isinstance(m, LoraLayer)]
    if not layers:
        return model.lm
    for layer in layers:
        layer.merge()
    # Swap each merged LoRA wrapper for its base layer so the saved checkpoint is plain transformers.
    for name, module in list(model.lm.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                setattr(module, child_name, child.get_base_layer())
    return model.lm


def save_model(model: LiveModel, out: str | Path) -> Path:
    lm = merged_lm(model)
    vision = model.vision
    return write_liveserve_layout(out, lm=lm, tokenizer=model.template.tokenizer, tower=vision.tower,
                                  mean=tuple(vision.mean.flatten().tolist()), std=tuple(vision.std.flatten().tolist()),
                                  connector=model.connector, layout=model.layout, system_prompt=model.system_prompt)


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # linear warmup, then cosine to 0 over the remaining steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _order(num: int, seed: int, epoch: int) -> list[int]:
    # A pure function of (seed, epoch): resuming needs no saved iterator state.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num, generator=g).tolist()


def _log(msg: str) -> None:
    print(f"liveserve train: {msg}", file=sys.stderr, flush=True)


def train(config: TrainConfig, model: LiveModel | None = None, log: Callable[[str], None] = _log) -> TrainResult:
    """Run training as configured; returns where the final model was written."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if model is None:
        model = load_model(resolve_model(config.model), device="cpu" if not torch.cuda.is_available() else None,
                           dtype=torch.float32)
    samples = load_samples(model, config.data, progress=log, frames=config.train_vision)
    params = prepare_model(model, config)
    model.train()
    if model.vision is not None and not config.train_vision:
        model.vision.eval()
    total_steps = config.steps or max(1, math.ceil(config.epochs * len(samples) / config.grad_accum))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total_steps, math.ceil(config.warmup_ratio * total_steps)))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    step, records = 0, []
    ckpt = out / CHECKPOINT
    if config.resume and ckpt.is_file():
        step = _restore(ckpt, named, optimizer, scheduler, total_steps)
        log(f"resumed from {ckpt} at step {step}/{total_steps}")
    if step:  # drop lines logged after the checkpoint by the interrupted run: they are about to be redone
        _truncate_log(out / TRAIN_LOG, step)
    log_file = (out / TRAIN_LOG).open("a" if step else "w")
    log(f"{len(samples)} dialogues, {sum(p.numel() for p in params):,} trainable parameters ({config.mode}"
        f"{', vision tower too' if config.train_vision else ''}), {total_steps} steps x {config.grad_accum} dialogues")
    started, window = time.perf_counter(), []
    try:
        while step < total_steps:
            optimizer.zero_grad(set_to_none=True)
            for k in range(config.grad_accum):
                index = step * config.grad_accum + k
                epoch, at = divmod(index, len(samples))
                sample = samples[_order(len(samples), config.seed, epoch)[at]]
                loss = compute_loss(model, sample, config.stream_loss_weight)
                (loss.total / config.grad_accum).backward()
                window.append(loss)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % config.log_every == 0 or step == total_steps:
                record = _record(step, window, scheduler.get_last_lr()[0], time.perf_counter() - started)
                records.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                log(f"step {step}/{total_steps} loss {record['loss']:.4f} stream {record['stream_loss']:.4f} "
                    f"lm {record['lm_loss']:.4f} lr {record['lr']:.2e} {record['elapsed_s']:.0f}s")
                window = []
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                _save_checkpoint(ckpt, named, optimizer, scheduler, step, config)
    finally:
        log_file.close()
    _save_checkpoint(ckpt, named, optimizer, scheduler, step, config)
    model.eval()
    model_dir = save_model(model, out / MODEL_DIR)
    wall = time.perf_counter() - started
    log(f"wrote {model_dir} after {step} steps in {wall:.0f}s")
    return TrainResult(model_dir, step, wall, records)


def _record(step: int, window: list[Loss], lr: float, elapsed: float) -> dict:
    def weighted(attr: str, count: str) -> float:
        n = sum(getattr(x, count) for x in window)
        return sum(getattr(x, attr) * getattr(x, count) for x in window if getattr(x, count)) / n if n else math.nan

    return {"step": step, "loss": sum(float(x.total.detach()) for x in window) / max(len(window), 1),
            "stream_loss": weighted("stream", "num_stream"), "lm_loss": weighted("lm", "num_lm"), "lr": lr,
            "elapsed_s": round(elapsed, 2)}


def _truncate_log(path: Path, step: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(f"{line}\n" for line in lines if json.loads(line).get("step", 0) <= step))


def _save_checkpoint(path: Path, named: dict, optimizer, scheduler, step: int, config: TrainConfig) -> None:
    state = {"step": step, "trainable": {n: p.detach().clone() for n, p in named.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(), "python_rng": random.getstate(), "config": asdict(config)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def _restore(path: Path, named: dict, optimizer, scheduler, total_steps: int) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = sorted(set(named) - set(state["trainable"]))
    if missing:
        raise ValueError(f"{path} does not match this model/mode: it lacks {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    random.setstate(state["python_rng"])
    if state["step"] > total_steps:
        raise ValueError(f"{path} is at step {state['step']}, past this run's {total_steps} steps")
    return int(state["step"])
