"""A LIVE session's cache as the stream it holds: where the stream stands, what the next frame or prompt
feeds, room made for it, and what a completed step adds to the ledger.

The stream is in one of three states: nothing fed yet (NEW), inside "[..." (STREAMING) or after a reply's
eos (REPLIED); `pending` are the tokens the last step decided but did not feed (a frame's ",", a reply's
eos), fed at the front of the next step. Every part of a session (its frames, its reply role, its
restore) plans and books its steps through this one object, so the cache and ledger change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liveserve.config import SessionConfig
from liveserve.engine.inputs import QueuedFrame
from liveserve.engine.kv_pool import CacheFullError
from liveserve.engine.live.ledger import Ledger
from liveserve.engine.live.planned import Planned, StepInput, Work

NEW, STREAMING, REPLIED = "new", "streaming", "replied"  # nothing fed / inside "[..." / after a reply's eos


@dataclass(frozen=True, slots=True)
class CachePoint:
    """Where a reply written elsewhere belongs: the stream at its trigger, before any tentative frame.

    Found again from the cache's end (the tentative frames' segments, and the "," or eos + "\\n[" the first
    of them added to the trigger's segment), so evictions of older segments meanwhile do not move it."""

    state: str
    pending: tuple[int, ...]
    next_position: int
    last_length: int  # the newest segment's length (0: none yet)


