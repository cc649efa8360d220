"""Decision sessions (replies="external"): another model writes the replies, and this session puts each one
back in its cache where an inline reply would have been.

The model was trained with a reply right after its trigger frame, so the cache is kept in that order: a
trigger (reported as ReplyRequested) remembers the cache point there, and the frames decided meanwhile
("tentative" frames, at most half the window) are cut off again when the reply lands (push_reply), the
reply is appended at the trigger, and the tentative frames are replayed after it, one frame step each.
The cache then holds what an inline session's would, had it stayed silent on those frames: exactly,
unless a sink_window cache had to evict frames older than the trigger during the wait (the reply then
sees fewer of them than an inline reply did). Queries that arrive meanwhile wait for the reply.

The fields another thread touches (push_reply) change under the session's lock (`inputs.lock`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from liveserve.config import SessionConfig
from liveserve.engine.events import Event, ReplyRequested
from liveserve.engine.inputs import QueuedFrame, QueuedQuery, SessionError
from liveserve.engine.live.planned import Completion, Planned, Work
from liveserve.engine.readout import Readout
from liveserve.engine.live.replies import Replies, Reply
from liveserve.engine.live.inputs import SessionInputs
from liveserve.engine.live.stream_cache import STREAMING, CachePoint, StreamCache


class ExternalReplies(Replies):
    def __init__(self, stream: StreamCache, inputs: SessionInputs, config: SessionConfig) -> None:
        super().__init__(stream, inputs, config)
        self._lock = inputs.lock
        self.awaited: Reply | None = None  # the trigger whose reply is being written elsewhere
        self.written: list[int] | None = None  # ... that reply's tokens, once handed back
        self._point: CachePoint | None = None  # ... where it goes in the cache
        self.tentative: list[QueuedFrame] = []  # frames decided since the trigger, with their features
        self.replay: deque[QueuedFrame] = deque()  # tentative frames still to be fed after the reply
        self._max_tentative = max(1, config.cache.window_frames // 2)

    # ---- a trigger asks for the reply --------------------------------------------------------------

    def trigger(self, trigger: str, timestamp: float, query: str | None, frame_id: int) -> list[Event]:
        self.await_reply(trigger, timestamp, query)
        return [ReplyRequested(timestamp, trigger, query, frame_id)]

    def await_reply(self, trigger: str, timestamp: float, query: str | None) -> None:
        """Remember where the reply written elsewhere goes: here, at the trigger."""
        point = self.stream.point()
        with self._lock:
            self.awaited, self._point = Reply(trigger, timestamp, query, time.monotonic()), point
        if self.stream.state == STREAMING:
            self.stream.pending = [self.stream.template.interval_id]  # frames stay ","-separated meanwhile

    @property
    def awaiting(self) -> bool:
        return self.awaited is not None

    def take(self, ids: list[int]) -> None:
        if self.awaited is None or self.written is not None:
            raise SessionError("no reply was requested")
        self.give(ids)

    def give(self, ids: list[int]) -> None:
        """The awaited reply's tokens (the caller holds the lock). None (empty) means it failed: nothing is
        appended, the tentative frames stay as they are (as if the trigger had been silent)."""
        if ids:
            self.written = ids
        else:
            self.awaited, self._point, self.tentative = None, None, []

    # ---- meanwhile -----------------------------------------------------------------------------------

    def next_input(self) -> QueuedFrame | QueuedQuery | None:
        # Queries wait for the reply; frames go on, up to half the window: the tentative frames cannot be
        # evicted (the reply goes back before them), and each is computed again after the reply.
        return self.inputs.next_item(self.awaited is not None, len(self.tentative) < self._max_tentative)

    def protect(self) -> int:
        return 1 + len(self.tentative)  # the trigger's segment and the tentative frames: cut off again later

    def hold(self, frame: QueuedFrame, features) -> bool:
        if self.awaited is None:
            return False
        self.tentative.append(replace(frame, pixels=None, features=features))  # encoded once, replayed later
        return True

    @property
    def holding_frames(self) -> bool:
        return self.awaited is not None and len(self.tentative) >= self._max_tentative

    # ---- the reply lands ---------------------------------------------------------------------------

    def completions(self) -> dict[Work, Completion]:
        return {Work.WRITTEN: self._complete_written, Work.REPLAY: self._complete_replay}

    def plan(self) -> Planned | None:
        if self.written is not None:
            if self._point is not None:  # not yet rolled back (a retry after CacheFullError finds it done)
                self._roll_back()
            awaited = self.awaited
            return self.stream.plan_turn(awaited.trigger, awaited.query, self.written, Work.WRITTEN)
        if self.replay:
            return self.stream.plan_frame(self.replay.popleft(), Work.REPLAY)
        return None

    def has_step(self) -> bool:
        if self.replay:
            return True
        with self._lock:
            return self.written is not None

    def step_tokens(self) -> int:
        with self._lock:
            if self.written is not None:
                prompt = self.stream.prompt_ids(self.awaited.trigger, self.awaited.query, self._point)[0]
                return len(prompt) + len(self.stream.reply_ids(self.written)[0])
            replaying = bool(self.replay)
        return self.stream.frame_step_tokens() if replaying else 0

    def _roll_back(self) -> None:
        """Return to the trigger's cache point, so the reply lands right after its trigger; the tentative
        frames cut off go to the replay queue."""
        self.stream.roll_back(self._point, len(self.tentative))
        with self._lock:
            self.replay.extend(self.tentative)
            self.tentative, self._point = [], None

    def _complete_written(self, planned: Planned, readout: Readout) -> list[Event]:
        self.stream.book_turn(planned)
        with self._lock:
            self.awaited = self.written = None
        self.responses += 1
        return []

    def _complete_replay(self, planned: Planned, readout: Readout) -> list[Event]:
        """Fed as the silent frame it was decided as (an inline session would have decided it with the
        reply in view; here it was decided without)."""
        self.stream.book_silent_frame(planned.step.ids)
        self.frames_replayed += 1
        return []
