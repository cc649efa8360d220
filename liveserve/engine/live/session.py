"""A live video session: frames and queries in, decisions and streamed responses out.

One session owns one KV cache that grows by appends (earlier tokens are never recomputed, except the
frames replayed behind an external reply) and shrinks by whole-segment evictions under a bounded policy.
Each frame is one forward of [pending tokens + the frame's <v> embeddings]; the decision is read at the
frame's last token.

A session is a state machine driven one forward at a time, so the same code runs alone or batched:
    push_frame / push_query   validate, queue (session_inputs.py: thread-safe; callers may push while steps run)
    plan                      take the next piece of work (planned.py: a restored item, the reply role's own
                              step, or the next queued input), make room in the cache (evict), reserve it
    (a forward)               `process` runs it alone; BatchEngine packs many sessions' inputs in one
    complete                  the logits at the step's last token -> the handler of the work's kind -> events

Its parts, chosen at open: the cache as a stream (stream_cache.py), the reply role (replies.py: inline,
on_request, none; external_replies.py: external) and the restore of a session that moved (restore.py).
Replies are written inline by default. Disaggregated serving splits the roles (SessionConfig.replies): a
Decision session ("external") reports ReplyRequested and keeps deciding frames while another model writes
the reply (push_reply hands it back); a Reaction session ("on_request") never fires by itself and answers
the triggers it is given (push_respond / push_query).
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from liveserve.config import SessionConfig
from liveserve.engine.events import Event, FrameDecision
from liveserve.engine.live.external_replies import ExternalReplies
from liveserve.engine.inputs import QueuedFrame, QueuedQuery, Restored, SessionError, SubmitFrame
from liveserve.engine.packed import forward_alone, private_cache
from liveserve.engine.live.planned import Completion, ForwardTrace, Planned, StepInput, Work
from liveserve.engine.readout import Readout, read_out
from liveserve.engine.live.replies import InlineReplies, NoReplies, Replies, RequestedReplies
from liveserve.engine.live.restore import Restore
from liveserve.engine.live.inputs import SessionInputs
from liveserve.engine.live.stream_cache import StreamCache
from liveserve.model.live import LiveModel

__all__ = ["Session", "SessionError", "StepInput", "ForwardTrace", "cache_limit"]

REPLY_ROLES: dict[str, type[Replies]] = {"inline": InlineReplies, "on_request": RequestedReplies,
                                          "external": ExternalReplies, "none": NoReplies}


class Session:
    def __init__(self, model: LiveModel, config: SessionConfig | None = None, session_id: str = "", *,
                 cache=None, encoder: SubmitFrame | None = None) -> None:
        """`cache`: a PagedCache from the engine's KVPool (batched serving); by default the session has a
        pool of its own, growing with its cache (stepped alone: the same cache and attention path).
        `encoder`: submits pushed images for batched encoding; by default frames are encoded when stepped."""
        self.model, self.config, self.session_id = model, config or SessionConfig(), session_id
        self.template = model.template
        self.system_prompt = self.config.system_prompt or model.system_prompt
        self.cache = cache if cache is not None else private_cache(model, cache_limit(model, self.config))
        self.stream = StreamCache(model, self.config, self.cache)
        self.ledger = self.stream.ledger
        self.inputs = SessionInputs(model, self.config, encoder)
        self._lock = self.inputs.lock  # one lock for the queues and the reply state other threads touch
        self._replies = REPLY_ROLES[self.config.replies](self.stream, self.inputs, self.config)
        awaits = self._replies if isinstance(self._replies, ExternalReplies) else None
        self._restore = Restore(model, self.config, self.stream, self.inputs, awaits)
        # One handler per kind of work this session plans, from the part that planned it.
        self.completions: dict[Work, Completion] = {Work.FRAME: self._complete_frame, **self._replies.completions(),
                                                    **self._restore.completions()}
        self.trace: list[ForwardTrace] | None = None
        self._notices: list[Event] = []  # events raised while planning, returned with the next completion
        self._planned: Planned | None = None
        self._last_decided_id = -1
        self.frames_decided = 0

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
            if not self._restore.keep_early_reply(ids):
                self._replies.take(ids)

    def restore(self, items: Sequence[Restored]) -> None:
        """Rebuild a session that lived elsewhere (its replica died or drained) from what survived it: the
        frames it saw last, as features, and its turns, in stream order (a turn goes after the frames up to
        its time). They are fed before any new input, without decisions: frames as the silent frames they
        were decided as, turns as the exchanges they were, and an AwaitedReply (last, at most one) leaves
        the session waiting for that reply as if it had just asked for it. Only before any other input.
        A proactive turn with no restored frame before it is skipped (nothing to have reacted to)."""
        last_id = self._restore.restore(items)
        if last_id is not None:
            self._last_decided_id = last_id

    @property
    def awaiting_reply(self) -> bool:
        return self._replies.awaiting or self._restore.awaits_reply

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
    def responses(self) -> int:
        return self._replies.responses

    @property
    def frames_replayed(self) -> int:
        """Tentative frames fed a second time, after an external reply."""
        return self._replies.frames_replayed

    @property
    def frames_restored(self) -> int:
        """Frames put back by `restore`."""
        return self._restore.frames_restored

    @property
    def holding_frames(self) -> bool:
        """Queued frames wait for the reply being written elsewhere: as many frames as may be replayed
        after it were decided already. Only `push_reply` (or dropping stale frames) moves them."""
        with self._lock:
            return self._replies.holding_frames

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
        if self._restore.queue or self._replies.has_step():
            return True
        with self._lock:
            item = self._replies.next_input()
        return item is not None and (isinstance(item, QueuedQuery) or item.ready)

    def has_work(self) -> bool:
        """Whether there is input queued or a step in progress (ready now or once encoded). Frames held for
        a reply written elsewhere are not: only its `push_reply` moves them."""
        return self.ready() or bool(self.backlog and not self.holding_frames)

    def next_step_tokens(self) -> int:
        """How many tokens the next `plan` would feed (0: nothing to do); the scheduler's batch budget."""
        if self._restore.queue:
            return self._restore.step_tokens()
        own = self._replies.step_tokens()
        if own:
            return own
        with self._lock:
            item = self._replies.next_input()
        if item is None:
            return 0
        if isinstance(item, QueuedQuery):
            return len(self.stream.prompt_ids(item.trigger, item.text)[0])
        return self.stream.frame_step_tokens()

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
        planned = self._restore.plan() if self._restore.queue else None  # a restored session's past goes first
        if planned is None:
            planned = self._replies.plan() or self._plan_input()
        if planned is None:
            return None
        self._planned = planned
        return planned.step

    def _plan_input(self) -> Planned | None:
        """The next queued input's step. A query triggers a reply: its prompt is the step when written
        here; when written elsewhere, the next frame is stepped meanwhile."""
        while True:
            with self._lock:
                item = self._replies.next_input()
                if item is not None:
                    self.inputs.take(item)
            if item is None:
                return None
            if isinstance(item, QueuedFrame):
                return self.stream.plan_frame(item, Work.FRAME, self._replies.protect())
            self._notices += self._replies.trigger(item.trigger, item.timestamp, item.text, self._last_decided_id)
            planned = self._replies.plan()
            if planned is not None:
                return planned

    def take_notices(self) -> list[Event]:
        """Events raised by a `plan` that found no step to run (an external reply request)."""
        notices, self._notices = self._notices, []
        return notices

    def complete(self, readout: Readout) -> list[Event]:
        """Apply the planned step's result: what its fp32 logits at the last token say (readout.py)."""
        planned, self._planned = self._planned, None
        if planned is None:
            raise RuntimeError(f"session {self.session_id!r}: no planned step to complete")
        self.stream.commit(planned.step)
        if self.trace is not None:
            self._record(planned.step, readout.logits)
        events, self._notices = self._notices, []
        return events + self.completions[planned.work](planned, readout)

    # ---- frames ----------------------------------------------------------------------------------------

    def _complete_frame(self, planned: Planned, readout: Readout) -> list[Event]:
        """The decision at the frame's last token: silent, fire (a reply is due), or a query at its time."""
        frame = planned.frame
        self.stream.book_frame(planned.step.ids)
        with self._lock:
            tentative = self._replies.hold(frame, planned.step.features)
            query = None if tentative else self.inputs.query_by(frame.timestamp)
        p_silent = readout.p_silent
        # Below the threshold the frame may not stay silent: the most likely other token decides.
        token = readout.argmax_speaking if p_silent < self.config.threshold else readout.argmax
        speaks = token != self.template.interval_id
        # One reply at a time; a Reaction session speaks only when asked.
        fired = query is None and speaks and not tentative and self._replies.fires_by_itself
        if query is None and not fired:
            self.stream.pending = [self.template.interval_id]
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
            return [decision] + self._replies.trigger(query.trigger, query.timestamp, query.text, frame.frame_id)
        if fired:
            return [decision] + self._replies.trigger("proactive", frame.timestamp, None, frame.frame_id)
        return [decision]

    def _record(self, step: StepInput, logits) -> None:
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
