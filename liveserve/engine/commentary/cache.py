"""A commentary session's cache as pieces, and StreamingVLM's windows over them.

The cache is a list of `Piece`s in cache order. Before each chunk's turn, the pieces older than the windows
go, as StreamingVLM's own loop deletes them: a turn's frames (with `<|vision_start|>` and `<|vision_end|>`)
once `vision_window_chunks` newer chunks exist, its reply (with the newline closing it) and its `Time=`
label once `text_rounds` newer ones do, the rest of its user turn once both have. The reply's words
(without framing or marker) move into the previous-text block rather than being dropped, and that block
is trimmed to its first `text_sink_tokens` and last `text_window_tokens`. The
result is one `keep` of the cache: kept tokens in their new order, with contiguous positions recomputed
as transformers' `get_rope_index` would over the kept tokens (text one per token, a chunk
max(rows, columns)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liveserve.config import CommentaryConfig
from liveserve.model.qwen_vl import VisionGrid


@dataclass(slots=True)
class Piece:
    """A run of cached tokens with one role. kinds: "system" (system turn and the previous-text opening:
    the sink), "previous" (older replies' words), "previous_end", and per chunk "turn" (`<|im_start|>user\n`),
    "time" (its `Time=` label), "vision_start", "vision", "vision_end", "turn_end" (its query, to the
    assistant's opening) and "reply" (the reply's tokens and the newline after its `<|im_end|>`; its first
    `content` are its words; "reply_end": a reply's last tokens fed after the reply itself left)."""

    kind: str
    ids: list[int]
    chunk: int = -1
    grid: VisionGrid | None = None
    content: int = 0

    def row0(self, start: int, interval: float) -> torch.Tensor:
        """The temporal M-RoPE row of the piece's tokens when it starts at `start` (the row the cache keeps:
        every row shifts alike when the cache is compacted); `interval`: positions per temporal group."""
        if self.grid is None:
            return torch.arange(start, start + len(self.ids))
        groups = (torch.arange(self.grid.t) * interval).long()
        return start + groups.repeat_interleave(self.grid.h * self.grid.w)

    @property
    def span(self) -> int:
        return len(self.ids) if self.grid is None else self.grid.span


TEXT_KINDS = ("time", "reply", "reply_end")  # a chunk's pieces that leave with its reply
VISION_KINDS = ("vision_start", "vision", "vision_end")  # ... with its frames
FRAMING_KINDS = ("turn", "turn_end")  # ... once both have left


def apply_windows(pieces: list[Piece], cfg: CommentaryConfig) -> tuple[list[Piece], torch.Tensor] | None:
    """The pieces the windows keep and the cache indices of their tokens in their new order; None when
    nothing goes. Planned a piece at a time (runs of cache indices as ranges): a cache of thousands of
    tokens costs a few dozen small tensors per chunk, not a Python list per token."""
    chunks = sorted({piece.chunk for piece in pieces if piece.chunk >= 0})  # the turns, oldest first
    reply_gone = set(chunks[: max(0, len(chunks) - cfg.text_rounds + 1)])  # text_rounds newer ones exist
    vision_gone = set(chunks[: max(0, len(chunks) - cfg.vision_window_chunks + 1)])
    kept: list[tuple[Piece, int]] = []  # (piece, its first cache index)
    moved: list[tuple[Piece, int]] = []  # replies leaving: their words go to the previous text
    start = 0
    for piece in pieces:
        text_gone, frames_gone = piece.chunk in reply_gone, piece.chunk in vision_gone
        if piece.kind in ("reply", "reply_end") and text_gone:
            moved.append((piece, start))
        elif not (piece.kind in TEXT_KINDS and text_gone or piece.kind in VISION_KINDS and frames_gone
                  or piece.kind in FRAMING_KINDS and text_gone and frames_gone):
            kept.append((piece, start))
        start += len(piece.ids)
    previous = next((piece for piece, _ in kept if piece.kind == "previous"), None)
    limit = cfg.text_sink_tokens + cfg.text_window_tokens
    if len(kept) == len(pieces) and (previous is None or len(previous.ids) <= limit):
        return None
    new_pieces, runs = [], []
    for piece, start in kept:
        index = torch.arange(start, start + len(piece.ids))
        if piece.kind == "previous":
            words = [(reply, first, min(reply.content, len(reply.ids))) for reply, first in moved]
            index = torch.cat([index, *(torch.arange(first, first + n) for _, first, n in words)])
            ids = piece.ids + [i for reply, _, n in words for i in reply.ids[:n]]
            if len(ids) > limit:  # its first text_sink_tokens and last text_window_tokens
                tail = len(ids) - cfg.text_window_tokens
                ids = ids[: cfg.text_sink_tokens] + ids[tail:]
                index = torch.cat([index[: cfg.text_sink_tokens], index[tail:]])
            piece = Piece("previous", ids)
        new_pieces.append(piece)
        runs.append(index)
    return new_pieces, torch.cat(runs)


def contiguous_rows(pieces: list[Piece], interval: float) -> tuple[torch.Tensor, int]:
    """Every kept token's temporal M-RoPE row, numbered from 0 as `get_rope_index` numbers a sequence, and
    the position after them. `interval`: positions per temporal group of a chunk."""
    rows, position = [], 0
    for piece in pieces:
        rows.append(piece.row0(position, interval))
        position += piece.span
    return torch.cat(rows), position


def turn_positions(model, grid: VisionGrid, seconds_per_grid: float, ids: list[int], start: int) -> torch.Tensor:
    """M-RoPE rows [3, n] of a turn's ids starting at `start`: text one per token, the chunk's pads (the
    first <|video_pad|> on) by their grid."""
    first = ids.index(model.template.video_pad)
    before = torch.arange(start, start + first).expand(3, first)
    vision = model.vision_positions(start + first, grid, seconds_per_grid)
    after_start = start + first + grid.span
    rest = len(ids) - first - grid.num_tokens
    after = torch.arange(after_start, after_start + rest).expand(3, rest)
    return torch.cat([before, vision, after], dim=1)
