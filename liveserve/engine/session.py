"""A live video session: frames and queries in, decisions and streamed responses out.

One session owns one KV cache that only ever grows by appends (earlier tokens are never recomputed)
and shrinks by whole-segment evictions under a bounded policy. Each frame is one forward of
[pending tokens + the frame's <v> embeddings]; the decision is read at the frame's last token.

The request path, top to bottom:
    push_frame / push_query   validate, queue (thread-safe; callers may push while `process` runs)
    process                   take the next input in stream-time order -> step -> events
    _step_frame / _respond    make room (evict) -> forward -> update ledger, pending tokens, state
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from liveserve.config import SessionConfig
from liveserve.engine.attention import StepContext
from liveserve.engine.events import Event, FrameDecision, ResponseDelta, ResponseDone, ResponseStarted
from liveserve.engine.kv_cache import CacheFullError, KVCache
from liveserve.engine.ledger import Ledger
from liveserve.model.live import LiveModel

NEW, STREAMING, REPLIED = "new", "streaming", "replied"  # nothing fed / inside "[..." / after a reply's eos


class SessionError(ValueError):
    """Bad input for a session (the session itself is unaffected)."""


@dataclass(frozen=True, slots=True)
class _Frame:
    timestamp: float
    arrival: float
    pixels: torch.Tensor | None = None  # uint8 [3, S, S]
    features: torch.Tensor | None = None  # [tokens_per_frame, vision_hidden]


@dataclass(frozen=True, slots=True)
class _Query:
    timestamp: float
    arrival: float
    text: str


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
    def __init__(self, model: LiveModel, config: SessionConfig | None = None, session_id: str = "") -> None:
        self.model, self.config, self.session_id = model, config or SessionConfig(), session_id
        self.template = model.template
        self.system_prompt = self.config.system_prompt or model.system_prompt
        self.ledger = Ledger()
        self.cache = KVCache(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                             max_tokens=self._cache_limit(), dtype=model.dtype, device=model.device)
        self.trace: list[ForwardTrace] | None = None
        self._contiguous = self.config.cache.positions == "contiguous"
        self._state, self._pending = NEW, []
        self._next_position = 0
        self._instruction_pinned = False
        self._frames: deque[_Frame] = deque()
        self._queries: deque[_Query] = deque()
        self._lock = threading.Lock()
        self._last_frame_time = -math.inf
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self.frames_decided = self.responses = 0
        self.closed = False

    # ---- input -------------------------------------------------------------------------------

    def push_frame(self, timestamp: float, frame) -> None:
        """Queue a frame: an image (uint8 tensor [3,H,W], numpy [H,W,3] or PIL image, resized and padded
        to the tower's input) or precomputed vision features [tokens_per_frame, vision_hidden]."""
        timestamp = _check_time(timestamp, "frame")
        item = self._as_frame(timestamp, frame)
        with self._lock:
            self._check_open()
            if timestamp < self._last_frame_time:
                raise SessionError(f"frame timestamp {timestamp:.3f}s is before the previous frame's "
                                   f"{self._last_frame_time:.3f}s; timestamps must not go backwards")
            self._last_frame_time = timestamp
            self._frames.append(item)

    def push_query(self, timestamp: float, text: str) -> None:
        timestamp = _check_time(timestamp, "query")
        if not isinstance(text, str) or not text.strip():
            raise SessionError("query text is empty")
        n = len(self.template.encode(text))
        if n > self.config.max_query_tokens:
            raise SessionError(f"query is {n} tokens; the limit is {self.config.max_query_tokens}")
        with self._lock:
            self._check_open()
            self._queries.append(_Query(timestamp, time.monotonic(), text.strip()))

    @property
    def backlog(self) -> int:
        return len(self._frames)

    # ---- processing ----------------------------------------------------------------------------

    def process(self) -> Iterator[Event]:
        """Process everything queued, in stream-time order, yielding events as they happen. A query is
        answered before the first frame later than it, or right after a frame at the same time."""
        while (item := self._next_item()) is not None:
            if isinstance(item, _Query):
                yield from self._respond("query", item.timestamp, item.text)
                continue
            decision, query = self._step_frame(item)
            yield decision
            if query is not None:
                yield from self._respond("query", query.timestamp, query.text)
            elif decision.fired:
                yield from self._respond("proactive", item.timestamp, None)

    def _next_item(self) -> _Frame | _Query | None:
        with self._lock:
            if self._queries and (not self._frames or self._queries[0].timestamp < self._frames[0].timestamp):
                return self._queries.popleft()
            return self._frames.popleft() if self._frames else None

    def _step_frame(self, frame: _Frame) -> tuple[FrameDecision, _Query | None]:
        features = frame.features if frame.features is not None else self.model.encode_frames(frame.pixels[None])[0]
        if self._state == NEW:
            ids = self.template.start_ids(self.system_prompt)
        elif self._state == REPLIED:
            ids = self._pending + list(self.template.stream_open_ids)
        else:
            ids = self._pending
        self._make_room(incoming_frames=1)
        logits = self._forward(ids, features)
        if self._state == NEW:
            self.ledger.add("prefix", len(ids))
        elif ids:
            self.ledger.extend_last(len(ids))  # "," closes the previous frame; eos + "\n[" close the turn
        self.ledger.add("frame", features.shape[0])
        self._state, self._pending = STREAMING, []
        with self._lock:
            query = self._queries.popleft() if self._queries and self._queries[0].timestamp <= frame.timestamp else None
        probs = logits.softmax(-1)
        p_silent = float(probs[self.template.interval_id])
        if p_silent < self.config.threshold:
            probs[self.template.interval_id] = 0.0
        token = int(probs.argmax())
        fired = query is None and token != self.template.interval_id
        if query is None and not fired:
            self._pending = [self.template.interval_id]
        self.frames_decided += 1
        action = "query" if query is not None else ("respond" if fired else "silent")
        return FrameDecision(frame.timestamp, self.frames_decided - 1, p_silent, fired, action, token,
                             time.monotonic() - frame.arrival, self.cache.length), query

    def _respond(self, trigger: str, timestamp: float, query: str | None) -> Iterator[Event]:
        started = time.monotonic()
        pending: list[int] = []
        kind, pinned = "text", False
        if trigger == "proactive":
            ids = list(self.template.stream_reply_ids)
        elif self._state == NEW:
            ids, kind = self.template.first_query_ids(self.system_prompt, query), "prefix"
        else:
            pending = self._pending if self._state == REPLIED else []  # a pending "," is dropped: "]" closes
            ids = pending + self.template.query_ids(query, stream_open=self._state == STREAMING)
            pinned = not self._instruction_pinned
        self._make_room(incoming_frames=0)
        self._check_room(len(ids) + self.config.max_new_tokens + 1)
        yield ResponseStarted(timestamp, trigger, query)
        logits = self._forward(ids, None)
        if pending:
            self.ledger.extend_last(len(pending))
        self.ledger.add(kind, len(ids) - len(pending), pinned)
        self._instruction_pinned |= trigger == "query"
        tokens: list[int] = []
        text, ttft = "", 0.0
        while True:
            token = self._pick(logits)
            tokens.append(token)
            if len(tokens) == 1:
                ttft = time.monotonic() - started
            if token == self.template.eos_id:
                finish, self._pending = "eos", [token]
                break
            decoded = self.template.decode(tokens)
            if not decoded.endswith("\ufffd") and len(decoded) > len(text):  # hold back split UTF-8
                yield ResponseDelta(timestamp, decoded[len(text):], (token,))
                text = decoded
            if len(tokens) == self.config.max_new_tokens:
                finish, self._pending = "length", [token, self.template.eos_id]  # close the turn properly
                break
            logits = self._forward([token], None)
            self.ledger.extend_last(1)
        self._state = REPLIED
        self.responses += 1
        text = self.template.decode(tokens)
        yield ResponseDone(timestamp, trigger, query, text, len(tokens), finish, ttft, time.monotonic() - started)

    def _pick(self, logits: torch.Tensor) -> int:
        if self.config.temperature == 0.0:
            return int(logits.argmax())
        probs = (logits / self.config.temperature).softmax(-1)
        if self.config.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.config.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs.cpu(), 1, generator=self._rng))

    # ---- cache -----------------------------------------------------------------------------------

    def _cache_limit(self) -> int:
        cache, limit = self.config.cache, self.model.max_positions
        if cache.policy == "full":
            return limit
        turn = self.config.max_query_tokens + self.config.max_new_tokens + 16  # framing of one turn
        prefix = len(self.template.start_ids(self.config.system_prompt or self.model.system_prompt)) + turn
        frame = self.model.layout.num_tokens + 1
        bound = prefix + (cache.window_frames + 2) * frame + cache.text_window_tokens + 2 * turn
        if cache.positions == "contiguous" and bound > limit:
            raise ValueError(f"sink_window needs up to {bound} positions but the model has {limit}; "
                             "lower window_frames, text_window_tokens or max_new_tokens")
        return min(bound, limit)

    def _make_room(self, incoming_frames: int) -> None:
        victims = self.ledger.plan_eviction(self.config.cache, incoming_frames)
        if victims is None:
            return
        # The newest frame owes its pending ","; the newest turn its eos: neither can go.
        last = len(self.ledger.segments) - 1
        victims = [v for v in victims if v != last]
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

    def _forward(self, ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        parts = [self.model.embed_ids(ids)] if ids else []
        if features is not None:
            parts.append(self.model.embed_frames(features[None]))
        embeds = torch.cat(parts) if len(parts) > 1 else parts[0]
        n = embeds.shape[0]
        self._check_room(n)
        self.cache.reserve(n)
        start = self.cache.length if self._contiguous else self._next_position
        positions = torch.arange(start, start + n, device=self.model.device)
        with torch.inference_mode():
            logits = self.model.forward_step(embeds, positions, StepContext([(self.cache, n)]),
                                             torch.tensor([n - 1], device=self.model.device))[0]
        self.cache.commit(positions)
        self._next_position = start + n
        if self.trace is not None:
            self.trace.append(ForwardTrace(embeds.detach().clone(), positions.clone(),
                                           self.cache.positions[: self.cache.length].clone(), logits.clone(),
                                           tuple(ids), 0 if features is None else features.shape[0]))
        return logits

    def close(self) -> None:
        """Release the cache memory; the session cannot be used afterwards."""
        self.cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=1, max_tokens=0, dtype=self.model.dtype,
                             device=self.model.device, initial_capacity=0)
        with self._lock:
            self.closed = True
            self._frames.clear()
            self._queries.clear()

    def _check_open(self) -> None:
        if self.closed:
            raise SessionError("session is closed")

    # ---- validation ------------------------------------------------------------------------------

    def _as_frame(self, timestamp: float, frame) -> _Frame:
        arrival = time.monotonic()
        expected = (self.model.layout.num_tokens, self.model.vision_hidden_size)
        if isinstance(frame, torch.Tensor) and frame.is_floating_point():
            if tuple(frame.shape) != expected:
                raise SessionError(f"frame features must have shape {expected}, got {tuple(frame.shape)}")
            if not bool(torch.isfinite(frame).all()):
                raise SessionError("frame features contain NaN or infinite values")
            return _Frame(timestamp, arrival, features=frame)
        if isinstance(frame, (torch.Tensor, np.ndarray)) or hasattr(frame, "convert"):
            from liveserve.video import resize_and_pad

            if self.model.vision is None:
                raise SessionError("this model has no vision tower loaded; send frame features")
            try:
                pixels = resize_and_pad(frame, self.model.frame_size)
            except ValueError as exc:
                raise SessionError(f"bad frame image: {exc}") from exc
            return _Frame(timestamp, arrival, pixels=pixels)
        raise SessionError(f"a frame is an image or a features tensor, got {type(frame).__name__}")


def _check_time(timestamp, what: str) -> float:
    try:
        value = float(timestamp)
    except (TypeError, ValueError):
        raise SessionError(f"{what} timestamp must be a number, got {timestamp!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SessionError(f"{what} timestamp must be finite and >= 0, got {timestamp!r}")
    return value
