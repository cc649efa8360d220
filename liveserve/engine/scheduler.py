"""Which sessions run in the next engine step.

Fair: each ready session gets at most one step per engine step (its next step needs this step's
logits), least recently served first, within a budget of new tokens per step (and, optionally, a cap on
sessions), so a session waits at most about ceil(ready tokens / budget) steps. The budget, not a session
count, bounds a step's cost: frame steps are 11 tokens, a reply prompt can be hundreds. A session that
does not fit the budget is skipped for smaller ones, but it only grows older, reaches the front, and the
front session is always taken, so nothing starves.

Real-time: before picking, a session whose queued frames fall too far behind its stream drops its
oldest queued frames (reported as FramesDropped) instead of building an ever-growing backlog.
"""

from __future__ import annotations

from dataclasses import dataclass

from liveserve.config import SchedulerConfig
from liveserve.engine.events import FramesDropped
from liveserve.engine.contracts import EngineSession


@dataclass(frozen=True, slots=True)
class Schedule:
    sessions: list[EngineSession]
    dropped: list[tuple[str, FramesDropped]]
    tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._last_served: dict[str, int] = {}
        self._step = 0

    def forget(self, session_id: str) -> None:
        self._last_served.pop(session_id, None)

    def schedule(self, sessions: list[EngineSession]) -> Schedule:
        """`sessions` in admission order (the tie-break among equally served sessions)."""
        config = self.config
        self._step += 1
        dropped = []
        for session in sessions:
            stale = session.drop_stale_frames(config.max_lag_s, config.max_queued_frames)
            if stale:
                reason = (f"{len(stale)} frame(s) dropped: the session was more than "
                          f"{config.max_lag_s}s or {config.max_queued_frames} frames behind its stream")
                dropped.append((session.session_id, FramesDropped(tuple(f.timestamp for f in stale),
                                                                  tuple(f.frame_id for f in stale), reason)))
        ready = sorted((s for s in sessions if s.ready()), key=lambda s: self._last_served.get(s.session_id, 0))
        batch, tokens = [], 0
        for session in ready:
            if config.max_batch_sessions is not None and len(batch) == config.max_batch_sessions:
                break
            cost = session.next_step_tokens()
            if batch and tokens + cost > config.max_batch_tokens:
                continue
            batch.append(session)
            tokens += cost
            self._last_served[session.session_id] = self._step
        return Schedule(batch, dropped, tokens)
