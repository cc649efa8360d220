"""A commentary session (StreamingVLM's mode, Qwen2.5-VL family): a turn per chunk of video, said or silent.

The conversation is ChatML, one user turn per chunk and the model's reply after it:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>previous text\\n{older replies}<|im_end|>\\n
    <|im_start|>user\\nTime=0.0-1.0s<|vision_start|>{chunk}<|vision_end|>{query}<|im_end|>\\n<|im_start|>assistant\\n
    {reply} ...<|im_end|>\\n<|im_start|>user\\nTime=1.0-2.0s<|vision_start|>...

Each chunk is one prompt step (the turn, its vision tokens in place of the <|video_pad|>s) and then one step
per reply token, up to `max_tokens_per_chunk`; the reply's last token and its <|im_end|> are fed with the
next turn (the engine never feeds a token it has not read yet). A reply of only the no-comment marker
" ..." is silence.

The cache is a list of pieces in cache order (commentary_cache.py: `Piece`); before each chunk's turn,
the pieces older than StreamingVLM's windows go in one `keep` of the cache, the keys re-rotated by their
shift. Frames are grouped into chunks on the input side (chunk_inputs.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from liveserve.config import SessionConfig
from liveserve.engine.commentary.inputs import Chunk, ChunkInputs
from liveserve.engine.commentary.cache import Piece, apply_windows, contiguous_rows, turn_positions
from liveserve.engine.commentary.decoding import ReplyDecoder
from liveserve.engine.commentary.reply import ChunkReply
from liveserve.engine.events import ChunkDone, Event, ResponseDone
from liveserve.engine.inputs import QueuedFrame, SessionError
from liveserve.engine.kv_pool import CacheFullError
from liveserve.engine.packed import forward_alone, private_cache
from liveserve.engine.readout import Readout, read_out
from liveserve.model.qwen_vl import QwenVLModel, VisionGrid

__all__ = ["CommentarySession", "CommentaryStep", "Piece", "commentary_cache_limit", "encode_chunks"]


@dataclass(frozen=True, slots=True)
class CommentaryStep:
    """One session's share of a forward: token ids (a chunk's vision tokens as <|video_pad|>s, filled in
    from `features`), at M-RoPE `positions` [3, tokens]."""

    ids: tuple[int, ...]
    features: torch.Tensor | None  # [vision tokens, hidden]: LM embeddings from the tower's merger
    positions: torch.Tensor
    start: int
    grid: VisionGrid | None = None  # a turn's: its chunk's vision grid

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def chunk_grid(model: QwenVLModel, chunk: Chunk) -> VisionGrid:
    """The vision grid of `chunk`: its frames' count and size."""
    frame = chunk.frames[0].pixels
    return model.grid(len(chunk.frames), frame.shape[1], frame.shape[2])


