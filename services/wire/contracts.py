"""The messages at the seams between the Gateway and the Perception, Decision and Reaction services.

Frozen dataclasses, the same in both transports: in one process they are handed over as they are; on
Ray they travel as the internal protobuf contracts (protos/liveserve/internal/v2), whose messages have
these classes' names and fields, so codec.py converts most of them by name. Events carry the public
API's names (docs/architecture.md, "Event names"). A gateway batches: one EncodeRequest per tick, one
DecisionPush / ReactionPush per tick and replica, and one stream of event batches per replica. Frame
features stay tensors in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch

from liveserve.config import SessionConfig
from liveserve.engine.inputs import AwaitedReply

# The W3C traceparent/tracestate of the span a message belongs to, as (key, value) pairs; empty: untraced.
Trace = tuple[tuple[str, str], ...]
NO_TRACE: Trace = ()


class Action(StrEnum):
    SILENT = "silent"
    RESPOND = "respond"
    QUERY = "query"  # a query at the frame's time pre-empted the decision
    SUPPRESSED = "suppressed"  # it would have fired, but a reply is still being written


class Trigger(StrEnum):
    PROACTIVE = "proactive"
    QUERY = "query"
    COMMENTARY = "commentary"  # a chunk's turn in commentary mode (written by Decision itself)


# ---- opening a session (Decision and Reaction) ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Restore:
    """What survived of a session whose Decision replica died or drains, besides its turns (the new owner
    reads those from the registry): the decided frames its gateway kept, and the reply in flight."""

    frames: tuple[FrameFeatures, ...]
    awaited: AwaitedReply | None = None


@dataclass(frozen=True, slots=True)
class OpenSession:
    session_id: str
    gateway_id: str  # the gateway whose event stream carries this session's events
    config: SessionConfig  # resolved and validated by the gateway
    restore: Restore | None = None  # set: rebuild the session here (Decision only)


@dataclass(frozen=True, slots=True)
class Limits:
    max_query_tokens: int
    max_new_tokens: int
    max_lag_s: float
    tokens_per_frame: int


@dataclass(frozen=True, slots=True)
class SessionPlaced:
    session_id: str
    replica: str  # later calls for the session go to this replica only
    epoch: int  # fencing epoch: commands carry it, a replica refuses one it does not hold
    limits: Limits
    restored_turns: int = 0  # a restored session: the turns put back from the registry


@dataclass(frozen=True, slots=True)
class CloseSession:
    session_id: str
    epoch: int
    drain: bool  # decide everything sent and take the reply in progress first (the client's Close)


# ---- Perception ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FrameImage:
    session_id: str
    frame_id: int
    timestamp: float
    image: bytes  # JPEG, PNG or WebP
    trace: Trace = NO_TRACE


@dataclass(frozen=True, slots=True)
class EncodeRequest:
    frames: tuple[FrameImage, ...]


@dataclass(frozen=True, slots=True)
class EncodeResult:
    """One row per request frame: its features, or why it could not be encoded."""

    features: tuple[torch.Tensor | None, ...]  # [tokens_per_frame, vision_hidden] each, model dtype
    errors: tuple[str, ...]  # "" where encoded
    encode_s: float


# ---- Decision --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FrameFeatures:
    session_id: str
    epoch: int
    frame_id: int
    timestamp: float
    features: torch.Tensor
    trace: Trace = NO_TRACE


@dataclass(frozen=True, slots=True)
class QueryText:
    session_id: str
    epoch: int
    timestamp: float
    text: str
    trace: Trace = NO_TRACE


@dataclass(frozen=True, slots=True)
class ReplyText:
    """The reply Reaction wrote for the session's last ReplyRequested ("" = it failed), with its tokens when
    Reaction shares Decision's tokenizer (else () and Decision tokenizes the text)."""

    session_id: str
    epoch: int
    text: str
    token_ids: tuple[int, ...] = ()


DecisionCommand = FrameFeatures | QueryText | ReplyText | CloseSession


@dataclass(frozen=True, slots=True)
class DecisionPush:
    gateway_id: str
    commands: tuple[DecisionCommand, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """One frame's decision (the engine's FrameDecision); the client gets it as a Decision."""

    session_id: str
    frame_id: int
    timestamp: float
    p_silent: float
    fired: bool
    action: Action
    trace: Trace = NO_TRACE  # the decide span; a reply this frame triggers is traced under it


@dataclass(frozen=True, slots=True)
class FramesDropped:
    """Frames the session skipped to catch up; the client is told with a FRAME_DROPPED Warning."""

    session_id: str
    frame_ids: tuple[int, ...]
    timestamps: tuple[float, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class ReplyRequested:
    """The session fired or met a query: the gateway has the reply written (Respond) and hands it back
    (ReplyText). The client sees the reply itself, from ResponseStarted on."""

    session_id: str
    trigger: Trigger
    timestamp: float
    query: str
    frame_id: int  # the last frame decided before the trigger; -1 before any
    trace: Trace = NO_TRACE


@dataclass(frozen=True, slots=True)
class Refused:
    """One input a replica could not take; the session goes on."""

    session_id: str
    input: str  # "frame" | "query" | "reply" | "close"
    frame_id: int  # -1 unless a frame
    message: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """Decision closed the session: normally (code 0; the client gets SessionClosed with these counts), or
    because it failed (the call ends with `code` and `message`)."""

    session_id: str
    frames_decided: int = 0
    frames_dropped: int = 0
    responses: int = 0
    frames_replayed: int = 0
    code: int = 0  # a grpc.StatusCode value: 0 closed normally, else why it failed
    message: str = ""


# ---- Reaction --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SyncFrames:
    """Frames Decision decided that the session's Reaction replica has not seen, in order."""

    session_id: str
    first: int  # how many frames the session was sent before these (a gap is an error, not a skip)
    frames: tuple[FrameFeatures, ...]


@dataclass(frozen=True, slots=True)
class Respond:
    session_id: str
    trigger: Trigger
    timestamp: float
    query: str
    trace: Trace = NO_TRACE


ReactionCommand = SyncFrames | Respond | CloseSession


@dataclass(frozen=True, slots=True)
class ReactionPush:
    gateway_id: str
    commands: tuple[ReactionCommand, ...]


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    session_id: str
    timestamp: float
    trigger: Trigger
    query: str


@dataclass(frozen=True, slots=True)
class ResponseDelta:
    session_id: str
    text: str
    num_tokens: int


@dataclass(frozen=True, slots=True)
class ResponseDone:
    session_id: str
    text: str
    num_tokens: int
    finish_reason: str  # "eos" | "length"
    ttft_s: float
    duration_s: float
    token_ids: tuple[int, ...] = ()  # without the eos that ended it


@dataclass(frozen=True, slots=True)
class ResponseFailed:
    """The reply could not be written; the client gets a Warning, and the session goes on."""

    session_id: str
    message: str


ReactionEvent = ResponseStarted | ResponseDelta | ResponseDone | ResponseFailed
# A commentary session's Decision writes its replies itself: they reach the gateway as Reaction's would.
DecisionEvent = (Decision | FramesDropped | ReplyRequested | Refused | SessionClosed | ResponseStarted | ResponseDelta
                 | ResponseDone)


@dataclass(frozen=True, slots=True)
class EventBatch:
    """What one replica produced for one gateway since the last batch (decision or reaction events)."""

    events: tuple = field(default_factory=tuple)