class StreamCache:
    def __init__(self, model, config: SessionConfig, cache) -> None:
        self.model, self.config, self.cache = model, config, cache
        self.template = model.template
        self.system_prompt = config.system_prompt or model.system_prompt
        self._start_ids = self.template.start_ids(self.system_prompt)  # tokenized once, not per first frame
        self._frame_tokens = model.layout.num_tokens
        self.ledger = Ledger()
        self.contiguous = config.cache.positions == "contiguous"
        self.state, self.pending = NEW, []
        self.next_position = 0
        self.instruction_pinned = False

    # ---- what the next step feeds ----------------------------------------------------------------------

    def frame_ids(self) -> list[int]:
        if self.state == NEW:
            return self._start_ids
        if self.state == REPLIED:
            return self.pending + list(self.template.stream_open_ids)
        return self.pending

    def frame_step_tokens(self) -> int:
        return len(self.frame_ids()) + self._frame_tokens

    def prompt_ids(self, trigger: str, query: str | None,
                   at: CachePoint | None = None) -> tuple[list[int], str, int, bool]:
        """A reply's prompt: (ids, ledger segment kind, pending tokens it starts with, pinned), from the
        stream as it is now or, for a reply written elsewhere not yet put back, as it was `at` its trigger."""
        state, pending = (self.state, self.pending) if at is None else (at.state, list(at.pending))
        if trigger == "proactive":
            return list(self.template.stream_reply_ids), "text", 0, False
        if state == NEW:
            return self.template.first_query_ids(self.system_prompt, query), "prefix", 0, False
        pending = pending if state == REPLIED else []  # a pending "," is dropped: "]" closes
        ids = pending + self.template.query_ids(query, stream_open=state == STREAMING)
        return ids, "text", len(pending), not self.instruction_pinned

    def reply_ids(self, reply: list[int]) -> tuple[list[int], list[int]]:
        """A given reply's tokens: (fed with its prompt, left pending). It ends as an inline reply does: eos
        pending, or, at max_new_tokens, the last token with it (fed by the next step, after that step's
        evictions)."""
        eos = [self.template.eos_id]
        if len(reply) == self.config.max_new_tokens:
            return reply[:-1], reply[-1:] + eos
        return reply, eos

    # ---- planning: room, then a reservation -------------------------------------------------------------

    def plan_frame(self, frame: QueuedFrame, work: Work, protect: int = 1) -> Planned:
        """`protect`: the newest segments eviction must keep (see make_room)."""
        features = frame.vision_features(self.model)
        ids = self.frame_ids()
        self.make_room(1, protect)
        return Planned(work, self.reserve(ids, features), frame=frame)

    def plan_turn(self, trigger: str, query: str | None, reply: list[int], work: Work) -> Planned:
        """A finished turn in one step: its prompt and the reply given for it (written elsewhere, or restored)."""
        ids, segment, pending, pinned = self.prompt_ids(trigger, query)
        fed, held = self.reply_ids(reply)
        ids = ids + fed
        self.make_room(0)
        self.check_room(len(ids) + len(held))
        return Planned(work, self.reserve(ids, None), segment=segment, pending=pending, pinned=pinned,
                       trigger=trigger, held=tuple(held))

    def make_room(self, incoming_frames: int, protect: int = 1) -> None:
        """Evict what the cache policy wants gone before a step. The newest frame owes its pending ","; the
        newest turn its eos: neither can go (`protect` 1). While a reply is written elsewhere, the trigger's
        segment and the tentative frames stay too: the rollback to the trigger cuts them off again."""
        victims = self.ledger.plan_eviction(self.config.cache, incoming_frames, protect)
        if victims:
            keep = self.ledger.evict(victims)
            self.cache.keep(keep, self.model.inv_freq if self.contiguous else None)

    def check_room(self, n: int) -> None:
        start = self.cache.length if self.contiguous else self.next_position
        if start + n > self.model.max_positions:
            raise CacheFullError(f"session is at position {start}; {n} more tokens would pass the model's "
                                 f"limit of {self.model.max_positions} (use the sink_window cache policy)")
        if self.cache.length + n > self.cache.max_tokens:
            raise CacheFullError(f"cache holds {self.cache.length} tokens; {n} more would pass its limit "
                                 f"of {self.cache.max_tokens}")

    def reserve(self, ids: list[int], features: torch.Tensor | None) -> StepInput:
        n = len(ids) + (0 if features is None else features.shape[0])
        self.check_room(n)
        self.cache.reserve(n)
        start = self.cache.length if self.contiguous else self.next_position
        positions = torch.arange(start, start + n)  # on the host: sent with the step's other indices
        return StepInput(tuple(ids), features, positions, start)

    # ---- booking a completed step -----------------------------------------------------------------------

    def commit(self, step: StepInput) -> None:
        self.cache.commit(step.positions)
        self.next_position = step.start + step.num_tokens

    def book_frame(self, ids: tuple[int, ...]) -> None:
        """A fed frame: its leading ids close what came before it, then its own segment."""
        if self.state == NEW:
            self.ledger.add("prefix", len(ids))
        elif ids:
            self.ledger.extend_last(len(ids))  # "," closes the previous frame; eos + "\n[" close the turn
        self.ledger.add("frame", self._frame_tokens)
        self.state, self.pending = STREAMING, []

    def book_silent_frame(self, ids: tuple[int, ...]) -> None:
        """A frame fed again without a decision (replayed or restored): silent, as it was decided."""
        self.book_frame(ids)
        self.pending = [self.template.interval_id]

    def book_prompt(self, planned: Planned) -> None:
        if planned.pending:
            self.ledger.extend_last(planned.pending)
        self.ledger.add(planned.segment, planned.step.num_tokens - planned.pending, planned.pinned)
        self.instruction_pinned |= planned.trigger == "query"

    def book_turn(self, planned: Planned) -> None:
        """A turn from `plan_turn` is in the cache: it ends as an inline reply's would."""
        self.book_prompt(planned)
        self.end_reply(list(planned.held))

    def end_reply(self, pending: list[int]) -> None:
        self.state, self.pending = REPLIED, pending

    # ---- a reply written elsewhere goes back to its trigger --------------------------------------------

    def point(self) -> CachePoint:
        last_length = self.ledger.segments[-1].length if self.ledger.segments else 0
        return CachePoint(self.state, tuple(self.pending), self.next_position, last_length)

    def roll_back(self, point: CachePoint, frames: int) -> None:
        """Cut the `frames` decided since `point` off the cache and return to it."""
        # Each of them added a segment; before any frame the first one also opened the prefix. The segment
        # before them loses the first one's leading ids again.
        added = frames + (point.state == NEW)
        self.ledger.roll_back(len(self.ledger.segments) - added, point.last_length)
        self.cache.truncate(self.ledger.num_tokens)
        self.state, self.pending, self.next_position = point.state, list(point.pending), point.next_position
