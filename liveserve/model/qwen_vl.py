"""The Qwen2.5-VL family (StreamingVLM's base): its own vision tower and patch merger, M-RoPE, ChatML turns.

What differs from a LIVE model, and how the engine meets it:
  frames -> tokens  frames are encoded a chunk at a time: `temporal_patch_size` frames (2) make one
                    temporal grid, and the merger turns each 2x2 block of 14-px patches into one LM token, so
                    a chunk of H x W frames is (H / 28) x (W / 28) tokens a group, in the LM's embedding space.
  positions         M-RoPE: three rows (temporal, height, width). Text advances all three by one per token;
                    a chunk's vision tokens sit at (p + t * interval, p + row, p + column) and the text after
                    them starts at p + max(rows, columns), the rule of transformers' `get_rope_index`.
  re-rotation       compacting the cache shifts every later token by the same amount in all three rows, so a
                    cached key is re-rotated by one angle per frequency, as for 1-D RoPE (model/forward/rope.py).
  template          ChatML (`<|im_start|>role\\n...<|im_end|>`), built from the tokenizer's own marker tokens.

Frames reach the tower sized as the session's CommentaryConfig says (`frame_format`): by default as the
reference sizes them, aspect ratio kept under a pixel budget (360 x 640 becomes 364 x 644: 13 x 23 = 299 LM
tokens a chunk), or squared as a LIVE model's are to S x S, S the largest multiple of 28 whose square fits
StreamingVLM's frame size (360 x 640 pixels) and the image processor's `max_pixels` (476 px, 289 tokens).
Each chunk has the grid of its own frames.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from liveserve.config import CommentaryConfig
from liveserve.frame_format import FrameFormat, stream_pixel_bounds
from liveserve.model.attention import ATTN_IMPLEMENTATION, KVStep
from liveserve.model.forward.direct_forward import DirectForward

FAMILY = "qwen2_5_vl"
NO_COMMENT = " ..."  # StreamingVLM ends every reply with it; a reply of only this is silence
# StreamingVLM's video frames are at most 360 x 640 pixels (about 300 LM tokens a chunk); the image
# processor's own max_pixels is for single images (12.8 M) and would make every chunk thousands of tokens.
STREAM_FRAME_PIXELS = 360 * 640
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what the Qwen2.5-VL chat template puts first


class QwenTemplateError(ValueError):
    """The tokenizer lacks a token the ChatML/vision template needs."""


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """ChatML pieces as token ids. Text is tokenized between special tokens only, as a whole-prompt
    tokenization would split it (special tokens are never merged with their neighbours)."""

    tokenizer: object
    im_start: int
    im_end: int
    newline: int
    vision_start: int
    vision_end: int
    video_pad: int
    no_comment: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatTemplate:
        vocab = tokenizer.get_vocab()
        ids: dict[str, int] = {}
        for name, token in (("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"), ("vision_start", "<|vision_start|>"),
                            ("vision_end", "<|vision_end|>"), ("video_pad", "<|video_pad|>")):
            if token not in vocab:
                raise QwenTemplateError(f"the tokenizer has no {token} token: not a Qwen2-VL/Qwen2.5-VL tokenizer")
            ids[name] = vocab[token]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1:
            raise QwenTemplateError(f"'\\n' must be one token, the tokenizer splits it into {newline}")
        no_comment = tuple(tokenizer(NO_COMMENT, add_special_tokens=False)["input_ids"])
        return cls(tokenizer=tokenizer, newline=newline[0], no_comment=no_comment, **ids)

    @property
    def eos_id(self) -> int:
        return self.im_end

    @property
    def interval_id(self) -> int:
        # The engine's readout reads one token's probability per row; for commentary it is the turn's end.
        return self.im_end

    def encode(self, text: str) -> list[int]:
        """Plain text (a query, a system prompt, a time label) as tokens: a marker written in it, such as
        "<|video_pad|>" or "<|im_end|>", stays text; only the template places special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def turn_open(self, role: str) -> list[int]:
        """`<|im_start|>role\\n`"""
        return [self.im_start, *self.encode(f"{role}\n")]

    def turn_close(self) -> list[int]:
        """`<|im_end|>\\n`"""
        return [self.im_end, self.newline]


@dataclass(frozen=True, slots=True)
class VisionGrid:
    """One chunk's grid in LM tokens: `t` temporal groups of `h` x `w` merged patches."""

    t: int
    h: int
    w: int

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @property
    def span(self) -> int:
        """How far the chunk moves the text positions after it (transformers' get_rope_index)."""
        return max(self.h, self.w)


