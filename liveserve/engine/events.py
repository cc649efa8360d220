"""What a session reports: one decision per frame, and streamed responses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FrameDecision:
    """The streaming-EOS decision at a frame's last token.

    p_silent is P(interval token); the session stays silent when p_silent >= threshold and the
    interval token then wins the argmax. `action` is "silent", "respond", or "query" when a user
    query at this frame's time pre-empts the decision (as in the reference). `token_id` is the
    argmax after thresholding; any non-interval argmax fires, even if it is not the respond token.
    "suppressed": the argmax says respond, but a reply written elsewhere is still awaited
    (replies="external"), so the frame does not fire (`fired` is False); once the reply lands the
    frame is replayed after it as a silent frame.
    `frame_index` is the frame's id: the caller's, or by default how many frames were pushed before it.
    """

    timestamp: float
    frame_index: int
    p_silent: float
    fired: bool
    action: str
    token_id: int
    lag_s: float  # decision time minus the frame's arrival, wall clock
    cache_tokens: int


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    timestamp: float  # stream time of the trigger (frame or query)
    trigger: str  # "proactive" | "query"
    query: str | None


@dataclass(frozen=True, slots=True)
class ReplyRequested:
    """A Decision session (replies="external") fired or met a query: another model should write the reply
    and hand it back with `push_reply`. Until then the session keeps deciding frames but does not fire;
    the reply is then put in the cache right after the trigger, and those frames after it."""

    timestamp: float
    trigger: str  # "proactive" | "query"
    query: str | None
    frame_index: int  # id of the last frame decided at the trigger; -1 before any


@dataclass(frozen=True, slots=True)
class ResponseDelta:
    timestamp: float
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ResponseDone:
    timestamp: float
    trigger: str
    query: str | None
    text: str
    num_tokens: int
    finish_reason: str  # "eos" | "length"
    ttft_s: float  # trigger to first token, wall clock
    duration_s: float
    token_ids: tuple[int, ...] = ()  # the reply's tokens, without the eos that ended it


@dataclass(frozen=True, slots=True)
class ChunkDone:
    """Commentary mode: one chunk of video was watched and answered. `text` is what the model said about
    it, without the no-comment marker ("" when it stayed silent); the text was streamed as ResponseDeltas
    between a ResponseStarted and a ResponseDone."""

    start_s: float
    end_s: float
    frame_ids: tuple[int, ...]
    timestamps: tuple[float, ...]  # parallel to frame_ids
    text: str
    silent: bool
    num_tokens: int
    lag_s: float  # the chunk's last token generated, minus its last frame's arrival (wall clock)
    cache_tokens: int


@dataclass(frozen=True, slots=True)
class FramesDropped:
    """The session fell behind its stream: these queued frames were skipped to catch up (newest kept)."""

    timestamps: tuple[float, ...]
    frame_ids: tuple[int, ...]  # parallel to timestamps
    reason: str


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The session cannot go on (e.g. its cache is full under the `full` policy); it takes no more input.
    Its neighbours are unaffected."""

    code: str  # "cache_full" | "internal"
    message: str


Event = (FrameDecision | ResponseStarted | ReplyRequested | ResponseDelta | ResponseDone | ChunkDone | FramesDropped
         | SessionFailed)
