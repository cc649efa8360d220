"""What a client keeps so that a broken connection loses nothing: the inputs the session has not settled,
and the translation between the client's own frame numbers and each call's.

The server numbers the frames of a call in the order they arrive, from SessionOpened.next_frame_index
(refused frames counted), so the k-th frame written on a call has index next_frame_index + k. Every frame
stays in the outbox until its Decision, or a Warning naming it (refused, dropped or lost: no Decision will
come), settles it; a query is settled once a frame sent after it is (the server takes inputs in order),
Close once the stream ends OK. After a reconnection whatever is unsettled is written again, in order, and
the caller sees every frame under its own number, from 0, whichever call carried it: one Decision each.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from liveserve.api.v1 import live_stream_pb2 as pb


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    """How a stream whose connection broke (UNAVAILABLE: the network, or a Gateway stopping) goes on.

    Waits double from `first_delay_s` up to `max_delay_s` (each shortened by up to `jitter` of itself, so
    the clients of a stopping Gateway do not all come back at once); `attempts` reconnections in a row may
    fail before the stream ends with the last status (0: never reconnect). The session is resumed with its
    token; when the server can no longer resume it (it closed the session, or keeps no session records),
    `new_session` opens a fresh one and the unsettled inputs go there instead."""

    attempts: int = 8
    first_delay_s: float = 0.05
    max_delay_s: float = 2.0
    jitter: float = 0.2
    new_session: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"resume attempts must be >= 0, got {self.attempts!r}")
        if not 0 < self.first_delay_s <= self.max_delay_s:
            raise ValueError(f"resume delays must satisfy 0 < first_delay_s <= max_delay_s, got "
                             f"{self.first_delay_s!r} and {self.max_delay_s!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"resume jitter must be in [0, 1), got {self.jitter!r}")

    def delay_s(self, attempt: int) -> float:
        """The wait before attempt number `attempt` (1-based)."""
        full = min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))
        return full * (1 - self.jitter * random.random())


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The stream's connection broke and it went on: in the same session (`resumed`, with its token) or,
    where that was no longer possible, in a new one (`session_id` is then the new session's)."""

    session_id: str
    resumed: bool
    attempts: int  # calls it took, the successful one included
    took_s: float  # from the break to the new SessionOpened
    resent: int  # inputs (frames, queries, Close) written again, none of them settled before the break
    reason: str  # the status that ended the broken call, e.g. "UNAVAILABLE: the server is shutting down"


@dataclass(slots=True)
class SentInput:
    message: pb.ClientMessage
    sequence: int  # its place among everything the client sent
    frame: int | None  # the client's number for a frame (0-based, every frame sent); None: a query or Close


class Outbox:
    def __init__(self) -> None:
        self._unsettled: dict[int, SentInput] = {}  # by sequence number: insertion order is send order
        self._next_sequence = 0
        self._next_frame = 0
        self._base = 0  # SessionOpened.next_frame_index of the current call
        self._written_frames: list[SentInput] = []  # the current call's frames, in the order written
        self.resent = 0  # inputs written again after reconnections, in all

    def __len__(self) -> int:
        return len(self._unsettled)

    @property
    def frames_sent(self) -> int:
        return self._next_frame

    def add(self, message: pb.ClientMessage) -> SentInput:
        item = SentInput(message, self._next_sequence, None)
        if message.HasField("frame"):
            item.frame, self._next_frame = self._next_frame, self._next_frame + 1
        self._unsettled[item.sequence] = item
        self._next_sequence += 1
        return item

    def start_call(self, next_frame_index: int, *, again: bool) -> list[SentInput]:
        """A call opened with `next_frame_index`: what it must carry first (every unsettled input, in order).
        `again`: a reconnection, so those count as resent."""
        self._base, self._written_frames = next_frame_index, []
        pending = list(self._unsettled.values())
        if again:
            self.resent += len(pending)
        return pending

    def written(self, item: SentInput) -> None:
        """`item` goes out on the current call now (so its frame gets the call's next index)."""
        if item.frame is not None:
            self._written_frames.append(item)

    def settle_close(self) -> None:
        """The stream ended OK: everything was taken, Close included."""
        self._unsettled.clear()

    def translate(self, message: pb.ServerMessage) -> pb.ServerMessage | None:
        """`message` with its frame indexes in the client's numbering, settling what it answers; None for a
        Decision of no unsettled frame (a duplicate, or a frame the client never sent)."""
        kind = message.WhichOneof("kind")
        if kind == "decision":
            frame = self._settle(message.decision.frame_index)
            if frame is None:
                return None
            translated = pb.ServerMessage()
            translated.CopyFrom(message)
            translated.decision.frame_index = frame
            return translated
        if kind == "warning" and message.warning.frame_indexes:
            warning = message.warning  # frame_indexes and timestamps are parallel
            named = [(self._settle(index), t) for index, t in zip(warning.frame_indexes, warning.timestamps)]
            named = [(frame, t) for frame, t in named if frame is not None]
            translated = pb.ServerMessage()
            translated.CopyFrom(message)
            del translated.warning.frame_indexes[:], translated.warning.timestamps[:]
            translated.warning.frame_indexes.extend(frame for frame, _ in named)
            translated.warning.timestamps.extend(t for _, t in named)
            return translated
        return message

    def _settle(self, index: int) -> int | None:
        """Settle the current call's frame `index` (and the queries sent before it); its client number."""
        offset = index - self._base
        if not 0 <= offset < len(self._written_frames):
            return None
        item = self._written_frames[offset]
        if self._unsettled.pop(item.sequence, None) is None:
            return None  # settled already
        for earlier in [s for s, other in self._unsettled.items() if s < item.sequence and other.frame is None]:
            del self._unsettled[earlier]  # a query the server took before this frame (Close comes last)
        return item.frame
