"""Frozen vision features of a dataset's videos, encoded once and cached on disk next to the dataset.

Training and teacher-forced evaluation read the same features the engine would compute: each video is
decoded at the stream fps with `iter_video_frames(path, fps, size=model.frame_size)` and encoded with
`model.encode_frames`. The cache lives in DATASET/features/<fingerprint>/, where the fingerprint hashes the
vision tower's weights, frame layout, input size and normalisation, so a different tower (one changed by
training included) never reads another tower's features:

    DATASET/features/<fingerprint>/<video path>.<fps>fps.safetensors   {"features": float32 [T, tokens, hidden]}
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liveserve.data.dialogue import Dialogue
from liveserve.model.live import LiveModel
from liveserve.video import iter_video_frames

FEATURE_DIR = "features"
ENCODE_BATCH = 32  # frames per vision forward: bounds memory on long videos


def vision_fingerprint(model: LiveModel) -> str:
    """16 hex digits identifying what the features depend on: tower weights, layout, input size, mean/std."""
    if model.vision is None:
        raise RuntimeError(f"model {model.name!r} was loaded without a vision tower; cannot encode frames")
    digest = hashlib.sha256()
    vision = model.vision
    digest.update(f"{vision.kind}|{vision.layout}|{model.frame_size}|".encode())
    digest.update(vision.mean.float().numpy().tobytes() + vision.std.float().numpy().tobytes())
    for name, tensor in sorted(vision.tower.state_dict().items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def feature_path(dataset_dir: Path, fingerprint: str, video: str, fps: float) -> Path:
    return Path(dataset_dir) / FEATURE_DIR / fingerprint / f"{video}.{fps:g}fps.safetensors"


def encode_video(model: LiveModel, path: Path, fps: float) -> torch.Tensor:
    """All frames of `path` at `fps` -> float32 features [T, tokens_per_frame, vision_hidden] on the CPU."""
    chunks, batch = [], []
    for frame in iter_video_frames(path, fps=fps, size=model.frame_size):
        batch.append(frame.pixels)
        if len(batch) == ENCODE_BATCH:
            chunks.append(model.encode_frames(torch.stack(batch)).float().cpu())
            batch = []
    if batch:
        chunks.append(model.encode_frames(torch.stack(batch)).float().cpu())
    if not chunks:
        raise ValueError(f"{path}: no frames at {fps:g} fps")
    return torch.cat(chunks)


def load_frames(model: LiveModel, dataset_dir: str | Path, dialogues: Iterable[Dialogue],
                progress: Callable[[int, int, bool], None] | None = None) -> dict[str, torch.Tensor]:
    """Decoded frames per dialogue video (uint8 [frames, 3, S, S], cut to the frames the dialogue covers), for
    training the vision tower: its features change every step, so nothing of it is cached."""
    dataset_dir = Path(dataset_dir)
    dialogues = list(dialogues)
    out: dict[str, torch.Tensor] = {}
    for i, dialogue in enumerate(dialogues):
        video = dataset_dir / dialogue.video
        if not video.is_file():
            raise FileNotFoundError(f"{video}: no such video (named by a dialogue in {dataset_dir})")
        frames = [f.pixels for f in iter_video_frames(video, fps=dialogue.fps, size=model.frame_size)]
        if len(frames) < dialogue.num_frames:
            raise ValueError(f"{dialogue.video}: {len(frames)} frames at {dialogue.fps:g} fps, but its dialogue "
                             f"covers {dialogue.num_frames}")
        out[dialogue.video] = torch.stack(frames[:dialogue.num_frames])
        if progress is not None:
            progress(i + 1, len(dialogues), False)
    return out


def load_features(model: LiveModel, dataset_dir: str | Path, dialogues: Iterable[Dialogue],
                  progress: Callable[[int, int, bool], None] | None = None) -> dict[str, torch.Tensor]:
    """Features per dialogue video (key: `dialogue.video`), cut to the frames the dialogue covers.

    Videos missing from the cache are encoded and written; `progress(done, total, was_cached)` follows each.
    """
    dataset_dir = Path(dataset_dir)
    dialogues = list(dialogues)
    fingerprint = vision_fingerprint(model)
    out: dict[str, torch.Tensor] = {}
    for i, dialogue in enumerate(dialogues):
        cache = feature_path(dataset_dir, fingerprint, dialogue.video, dialogue.fps)
        cached = cache.is_file()
        if cached:
            features = load_file(str(cache))["features"]
        else:
            video = dataset_dir / dialogue.video
            if not video.is_file():
                raise FileNotFoundError(f"{video}: no such video (named by a dialogue in {dataset_dir})")
            features = encode_video(model, video, dialogue.fps).clone()  # a normal tensor, usable by autograd
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            save_file({"features": features.contiguous()}, str(tmp))
            tmp.replace(cache)  # atomic: a concurrent reader never sees half a file
        if features.shape[0] < dialogue.num_frames:
            raise ValueError(f"{dialogue.video}: {features.shape[0]} frames at {dialogue.fps:g} fps, but its "
                             f"dialogue covers {dialogue.num_frames}")
        out[dialogue.video] = features[:dialogue.num_frames]
        if progress is not None:
            progress(i + 1, len(dialogues), cached)
    return out
