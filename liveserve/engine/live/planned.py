"""A LIVE session's unit of work: one forward's input and what kind of work it is.

`Session.plan` makes a `Planned` (the step, and what completing it needs); `Session.complete` hands the
step's readout to the one handler of its `Work` kind, owned by the part of the session that planned it:
the session itself (frames), its reply role (replies.py, external_replies.py) or its restore
(restore.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from liveserve.engine.events import Event
from liveserve.engine.inputs import QueuedFrame
from liveserve.engine.readout import Readout


class Work(Enum):
    FRAME = "frame"  # a queued frame: fed, then decided at its last token
    PROMPT = "prompt"  # an inline reply's prompt: its logits give the reply's first token
    TOKEN = "token"  # an inline reply's latest token: its logits give the next
    WRITTEN = "written"  # a reply written elsewhere, at its trigger: its prompt and tokens (logits unread)
    REPLAY = "replay"  # a tentative frame fed again after that reply, as the silent frame it was decided as
    RESTORE = "restore"  # a frame put back by `Session.restore`, silent
    RESTORED = "restored"  # a finished turn put back by `Session.restore`


@dataclass(frozen=True, slots=True)
class StepInput:
    """One session's share of a forward: text ids, then (for a frame step) the frame's vision features."""

    ids: tuple[int, ...]
    features: torch.Tensor | None  # [tokens_per_frame, vision_hidden]
    positions: torch.Tensor  # [num_tokens]: start, start + 1, ...
    start: int  # the first position, kept as a Python int so completing a step never syncs the device

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()


@dataclass(frozen=True, slots=True)
class Planned:
    work: Work
    step: StepInput
    frame: QueuedFrame | None = None  # frame kinds: the frame fed
    segment: str = ""  # prompt kinds: the ledger segment kind of the new text
    pending: int = 0  # ... how many of its leading ids close the previous segment
    pinned: bool = False  # ... whether it holds the first user instruction (kept with the sink)
    trigger: str = ""  # ... "proactive" | "query"
    held: tuple[int, ...] = ()  # WRITTEN / RESTORED: the turn's last tokens, fed by the next step


# Completes one kind of planned work with the step's readout: the events it raises.
Completion = Callable[[Planned, Readout], list[Event]]


@dataclass(frozen=True, slots=True)
class ForwardTrace:
    """One forward, recorded when `Session.trace` is a list (tests and debugging)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    kept_positions: torch.Tensor  # positions of every cached token after the forward
    logits: torch.Tensor
    ids: tuple[int, ...]  # the text tokens fed before any frame slots
    num_frame_tokens: int