class QwenVLModel(DirectForward, nn.Module):
    family = FAMILY

    def __init__(self, hf: nn.Module, tokenizer, *, image_mean, image_std, frame_size: int, name: str = "",
                 pixel_bounds: tuple[int, int] = stream_pixel_bounds(None, None)) -> None:
        """`pixel_bounds`: a smart-sized frame's (min_pixels, max_pixels) when the session sets none."""
        super().__init__()
        self.hf, self.name, self.pixel_bounds = hf, name, pixel_bounds
        self.template = ChatTemplate.from_tokenizer(tokenizer)
        self.system_prompt = DEFAULT_SYSTEM_PROMPT
        text, vision = hf.config.text_config, hf.config.vision_config
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.max_positions = text.max_position_embeddings
        self.hidden_size, self.vocab_size = text.hidden_size, text.vocab_size
        self.patch_size, self.merge = vision.patch_size, vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        self.tokens_per_second = getattr(vision, "tokens_per_second", 1)
        self.frame_size = frame_size
        self.vision = hf.model.visual
        self.register_buffer("_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._unread = None

    @property
    def device(self) -> torch.device:
        return self.hf.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.lm_head.weight.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.hf.model.language_model.rotary_emb.inv_freq

    def never_said_ids(self) -> tuple[int, ...]:
        """Tokens that are never valid output (engine/commentary/decoding.py): the vision pads and markers,
        `<|im_start|>`, and the LM head's rows past the tokenizer's vocabulary (padding)."""
        t, vocab = self.template, self.template.tokenizer.get_vocab()
        named = {t.video_pad, t.vision_start, t.vision_end, t.im_start,
                 *(vocab[token] for token in ("<|image_pad|>", "<|vision_pad|>") if token in vocab)}
        return tuple(sorted(named | set(range(len(t.tokenizer), self.vocab_size))))

    @property
    def frame_unit(self) -> int:
        """Frame sides are multiples of this (a merged patch: 28 px)."""
        return self.patch_size * self.merge

    def grid(self, num_frames: int, height: int | None = None, width: int | None = None) -> VisionGrid:
        """A chunk of `num_frames` frames of `height` x `width` px (by default the square frame size)."""
        unit = self.frame_unit
        return VisionGrid(num_frames // self.temporal_patch_size, (height or self.frame_size) // unit,
                          (width or self.frame_size) // unit)

    def frame_format(self, commentary: CommentaryConfig) -> FrameFormat:
        """How a session of CommentaryConfig `commentary` sizes its frames."""
        return commentary_frame_format(self.frame_size, self.frame_unit, self.pixel_bounds, commentary)

    def largest_chunk_tokens(self, commentary: CommentaryConfig) -> int:
        """The most vision tokens a chunk of a session of CommentaryConfig `commentary` has (what its cache
        reserves for it)."""
        groups = commentary.frames_per_chunk // self.temporal_patch_size
        return groups * (self.frame_format(commentary).largest_area // self.frame_unit ** 2)

    # ---- vision ----------------------------------------------------------------------------------------

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [F, 3, H, W] (F a multiple of temporal_patch_size, H and W of `frame_unit`) -> the
        tower's input rows [F / tp * (H / p) * (W / p), 3 * tp * p * p], normalized, in the order of Qwen's
        image processor (merge blocks together, so the merger's 2x2 groups are adjacent rows)."""
        f, c, h, w = frames.shape
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge
        if f % tp or h % self.frame_unit or w % self.frame_unit:
            raise ValueError(f"a chunk is a multiple of {tp} frames with sides multiples of {self.frame_unit} px, "
                             f"got {f} of {w}x{h}")
        x = (frames.to(self._mean.device, torch.float32) / 255.0 - self._mean) / self._std
        gh, gw = h // p, w // p
        x = x.reshape(f // tp, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, row block, col block, row in block, col in block, c, tp, p, p
        return x.reshape(f // tp * gh * gw, c * tp * p * p)

    @torch.inference_mode()
    def encode_chunk(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [F, 3, H, W] -> LM embeddings of the chunk's vision tokens [tokens, hidden]."""
        return self.encode_chunks([frames])[0]

    @torch.inference_mode()
    def encode_chunks(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several chunks (of several sessions) in one call of the tower: each attends within itself only
        (the tower's own per-grid attention), so each result equals encoding it alone."""
        grids = [self.grid(frames.shape[0], frames.shape[2], frames.shape[3]) for frames in chunks]
        patches = torch.cat([self.patchify(frames) for frames in chunks]).to(self.device, self.dtype)
        thw = torch.tensor([[g.t, g.h * self.merge, g.w * self.merge] for g in grids], device=self.device)
        out = self.vision(patches, grid_thw=thw)
        merged = getattr(out, "pooler_output", out)  # the merger's output: one row per LM token
        return list(merged.split([g.num_tokens for g in grids]))

    def temporal_interval(self, seconds_per_grid: float) -> float:
        """Temporal M-RoPE positions between a chunk's temporal groups: Qwen2.5-VL's are in time
        (tokens_per_second x the seconds a group spans), as its get_rope_index numbers them."""
        return self.tokens_per_second * seconds_per_grid

    def vision_positions(self, start: int, grid: VisionGrid, seconds_per_grid: float) -> torch.Tensor:
        """M-RoPE rows [3, tokens] of a chunk whose first position is `start` (host tensor)."""
        interval = self.temporal_interval(seconds_per_grid)
        t = (torch.arange(grid.t) * interval).long()
        rows, cols = torch.arange(grid.h), torch.arange(grid.w)
        tt, hh, ww = torch.meshgrid(t, rows, cols, indexing="ij")
        return torch.stack([tt, hh, ww]).reshape(3, -1) + start

    # ---- the LM ---------------------------------------------------------------------------------------

    def step_inputs(self, steps) -> dict[str, torch.Tensor]:
        """What a step needs on the device, planned on the host (sent with the attention indices): every id
        and each token's M-RoPE rows [3, T]."""
        return {"ids": torch.tensor([i for step in steps for i in step.ids], dtype=torch.long),
                "positions": torch.cat([step.positions for step in steps], dim=-1)}

    def embed_step(self, steps, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Every step's ids (with `<|video_pad|>` where its chunk's tokens go) as one [T, hidden] sequence:
        one embedding lookup, the vision embeddings written over the pads. `inputs`: `step_inputs(steps)`
        on the device (by default made and sent here)."""
        inputs = inputs if inputs is not None else {k: v.to(self.device) for k, v in self.step_inputs(steps).items()}
        ids = inputs["ids"]
        embeds = self.hf.get_input_embeddings()(ids)
        features = [step.features for step in steps if step.features is not None]
        if features:
            vision = torch.cat(features).to(self.device, embeds.dtype)
            embeds = embeds.masked_scatter((ids == self.template.video_pad)[:, None], vision)
        return embeds

    def decoder_and_head(self) -> tuple[nn.Module, nn.Module]:
        return self.hf.model.language_model, self.hf.lm_head

    def _unread_mask(self) -> torch.Tensor:
        if self._unread is None or self._unread.device != self.device:
            self._unread = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        return self._unread

    def forward_step(self, embeds: torch.Tensor, positions: torch.Tensor, step: KVStep,
                     logits_at: torch.Tensor) -> torch.Tensor:
        """One forward over packed new tokens [T, hidden] at M-RoPE `positions` [3, T]; fp32 logits at the
        packed indices `logits_at`."""
        run = self.step_forward()
        if run is not None:
            return run(embeds, positions, step, logits_at)
        out = self.hf.model.language_model(inputs_embeds=embeds[None], position_ids=positions[:, None],
                                           use_cache=False, kv_step=step, attention_mask=self._unread_mask())
        return self.hf.lm_head(out.last_hidden_state[0, logits_at]).float()


class FramePixels:
    """What a Perception replica does for a Qwen2.5-VL model: decode frames and size them for the tower
    (`frame_format`: a default session's, aspect ratio kept; a session that sizes its frames otherwise
    re-sizes them on its Decision replica). The tower itself runs a chunk of frames at a time, on the
    Decision replica with the LM (its frames are encoded together), so Perception sends pixels (uint8
    [3, H, W]) and loads no weights."""

    device = torch.device("cpu")
    dtype = torch.uint8

    def __init__(self, frame_size: int, name: str = "", family: str = FAMILY, unit: int = 28,
                 pixel_bounds: tuple[int, int] = stream_pixel_bounds(None, None)) -> None:
        self.frame_size, self.name, self.family = frame_size, name, family
        self.frame_format = commentary_frame_format(frame_size, unit, pixel_bounds, CommentaryConfig())

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels


def commentary_frame_format(frame_size: int, unit: int, pixel_bounds: tuple[int, int],
                            commentary: CommentaryConfig) -> FrameFormat:
    """How a commentary session sizes its frames: CommentaryConfig's `resize` and pixel bounds (where it sets
    them, else the model's `pixel_bounds`) over the model's square `frame_size` and side `unit`."""
    low, high = commentary.min_pixels or pixel_bounds[0], commentary.max_pixels or pixel_bounds[1]
    return FrameFormat(frame_size, commentary.resize, unit, low, high)


def frame_size_for(max_pixels: int, unit: int) -> int:
    """The largest multiple of `unit` whose square fits `max_pixels` (at least one unit)."""
    return max(unit, int(math.isqrt(int(max_pixels)) // unit * unit))


def _frame_size(path: Path, config: dict) -> tuple[int, dict]:
    """The square frame size of the checkpoint at `path` (from its image processor's max_pixels) and that
    processor's settings (`_pixel_bounds` reads its pixel bounds)."""
    from liveserve.model.checkpoint import CheckpointError

    processor = path / "preprocessor_config.json"
    if not processor.is_file():
        raise CheckpointError(f"{path} has no preprocessor_config.json (the image processor's mean, std and pixels)")
    image = json.loads(processor.read_text())
    vision = config.get("vision_config") or {}
    unit = vision.get("patch_size", 14) * vision.get("spatial_merge_size", 2)
    max_pixels = image.get("max_pixels") or (image.get("size") or {}).get("longest_edge") or STREAM_FRAME_PIXELS
    return frame_size_for(min(max_pixels, STREAM_FRAME_PIXELS), unit), image


def _pixel_bounds(image: dict) -> tuple[int, int]:
    """Smart-sized frames' default (min_pixels, max_pixels) for the image processor settings `image`."""
    size = image.get("size") or {}
    return stream_pixel_bounds(image.get("min_pixels") or size.get("shortest_edge"),
                               image.get("max_pixels") or size.get("longest_edge"))


def load_frame_pixels(path: Path) -> FramePixels:
    """A Perception replica's model for the Qwen2.5-VL (or Qwen2-VL) checkpoint at `path`: its frame size, no
    weights."""
    config = json.loads((path / "config.json").read_text())
    vision = config.get("vision_config") or {}
    size, image = _frame_size(path, config)
    return FramePixels(size, name=str(path), family=config.get("model_type", FAMILY),
                       unit=vision.get("patch_size", 14) * vision.get("spatial_merge_size", 2),
                       pixel_bounds=_pixel_bounds(image))


def load_qwen_vl(path: Path, device: torch.device, dtype: torch.dtype, *, frame_size: int | None = None,
                 hf_class=None, model_class: type[QwenVLModel] = QwenVLModel, what: str = "Qwen2.5-VL") -> QwenVLModel:
    """A Qwen2.5-VL checkpoint in the plain Hugging Face layout (config.json, safetensors, tokenizer,
    preprocessor_config.json): StreamingVLM's release, or Qwen2.5-VL-*-Instruct. `hf_class`, `model_class`:
    another family of the same layout (qwen2_vl.py)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from liveserve.model.checkpoint import CheckpointError, check_supported

    hf_class = hf_class or Qwen2_5_VLForConditionalGeneration

    config = json.loads((path / "config.json").read_text())
    check_supported(config.get("text_config", config), path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises several types for missing/corrupt tokenizer files
        raise CheckpointError(f"cannot load the tokenizer from {path}: {exc}") from exc
    size, image = _frame_size(path, config)
    try:
        hf = hf_class.from_pretrained(
            str(path), dtype=dtype, local_files_only=True,
            attn_implementation={"text_config": ATTN_IMPLEMENTATION, "vision_config": "sdpa", "": "sdpa"})
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the {what} model from {path}: {exc}") from exc
    vision = hf.config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    try:
        model = model_class(hf.to(device), tokenizer, image_mean=image["image_mean"], image_std=image["image_std"],
                            frame_size=frame_size or size, name=str(path), pixel_bounds=_pixel_bounds(image))
    except (QwenTemplateError, KeyError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if model.frame_size % unit:
        raise CheckpointError(f"frame_size must be a multiple of {unit} (patch {vision.patch_size} x merge "
                              f"{vision.spatial_merge_size}), got {model.frame_size}")
    return model.eval().requires_grad_(False)
