"""A live video session: frames and queries in, decisions and streamed responses out.

One session owns one KV cache that grows by appends (earlier tokens are never recomputed, except the
frames replayed behind an external reply, below) and shrinks by whole-segment evictions under a bounded
policy. Each frame is one forward of
[pending tokens + the frame's <v> embeddings]; the decision is read at the frame's last token.

A session is a state machine driven one forward at a time, so the same code runs alone or batched:
    push_frame / push_query   validate, queue (session_inputs.py: thread-safe; callers may push while steps run)
    plan                      take the next piece of work (frame, reply prompt or reply token), make
                              room in the cache (evict), reserve it -> a StepInput
    (a forward)               `process` runs it alone; BatchEngine packs many sessions' inputs in one
    complete                  the logits at the step's last token -> ledger, pending tokens, events

Replies are written inline by default. Disaggregated serving splits the roles (SessionConfig.replies): a
Decision session ("external") reports ReplyRequested and keeps deciding frames while another model writes
the reply (push_reply hands it back); a Reaction session ("on_request") never fires by itself and answers
the triggers it is given (push_respond / push_query).

The model was trained with a reply right after its trigger frame, so a Decision session keeps the cache
in that order: it remembers the cache point at the trigger, and the frames it decides meanwhile
("tentative" frames, at most half its window) are cut off again when the reply lands, the reply is
appended at the trigger, and the tentative frames are replayed after it, one frame step each. The cache
then holds what an inline session's would, had it stayed silent on those frames: exactly, unless a
sink_window cache had to evict frames older than the trigger during the wait (the reply then sees fewer
of them than an inline reply did).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from liveserve.config import SessionConfig
from liveserve.engine.events import (Event, FrameDecision, ReplyRequested, ResponseDelta, ResponseDone,
                                     ResponseStarted)
from liveserve.engine.inputs import (AwaitedReply, QueuedFrame, QueuedQuery, Restored, RestoredFrame, RestoredTurn,
                                     SessionError, SubmitFrame, as_frame, check_frame_id, check_time)
from liveserve.engine.kv_pool import CacheFullError
from liveserve.engine.ledger import Ledger
from liveserve.engine.packed import forward_alone, private_cache
from liveserve.engine.readout import Readout, read_out, sample
from liveserve.engine.session_inputs import SessionInputs
from liveserve.model.live import LiveModel

__all__ = ["Session", "SessionError", "StepInput", "ForwardTrace", "cache_limit"]

NEW, STREAMING, REPLIED = "new", "streaming", "replied"  # nothing fed / inside "[..." / after a reply's eos


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


@dataclass(slots=True)
class _Reply:
    trigger: str  # "proactive" | "query"
    timestamp: float
    query: str | None
    started: float  # wall clock at the trigger
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ttft: float = 0.0


@dataclass(frozen=True, slots=True)
class _CachePoint:
    """Where an external reply belongs: the session at its trigger, before any tentative frame.

    Found again from the cache's end (the tentative frames' segments, and the "," or eos + "\\n[" the first
    of them added to the trigger's segment), so evictions of older segments meanwhile do not move it."""

    state: str
    pending: tuple[int, ...]
    next_position: int
    last_length: int  # the newest segment's length (0: none yet)


