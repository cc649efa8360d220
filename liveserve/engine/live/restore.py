"""Restore after a move: a LIVE session rebuilt from what survived its old replica (it died or drained).

The frames it saw last (as features) and its turns, in stream order, are fed before any new input and
without decisions: frames as the silent frames they were decided as, turns as the exchanges they were.
An AwaitedReply (last, at most one) leaves a Decision session waiting for that reply as if it had just
asked for it; the reply may be handed in (push_reply) before the restore has reached it, and is kept for
it then.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Sequence

from liveserve.config import SessionConfig
from liveserve.engine.events import Event
from liveserve.engine.live.external_replies import ExternalReplies
from liveserve.engine.inputs import (AwaitedReply, QueuedFrame, Restored, RestoredFrame, RestoredTurn, SessionError,
                                     as_frame, check_frame_id, check_time)
from liveserve.engine.live.planned import Completion, Planned, Work
from liveserve.engine.readout import Readout
from liveserve.engine.live.inputs import SessionInputs
from liveserve.engine.live.stream_cache import NEW, StreamCache


class Restore:
    def __init__(self, model, config: SessionConfig, stream: StreamCache, inputs: SessionInputs,
                 awaits: ExternalReplies | None) -> None:
        """`awaits`: the session's role when its replies are written elsewhere, the only kind that can be
        left waiting for one (other sessions skip an AwaitedReply)."""
        self.model, self.config, self.stream, self.inputs = model, config, stream, inputs
        self._awaits = awaits
        self._lock = inputs.lock
        self.queue: deque[QueuedFrame | RestoredTurn | AwaitedReply] = deque()
        self._early_reply: list[int] | None = None  # push_reply's ids for an AwaitedReply not yet restored
        self.frames_restored = 0

    def restore(self, items: Sequence[Restored]) -> int | None:
        """Validate and queue `items` (see Session.restore); returns the last restored frame's id (None:
        no frame), which new frames follow."""
        queued: list[QueuedFrame | RestoredTurn | AwaitedReply] = []
        last_time, last_id, seen_frame = -float("inf"), -1, False
        for index, item in enumerate(items):
            if isinstance(item, RestoredFrame):
                timestamp = check_time(item.timestamp, "restored frame")
                if timestamp < last_time:
                    raise SessionError("restored frames must be in stream order")
                frame = as_frame(self.model, timestamp, item.features, None)
                queued.append(replace(frame, frame_id=check_frame_id(item.frame_id)))
                last_time, last_id, seen_frame = timestamp, item.frame_id, True
            elif isinstance(item, AwaitedReply):
                if index != len(items) - 1:
                    raise SessionError("an awaited reply can only be the last restored item")
                if self._awaits is not None and (seen_frame or item.query is not None):
                    queued.append(item)
            elif isinstance(item, RestoredTurn):
                if any(not 0 <= token < self.model.vocab_size for token in item.token_ids):
                    raise SessionError(f"restored token ids must be in [0, {self.model.vocab_size})")
                if item.reply and (seen_frame or item.query is not None):
                    queued.append(item)
            else:
                raise SessionError(f"cannot restore a {type(item).__name__}")
        with self._lock:
            self.inputs.check_open()
            if not self.inputs.empty or self.stream.state != NEW or self.queue:
                raise SessionError("a session can only be restored before any other input")
            self.queue.extend(queued)
            if seen_frame:
                self.inputs.resume_after(last_time, last_id)
        return last_id if seen_frame else None

    @property
    def awaits_reply(self) -> bool:
        """An AwaitedReply is still to be restored."""
        return bool(self.queue) and isinstance(self.queue[-1], AwaitedReply)

    def keep_early_reply(self, ids: list[int]) -> bool:
        """push_reply's tokens, when they beat the restore of their trigger (the engine may be writing a
        restored turn, or taking the awaited reply itself): kept for it (the caller holds the lock)."""
        if self.awaits_reply and self._early_reply is None:
            self._early_reply = ids
            return True
        return False

    # ---- steps ----------------------------------------------------------------------------------------

    def completions(self) -> dict[Work, Completion]:
        return {Work.RESTORE: self._complete_frame, Work.RESTORED: self._complete_turn}

    def plan(self) -> Planned | None:
        """The next restored item's step; None when only an awaited reply was left (it is awaited now, and
        the session's own work goes next)."""
        while self.queue:
            item = self.queue[0]
            if isinstance(item, QueuedFrame):
                return self.stream.plan_frame(self.queue.popleft(), Work.RESTORE)
            if isinstance(item, RestoredTurn):
                self.queue.popleft()
                return self.stream.plan_turn(item.trigger, item.query, self._turn_ids(item), Work.RESTORED)
            # The awaited reply leaves the queue only once it is awaited, and takes what push_reply (another
            # thread) kept for it meanwhile: a reply refused here would leave the frames held for good.
            self._awaits.await_reply(item.trigger, item.timestamp, item.query)
            with self._lock:
                self.queue.popleft()
                early, self._early_reply = self._early_reply, None
                if early is not None:  # it is here already: it goes in next, at the point just remembered
                    self._awaits.give(early)
        return None

    def step_tokens(self) -> int:
        with self._lock:
            item = self.queue[0] if self.queue else None
        if item is None:
            return 0
        if isinstance(item, RestoredTurn):
            return len(self.stream.prompt_ids(item.trigger, item.query)[0]) + len(self._turn_ids(item)) + 1
        if isinstance(item, AwaitedReply):
            return 1  # no forward of its own; the frame after it is planned in the same step
        return self.stream.frame_step_tokens()

    def _turn_ids(self, turn: RestoredTurn) -> list[int]:
        ids = list(turn.token_ids) or self.stream.template.encode(turn.reply)
        return [int(token) for token in ids[: self.config.max_new_tokens]]

    def _complete_frame(self, planned: Planned, readout: Readout) -> list[Event]:
        self.stream.book_silent_frame(planned.step.ids)
        self.frames_restored += 1
        return []

    def _complete_turn(self, planned: Planned, readout: Readout) -> list[Event]:
        self.stream.book_turn(planned)  # counted as a response where it was given
        return []
