"""Many sessions on one model replica: the batched engine.

Sessions are admitted against a KV pool (refused with PoolFullError when their reservation does not
fit), their frames are encoded by a shared dynamic-batching encoder, and every `step` is one
explicit pass of

    schedule   pick ready sessions fairly; drop frames of sessions lagging behind their stream
    execute    plan each session's next piece of work, pack all of them into one forward
    update     hand each session the logits at its last token -> decisions and reply tokens

A session's step is a frame (decision), a reply prompt or one reply token, so frame steps and reply
decoding of different sessions share forwards (continuous batching). A session whose own work cannot
fit its cache fails alone (SessionFailed); its neighbours go on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from liveserve.config import EngineConfig, SessionConfig
from liveserve.engine.contracts import EngineModel, EngineSession, SplitReplies, Step
from liveserve.engine.events import Event, SessionFailed
from liveserve.engine.inputs import SessionError
from liveserve.engine.kv_pool import CacheFullError, KVPool
from liveserve.engine.kernels import kernel_availability, select_kernel
from liveserve.engine.packed import forward
from liveserve.engine.perception import BatchedFrameEncoder
from liveserve.engine.readout import read_out
from liveserve.engine.scheduler import Scheduler
from liveserve.engine.sessions import FAMILIES, default_mode, new_session, session_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    sessions: int
    steps: int
    pool_capacity_tokens: int
    pool_reserved_tokens: int
    pool_used_tokens: int
    pool_bytes: int
    bytes_per_token: int
    perception_batches: int
    perception_frames: int


class BatchEngine:
    def __init__(self, model: EngineModel, config: EngineConfig | None = None) -> None:
        self.model, self.config = model, config or EngineConfig()
        self.pool = KVPool.for_model(model, self.config.pool)
        self.kernel = select_kernel(self.config.attention, self.pool)
        model.use_cuda_graphs(self.config.cuda_graphs)
        log.info("attention kernel: %s (asked for %s; %s)", self.kernel.name, self.config.attention,
                 ", ".join(f"{name}: {why or 'runs here'}" for name, why in kernel_availability(self.pool).items()))
        # How frames reach the tower is the family's: encoded as pushed, batched across sessions (LIVE), or
        # what the scheduled sessions feed next, in one call per step (Qwen2.5-VL's chunks).
        family = FAMILIES[model.family]
        encodes_frames = family.encodes_pushed_frames and model.vision is not None
        self.encoder = BatchedFrameEncoder(model, self.config.perception) if encodes_frames else None
        self._encode_scheduled = family.encode_scheduled
        self._wakeup = threading.Event()  # set by pushes (and an overlapping encoder's batches): there may be work
        if self.encoder is not None:
            self.encoder.start(self._wakeup.set)
        self.scheduler = Scheduler(self.config.scheduler)
        self.steps = 0
        self.last_batch: tuple[str, ...] = ()  # the sessions the latest step ran (introspection, metrics)
        self._sessions: dict[str, EngineSession] = {}  # admission order
        # Held for a whole step and by open/close: the pool's block lists and a session's cache change only
        # under it, so closing a session from another thread never frees memory a running forward uses.
        self._step_lock = threading.Lock()

    # ---- sessions --------------------------------------------------------------------------------------

    def open(self, session_id: str, config: SessionConfig | None = None) -> EngineSession:
        """Admit a session or raise PoolFullError (why, and how much is free) / SessionError (id in use)."""
        config = config or SessionConfig(mode=default_mode(self.model))
        limit = self.session_tokens(config)
        with self._step_lock:
            if session_id in self._sessions:
                raise SessionError(f"session {session_id!r} is already open")
            cache = self.pool.open_cache(limit)
            encoder = self.encoder.submit if self.encoder is not None else None
            session = new_session(self.model, config, session_id, cache=cache, encoder=encoder)
            self._sessions[session_id] = session
        return session

    def session_tokens(self, config: SessionConfig) -> int:
        """The KV tokens a session of `config` reserves in the pool."""
        limit = session_tokens(self.model, config)
        if config.mode == "live" and config.cache.policy == "full" and self.config.pool.max_session_tokens is not None:
            limit = min(limit, self.config.pool.max_session_tokens)
        return limit

    def describe_capacity(self, config: SessionConfig) -> str:
        """One line for the logs: the pool's size and how many sessions of `config` it admits."""
        pool, tokens = self.pool, self.session_tokens(config)
        policy = "commentary (StreamingVLM's windows)" if config.mode == "commentary" else config.cache.policy
        return (f"KV pool: {pool.capacity_tokens} tokens ({pool.nbytes / 2**30:.2f} GiB on {pool.device}) admits "
                f"{pool.sessions_admitted(tokens)} sessions of cache policy {policy} "
                f"({tokens} tokens, {tokens * pool.bytes_per_token / 2**20:.1f} MiB each)")

    def session(self, session_id: str) -> EngineSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionError(f"unknown session {session_id!r}") from None

    def push_frame(self, session_id: str, timestamp: float, frame, frame_id: int | None = None) -> None:
        """Queue a frame (see Session.push_frame); `frame_id` names it in its decision, by default its
        number among the session's frames."""
        self.session(session_id).push_frame(timestamp, frame, frame_id)
        self._wakeup.set()

    def push_query(self, session_id: str, timestamp: float, text: str) -> None:
        self.session(session_id).push_query(timestamp, text)
        self._wakeup.set()

    def push_respond(self, session_id: str, timestamp: float) -> None:
        """Reaction sessions: reply proactively at `timestamp` (see Session.push_respond)."""
        self._split_replies(session_id).push_respond(timestamp)
        self._wakeup.set()

    def push_reply(self, session_id: str, text: str, token_ids: tuple[int, ...] = ()) -> None:
        """Decision sessions: append the reply another model wrote (see Session.push_reply)."""
        self._split_replies(session_id).push_reply(text, token_ids)
        self._wakeup.set()

    def _split_replies(self, session_id: str) -> SplitReplies:
        session = self.session(session_id)
        if not isinstance(session, SplitReplies):
            raise SessionError(f"session {session_id!r} ({type(session).__name__}) writes every reply itself")
        return session

    def wake(self) -> None:
        """Tell a thread waiting in `wait_for_work` there may be work: for callers that push many inputs
        straight into sessions (`session(id).push_frame(...)`) and want one step to take all of them."""
        self._wakeup.set()

    def close(self, session_id: str) -> None:
        """Close a session and return its memory to the pool (safe while another thread steps)."""
        with self._step_lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                raise SessionError(f"unknown session {session_id!r}")
            session.close()
            self.scheduler.forget(session_id)

    def shutdown(self) -> None:
        with self._step_lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
        if self.encoder is not None:
            self.encoder.close()

    @property
    def sessions(self) -> list[EngineSession]:
        return list(self._sessions.values())

    # ---- one step: schedule -> execute -> update ----------------------------------------------------

    def step(self) -> list[tuple[str, Event]]:
        with self._step_lock:
            if self.encoder is not None and not self.encoder.overlap:
                self.encoder.encode_waiting()  # perception for every frame that arrived since the last step
            schedule = self.scheduler.schedule([s for s in self._sessions.values() if not s.closed])
            if self._encode_scheduled is not None:
                self._encode_for(schedule.sessions)
            events: list[tuple[str, Event]] = list(schedule.dropped)
            planned: list[tuple[EngineSession, Step]] = []
            for session in schedule.sessions:
                try:
                    step = session.plan()
                except CacheFullError as exc:
                    events.append(self._fail(session, "cache_full", str(exc)))
                    continue
                except Exception as exc:  # e.g. its frame failed to encode: this session fails, not the step
                    log.exception("planning session %s failed", session.session_id)
                    events.append(self._fail(session, "internal", f"{type(exc).__name__}: {exc}"))
                    continue
                if step is not None:
                    planned.append((session, step))
                else:
                    events.extend((session.session_id, notice) for notice in session.take_notices())
            self.last_batch = tuple(s.session_id for s, _ in planned)
            if not planned:
                return events
            try:
                logits = self._execute(planned)
            except Exception as exc:  # e.g. device OOM: the sessions of this batch fail, the engine goes on
                log.exception("batched forward failed for %d sessions", len(planned))
                return events + [self._fail(s, "internal", f"batched forward failed: {exc}") for s, _ in planned]
            for (session, _), row in zip(planned, read_out(logits, self.model.template.interval_id)):
                try:
                    events.extend((session.session_id, event) for event in session.complete(row))
                except Exception as exc:  # a bug in one session's bookkeeping must not stall the others
                    log.exception("completing session %s failed", session.session_id)
                    events.append(self._fail(session, "internal", f"{type(exc).__name__}: {exc}"))
            self.steps += 1
            return events

    def _encode_for(self, sessions: list[EngineSession]) -> None:
        """What the scheduled sessions feed next through the tower together (commentary: their turns'
        chunks). If that call fails, each session encodes its own while planning, so a bad chunk fails its
        session only."""
        try:
            self._encode_scheduled(self.model, sessions)
        except Exception:
            log.exception("encoding %d sessions' next vision together failed; each encodes its own", len(sessions))

    def _execute(self, planned: list[tuple[EngineSession, Step]]) -> torch.Tensor:
        return forward(self.model, self.pool, [(session.cache, step) for session, step in planned], self.kernel)

    def _fail(self, session: EngineSession, code: str, message: str) -> tuple[str, SessionFailed]:
        session.fail(message)
        return session.session_id, SessionFailed(code, message)

    # ---- driving ---------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        """Whether any session has queued input or a step in progress (ready now or once encoded). Frames
        held for a reply written elsewhere are not: only its `push_reply` moves them."""
        return any(s.has_work() for s in self._sessions.values() if not s.closed)

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a step has something to do (an input arrived, or frames to encode have waited
        `max_wait_ms` for company) or the timeout passes; True when there is work. Lets a serving loop
        sleep instead of spinning."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._wakeup.clear()  # clear first: a push landing between the check and the wait still wakes us
            if any(s.ready() for s in self._sessions.values()):
                return True
            # Frames waiting for an inline encoder are this step's work; an overlapping one wakes us when done.
            pending = self.encoder is not None and not self.encoder.overlap and self.encoder.queue_depth > 0
            wait = self.encoder.worth_waiting() if pending else deadline - time.monotonic()
            if pending and wait <= 0:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wakeup.wait(min(wait, remaining))

    def run_until_idle(self, timeout_s: float = 60.0) -> list[tuple[str, Event]]:
        """Step until no session has queued work, waiting for frames still being encoded. For tests and
        batch jobs; a server runs `step` / `wait_for_work` in its own loop."""
        deadline = time.monotonic() + timeout_s
        events: list[tuple[str, Event]] = []
        while self.has_work():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"engine still busy after {timeout_s}s")
            if self.wait_for_work(min(remaining, 0.1)):
                events.extend(self.step())
        return events

    def stats(self) -> EngineStats:
        pool, perception = self.pool, self.encoder.stats if self.encoder is not None else None
        return EngineStats(
            sessions=len(self._sessions), steps=self.steps, pool_capacity_tokens=pool.capacity_tokens,
            pool_reserved_tokens=pool.reserved_blocks * pool.block_size,
            pool_used_tokens=pool.used_blocks * pool.block_size, pool_bytes=pool.nbytes,
            bytes_per_token=pool.bytes_per_token, perception_batches=perception.batches if perception else 0,
            perception_frames=perception.frames if perception else 0)
