"""A commentary session (StreamingVLM's mode, Qwen2.5-VL family): a turn per chunk of video, said or silent.

The conversation is ChatML, one user turn per chunk and the model's reply after it:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>previous text\\n{older replies}<|im_end|>\\n
    <|im_start|>user\\nTime=0.0-1.0s<|vision_start|>{chunk}<|vision_end|>{query}<|im_end|>\\n<|im_start|>assistant\\n
    {reply} ...<|im_end|>\\n<|im_start|>user\\nTime=1.0-2.0s<|vision_start|>...

Each chunk is one prompt step (the turn, its vision tokens in place of the <|video_pad|>s) and then one step
per reply token, up to `max_tokens_per_chunk`; the reply's last token and its <|im_end|> are fed with the
next turn (the engine never feeds a token it has not read yet). A reply of only the no-comment marker
" ..." is silence.

The cache is a list of pieces in cache order (`Piece`); before each chunk's turn, the pieces older than
the windows go (StreamingVLM's policy): a turn's vision tokens once `vision_window_chunks` newer chunks
exist, its reply once `text_rounds` newer ones do, the reply's words (without framing or marker) moved
into the previous-text block rather than dropped, and that block trimmed to its first `text_sink_tokens`
and last `text_window_tokens`. Moving and dropping is one `keep` of the cache: kept tokens in their new
order, with contiguous positions recomputed as transformers' `get_rope_index` would over the kept tokens
(text one per token, a chunk max(rows, columns)), the keys re-rotated by their shift.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from liveserve.config import SessionConfig
from liveserve.engine.events import ChunkDone, Event, ResponseDelta, ResponseDone, ResponseStarted
from liveserve.engine.inputs import (QueuedFrame, SessionError, check_frame_id, check_not_before, check_open,
                                     check_time)
from liveserve.engine.kv_pool import CacheFullError
from liveserve.engine.packed import forward_alone, private_cache
from liveserve.engine.readout import Readout, read_out, sample
from liveserve.model.qwen_vl import NO_COMMENT, QwenVLModel, VisionGrid

__all__ = ["CommentarySession", "CommentaryStep", "Piece", "commentary_cache_limit", "encode_chunks"]


@dataclass(frozen=True, slots=True)
class CommentaryStep:
    """One session's share of a forward: token ids (a chunk's vision tokens as <|video_pad|>s, filled in
    from `features`), at M-RoPE `positions` [3, tokens]."""

    ids: tuple[int, ...]
    features: torch.Tensor | None  # [vision tokens, hidden]: LM embeddings from the tower's merger
    positions: torch.Tensor
    start: int

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class Piece:
    """A run of cached tokens with one role. kinds: "system" (system turn and the previous-text opening:
    the sink), "previous" (older replies' words), "previous_end", and per chunk "turn" (its user turn up
    to the vision), "vision", "turn_end" (to the assistant's opening) and "reply" (the reply's tokens;
    its first `content` are its words; "reply_end": a reply's last tokens fed after the reply itself left)."""

    kind: str
    ids: list[int]
    chunk: int = -1
    grid: VisionGrid | None = None
    content: int = 0

    def row0(self, start: int, interval: float) -> torch.Tensor:
        """The temporal M-RoPE row of the piece's tokens when it starts at `start` (the row the cache keeps:
        every row shifts alike when the cache is compacted); `interval`: positions per temporal group."""
        if self.grid is None:
            return torch.arange(start, start + len(self.ids))
        groups = (torch.arange(self.grid.t) * interval).long()
        return start + groups.repeat_interleave(self.grid.h * self.grid.w)

    @property
    def span(self) -> int:
        return len(self.ids) if self.grid is None else self.grid.span


@dataclass(frozen=True, slots=True)
class _Chunk:
    index: int  # floor(start / chunk_s)
    frames: tuple[QueuedFrame, ...]
    queries: tuple[str, ...]
    features: torch.Tensor | None = None  # its vision tokens, once encoded (see encode_chunks)

    @property
    def start_s(self) -> float:
        return self.frames[0].timestamp

    def pixels(self) -> torch.Tensor:
        return torch.stack([frame.pixels for frame in self.frames])

    def distinct_frames(self) -> list[QueuedFrame]:
        """Its frames, a short chunk's repeated last frame once (by identity: frames hold tensors)."""
        return list({id(frame): frame for frame in self.frames}.values())


@dataclass(slots=True)
class _Reply:
    chunk: _Chunk
    start_s: float
    end_s: float
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # text streamed so far
    ttft: float = 0.0  # the chunk's last frame's arrival to its first reply token
    started: bool = False  # ResponseStarted sent


class CommentarySession:
    def __init__(self, model: QwenVLModel, config: SessionConfig | None = None, session_id: str = "", *,
                 cache=None, encoder=None) -> None:
        """`cache`: a PagedCache from the engine's KVPool (batched serving); by default a pool of its own.
        `encoder` is accepted for the engine's sake and not used: a chunk is encoded when it is stepped."""
        self.model, self.config, self.session_id = model, config or SessionConfig(mode="commentary"), session_id
        self.commentary = self.config.commentary
        self.template = model.template
        tp = model.temporal_patch_size
        if self.commentary.frames_per_chunk % tp:
            raise SessionError(f"a chunk of {self.commentary.chunk_s}s at {self.commentary.fps} FPS is "
                               f"{self.commentary.frames_per_chunk} frames; this model's tower takes frames in "
                               f"groups of {tp}")
        self.system_prompt = self.config.system_prompt or model.system_prompt
        self.cache = cache if cache is not None else private_cache(model, commentary_cache_limit(model, self.config))
        self.pieces: list[Piece] = []
        self.last_keep: torch.Tensor | None = None  # the cache indices the last eviction kept, in their new order
        self.trace: list | None = None
        self._contiguous = self.commentary.positions == "contiguous"
        self._seconds_per_grid = tp / self.commentary.fps  # the video time one temporal group of frames spans
        self._grid = model.grid(self.commentary.frames_per_chunk)
        self._lock = threading.Lock()
        self._filling: list[QueuedFrame] = []  # the chunk being filled
        self._filling_index = -1
        self._last_index = -1  # the last closed chunk's
        self._chunks: deque[_Chunk] = deque()  # full chunks, waiting for their turn
        self._queries: list[str] = []  # pushed since the last chunk closed: asked in the next one's turn
        self._turns = 0  # chunks fed so far
        self._pending: list[int] = []  # the last reply's tokens not fed yet (its end)
        self._pending_chunk = -1  # ... and its chunk
        self._turn_pieces: list[Piece] = []  # the planned turn's pieces, added once it is in the cache
        self._turn_memo: tuple[tuple, tuple[list[int], list[Piece]]] | None = None  # see _turn_ids
        self._next_position = 0
        self._reply: _Reply | None = None
        self._planned: tuple[str, CommentaryStep] | None = None
        self._last_frame_time = -float("inf")
        self._frames_pushed = 0
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self.frames_decided = self.frames_dropped = self.responses = 0
        self.frames_replayed = 0  # (live sessions' counter: a commentary session replays nothing)
        self.closed = False
        self.failure: str | None = None

    # ---- input -------------------------------------------------------------------------------------

    def push_frame(self, timestamp: float, frame, frame_id: int | None = None) -> None:
        """Queue a frame (encoded image bytes, an image tensor/array/PIL image; resized and padded to the
        tower's square input). Frames are grouped into chunks in arrival order: a chunk is complete with its
        `chunk_s * fps` frames, or early when a frame of a later chunk's time arrives (a short chunk repeats
        its last frame). Chunk k is labelled `Time=k*chunk_s-(k+1)*chunk_s`: the chunk after the last one,
        or the chunk of its first frame's time after a gap, so jittery timestamps never repeat a label."""
        timestamp = check_time(timestamp, "frame")
        frame_id = check_frame_id(frame_id)
        if isinstance(frame, torch.Tensor) and frame.is_floating_point():
            raise SessionError("commentary sessions take images: the tower encodes a chunk of frames together")
        with self._lock:
            self._check_open()
            self._check_order(timestamp)
        pixels = _pixels(frame, self.model.frame_size)
        with self._lock:
            self._check_open()
            self._check_order(timestamp)
            self._last_frame_time = timestamp
            item = QueuedFrame(timestamp, time.monotonic(), pixels=pixels,
                               frame_id=self._frames_pushed if frame_id is None else frame_id)
            self._frames_pushed += 1
            second = int(timestamp // self.commentary.chunk_s)
            if self._filling and second > self._filling_index:  # the source skipped the rest of the chunk
                self._close_chunk()
            if not self._filling:  # a new chunk: the next one, or the one of this time after a gap
                self._filling_index = max(self._last_index + 1, second)
            self._filling.append(item)
            if len(self._filling) == self.commentary.frames_per_chunk:
                self._close_chunk()

    def push_query(self, timestamp: float, text: str) -> None:
        """A user question: asked in the turn of the next chunk to close, after its frames."""
        check_time(timestamp, "query")
        if not isinstance(text, str) or not text.strip():
            raise SessionError("query text is empty")
        n = len(self.template.encode(text))
        if n > self.commentary.max_query_tokens:
            raise SessionError(f"query is {n} tokens; the limit is {self.commentary.max_query_tokens}")
        with self._lock:
            self._check_open()
            self._queries.append(text.strip())

    def flush(self) -> None:
        """The stream ended: a partly filled chunk is closed now (its last frame repeated)."""
        with self._lock:
            if self._filling:
                self._close_chunk()

    def push_respond(self, timestamp: float) -> None:
        raise SessionError("commentary sessions speak (or stay silent) every chunk; there is nothing to trigger")

    def push_reply(self, text: str, token_ids=()) -> None:
        raise SessionError("commentary sessions write their own replies")

    def restore(self, items) -> None:
        raise SessionError("commentary sessions cannot be restored yet")

    def chunk_to_encode(self) -> _Chunk | None:
        """The chunk the next `plan` feeds, when it still needs its vision tokens."""
        with self._lock:
            chunk = self._chunks[0] if self._chunks and self._reply is None else None
        return chunk if chunk is not None and chunk.features is None else None

    def give_features(self, chunk: _Chunk, features: torch.Tensor) -> None:
        with self._lock:
            if self._chunks and self._chunks[0] is chunk:  # not dropped meanwhile
                self._chunks[0] = replace(chunk, features=features)

    def _close_chunk(self) -> None:
        frames, n = self._filling, self.commentary.frames_per_chunk
        frames = frames + [frames[-1]] * (n - len(frames))
        self._chunks.append(_Chunk(self._filling_index, tuple(frames), tuple(self._queries)))
        self._last_index = self._filling_index
        self._filling, self._queries = [], []

    # ---- state the engine reads ---------------------------------------------------------------------

    @property
    def awaiting_reply(self) -> bool:
        return False

    @property
    def holding_frames(self) -> bool:
        return False

    @property
    def backlog(self) -> int:
        """Frames of complete chunks waiting for their turn (a chunk still filling is no work yet)."""
        return sum(len(c.frames) for c in self._chunks)

    def ready(self) -> bool:
        return not self.closed and (self._reply is not None or bool(self._chunks))

    def next_step_tokens(self) -> int:
        if self._reply is not None:
            return 1
        with self._lock:
            chunk = self._chunks[0] if self._chunks else None
        return 0 if chunk is None else len(self._turn_ids(chunk)[0])

    def drop_stale_frames(self, max_lag_s: float | None, max_queued: int) -> list[QueuedFrame]:
        """Keep the session real-time: drop the oldest waiting chunks while they span more than `max_lag_s`
        of stream time or hold more than `max_queued` frames (the newest chunk always stays). A dropped
        chunk's queries are asked with the next one."""
        dropped: list[QueuedFrame] = []
        with self._lock:
            chunks = self._chunks
            while len(chunks) > 1 and (sum(len(c.frames) for c in chunks) > max_queued or (
                    max_lag_s is not None and chunks[-1].start_s - chunks[0].start_s > max_lag_s)):
                gone = chunks.popleft()
                dropped.extend(gone.distinct_frames())
                if gone.queries:
                    chunks[0] = replace(chunks[0], queries=gone.queries + chunks[0].queries)
        self.frames_dropped += len(dropped)
        return dropped

    def fail(self, message: str) -> None:
        self.failure = message
        self.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._chunks.clear()
            self._filling = []
        self.cache.close()

    def take_notices(self) -> list[Event]:
        return []

    # ---- alone ---------------------------------------------------------------------------------------

    def process(self) -> Iterator[Event]:
        """Run everything queued, one forward at a time, yielding events as they happen."""
        while (events := self.step_alone()) is not None:
            yield from events

    def step_alone(self) -> list[Event] | None:
        step = self.plan()
        if step is None:
            return None
        return self.complete(read_out(forward_alone(self.model, self.cache, step), self.template.interval_id)[0])

    # ---- one step: plan -> (a forward) -> complete ---------------------------------------------------

    def plan(self) -> CommentaryStep | None:
        """The next step (a chunk's turn or a reply token) with room made for it; None when idle. Raises
        CacheFullError (nothing written) when it cannot fit."""
        if self._planned is not None:
            raise RuntimeError(f"session {self.session_id!r}: complete the planned step before planning another")
        self.last_keep = None
        if self.closed:
            return None
        if self._reply is not None:
            step = self._reserve([self._reply.tokens[-1]], None)
            self._planned = ("token", step)
            return step
        with self._lock:
            if not self._chunks:
                return None
            chunk = self._chunks.popleft()
        self._make_room()
        features = chunk.features if chunk.features is not None else self.model.encode_chunk(chunk.pixels())
        ids, pieces = self._turn_ids(chunk)
        step = self._reserve(ids, features)
        self._planned = ("turn", step)
        self._reply = _Reply(chunk, chunk.index * self.commentary.chunk_s, (chunk.index + 1) * self.commentary.chunk_s)
        self._turn_pieces = pieces
        return step

    def complete(self, readout: Readout) -> list[Event]:
        (kind, step), self._planned = self._planned, None
        if kind == "turn":
            self._commit_turn(step)
        else:
            self._commit_ids(step, self.pieces[-1])
        if self.trace is not None:
            self.trace.append((step, readout.logits.detach().clone()))
        return self._next_token(readout)

    # ---- turns ---------------------------------------------------------------------------------------

    def _turn_ids(self, chunk: _Chunk) -> tuple[list[int], list[Piece]]:
        """The ids a chunk's turn feeds (the last reply's unfed end first) and the pieces they make:
        tokenized once per turn, though the scheduler asks for their count each step until it runs."""
        key = (chunk.index, chunk.queries, self._turns)
        if self._turn_memo is not None and self._turn_memo[0] == key:
            return self._turn_memo[1]
        t = self.template
        pieces: list[Piece] = []
        if self._turns == 0:
            pieces += [Piece("system", [*t.turn_open("system"), *t.encode(self.system_prompt), *t.turn_close(),
                                        *t.turn_open("previous text")]),
                       Piece("previous", t.encode(self.commentary.previous_text)),
                       Piece("previous_end", t.turn_close())]
            opening = []
        else:
            opening = [t.newline]  # the newline after the last reply's <|im_end|>
        c = chunk.index
        start, end = c * self.commentary.chunk_s, (c + 1) * self.commentary.chunk_s
        pieces.append(Piece("turn", [*opening, *t.turn_open("user"), *t.encode(f"Time={start:.1f}-{end:.1f}s"),
                                     t.vision_start], chunk=c))
        pieces.append(Piece("vision", [t.video_pad] * self._grid.num_tokens, chunk=c, grid=self._grid))
        queries = ([self.commentary.query] if self._turns == 0 and self.commentary.query else []) + list(chunk.queries)
        pieces.append(Piece("turn_end", [t.vision_end, *t.encode(" ".join(queries)), *t.turn_close(),
                                         *t.turn_open("assistant")], chunk=c))
        ids = list(self._pending) + [i for piece in pieces for i in piece.ids]
        self._turn_memo = (key, (ids, pieces))
        return ids, pieces

    def _commit_turn(self, step: CommentaryStep) -> None:
        if self._pending:  # the last reply's end, fed now: with its reply, unless that has left the cache
            last = self.pieces[-1]
            if last.kind == "reply" and last.chunk == self._pending_chunk:
                last.ids.extend(self._pending)
            else:
                self.pieces.append(Piece("reply_end", list(self._pending), chunk=self._pending_chunk))
            self._pending = []
        self.pieces.extend(self._turn_pieces)
        self.pieces.append(Piece("reply", [], chunk=self._reply.chunk.index))
        self._turns += 1
        self._turn_pieces = []
        self.cache.commit(step.positions[0])
        self._next_position = step.start + self._span(step)

    def _commit_ids(self, step: CommentaryStep, piece: Piece) -> None:
        piece.ids.extend(step.ids)
        self.cache.commit(step.positions[0])
        self._next_position = step.start + step.num_tokens

    def _span(self, step: CommentaryStep) -> int:
        vision = 0 if step.features is None else self._grid.num_tokens
        return step.num_tokens - vision + (0 if step.features is None else self._grid.span)

    # ---- replies -------------------------------------------------------------------------------------

    def _next_token(self, readout: Readout) -> list[Event]:
        reply = self._reply
        token = self._pick(readout)
        reply.tokens.append(token)
        if len(reply.tokens) == 1:
            reply.ttft = time.monotonic() - reply.chunk.frames[-1].arrival
        eos = self.template.eos_id
        if token == eos or len(reply.tokens) == self.commentary.max_tokens_per_chunk:
            return self._finish(reply)
        return self._stream(reply, final=False)

    def _visible(self, tokens: list[int], final: bool) -> str:
        text = self.template.decode([i for i in tokens if i != self.template.eos_id])
        if final:
            return text[: -len(NO_COMMENT)].rstrip() if text.endswith(NO_COMMENT) else text.rstrip()
        # Hold back what may still become the marker, and a split UTF-8 character.
        for n in range(min(len(NO_COMMENT), len(text)), 0, -1):
            if NO_COMMENT.startswith(text[-n:]):
                return text[:-n]
        return text[:-1] if text.endswith("\ufffd") else text

    def _stream(self, reply: _Reply, final: bool) -> list[Event]:
        text = self._visible(reply.tokens, final)
        events: list[Event] = []
        if len(text) > len(reply.shown) and text.startswith(reply.shown):
            if not reply.started:
                reply.started = True
                events.append(ResponseStarted(reply.start_s, "commentary", None))
            events.append(ResponseDelta(reply.start_s, text[len(reply.shown):], (reply.tokens[-1],)))
            reply.shown = text
        return events

    def _finish(self, reply: _Reply) -> list[Event]:
        events = self._stream(reply, final=True)
        eos = self.template.eos_id
        tokens = reply.tokens
        # The reply's words: without its <|im_end|> and, when it ends so, the no-comment marker.
        words = tokens[:-1] if tokens[-1] == eos else list(tokens)
        marker = list(self.template.no_comment)
        if marker and words[-len(marker):] == marker:
            words = words[: -len(marker)]
        self.pieces[-1].content = len(words)
        # The last token is not in the cache yet; a reply cut at the limit is closed with <|im_end|>.
        self._pending = [tokens[-1]] if tokens[-1] == eos else [tokens[-1], eos]
        self._pending_chunk = reply.chunk.index
        self._reply = None
        self.frames_decided += len(reply.chunk.distinct_frames())
        silent = not reply.shown
        if reply.started:
            self.responses += 1
            finish = "eos" if tokens[-1] == eos else "length"
            events.append(ResponseDone(reply.start_s, "commentary", None, reply.shown, len(tokens), finish, reply.ttft,
                                       time.monotonic() - reply.chunk.frames[-1].arrival,
                                       tuple(tokens[:-1] if tokens[-1] == eos else tokens)))
        frames = reply.chunk.distinct_frames()
        events.append(ChunkDone(reply.start_s, reply.end_s, tuple(f.frame_id for f in frames),
                                tuple(f.timestamp for f in frames), reply.shown, silent, len(tokens),
                                time.monotonic() - reply.chunk.frames[-1].arrival, self.cache.length))
        return events

    def _pick(self, readout: Readout) -> int:
        return sample(readout, self.config.temperature, self.config.top_p, self._rng)

    # ---- the cache -----------------------------------------------------------------------------------

    def _make_room(self) -> None:
        """Before the next chunk's turn: apply the windows (see the module docs) in one `keep`. Planned a
        piece at a time (runs of cache indices as ranges): a cache of thousands of tokens costs a few dozen
        small tensors per chunk, not a Python list per token."""
        cfg = self.commentary
        chunks = sorted({piece.chunk for piece in self.pieces if piece.chunk >= 0})  # the turns, oldest first
        reply_gone = set(chunks[: max(0, len(chunks) - cfg.text_rounds + 1)])  # text_rounds newer ones exist
        vision_gone = set(chunks[: max(0, len(chunks) - cfg.vision_window_chunks + 1)])
        kept: list[tuple[Piece, int]] = []  # (piece, its first cache index)
        moved: list[tuple[Piece, int]] = []  # replies leaving: their words go to the previous text
        start = 0
        for piece in self.pieces:
            if piece.kind in ("reply", "reply_end") and piece.chunk in reply_gone:
                moved.append((piece, start))
            elif not (piece.kind == "vision" and piece.chunk in vision_gone or piece.kind in ("turn", "turn_end")
                      and piece.chunk in reply_gone and piece.chunk in vision_gone):
                kept.append((piece, start))
            start += len(piece.ids)
        previous = next((piece for piece, _ in kept if piece.kind == "previous"), None)
        limit = cfg.text_sink_tokens + cfg.text_window_tokens
        if len(kept) == len(self.pieces) and (previous is None or len(previous.ids) <= limit):
            return
        new_pieces, runs = [], []
        for piece, start in kept:
            index = torch.arange(start, start + len(piece.ids))
            if piece.kind == "previous":
                words = [(reply, first, min(reply.content, len(reply.ids))) for reply, first in moved]
                index = torch.cat([index, *(torch.arange(first, first + n) for _, first, n in words)])
                ids = piece.ids + [i for reply, _, n in words for i in reply.ids[:n]]
                if len(ids) > limit:  # its first text_sink_tokens and last text_window_tokens
                    tail = len(ids) - cfg.text_window_tokens
                    ids = ids[: cfg.text_sink_tokens] + ids[tail:]
                    index = torch.cat([index[: cfg.text_sink_tokens], index[tail:]])
                piece = Piece("previous", ids)
            new_pieces.append(piece)
            runs.append(index)
        index = torch.cat(runs)
        self.pieces, self.last_keep = new_pieces, index
        if self._contiguous:
            rows, position = [], 0
            for piece in new_pieces:
                rows.append(piece.row0(position, self.model.tokens_per_second * self._seconds_per_grid))
                position += piece.span
            self.cache.keep(index, self.model.inv_freq, torch.cat(rows))
            self._next_position = position
        else:
            self.cache.keep(index, None)

    def kept_ids(self) -> list[int]:
        """Every cached token's id in cache order (vision tokens as <|video_pad|>): what a full forward
        over the kept conversation would read."""
        return [i for piece in self.pieces for i in piece.ids]

    def _reserve(self, ids: list[int], features: torch.Tensor | None) -> CommentaryStep:
        n, start = len(ids), self._next_position
        if features is not None:
            positions = self._turn_positions(ids, start)
        else:
            positions = torch.arange(start, start + n).expand(3, n)
        if int(positions.max()) >= self.model.max_positions:
            raise CacheFullError(f"session is at position {start}; this step would pass the model's limit of "
                                 f"{self.model.max_positions} (use contiguous positions)")
        if self.cache.length + n > self.cache.max_tokens:
            raise CacheFullError(f"cache holds {self.cache.length} tokens; {n} more would pass its limit "
                                 f"of {self.cache.max_tokens}")
        self.cache.reserve(n)
        return CommentaryStep(tuple(ids), features, positions, start)  # positions on the host: sent with the step

    def _turn_positions(self, ids: list[int], start: int) -> torch.Tensor:
        """M-RoPE rows [3, n] of a turn's ids starting at `start`: text one per token, the chunk's pads by
        their grid."""
        pad = self.template.video_pad
        first = ids.index(pad)
        n_vision = self._grid.num_tokens
        before = torch.arange(start, start + first).expand(3, first)
        vision = self.model.vision_positions(start + first, self._grid, self._seconds_per_grid)
        after_start = start + first + self._grid.span
        rest = len(ids) - first - n_vision
        after = torch.arange(after_start, after_start + rest).expand(3, rest)
        return torch.cat([before, vision, after], dim=1)

    # ---- checks --------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        check_open(self.failure, self.closed)

    def _check_order(self, timestamp: float) -> None:
        check_not_before(timestamp, self._last_frame_time)


def encode_chunks(model: QwenVLModel, sessions) -> None:
    """Encode the chunk every one of `sessions` feeds next in one call of the tower (the engine's perception
    for this family: a step's turns share the tower as its frames share the LM)."""
    waiting = [(session, chunk) for session in sessions if (chunk := session.chunk_to_encode()) is not None]
    if not waiting:
        return
    for (session, chunk), features in zip(waiting, model.encode_chunks([chunk.pixels() for _, chunk in waiting])):
        session.give_features(chunk, features)


def _pixels(frame, size: int) -> torch.Tensor:
    from liveserve.video import VideoError, decode_image_bytes, resize_and_pad

    try:
        if isinstance(frame, (bytes, bytearray, memoryview)):
            return decode_image_bytes(bytes(frame), size)
        return resize_and_pad(frame, size)
    except (ValueError, VideoError, TypeError) as exc:
        raise SessionError(f"bad frame image: {exc}") from exc


def commentary_cache_limit(model: QwenVLModel, config: SessionConfig) -> int:
    """The most tokens a commentary session's cache holds under its windows: what a KV pool reserves."""
    cfg, t = config.commentary, model.template
    system = len(t.encode(config.system_prompt or model.system_prompt)) + 16
    framing = 32 + cfg.max_query_tokens  # a turn's ChatML and time text, and a query
    turn = framing + model.grid(cfg.frames_per_chunk).num_tokens + cfg.max_tokens_per_chunk + 2
    previous = max(len(t.encode(cfg.previous_text)), cfg.text_sink_tokens + cfg.text_window_tokens)
    # Moved words wait one turn before the trim: up to one reply more than the window.
    bound = system + previous + cfg.max_tokens_per_chunk + (max(cfg.vision_window_chunks, cfg.text_rounds) + 1) * turn
    return min(bound, model.max_positions)
