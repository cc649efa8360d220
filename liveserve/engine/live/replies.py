"""Who writes a LIVE session's replies: a role object, chosen at open from `SessionConfig.replies`.

    "inline"      InlineReplies     the session writes them: a prompt step, then a step per token
    "on_request"  RequestedReplies  the same, but only for the triggers it is given (Reaction sessions)
    "external"    ExternalReplies   another model writes them (Decision sessions; external_replies.py)
    "none"        NoReplies         decisions only: a trigger leaves the stream as if the frame were silent

The session asks its role what a trigger (a speaking frame, a query) does, for the steps the role plans
itself, and, while a reply is written elsewhere, what of its queued input may go on meanwhile.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from liveserve.config import SessionConfig
from liveserve.engine.events import Event, ResponseDelta, ResponseDone, ResponseStarted
from liveserve.engine.inputs import QueuedFrame, QueuedQuery, SessionError
from liveserve.engine.live.planned import Completion, Planned, Work
from liveserve.engine.readout import Readout, sample
from liveserve.engine.live.inputs import SessionInputs
from liveserve.engine.live.stream_cache import StreamCache


@dataclass(slots=True)
class Reply:
    trigger: str  # "proactive" | "query"
    timestamp: float
    query: str | None
    started: float  # wall clock at the trigger
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ttft: float = 0.0


class Replies(ABC):
    """A reply role. The defaults are a role that holds nothing back: queued queries and frames go in
    stream order, no frame waits for a reply, none is awaited, and a reply handed in is refused."""

    fires_by_itself = True  # a speaking frame fires; False: the session answers only the triggers it is given

    def __init__(self, stream: StreamCache, inputs: SessionInputs, config: SessionConfig) -> None:
        self.stream, self.inputs, self.config = stream, inputs, config
        self.responses = 0
        self.frames_replayed = 0

    @abstractmethod
    def trigger(self, trigger: str, timestamp: float, query: str | None, frame_id: int) -> list[Event]:
        """A reply is due at `timestamp` (`frame_id`: the last frame decided): what happens, and its events."""

    def completions(self) -> dict[Work, Completion]:
        """The kinds of work this role plans, each with its handler."""
        return {}

    def plan(self) -> Planned | None:
        """The role's own next step, before any queued input; None when it has none."""
        return None

    def has_step(self) -> bool:
        return False

    def step_tokens(self) -> int:
        """Tokens of the role's own next step (0: none)."""
        return 0

    def next_input(self) -> QueuedFrame | QueuedQuery | None:
        """The queued input that goes next (the caller holds the session's lock)."""
        return self.inputs.next_item(False, True)

    def protect(self) -> int:
        """How many of the newest segments a frame step's eviction must keep: the newest owes its pending
        token (a frame's ",", a turn's eos)."""
        return 1

    def hold(self, frame: QueuedFrame, features) -> bool:
        """A frame was decided: whether it is tentative, kept for a replay after an awaited reply (the
        caller holds the session's lock)."""
        return False

    @property
    def awaiting(self) -> bool:
        return False

    @property
    def holding_frames(self) -> bool:
        return False

    def take(self, ids: list[int]) -> None:
        """`Session.push_reply`'s tokens (the caller holds the session's lock)."""
        raise SessionError("no reply was requested")


class InlineReplies(Replies):
    def __init__(self, stream: StreamCache, inputs: SessionInputs, config: SessionConfig) -> None:
        super().__init__(stream, inputs, config)
        self.template = stream.template
        self.reply: Reply | None = None
        self._prompted = False  # the reply's prompt has been fed
        self._rng = torch.Generator().manual_seed(config.seed)

    def trigger(self, trigger: str, timestamp: float, query: str | None, frame_id: int) -> list[Event]:
        self.reply = Reply(trigger, timestamp, query, time.monotonic())
        self._prompted = False
        return []

    def completions(self) -> dict[Work, Completion]:
        return {Work.PROMPT: self._complete_prompt, Work.TOKEN: self._complete_token}

    def plan(self) -> Planned | None:
        reply, stream = self.reply, self.stream
        if reply is None:
            return None
        if self._prompted:
            return Planned(Work.TOKEN, stream.reserve([reply.tokens[-1]], None))
        ids, segment, pending, pinned = stream.prompt_ids(reply.trigger, reply.query)
        stream.make_room(0)
        stream.check_room(len(ids) + self.config.max_new_tokens + 1)  # the whole reply: a full cache refuses now
        return Planned(Work.PROMPT, stream.reserve(ids, None), segment=segment, pending=pending, pinned=pinned,
                       trigger=reply.trigger)

    def has_step(self) -> bool:
        return self.reply is not None

    def step_tokens(self) -> int:
        if self.reply is None:
            return 0
        return 1 if self._prompted else len(self.stream.prompt_ids(self.reply.trigger, self.reply.query)[0])

    def _complete_prompt(self, planned: Planned, readout: Readout) -> list[Event]:
        self.stream.book_prompt(planned)
        self._prompted = True
        reply = self.reply
        return [ResponseStarted(reply.timestamp, reply.trigger, reply.query)] + self._next_token(readout)

    def _complete_token(self, planned: Planned, readout: Readout) -> list[Event]:
        self.stream.ledger.extend_last(1)
        return self._next_token(readout)

    def _next_token(self, readout: Readout) -> list[Event]:
        reply = self.reply
        token = sample(readout, self.config.temperature, self.config.top_p, self._rng)
        reply.tokens.append(token)
        if len(reply.tokens) == 1:
            reply.ttft = time.monotonic() - reply.started
        if token == self.template.eos_id:
            return [self._finish("eos", [token])]
        events: list[Event] = []
        decoded = self.template.decode(reply.tokens)
        if not decoded.endswith("\ufffd") and len(decoded) > len(reply.text):  # hold back split UTF-8
            events.append(ResponseDelta(reply.timestamp, decoded[len(reply.text):], (token,)))
            reply.text = decoded
        if len(reply.tokens) == self.config.max_new_tokens:
            events.append(self._finish("length", [token, self.template.eos_id]))  # close the turn properly
        return events

    def _finish(self, finish: str, pending: list[int]) -> ResponseDone:
        reply, self.reply = self.reply, None
        self.stream.end_reply(pending)
        self.responses += 1
        text_ids = tuple(reply.tokens[:-1] if finish == "eos" else reply.tokens)  # the reply without its eos
        return ResponseDone(reply.timestamp, reply.trigger, reply.query, self.template.decode(reply.tokens),
                            len(reply.tokens), finish, reply.ttft, time.monotonic() - reply.started, text_ids)


class RequestedReplies(InlineReplies):
    """Reaction sessions: replies written here, only for the triggers pushed (push_respond / push_query)."""

    fires_by_itself = False


class NoReplies(Replies):
    def trigger(self, trigger: str, timestamp: float, query: str | None, frame_id: int) -> list[Event]:
        self.stream.pending = [self.stream.template.interval_id]  # the stream goes on as if silent
        return []
