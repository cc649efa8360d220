"""The engine's contracts: what BatchEngine and the Scheduler may call on a session (`EngineSession`), and
what the engine asks of a model (`EngineModel`), whatever the family.

    family       model (liveserve/model/)   session (here)
    LIVE         LiveModel                  Session: a streaming-EOS decision per frame
    Qwen2.5-VL   QwenVLModel                CommentarySession: a turn per chunk of video

A session is driven one forward at a time: `plan` its next step (room made in its cache), one packed
forward of every planned step (packed.forward, through the model's `step_inputs` / `embed_step` /
`forward_step`), then `complete` with what the logits at its last token say (readout.py). What a family
does beyond this stays in its own session and model classes; `SplitReplies` is the one extra role the
engine forwards input to (LIVE sessions whose replies may be written by another model).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from liveserve.engine.events import Event
from liveserve.engine.inputs import QueuedFrame
from liveserve.engine.kv_pool import PagedCache
from liveserve.engine.readout import Readout


class Step(Protocol):
    """One session's share of a forward (StepInput, CommentaryStep)."""

    ids: tuple[int, ...]
    features: torch.Tensor | None
    positions: torch.Tensor  # [T], or M-RoPE rows [3, T]
    start: int

    @property
    def num_tokens(self) -> int: ...


class EngineSession(Protocol):
    session_id: str
    cache: PagedCache

    @property
    def closed(self) -> bool: ...

    @property
    def backlog(self) -> int:
        """Frames queued and not yet stepped (the replica's queue-depth metric)."""

    # ---- input (any thread) -------------------------------------------------------------------------

    def push_frame(self, timestamp: float, frame, frame_id: int | None = None) -> None: ...

    def push_query(self, timestamp: float, text: str) -> None: ...

    def flush(self) -> None:
        """The stream ended: what was pushed becomes work (a commentary session's last, partial chunk)."""

    # ---- scheduling ---------------------------------------------------------------------------------

    def drop_stale_frames(self, max_lag_s: float | None, max_queued: int) -> list[QueuedFrame]:
        """Drop the oldest queued frames of a session lagging its stream; the newest stays."""

    def ready(self) -> bool:
        """`plan` has work that can run now."""

    def has_work(self) -> bool:
        """Work is queued or in progress: ready now, or once its frames are encoded."""

    def next_step_tokens(self) -> int:
        """Tokens the next `plan` would feed (0: none): the scheduler's batch budget."""

    # ---- one step: plan -> (a packed forward) -> complete --------------------------------------------

    def plan(self) -> Step | None:
        """The next step, with room made for it; None when idle. Raises CacheFullError (nothing written)
        when it cannot fit."""

    def complete(self, readout: Readout) -> list[Event]:
        """The planned step's result -> its events."""

    def take_notices(self) -> list[Event]:
        """Events a `plan` raised without a step to carry them."""

    # ---- the end ------------------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        """Stop for good (memory back at once); later input is refused with `message`."""

    def close(self) -> None: ...


@runtime_checkable
class SplitReplies(Protocol):
    """A session whose replies may be written by another model (LIVE: Session): a Decision session takes
    the reply written elsewhere, a Reaction session the triggers it answers."""

    def push_reply(self, text: str, token_ids: Sequence[int] = ()) -> None: ...

    def push_respond(self, timestamp: float) -> None: ...


class Template(Protocol):
    """What the engine reads of a family's template."""

    @property
    def interval_id(self) -> int:
        """The token whose probability the readout reports (LIVE: ",", stay silent)."""

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class EngineModel(Protocol):
    """What the engine asks of a model: its family, the KV pool's shape, and a packed forward."""

    family: str  # names the session modes it serves (sessions.py)
    name: str
    template: Template
    system_prompt: str
    vision: torch.nn.Module | None  # the vision tower (None: frames arrive as features)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def inv_freq(self) -> torch.Tensor:
        """RoPE's frequencies: a compacted cache re-rotates its kept keys by them."""

    def step_inputs(self, steps: Sequence[Step]) -> dict[str, torch.Tensor]:
        """What the steps need on the device, planned on the host (sent in the step's one upload)."""

    def embed_step(self, steps: Sequence[Step], inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The steps' ids and vision inputs as one packed embedding sequence [T, hidden]."""

    def forward_step(self, embeds: torch.Tensor, positions: torch.Tensor, step,
                     logits_at: torch.Tensor) -> torch.Tensor:
        """The LM over packed tokens through the paged attention (`step`: a PackedStep); fp32 logits at
        `logits_at`."""

    def use_cuda_graphs(self, on: bool = True) -> None: ...
