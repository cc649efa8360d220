"""Decision: each session's KV cache on this replica's device, frames of all sessions stepped in batches,
one streaming-EOS decision per frame.

Sessions run with replies="external": when one fires (or meets a query) it reports ReplyRequested and
keeps deciding frames; the gateway has Reaction write the reply and hands the finished text back
(ReplyText). The engine then puts the reply right after its trigger and re-appends the frames decided
meanwhile, so the cache keeps the token order the model was trained on. Frames that wanted to fire
during a reply are reported as SUPPRESSED: one reply at a time.

With a registry (Redis), each session's record names this replica as owner under a fencing epoch; every
write (heartbeat, last timestamp, history) is fenced, and a session whose record was taken over stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc

from liveserve.engine.batch import BatchEngine
from liveserve.engine.events import Event
from liveserve.engine.inputs import FeatureShapeError, RestoredTurn, SessionError
from liveserve.engine.kv_pool import PoolFullError
from liveserve.engine.live.session import Session
from liveserve.engine.sessions import default_mode, tokens_per_frame
from liveserve.model.live import LiveModel
from liveserve.services.decision.events import EventTranslator, HeldSession
from liveserve.services.decision.recovery import restore_items
from liveserve.services.observability.telemetry import DecisionMetrics, GpuMetrics, sample_periodically
from liveserve.services.observability.tracing import extract, tracer
from liveserve.services.replica.engine_worker import EngineWorker
from liveserve.services.replica.outbox import GatewayLeases, Outboxes
from liveserve.services.settings import ServiceSettings
from liveserve.services.state.registry import RegistryError, SessionRegistry, UnknownSessionError
from liveserve.services.wire import contracts as c

log = logging.getLogger(__name__)


class DecisionService:
    def __init__(self, model: LiveModel, settings: ServiceSettings, replica: str,
                 registry: SessionRegistry | None = None) -> None:
        self.model, self.settings, self.replica, self.registry = model, settings, replica, registry
        self._warned_features = False  # features of another tower's shape were logged
        self.engine = BatchEngine(model, settings.engine_config())
        defaults = dataclasses.replace(settings.session_defaults(), mode=default_mode(model))
        log.info("decision replica %s: %s", replica, self.engine.describe_capacity(defaults))
        self.metrics, self.gpu, self.tracer = DecisionMetrics(), GpuMetrics(), tracer("decision")
        self.translate = EventTranslator(replica, self.metrics, self._record_turn,
                                         close_failed=lambda sid: self._worker.close_when_drained(sid, 0))
        self.sessions: dict[str, HeldSession] = {}
        self.outboxes = Outboxes(self._gateway_gone, interval_s=settings.hop_ms / 1000)
        self.leases = GatewayLeases(settings.session_ttl_s, self._gateway_gone)
        self._worker: EngineWorker | None = None  # started on the serving loop by the first call
        self.admission = settings.admission_limit(model.device.type)
        self.max_sessions = self.admission.sessions  # None: as many as the KV pool holds
        log.info("decision replica %s admits %s: %s", replica, "as many sessions as its KV pool holds"
                 if self.max_sessions is None else f"at most {self.max_sessions} sessions", self.admission.reason)
        self._opening = 0  # sessions being admitted (counted against max_sessions before they are held)
        self._background: list[asyncio.Task] = []
        self.stopping = False  # the replica goes away: its sessions live on where their gateways move them

    def _start(self) -> EngineWorker:
        if self._worker is None:
            loop = asyncio.get_running_loop()
            self._worker = EngineWorker(self.engine, loop, self._deliver, self._ended,
                                        on_step=self.metrics.record_step, name="decision-engine")
            self._background = [loop.create_task(sample_periodically(self._sample_metrics)),
                                loop.create_task(self.leases.watch())]
            if self.registry is not None:
                self._background.append(loop.create_task(self._heartbeat_loop()))
        return self._worker

    # ---- the seam: open, push, events ---------------------------------------------------------------------

    async def ping(self) -> None:
        """Raises when this replica cannot take sessions: its Redis (when it has one) is unreachable."""
        if self.registry is None:
            return
        try:
            await asyncio.to_thread(self.registry.client.ping)
        except BaseException:  # unreachable, or the caller stopped waiting (cancelled): no answer either way
            self.metrics.redis_pings.inc(tags={"result": "error"})
            raise
        self.metrics.redis_pings.inc(tags={"result": "ok"})

    async def open(self, request: c.OpenSession) -> c.SessionPlaced:
        """Admit the session here (PoolFullError when the replica holds `max_sessions` or the KV pool has no
        room) and register it."""
        worker = self._start()
        config = request.config
        config = dataclasses.replace(config, replies="none" if config.replies == "none" else "external")
        sid = request.session_id
        self.leases.renew(request.gateway_id)
        if request.restore is not None:  # resumed right after its call broke: its old self may still be closing
            await self._gone(sid)
        # The engine's sessions: those closing still take compute until they are gone.
        if self.max_sessions is not None and len(self.engine.sessions) + self._opening >= self.max_sessions:
            raise PoolFullError(f"decision replica {self.replica} holds {len(self.engine.sessions) + self._opening}"
                                f" sessions, its admission limit: {self.admission.reason}")
        self._opening += 1
        try:
            session = await asyncio.to_thread(worker.open, sid, config)
        finally:
            self._opening -= 1  # now one of the engine's sessions
        epoch, history = 1, ()
        record = {"threshold": config.threshold, "max_new_tokens": config.max_new_tokens,
                  "cache_policy": config.cache.policy, "window_frames": config.cache.window_frames,
                  "gateway": request.gateway_id, "mode": config.mode}
        try:
            if self.registry is not None and request.restore is not None:
                epoch, history = await asyncio.to_thread(self._take_over, sid, record)
            elif self.registry is not None:
                epoch = (await asyncio.to_thread(self.registry.create, sid, self.replica, record)).epoch
            restored_turns = 0
            if request.restore is not None:
                items = restore_items(request.restore, history)
                session.restore(items)
                restored_turns = sum(isinstance(item, RestoredTurn) for item in items)
                self.engine.wake()
        except Exception:
            worker.close(sid)
            raise
        self.sessions[sid] = HeldSession(sid, request.gateway_id, epoch, session, record=record)
        limits = c.Limits(max_query_tokens=config.max_query_tokens, max_new_tokens=config.max_new_tokens,
                          max_lag_s=self.engine.config.scheduler.max_lag_s or 0.0,
                          tokens_per_frame=tokens_per_frame(self.model, config))
        return c.SessionPlaced(sid, self.replica, epoch, limits, restored_turns)

    async def _gone(self, session_id: str, timeout_s: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while session_id in self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    def _take_over(self, session_id: str, record: dict) -> tuple[int, tuple[dict, ...]]:
        """Own a session moving here: a new epoch fences its previous owner off (a replica that is only
        slow or partitioned can no longer write), and its turns come back from the registry."""
        try:
            epoch = self.registry.claim(session_id, self.replica, reopen=True)  # reopen: a resumed session
        except UnknownSessionError:  # its record expired with its owner: the conversation went with it
            log.warning("session %s moved here without a registry record; its turns are lost", session_id)
            return self.registry.create(session_id, self.replica, {**record, "restored": True}).epoch, ()
        found = self.registry.get(session_id)
        return epoch, found.history if found is not None else ()

    async def push(self, push: c.DecisionPush) -> None:
        """Apply a gateway's commands in order. A command that cannot be applied becomes a Refused event
        for its session; the others go on."""
        worker = self._start()
        self.leases.renew(push.gateway_id)  # an empty push is the gateway's heartbeat
        for command in push.commands:
            held = self.sessions.get(command.session_id)
            if held is None or held.epoch != command.epoch:
                where = "unknown" if held is None else f"at epoch {held.epoch}, not {command.epoch},"
                self.outboxes.put(push.gateway_id, c.Refused(command.session_id, _input_kind(command),
                                                             getattr(command, "frame_id", -1),
                                                             f"session {command.session_id!r} is {where} on "
                                                             f"decision replica {self.replica}"))
                continue
            try:
                self._apply(worker, held, command)
            except SessionError as exc:
                self.outboxes.put(held.gateway_id, c.Refused(held.session_id, _input_kind(command),
                                                             getattr(command, "frame_id", -1), str(exc)))
        self.engine.wake()  # once for the whole push, so one step takes every session in it

    def events(self, gateway_id: str):
        """The events of `gateway_id`'s sessions here, a batch at a time, until the gateway cancels."""
        return self.outboxes.stream(gateway_id)

    def _apply(self, worker: EngineWorker, held: HeldSession, command: c.DecisionCommand) -> None:
        sid, session = held.session_id, held.session
        if isinstance(command, c.FrameFeatures):
            try:
                session.push_frame(command.timestamp, command.features, frame_id=command.frame_id)
            except FeatureShapeError as exc:
                raise self._other_tower(exc) from None
            held.last_timestamp = command.timestamp
            if command.trace:
                held.decide_spans[command.frame_id] = self.tracer.start_span(
                    "decision.decide", context=extract(command.trace),
                    attributes={"liveserve.session_id": sid, "liveserve.frame_timestamp": command.timestamp})
        elif isinstance(command, c.QueryText):
            session.push_query(command.timestamp, command.text)
            if command.trace:
                held.trigger_traces[command.timestamp] = command.trace
            self._record_turn(held, command.timestamp, "user", command.text)
        elif isinstance(command, c.ReplyText):
            session.push_reply(command.text, command.token_ids)
            if command.text:
                self._record_turn(held, held.reply_at, "assistant", command.text)
        else:
            if command.drain:
                session.flush()  # the end of the stream: all it was sent is decided (a last, partial chunk too)
            worker.close_when_drained(sid, self.settings.drain_timeout_s if command.drain else 0.0)

    def _other_tower(self, exc: FeatureShapeError) -> SessionError:
        """Features come from a Perception pool: of the wrong shape, that pool runs another vision tower (a
        model of `models` whose `perception` names a model with a different tower). Said to the client per
        frame and to the operator once."""
        message = (f"frame features from Perception are {exc.got}, this model takes {exc.expected}: the "
                   f"Perception pool encoding this model's frames runs another vision tower (with several models, "
                   f"`perception` may only name a model with the same tower)")
        if not self._warned_features:
            self._warned_features = True
            log.error("decision replica %s: %s", self.replica, message)
        return SessionError(message)

    # ---- engine events -> the gateways' outboxes (on the serving loop) ------------------------------------

    def _deliver(self, events: list[tuple[str, Event]]) -> None:
        for sid, event in events:
            held = self.sessions.get(sid)
            if held is None:
                continue
            for message in self.translate(held, event):
                self.outboxes.put(held.gateway_id, message)

    def _ended(self, session_id: str, session: Session) -> None:
        held = self.sessions.pop(session_id, None)
        if held is None or self.stopping:  # stopping: not ended, moving (its record stays open for the claim)
            return
        for span in held.decide_spans.values():  # never decided: the session ended first
            span.end()
        self.metrics.frames_replayed.inc(session.frames_replayed)
        code, message = held.failure or (0, "")
        self.outboxes.put(held.gateway_id, c.SessionClosed(
            session_id, session.frames_decided, session.frames_dropped, session.responses, session.frames_replayed,
            code, message))
        if self.registry is not None:
            self._write_registry(self._close_record, held)

    def _close_record(self, held: HeldSession) -> None:
        """The record's last timestamp as the session ended (heartbeats carry it only every heartbeat_s, so
        the frames decided since the last one would be missing from its transcript), then closed."""
        if held.last_timestamp is not None:
            self.registry.record(held.session_id, self.replica, held.epoch, last_timestamp=held.last_timestamp)
        self.registry.close(held.session_id, self.replica, held.epoch)

    def _gateway_gone(self, gateway_id: str) -> None:
        """The gateway's event stream ended, or its lease ran out: nobody will read its sessions' events,
        so they close now."""
        for held in list(self.sessions.values()):
            if held.gateway_id == gateway_id and self._worker is not None:
                held.failure = held.failure or (grpc.StatusCode.UNAVAILABLE.value[0],
                                                f"the session's gateway went silent for over "
                                                f"{self.settings.session_ttl_s:g}s; the session was closed")
                self._worker.close_when_drained(held.session_id, 0)

    # ---- registry, metrics, introspection ------------------------------------------------------------------

    def _record_turn(self, held: HeldSession, timestamp: float, role: str, text: str) -> None:
        if self.registry is not None:
            self._write_registry(self.registry.record, held.session_id, self.replica, held.epoch,
                                 turn={"t": timestamp, "role": role, "text": text})

    def _write_registry(self, write, *args, **kwargs) -> None:
        async def write_quietly() -> None:
            try:
                await asyncio.to_thread(write, *args, **kwargs)
            except Exception:
                log.warning("registry write %s failed", write.__name__, exc_info=True)

        task = asyncio.get_running_loop().create_task(write_quietly())
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    async def _heartbeat_loop(self) -> None:
        """Keep owned sessions' records alive and their last timestamps current; a session whose record was
        taken over (stale epoch) is stopped here."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for held in list(self.sessions.values()):
                try:
                    await asyncio.to_thread(self.registry.record, held.session_id, self.replica, held.epoch,
                                            last_timestamp=held.last_timestamp)
                except UnknownSessionError:  # Redis lost it (restarted, flushed): nobody else owns it
                    await self._register_again(held)
                except RegistryError as exc:
                    log.warning("session %s lost its registry record: %s", held.session_id, exc)
                    held.failure = (grpc.StatusCode.FAILED_PRECONDITION.value[0], str(exc))
                    self._worker.close_when_drained(held.session_id, 0)
                except Exception:
                    log.warning("heartbeat for session %s failed", held.session_id, exc_info=True)

    async def _register_again(self, held: HeldSession) -> None:
        log.warning("session %s had no registry record any more (Redis restarted?); writing it again",
                    held.session_id)
        try:
            held.epoch = (await asyncio.to_thread(self.registry.create, held.session_id, self.replica,
                                                  {**held.record, "restored": True})).epoch
        except Exception:
            log.warning("writing session %s's record again failed", held.session_id, exc_info=True)

    def _sample_metrics(self) -> None:
        self.metrics.record_state(self.engine)
        self.gpu.sample()

    def report(self) -> dict[str, dict]:
        """This replica's sessions and how far each got (operators' tools, and tests of stickiness)."""
        return {sid: {"epoch": held.epoch, "replica": self.replica, "gateway": held.gateway_id,
                      "frames_decided": held.session.frames_decided, "awaiting_reply": held.session.awaiting_reply,
                      "cache_tokens": held.session.cache.length, "frames_replayed": held.session.frames_replayed}
                for sid, held in self.sessions.items()}

    def load(self) -> dict:
        """What routing and autoscaling go by: sessions held and the KV pool's reserved share."""
        return {"sessions": len(self.sessions), "kv_used_fraction": self.engine.pool.reserved_fraction,
                "free_fraction": 1.0 - self.engine.pool.reserved_fraction, "max_sessions": self.max_sessions or 0}

    def stop(self) -> None:
        """The replica goes away (scale-down, upgrade, shutdown). Sessions still here are not closed: their
        gateways see the event streams end and rebuild them on other replicas (gateway recovery)."""
        self.stopping = True
        for task in self._background:
            task.cancel()
        if self._worker is not None:
            self._worker.stop()


def _input_kind(command: c.DecisionCommand) -> str:
    return {c.FrameFeatures: "frame", c.QueryText: "query", c.ReplyText: "reply"}.get(type(command), "close")
