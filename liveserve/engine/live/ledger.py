"""Which cached tokens belong to which part of the stream, and what a cache policy evicts.

The cache is a sequence of whole segments, in cache order:
  prefix  bos + system prompt (+ a first query): the attention sink, never evicted
  frame   10 <v> tokens plus the "," that joins the frame to the next one
  text    a user or assistant turn, e.g. "]\\nUser: q\\nAssistant: a<eos>\\n[" (framing included)
Eviction removes whole segments only, so no frame is split and the framing of what stays is intact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liveserve.config import CacheConfig


@dataclass(slots=True)
class Segment:
    kind: str  # "prefix" | "frame" | "text"
    length: int
    pinned: bool = False  # the first user instruction stays with the sink


class Ledger:
    """The segments, and running totals of what the cache policy checks every step (frames held, unpinned
    text tokens), so the common step that evicts nothing decides that without a scan. Change it through
    its methods only: they keep the totals."""

    def __init__(self, segments: list[Segment] | None = None) -> None:
        self.segments: list[Segment] = list(segments or [])
        self._recount()

    def _recount(self) -> None:
        self.num_tokens = sum(s.length for s in self.segments)
        self.frames = sum(1 for s in self.segments if s.kind == "frame")
        self.free_text_tokens = sum(s.length for s in self.segments if s.kind == "text" and not s.pinned)

    def add(self, kind: str, length: int, pinned: bool = False) -> None:
        if length:
            self.segments.append(Segment(kind, length, pinned))
            self.num_tokens += length
            self.frames += kind == "frame"
            self.free_text_tokens += length if kind == "text" and not pinned else 0

    def extend_last(self, length: int) -> None:
        last = self.segments[-1]
        last.length += length
        self.num_tokens += length
        self.free_text_tokens += length if last.kind == "text" and not last.pinned else 0

    def roll_back(self, count: int, last_length: int) -> None:
        """Keep the first `count` segments, the last of them `last_length` tokens long again."""
        del self.segments[count:]
        if self.segments:
            self.segments[-1].length = last_length
        self._recount()

    def count(self, kind: str) -> int:
        return sum(1 for s in self.segments if s.kind == kind)

    def plan_eviction(self, config: CacheConfig, incoming_frames: int, protect: int = 0) -> list[int] | None:
        """Segment indices to evict so the kept frames (with `incoming_frames` more) and text fit the
        window, or None when nothing needs to go. Frames go `evict_frames` at a time (oldest first);
        text goes oldest turn first but the newest turn always stays. The newest `protect` segments stay
        too: victims are chosen among older ones only, even if that is fewer than the window wants."""
        if config.policy != "sink_window":
            return None
        if self.frames + incoming_frames <= config.window_frames and self.free_text_tokens <= config.text_window_tokens:
            return None  # what the scan below would find, without it: the common step
        victims: list[int] = []
        older = len(self.segments) - protect  # segments before this index may go
        frames = [i for i, s in enumerate(self.segments) if s.kind == "frame"]
        if len(frames) + incoming_frames > config.window_frames:
            excess = len(frames) + incoming_frames - config.window_frames
            victims += [i for i in frames[: max(excess, config.evict_frames)] if i < older]
        texts = [i for i, s in enumerate(self.segments) if s.kind == "text" and not s.pinned]
        text_tokens = sum(self.segments[i].length for i in texts)
        for i in texts[:-1]:
            if text_tokens <= config.text_window_tokens or i >= older:
                break
            victims.append(i)
            text_tokens -= self.segments[i].length
        return sorted(victims) or None

    def evict(self, victims: list[int]) -> torch.Tensor:
        """Drop the victim segments; return the cache indices of the kept tokens, ascending."""
        drop = set(victims)
        keep, start = [], 0
        for i, seg in enumerate(self.segments):
            if i not in drop:
                keep.append(torch.arange(start, start + seg.length))
            start += seg.length
        self.segments = [s for i, s in enumerate(self.segments) if i not in drop]
        self._recount()
        return torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)