class CommentarySession:
    # The serving side asks every Decision session whether a reply written elsewhere is still due (its
    # text goes in before the session closes); a commentary session writes each turn's reply itself.
    awaiting_reply = False

    def __init__(self, model: QwenVLModel, config: SessionConfig | None = None, session_id: str = "", *,
                 cache=None) -> None:
        """`cache`: a PagedCache from the engine's KVPool (batched serving); by default a pool of its own."""
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
        self.inputs = ChunkInputs(model, self.config)
        self.pieces: list[Piece] = []
        self.last_keep: torch.Tensor | None = None  # the cache indices the last eviction kept, in their new order
        self.trace: list | None = None
        self._contiguous = self.commentary.positions == "contiguous"
        self._seconds_per_grid = tp / self.commentary.fps  # the video time one temporal group of frames spans
        self._turns = 0  # chunks fed so far
        self._pending: list[int] = []  # the last reply's tokens not fed yet (its end)
        self._pending_chunk = -1  # ... and its chunk
        self._turn_pieces: list[Piece] = []  # the planned turn's pieces, added once it is in the cache
        self._turn_memo: tuple[tuple, tuple[list[int], list[Piece]]] | None = None  # see _turn_ids
        self._next_position = 0
        self._reply: ChunkReply | None = None
        self._planned: tuple[bool, CommentaryStep] | None = None  # (a turn, not a reply token; the step)
        self.decoder = ReplyDecoder(model.never_said_ids(), self.config)
        self.frames_decided = self.responses = 0
        self.frames_replayed = 0  # (live sessions' counter: a commentary session replays nothing)

    # ---- input -------------------------------------------------------------------------------------

    def push_frame(self, timestamp: float, frame, frame_id: int | None = None) -> None:
        """Queue a frame (encoded image bytes, an image tensor/array/PIL image; sized as the session's
        CommentaryConfig says), into the chunk of its time (chunk_inputs.py)."""
        self.inputs.push_frame(timestamp, frame, frame_id)

    def push_query(self, timestamp: float, text: str) -> None:
        """A user question: asked in the turn of the next chunk to close, after its frames."""
        self.inputs.push_query(timestamp, text)

    def flush(self) -> None:
        """The stream ended: a partly filled chunk is closed now (its last frame repeated)."""
        self.inputs.flush()

    def chunk_to_encode(self) -> Chunk | None:
        """The chunk the next `plan` feeds, when it still needs its vision tokens."""
        chunk = self.inputs.next_chunk() if self._reply is None else None
        return chunk if chunk is not None and chunk.features is None else None

    def give_features(self, chunk: Chunk, features: torch.Tensor) -> None:
        self.inputs.give_features(chunk, features)

    # ---- state the engine reads ---------------------------------------------------------------------

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
    def backlog(self) -> int:
        """Frames of complete chunks waiting for their turn (a chunk still filling is no work yet)."""
        return sum(len(c.frames) for c in self.inputs.chunks)

    def ready(self) -> bool:
        return not self.closed and (self._reply is not None or bool(self.inputs.chunks))

    def has_work(self) -> bool:
        """The same as `ready`: a waiting chunk is encoded when it is planned, so it is always ready."""
        return self.ready()

    def next_step_tokens(self) -> int:
        if self._reply is not None:
            return 1
        chunk = self.inputs.next_chunk()
        return 0 if chunk is None else len(self._turn_ids(chunk)[0])

    def drop_stale_frames(self, max_lag_s: float | None, max_queued: int) -> list[QueuedFrame]:
        """Keep the session real-time: drop the oldest waiting chunks (see ChunkInputs.drop_stale)."""
        return self.inputs.drop_stale(max_lag_s, max_queued)

    def fail(self, message: str) -> None:
        self.inputs.close(failure=message)
        self.cache.close()

    def close(self) -> None:
        self.inputs.close()
        self.cache.close()

    def take_notices(self) -> list[Event]:
        """A commentary session's events all come with its steps' completions: planning raises none."""
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
        CacheFullError (nothing written) when the step would pass the cache or the model's positions."""
        if self._planned is not None:
            raise RuntimeError(f"session {self.session_id!r}: complete the planned step before planning another")
        self.last_keep = None
        if self.closed:
            return None
        if self._reply is not None:
            step = self._reserve([self._reply.tokens[-1]], None)
            self._planned = (False, step)
            return step
        chunk = self.inputs.take_chunk()
        if chunk is None:
            return None
        self._make_room()
        features = chunk.features if chunk.features is not None else self.model.encode_chunk(chunk.pixels())
        ids, pieces = self._turn_ids(chunk)
        step = self._reserve(ids, features, chunk_grid(self.model, chunk))
        self._planned = (True, step)
        self._reply = ChunkReply(chunk, chunk.index * self.commentary.chunk_s, (chunk.index + 1) * self.commentary.chunk_s)
        self._turn_pieces = pieces
        return step

    def complete(self, readout: Readout) -> list[Event]:
        (turn, step), self._planned = self._planned, None
        if turn:
            self._commit_turn(step)
        else:
            self._commit_ids(step, self.pieces[-1])
        if self.trace is not None:
            self.trace.append((step, readout.logits.detach().clone()))
        return self._next_token(readout)

    # ---- turns ---------------------------------------------------------------------------------------

    def _turn_ids(self, chunk: Chunk) -> tuple[list[int], list[Piece]]:
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
        c = chunk.index
        start, end = c * self.commentary.chunk_s, (c + 1) * self.commentary.chunk_s
        grid = chunk_grid(self.model, chunk)
        pieces += [Piece("turn", t.turn_open("user"), chunk=c),
                   Piece("time", t.encode(f"Time={start:.1f}-{end:.1f}s"), chunk=c),
                   Piece("vision_start", [t.vision_start], chunk=c),
                   Piece("vision", [t.video_pad] * grid.num_tokens, chunk=c, grid=grid),
                   Piece("vision_end", [t.vision_end], chunk=c)]
        queries = ([self.commentary.query] if self._turns == 0 and self.commentary.query else []) + list(chunk.queries)
        pieces.append(Piece("turn_end", [*t.encode(" ".join(queries)), *t.turn_close(), *t.turn_open("assistant")],
                            chunk=c))
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
        self._next_position = step.start + step.num_tokens - step.grid.num_tokens + step.grid.span

    def _commit_ids(self, step: CommentaryStep, piece: Piece) -> None:
        piece.ids.extend(step.ids)
        self.cache.commit(step.positions[0])
        self._next_position = step.start + step.num_tokens

    # ---- replies -------------------------------------------------------------------------------------

    def _next_token(self, readout: Readout) -> list[Event]:
        reply = self._reply
        token = self.decoder.pick(readout, reply.tokens)
        reply.tokens.append(token)
        if len(reply.tokens) == 1:
            reply.ttft = time.monotonic() - reply.chunk.frames[-1].arrival
        eos = self.template.eos_id
        if token == eos or len(reply.tokens) == self.commentary.max_tokens_per_chunk:
            return self._finish(reply)
        return reply.stream(self.template, final=False)

    def _finish(self, reply: ChunkReply) -> list[Event]:
        events = reply.stream(self.template, final=True)
        eos = self.template.eos_id
        tokens = reply.tokens
        self.pieces[-1].content = reply.num_words(self.template)
        # The last token is not in the cache yet; a reply cut at the limit is closed with <|im_end|>. The
        # newline closing the assistant turn is the reply's own: it leaves the cache with it.
        self._pending = [tokens[-1], self.template.newline] if tokens[-1] == eos else [tokens[-1], eos,
                                                                                       self.template.newline]
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

    # ---- the cache -----------------------------------------------------------------------------------

    def _make_room(self) -> None:
        """Before the next chunk's turn: apply the windows (commentary_cache.py) in one `keep`."""
        kept = apply_windows(self.pieces, self.commentary)
        if kept is None:
            return
        self.pieces, self.last_keep = kept
        if self._contiguous:
            rows, self._next_position = contiguous_rows(self.pieces, self.model.temporal_interval(self._seconds_per_grid))
            self.cache.keep(self.last_keep, self.model.inv_freq, rows)
        else:
            self.cache.keep(self.last_keep, None)

    def kept_ids(self) -> list[int]:
        """Every cached token's id in cache order (vision tokens as <|video_pad|>): what a full forward
        over the kept conversation would read."""
        return [i for piece in self.pieces for i in piece.ids]

    def _reserve(self, ids: list[int], features: torch.Tensor | None, grid: VisionGrid | None = None) -> CommentaryStep:
        n, start = len(ids), self._next_position
        if features is not None:
            if features.shape[0] != grid.num_tokens:
                raise SessionError(f"a chunk of {grid.num_tokens} vision tokens got {features.shape[0]} features")
            positions = turn_positions(self.model, grid, self._seconds_per_grid, ids, start)
        else:
            positions = torch.arange(start, start + n).expand(3, n)
        if int(positions.max()) >= self.model.max_positions:
            raise CacheFullError(f"session is at position {start}; this step would pass the model's limit of "
                                 f"{self.model.max_positions} (use contiguous positions)")
        if self.cache.length + n > self.cache.max_tokens:
            raise CacheFullError(f"cache holds {self.cache.length} tokens; {n} more would pass its limit "
                                 f"of {self.cache.max_tokens}")
        self.cache.reserve(n)
        return CommentaryStep(tuple(ids), features, positions, start, grid)  # positions on the host: sent with it