@dataclass(frozen=True, slots=True)
class _Planned:
    # "frame" | "prompt" | "token" | "written" (an external reply: its prompt and tokens) | "replay" (a
    # tentative frame fed again after that reply; its logits are not read) | "restore" / "restored" (a frame
    # / a finished turn put back by `restore`)
    kind: str
    step: StepInput
    frame: QueuedFrame | None = None
    segment: str = ""  # prompt: ledger segment kind of the new text
    pending: int = 0  # prompt: pending tokens that close the previous segment
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class ForwardTrace:
    """One forward, recorded when `Session.trace` is a list (tests and debugging)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    kept_positions: torch.Tensor  # positions of every cached token after the forward
    logits: torch.Tensor
    ids: tuple[int, ...]  # the text tokens fed before any frame slots
    num_frame_tokens: int


class Session:
    def __init__(self, model: LiveModel, config: SessionConfig | None = None, session_id: str = "", *,
                 cache=None, encoder: SubmitFrame | None = None) -> None:
        """`cache`: a PagedCache from the engine's KVPool (batched serving); by default the session has a
        pool of its own, growing with its cache (stepped alone: the same cache and attention path).
        `encoder`: submits pushed images for batched encoding; by default frames are encoded when stepped."""
        self.model, self.config, self.session_id = model, config or SessionConfig(), session_id
        self.template = model.template
        self.system_prompt = self.config.system_prompt or model.system_prompt
        self._start_ids = self.template.start_ids(self.system_prompt)  # tokenized once, not per first frame
        self.ledger = Ledger()
        self.cache = cache if cache is not None else private_cache(model, cache_limit(model, self.config))
        self.inputs = SessionInputs(model, self.config, encoder)
        self._lock = self.inputs.lock  # one lock for the queues and the reply state other threads touch
        self.trace: list[ForwardTrace] | None = None
        self._contiguous = self.config.cache.positions == "contiguous"
        self._state, self._pending = NEW, []
        self._next_position = 0
        self._instruction_pinned = False
        self._reply: _Reply | None = None
        self._prompted = False  # the reply's prompt has been fed
        self._awaiting: _Reply | None = None  # replies="external": the trigger whose reply is being written
        self._written: list[int] | None = None  # ... and that reply's tokens once handed back
        self._point: _CachePoint | None = None  # ... where that reply goes in the cache
        self._tentative: list[QueuedFrame] = []  # frames decided since the trigger, with their features
        self._replay: deque[QueuedFrame] = deque()  # tentative frames still to be fed after the reply
        self._restore: deque[QueuedFrame | RestoredTurn | AwaitedReply] = deque()  # see `restore`
        self._early_reply: list[int] | None = None  # push_reply's ids for an AwaitedReply not yet restored
        self._max_tentative = max(1, self.config.cache.window_frames // 2)
        self._notices: list[Event] = []  # events raised while planning, returned with the next completion
        self._planned: _Planned | None = None
        self._last_decided_id = -1
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self.frames_decided = self.responses = 0
        self.frames_replayed = 0  # tentative frames fed a second time, after an external reply
        self.frames_restored = 0  # frames put back by `restore`

    # ---- input -------------------------------------------------------------------------------

    def push_frame(self, timestamp: float, frame, frame_id: int | None = None) -> None:
        """Queue a frame: encoded image bytes, an image (uint8 tensor [3,H,W], numpy [H,W,3] or PIL image,
        resized and padded to the tower's input) or precomputed vision features [tokens_per_frame, hidden].
        `frame_id` names the frame in its FrameDecision (or FramesDropped); by default it is the number of
        frames pushed to this session before it."""
        self.inputs.push_frame(timestamp, frame, frame_id)

    def push_query(self, timestamp: float, text: str) -> None:
        """Queue a user question: answered before the first queued frame later than it, or pre-empting the
        decision of a frame at its time. In a Decision session (replies="external") a query that arrives
        while a reply is written elsewhere waits for it and is answered right after it, after the frames
        replayed behind it (queries in arrival order; queued frames earlier than a query still go first)."""
        self.inputs.push_query(timestamp, text)

    def push_respond(self, timestamp: float) -> None:
        """Reaction sessions (replies="on_request"): reply proactively at `timestamp`, after the frames up
        to that time."""
        self.inputs.push_respond(timestamp)

    def push_reply(self, text: str, token_ids: Sequence[int] = ()) -> None:
        """Decision sessions (replies="external"): the reply another model wrote for the last ReplyRequested.
        It goes into this session's cache right after its trigger, as an inline reply would (its prompt,
        then the reply), and the frames decided meanwhile are fed again after it; firing resumes then.
        Queries that arrived meanwhile are answered next (see push_query). An empty text means the reply
        failed: nothing is appended, the frames stay as they are (as if the trigger had been silent) and
        firing resumes at once. `token_ids`: the writer's own tokens, when it shares this model's tokenizer
        (a decoded text does not always encode back to the tokens that were generated); else the text is
        tokenized here."""
        if not text:
            ids = []
        elif token_ids:
            ids = [int(token) for token in token_ids[: self.config.max_new_tokens]]
            if any(not 0 <= token < self.model.vocab_size for token in ids):
                raise SessionError(f"reply token ids must be in [0, {self.model.vocab_size}), got {ids}")
        else:
            ids = self.template.encode(text)[: self.config.max_new_tokens]
        with self._lock:
            self.inputs.check_open()
            if self._restore and isinstance(self._restore[-1], AwaitedReply) and self._early_reply is None:
                # The reply beat the restore of its trigger (the engine may be writing a restored turn, or
                # taking the awaited reply itself): kept for it, `_plan_restored` puts it in.
                self._early_reply = ids
                return
            if self._awaiting is None or self._written is not None:
                raise SessionError("no reply was requested")
            if ids:
                self._written = ids
            else:
                self._awaiting, self._point, self._tentative = None, None, []

    def restore(self, items: Sequence[Restored]) -> None:
        """Rebuild a session that lived elsewhere (its replica died or drained) from what survived it: the
        frames it saw last, as features, and its turns, in stream order (a turn goes after the frames up to
        its time). They are fed before any new input, without decisions: frames as the silent frames they
        were decided as, turns as the exchanges they were, and an AwaitedReply (last, at most one) leaves
        the session waiting for that reply as if it had just asked for it. Only before any other input.
        A proactive turn with no restored frame before it is skipped (nothing to have reacted to)."""
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
                if self.config.replies == "external" and (seen_frame or item.query is not None):
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
            if not self.inputs.empty or self._state != NEW or self._restore:
                raise SessionError("a session can only be restored before any other input")
            self._restore.extend(queued)
            if seen_frame:
                self._last_decided_id = last_id
                self.inputs.resume_after(last_time, last_id)

    @property
    def awaiting_reply(self) -> bool:
        return self._awaiting is not None or bool(self._restore and isinstance(self._restore[-1], AwaitedReply))

    @property
    def backlog(self) -> int:
        return len(self.inputs.frames)

    @property
    def closed(self) -> bool:
        return self.inputs.closed

    @property
    def failure(self) -> str | None:
        return self.inputs.failure

    @property
    def frames_dropped(self) -> int:
        return self.inputs.frames_dropped

    @property
    def holding_frames(self) -> bool:
        """Queued frames wait for the reply being written elsewhere: as many frames as may be replayed
        after it were decided already. Only `push_reply` (or dropping stale frames) moves them."""
        with self._lock:
            return self._awaiting is not None and len(self._tentative) >= self._max_tentative

    def drop_stale_frames(self, max_lag_s: float | None, max_queued: int) -> list[QueuedFrame]:
        """Keep the session real-time: drop the oldest queued frames while more than `max_queued` wait or
        they span more than `max_lag_s` of stream time (the newest frame always stays). Returns the
        dropped frames."""
        return self.inputs.drop_stale(max_lag_s, max_queued)

    # ---- processing: alone -------------------------------------------------------------------------

    def process(self) -> Iterator[Event]:
        """Process everything queued, in stream-time order, one forward at a time, yielding events as
        they happen. A query is answered before the first frame later than it, or right after a frame at
        the same time."""
        while (events := self.step_alone()) is not None:
            yield from events

    def step_alone(self) -> list[Event] | None:
        """One step (plan -> a forward of this session alone -> complete); None when there is no work."""
        step = self.plan()
        if step is None:
            return self.take_notices() or None
        logits = forward_alone(self.model, self.cache, step)
        return self.complete(read_out(logits, self.template.interval_id)[0])

    # ---- processing: one step ----------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether `plan` has work that can run now (a queued frame's encoding may still be pending)."""
        if self.closed:
            return False
        if self._reply is not None or self._replay or self._restore:
            return True
        with self._lock:
            if self._written is not None:
                return True
            item = self._peek_item()
        return item is not None and (isinstance(item, QueuedQuery) or item.ready)

    def next_step_tokens(self) -> int:
        """How many tokens the next `plan` would feed (0: nothing to do); the scheduler's batch budget."""
        if self._reply is not None:
            return 1 if self._prompted else len(self._prompt_ids(self._reply.trigger, self._reply.query)[0])
        with self._lock:
            if self._written is not None:
                prompt = self._prompt_ids(self._awaiting.trigger, self._awaiting.query, self._point)[0]
                return len(prompt) + len(self._written_ids()[0])
            item = self._replay[0] if self._replay else self._restore[0] if self._restore else self._peek_item()
        if item is None:
            return 0
        if isinstance(item, RestoredTurn):
            return len(self._prompt_ids(item.trigger, item.query)[0]) + len(self._turn_ids(item)) + 1
        if isinstance(item, AwaitedReply):
            return 1  # no forward of its own; the frame after it is planned in the same step
        if isinstance(item, QueuedQuery):
            return len(self._prompt_ids(item.trigger, item.text)[0])
        return len(self._frame_ids()) + self.model.layout.num_tokens

    def fail(self, message: str) -> None:
        """Stop the session for good (its memory returns at once); later input is refused with `message`."""
        self.inputs.close(failure=message)
        self.cache.close()

    def plan(self) -> StepInput | None:
        """Take the next piece of work and make room for it; None when there is nothing to do. Raises
        CacheFullError (nothing written) when the work cannot fit the cache or the model's positions."""
        if self._planned is not None:
            raise RuntimeError(f"session {self.session_id!r}: complete the planned step before planning another")
        if self.closed:
            return None
        restored = self._plan_restored() if self._restore else None  # a restored session's past goes first
        if restored is not None:
            planned = restored
        elif self._reply is not None:
            planned = self._plan_token() if self._prompted else self._plan_prompt()
        elif self._written is not None:
            planned = self._plan_written()
        elif self._replay:
            planned = self._plan_frame(self._replay.popleft(), "replay")
        else:
            while True:
                with self._lock:
                    item = self._pop_item()
                if item is None:
                    return None
                if isinstance(item, QueuedFrame):
                    planned = self._plan_frame(item)
                    break
                self._notices += self._trigger(item.trigger, item.timestamp, item.text)
                if self._reply is not None:
                    planned = self._plan_prompt()
                    break
                # external: the query went to the reply writer; the next frame is stepped meanwhile
        self._planned = planned
        return planned.step

    def take_notices(self) -> list[Event]:
        """Events raised by a `plan` that found no step to run (an external reply request)."""
        notices, self._notices = self._notices, []
        return notices

    def complete(self, readout: Readout) -> list[Event]:
        """Apply the planned step's result: what its fp32 logits at the last token say (readout.py)."""
        planned, self._planned = self._planned, None
        if planned is None:
            raise RuntimeError(f"session {self.session_id!r}: no planned step to complete")
        step = planned.step
        self.cache.commit(step.positions)
        self._next_position = step.start + step.num_tokens
        if self.trace is not None:
            self._record(step, readout.logits)
        events, self._notices = self._notices, []
        if planned.kind == "frame":
            return events + self._complete_frame(planned, readout)
        if planned.kind in ("replay", "restore"):
            return events + self._complete_replay(planned)
        if planned.kind in ("written", "restored"):
            return events + self._complete_written(planned)
        if planned.kind == "prompt":
            if planned.pending:
                self.ledger.extend_last(planned.pending)
            self.ledger.add(planned.segment, step.num_tokens - planned.pending, planned.pinned)
            self._instruction_pinned |= self._reply.trigger == "query"
            self._prompted = True
            events.append(ResponseStarted(self._reply.timestamp, self._reply.trigger, self._reply.query))
        else:
            self.ledger.extend_last(1)
        return events + self._next_token(readout)

    # ---- frames ----------------------------------------------------------------------------------------

    def _plan_frame(self, frame: QueuedFrame, kind: str = "frame") -> _Planned:
        features = frame.vision_features(self.model)
        ids = self._frame_ids()
        self._make_room(incoming_frames=1)
        return _Planned(kind, self._reserve(ids, features), frame=frame)

    def _append_frame(self, ids: tuple[int, ...]) -> None:
        """Book a fed frame: its leading ids close what came before it, then its own segment."""
        if self._state == NEW:
            self.ledger.add("prefix", len(ids))
        elif ids:
            self.ledger.extend_last(len(ids))  # "," closes the previous frame; eos + "\n[" close the turn
        self.ledger.add("frame", self.model.layout.num_tokens)
        self._state, self._pending = STREAMING, []

    def _complete_frame(self, planned: _Planned, readout: Readout) -> list[Event]:
        frame = planned.frame
        self._append_frame(planned.step.ids)
        with self._lock:
            tentative = self._awaiting is not None
            if tentative:  # kept for the replay after the reply, encoded once
                self._tentative.append(replace(frame, pixels=None, features=planned.step.features))
            query = None if tentative else self.inputs.query_by(frame.timestamp)
        p_silent = readout.p_silent
        # Below the threshold the frame may not stay silent: the most likely other token decides.
        token = readout.argmax_speaking if p_silent < self.config.threshold else readout.argmax
        speaks = token != self.template.interval_id
        # One reply at a time; a Reaction session speaks only when asked.
        fired = query is None and speaks and not tentative and self.config.replies != "on_request"
        if query is None and not fired:
            self._pending = [self.template.interval_id]
        self.frames_decided += 1
        self._last_decided_id = frame.frame_id
        if query is not None:
            action = "query"
        elif fired:
            action = "respond"
        else:
            action = "suppressed" if tentative and speaks else "silent"
        decision = FrameDecision(frame.timestamp, frame.frame_id, p_silent, fired, action, token,
                                 time.monotonic() - frame.arrival, self.cache.length)
        if query is not None:
            return [decision] + self._trigger(query.trigger, query.timestamp, query.text)
        if fired:
            return [decision] + self._trigger("proactive", frame.timestamp, None)
        return [decision]

    def _trigger(self, trigger: str, timestamp: float, query: str | None) -> list[Event]:
        """Start a reply here, or (replies="external") ask for it to be written elsewhere."""
        if self.config.replies == "none":
            self._pending = [self.template.interval_id]  # decisions only: the stream goes on as if silent
            return []
        if self.config.replies != "external":
            self._start_reply(trigger, timestamp, query)
            return []
        self._await_reply(trigger, timestamp, query)
        return [ReplyRequested(timestamp, trigger, query, self._last_decided_id)]

    def _await_reply(self, trigger: str, timestamp: float, query: str | None) -> None:
        """Remember where the reply written elsewhere goes: here, at the trigger."""
        last_length = self.ledger.segments[-1].length if self.ledger.segments else 0
        point = _CachePoint(self._state, tuple(self._pending), self._next_position, last_length)
        with self._lock:
            self._awaiting, self._point = _Reply(trigger, timestamp, query, time.monotonic()), point
        if self._state == STREAMING:
            self._pending = [self.template.interval_id]  # frames stay ","-separated until the reply is in

    # ---- restored sessions -----------------------------------------------------------------------------

    def _plan_restored(self) -> _Planned | None:
        """The next restored item's step; None when only an awaited reply was left (it is remembered, and
        the session's own input goes next)."""
        while self._restore:
            item = self._restore[0]
            if isinstance(item, QueuedFrame):
                return self._plan_frame(self._restore.popleft(), "restore")
            if isinstance(item, RestoredTurn):
                self._restore.popleft()
                with self._lock:
                    self._awaiting = _Reply(item.trigger, item.timestamp, item.query, time.monotonic())
                    self._written, self._point = self._turn_ids(item), None
                return replace(self._plan_written(), kind="restored")
            # The awaited reply leaves the queue only once it is awaited, and takes what push_reply (another
            # thread) kept for it meanwhile: a reply refused here would leave the frames held for good.
            self._await_reply(item.trigger, item.timestamp, item.query)
            with self._lock:
                self._restore.popleft()
                early, self._early_reply = self._early_reply, None
                if early:  # the reply is here already: it goes in next, at the point just remembered
                    self._written = early
                elif early is not None:  # it failed: as if the trigger had been silent
                    self._awaiting, self._point = None, None
        return None

    def _turn_ids(self, turn: RestoredTurn) -> list[int]:
        ids = list(turn.token_ids) or self.template.encode(turn.reply)
        return [int(token) for token in ids[: self.config.max_new_tokens]]

    # ---- external replies ----------------------------------------------------------------------------

    def _plan_written(self) -> _Planned:
        if self._point is not None:  # not yet rolled back (a retry after CacheFullError finds it done)
            self._roll_back()
        awaiting = self._awaiting
        ids, segment, pending, pinned = self._prompt_ids(awaiting.trigger, awaiting.query)
        fed, held = self._written_ids()
        ids = ids + fed
        self._make_room(incoming_frames=0)
        self._check_room(len(ids) + len(held))
        return _Planned("written", self._reserve(ids, None), segment=segment, pending=pending, pinned=pinned)

    def _written_ids(self) -> tuple[list[int], list[int]]:
        """The external reply's tokens: (fed with its prompt, left pending). It ends as an inline reply
        does: eos pending, or, at max_new_tokens, the last token with it (fed by the next step, after
        that step's evictions)."""
        reply, eos = self._written, [self.template.eos_id]
        if len(reply) == self.config.max_new_tokens:
            return reply[:-1], reply[-1:] + eos
        return reply, eos

    def _roll_back(self) -> None:
        """Cut the tentative frames off the cache and return to the trigger's cache point, so the reply
        lands right after its trigger; the frames are queued for replay after it."""
        point = self._point
        # Each tentative frame added a segment; before any frame the first one also opened the prefix. The
        # segment before them loses the first tentative frame's leading ids again.
        added = len(self._tentative) + (point.state == NEW)
        self.ledger.roll_back(len(self.ledger.segments) - added, point.last_length)
        self.cache.truncate(self.ledger.num_tokens)
        self._state, self._pending, self._next_position = point.state, list(point.pending), point.next_position
        with self._lock:
            self._replay.extend(self._tentative)
            self._tentative, self._point = [], None

    def _complete_written(self, planned: _Planned) -> list[Event]:
        """The external (or restored) reply is in the cache: the turn ends as an inline reply's would."""
        if planned.pending:
            self.ledger.extend_last(planned.pending)
        self.ledger.add(planned.segment, planned.step.num_tokens - planned.pending, planned.pinned)
        self._instruction_pinned |= self._awaiting.trigger == "query"
        self._state, self._pending = REPLIED, self._written_ids()[1]
        with self._lock:
            self._awaiting = self._written = None
        self.responses += planned.kind == "written"  # a restored turn was counted where it was given
        return []

    def _complete_replay(self, planned: _Planned) -> list[Event]:
        """A tentative frame is back after the reply, fed as the silent frame it was decided as (an
        inline session would have decided it with the reply in view; here it was decided without)."""
        self._append_frame(planned.step.ids)
        self._pending = [self.template.interval_id]
        if planned.kind == "restore":
            self.frames_restored += 1
        else:
            self.frames_replayed += 1
        return []

    # ---- replies ---------------------------------------------------------------------------------------

    def _start_reply(self, trigger: str, timestamp: float, query: str | None) -> None:
        self._reply = _Reply(trigger, timestamp, query, time.monotonic())
        self._prompted = False

    def _prompt_ids(self, trigger: str, query: str | None,
                    at: _CachePoint | None = None) -> tuple[list[int], str, int, bool]:
        """A reply's prompt: (ids, ledger segment kind, pending tokens it starts with, pinned), from the
        stream as it is now or, for an external reply not yet put back, as it was `at` its trigger."""
        state, pending = (self._state, self._pending) if at is None else (at.state, list(at.pending))
        if trigger == "proactive":
            return list(self.template.stream_reply_ids), "text", 0, False
        if state == NEW:
            return self.template.first_query_ids(self.system_prompt, query), "prefix", 0, False
        pending = pending if state == REPLIED else []  # a pending "," is dropped: "]" closes
        ids = pending + self.template.query_ids(query, stream_open=state == STREAMING)
        return ids, "text", len(pending), not self._instruction_pinned

    def _frame_ids(self) -> list[int]:
        if self._state == NEW:
            return self._start_ids
        if self._state == REPLIED:
            return self._pending + list(self.template.stream_open_ids)
        return self._pending

    def _plan_prompt(self) -> _Planned:
        ids, segment, pending, pinned = self._prompt_ids(self._reply.trigger, self._reply.query)
        self._make_room(incoming_frames=0)
        self._check_room(len(ids) + self.config.max_new_tokens + 1)
        return _Planned("prompt", self._reserve(ids, None), segment=segment, pending=pending, pinned=pinned)

    def _plan_token(self) -> _Planned:
        return _Planned("token", self._reserve([self._reply.tokens[-1]], None))

    def _next_token(self, readout: Readout) -> list[Event]:
        reply = self._reply
        token = self._pick(readout)
        reply.tokens.append(token)
        if len(reply.tokens) == 1:
            reply.ttft = time.monotonic() - reply.started
        if token == self.template.eos_id:
            return [self._finish_reply("eos", [token])]
        events: list[Event] = []
        decoded = self.template.decode(reply.tokens)
        if not decoded.endswith("\ufffd") and len(decoded) > len(reply.text):  # hold back split UTF-8
            events.append(ResponseDelta(reply.timestamp, decoded[len(reply.text):], (token,)))
            reply.text = decoded
        if len(reply.tokens) == self.config.max_new_tokens:
            events.append(self._finish_reply("length", [token, self.template.eos_id]))  # close the turn properly
        return events

    def _finish_reply(self, finish: str, pending: list[int]) -> ResponseDone:
        reply, self._reply = self._reply, None
        self._state, self._pending = REPLIED, pending
        self.responses += 1
        text_ids = tuple(reply.tokens[:-1] if finish == "eos" else reply.tokens)  # the reply without its eos
        return ResponseDone(reply.timestamp, reply.trigger, reply.query, self.template.decode(reply.tokens),
                            len(reply.tokens), finish, reply.ttft, time.monotonic() - reply.started, text_ids)

    def _pick(self, readout: Readout) -> int:
        return sample(readout, self.config.temperature, self.config.top_p, self._rng)

    # ---- queues ----------------------------------------------------------------------------------------

    def _peek_item(self) -> QueuedFrame | QueuedQuery | None:
        # While an external reply is being written, queries wait for it; frames go on, up to half the window:
        # the tentative frames cannot be evicted (the reply goes back before them), and each is computed again
        # after the reply.
        return self.inputs.next_item(self._awaiting is not None, len(self._tentative) < self._max_tentative)

    def _pop_item(self) -> QueuedFrame | QueuedQuery | None:
        item = self._peek_item()
        if item is not None:
            self.inputs.take(item)
        return item

    # ---- cache -----------------------------------------------------------------------------------------

    def _make_room(self, incoming_frames: int) -> None:
        # The newest frame owes its pending ","; the newest turn its eos: neither can go. While a reply is
        # written elsewhere, the trigger's segment and the tentative frames stay too: the rollback to the
        # trigger cuts them off again.
        protect = 1 + len(self._tentative)
        victims = self.ledger.plan_eviction(self.config.cache, incoming_frames, protect)
        if victims:
            keep = self.ledger.evict(victims)
            self.cache.keep(keep, self.model.inv_freq if self._contiguous else None)

    def _check_room(self, n: int) -> None:
        start = self.cache.length if self._contiguous else self._next_position
        if start + n > self.model.max_positions:
            raise CacheFullError(f"session is at position {start}; {n} more tokens would pass the model's "
                                 f"limit of {self.model.max_positions} (use the sink_window cache policy)")
        if self.cache.length + n > self.cache.max_tokens:
            raise CacheFullError(f"cache holds {self.cache.length} tokens; {n} more would pass its limit "
                                 f"of {self.cache.max_tokens}")

    def _reserve(self, ids: list[int], features: torch.Tensor | None) -> StepInput:
        n = len(ids) + (0 if features is None else features.shape[0])
        self._check_room(n)
        self.cache.reserve(n)
        start = self.cache.length if self._contiguous else self._next_position
        positions = torch.arange(start, start + n)  # on the host: sent with the step's other indices
        return StepInput(tuple(ids), features, positions, start)

    def _record(self, step: StepInput, logits: torch.Tensor) -> None:
        embeds = self.model.embed_step([step])
        self.trace.append(ForwardTrace(embeds.detach().clone(), step.positions.clone(),
                                       self.cache.kept_positions().clone(), logits.clone(), step.ids,
                                       0 if step.features is None else step.features.shape[0]))

    def flush(self) -> None:
        """The stream ended. Nothing to do here: every frame pushed is work already (a commentary session
        closes its last, partly filled chunk)."""

    def close(self) -> None:
        """Release the cache memory; the session cannot be used afterwards."""
        self.inputs.close()
        self.cache.close()


def cache_limit(model: LiveModel, config: SessionConfig) -> int:
    """The most tokens a session's cache can hold under its policy: what a KV pool reserves for it."""
    cache, limit = config.cache, model.max_positions
    if cache.policy == "full":
        return limit
    turn = config.max_query_tokens + config.max_new_tokens + 16  # framing of one turn
    prefix = len(model.template.start_ids(config.system_prompt or model.system_prompt)) + turn
    frame = model.layout.num_tokens + 1
    bound = prefix + (cache.window_frames + 2) * frame + cache.text_window_tokens + 2 * turn
    if cache.positions == "contiguous" and bound > limit:
        raise ValueError(f"sink_window needs up to {bound} positions but the model has {limit}; "
                         "lower window_frames, text_window_tokens or max_new_tokens")
    return min(bound, limit)