def encode_chunks(model: QwenVLModel, sessions) -> None:
    """Encode the chunk every one of `sessions` feeds next in one call of the tower (the engine's perception
    for this family: a step's turns share the tower as its frames share the LM)."""
    waiting = [(session, chunk) for session in sessions if (chunk := session.chunk_to_encode()) is not None]
    if not waiting:
        return
    for (session, chunk), features in zip(waiting, model.encode_chunks([chunk.pixels() for _, chunk in waiting])):
        session.give_features(chunk, features)


def commentary_cache_limit(model: QwenVLModel, config: SessionConfig) -> int:
    """The most tokens a commentary session's cache holds under its windows: what a KV pool reserves."""
    cfg, t = config.commentary, model.template
    system = len(t.encode(config.system_prompt or model.system_prompt)) + 16
    framing = 32 + cfg.max_query_tokens  # a turn's ChatML and time text, and a query
    turn = framing + model.largest_chunk_tokens(cfg) + cfg.max_tokens_per_chunk + 3
    previous = max(len(t.encode(cfg.previous_text)), cfg.text_sink_tokens + cfg.text_window_tokens)
    # Moved words wait one turn before the trim: up to one reply more than the window.
    bound = system + previous + cfg.max_tokens_per_chunk + (max(cfg.vision_window_chunks, cfg.text_rounds) + 1) * turn
    return min(bound, model.max_positions)
