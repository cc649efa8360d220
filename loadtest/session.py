"""One simulated camera: a LiveStream call that sends paced frames and queries and times what comes back.

The sender and the receiver are separate tasks on the call, as in a real client: frames leave on the
wall-clock schedule (frame k at first-frame + k / fps) whatever the server answers, so a slow server
shows up as latency, lag and dropped frames rather than as a client that politely slows down.
All times are `time.perf_counter()` (monotonic); reported instants are seconds since the level began.
Frames are matched to their decisions by `frame_index` (the frame's number in this stream), never by
timestamp, so frames with equal timestamps are told apart. The call is a LiveStreamClient
(services/client/session.py): a session whose connection breaks resumes by itself, its undecided frames
sent again and still numbered as first sent, so their latency includes the outage; the resumes are counted.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field

import grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.loadtest.config import LoadConfig
from liveserve.loadtest.metrics import LiveStats
from liveserve.loadtest.workload import FrameBank, query_schedule, stream_plan
from liveserve.services.client import ClientError, LiveStreamClient, Reconnected, ResumePolicy

_TRIGGERS = {pb.TRIGGER_PROACTIVE: "proactive", pb.TRIGGER_QUERY: "query"}


@dataclass(slots=True)
class SessionRecord:
    """What one session measured. Latency pairs are parallel arrays (compact for long runs)."""

    index: int
    frames_scheduled: int
    model: str = ""  # Open.model: "" is the deployment's default
    started_s: float | None = None  # Open sent; None if the run stopped before this session's turn
    ended_s: float | None = None
    open_s: float | None = None  # Open -> SessionOpened
    frames_sent: int = 0
    queries_sent: int = 0
    decided_at: array = field(default_factory=lambda: array("d"))  # decision arrival (level time)
    latency_s: array = field(default_factory=lambda: array("d"))  # frame sent -> its decision arrived
    lag_s: array = field(default_factory=lambda: array("d"))  # decision arrival - the frame's due time
    server_lag_s: array = field(default_factory=lambda: array("d"))
    send_slip_s: array = field(default_factory=lambda: array("d"))
    dropped: set[int] = field(default_factory=set)  # frame indexes the server reported dropped
    undecided: int = 0
    ttft: list[tuple[str, float]] = field(default_factory=list)  # (trigger, seconds)
    tpot_s: list[float] = field(default_factory=list)
    server_ttft_s: list[float] = field(default_factory=list)  # ResponseDone.ttft_s: also replies with no text
    responses: int = 0
    response_tokens: int = 0
    warnings: Counter = field(default_factory=Counter)
    status: str = "OK"  # final gRPC status name, or DEADLINE_EXCEEDED for a client-side timeout
    detail: str = ""
    closed: bool = False  # SessionClosed arrived
    resume_s: list[float] = field(default_factory=list)  # per broken connection: the break -> SessionOpened again
    inputs_resent: int = 0

    @property
    def sustained(self) -> bool:
        return self.status == "OK" and self.closed


@dataclass(slots=True)
class _Reply:
    trigger: str
    trigger_at: float | None  # when the trigger happened at the client (None: not seen, no TTFT)
    first_at: float | None = None
    last_at: float | None = None


class SessionDriver:
    def __init__(self, index: int, config: LoadConfig, stub: pb_grpc.LiveStreamStub, bank: FrameBank,
                 live: LiveStats, origin: float, start_delay_s: float, stop: asyncio.Event, run_id: str) -> None:
        self.index, self.config, self.stub, self.bank, self.live = index, config, stub, bank, live
        self.origin, self.start_delay_s, self.stop, self.run_id = origin, start_delay_s, stop, run_id
        self.queries = query_schedule(config.seed, index, config.queries_per_min, config.duration_s)
        models = config.models
        self.record = SessionRecord(index, config.frames_per_session, models[index % len(models)] if models else "")
        self._t0 = 0.0  # due time of frame 0
        self._sent_at: dict[int, float] = {}  # frame index -> send time, until decided or dropped
        self._query_sent_at: deque[float] = deque()  # send times of queries not answered yet, in order
        self._fired_at: float | None = None  # arrival of the latest fired decision (one reply at a time)
        self._reply: _Reply | None = None
        self.clock = time.perf_counter  # replaceable, so the accounting can be tested with exact times

    async def run(self) -> SessionRecord:
        record = self.record
        if self.start_delay_s > 0:
            try:  # the ramp: wait for this session's turn, unless the run is being stopped
                await asyncio.wait_for(self.stop.wait(), self.start_delay_s)
            except TimeoutError:
                pass
        if self.stop.is_set():
            record.frames_scheduled = 0  # never started: nothing was owed
            return record
        record.started_s = self.clock() - self.origin
        self.live.sessions_active += 1
        call = self._client()
        try:
            await self._stream(call)
        except TimeoutError as exc:  # client-side limits (open, drain): the server did not keep up
            record.status, record.detail = "DEADLINE_EXCEEDED", str(exc)
        except ClientError as exc:  # the stream ended with a status (after any resumes it was allowed)
            if record.status == "OK":
                record.status, record.detail = exc.code.name, exc.details
        finally:
            await call.aclose()  # cancels a stream still going
            record.inputs_resent = call.resent
            record.ended_s = self.clock() - self.origin
            record.undecided = len(self._sent_at)
            self.live.frames_dropped += record.undecided
            self.live.sessions_active -= 1
            self.live.sessions_done += 1
            self.live.errors += record.status != "OK"
        return record

    def _deadline_s(self) -> float:
        """A backstop for the whole call; the open and drain timeouts normally fire first."""
        return self.config.open_timeout_s + self.config.duration_s + self.config.drain_timeout_s + 30.0

    def _client(self) -> LiveStreamClient:
        return LiveStreamClient(self.stub, self._open_message().open, timeout_s=self._deadline_s(),
                                resume=ResumePolicy(attempts=self.config.resume_attempts))

    def _open_message(self) -> pb.ClientMessage:
        c = self.config
        open_ = pb.Open(model=self.record.model, fps=c.fps, max_new_tokens=c.max_new_tokens, cache=pb.CacheOptions(policy=c.cache_policy),
                        credentials=dict(c.credentials), client_session_id=f"{self.run_id}-{self.index}")
        if c.threshold is not None:
            open_.threshold = c.threshold
        return pb.ClientMessage(open=open_)

    async def _stream(self, call: LiveStreamClient) -> None:
        """ClientError when the stream ends with an error status (a server breaking the protocol too: its
        first answer must be SessionOpened)."""
        sent = self.clock()
        call.start()
        try:
            await asyncio.wait_for(call.read(), self.config.open_timeout_s)  # SessionOpened
        except TimeoutError:
            raise TimeoutError(f"no SessionOpened within {self.config.open_timeout_s:g} s") from None
        self._t0 = self.clock()
        self.record.open_s = self._t0 - sent
        receiver = asyncio.create_task(self._receive(call))
        sender = asyncio.create_task(self._send(call))
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done():  # the server ended the stream before we were done sending
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await receiver  # raises the call's error status, if it ended with one
            return
        if (failure := sender.exception()) is not None:
            if not isinstance(failure, ClientError):
                raise failure  # a bug, not the server: do not dress it up as a status
            await receiver  # the stream is over: raises its status
            return
        await call.close()
        try:  # Close drains: every frame sent is decided before SessionClosed
            await asyncio.wait_for(receiver, self.config.drain_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"decisions still missing {self.config.drain_timeout_s:g} s after Close "
                               "(--drain-timeout)") from None

    async def _send(self, call) -> None:
        record, fps = self.record, self.config.fps
        for stream_t, index, text in stream_plan(fps, record.frames_scheduled, self.queries):
            due = self._t0 + stream_t
            delay = due - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop.is_set():  # interrupted: what was not sent was not owed
                record.frames_scheduled = record.frames_sent
                return
            now = self.clock()
            if index is None:
                self._query_sent_at.append(now)
                await call.write(pb.ClientMessage(query=pb.Query(timestamp=stream_t, text=text)))
                record.queries_sent += 1
                continue
            record.send_slip_s.append(now - due)
            self._sent_at[record.frames_sent] = now  # the client numbers frames in the order they are sent
            await call.write(pb.ClientMessage(frame=pb.Frame(
                timestamp=stream_t, image=self.bank.frame(self.index, index, fps))))
            record.frames_sent += 1
            self.live.frames_sent += 1

    async def _receive(self, call) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            now = self.clock()
            if isinstance(message, Reconnected):
                self.record.resume_s.append(message.took_s)
                continue
            kind = message.WhichOneof("kind")
            if kind == "decision":
                self._on_decision(message.decision, now)
            elif kind == "response_started":
                started = message.response_started
                trigger = _TRIGGERS.get(started.trigger, "proactive")
                if trigger == "query":  # queries are answered in the order they were sent
                    at = self._query_sent_at.popleft() if self._query_sent_at else None
                else:
                    at, self._fired_at = self._fired_at, None
                self._reply = _Reply(trigger, at)
            elif kind == "response_delta" and self._reply is not None:
                reply = self._reply
                if reply.first_at is None:
                    reply.first_at = now
                    if reply.trigger_at is not None:
                        self.record.ttft.append((reply.trigger, now - reply.trigger_at))
                reply.last_at = now
            elif kind == "response_done":
                self._on_done(message.response_done)
            elif kind == "warning":
                self._on_warning(message.warning)
            elif kind == "error":
                self.record.detail = message.error.message  # the status follows and ends the stream
            elif kind == "closed":
                self.record.closed = True

    def _on_decision(self, decision: pb.Decision, now: float) -> None:
        sent = self._sent_at.pop(decision.frame_index, None)
        if sent is None:
            return  # not a frame this session sent (or already counted): nothing to time
        record = self.record
        record.decided_at.append(now - self.origin)
        record.latency_s.append(now - sent)
        record.lag_s.append(now - (self._t0 + decision.timestamp))
        record.server_lag_s.append(decision.lag_s)
        if decision.fired:
            self._fired_at = now
        self.live.frames_decided += 1
        self.live.latency.add(now - sent)

    def _on_done(self, done: pb.ResponseDone) -> None:
        record, reply = self.record, self._reply
        record.responses += 1
        record.response_tokens += done.num_tokens
        record.server_ttft_s.append(done.ttft_s)
        if reply is not None and reply.first_at is not None and done.num_tokens > 1:
            record.tpot_s.append((reply.last_at - reply.first_at) / (done.num_tokens - 1))
        self._reply = None

    def _on_warning(self, warning: pb.Warning) -> None:
        self.record.warnings[pb.WarningCode.Name(warning.code).removeprefix("WARNING_CODE_")] += 1
        if warning.code == pb.WARNING_CODE_FRAME_DROPPED:
            for index in warning.frame_indexes:
                if self._sent_at.pop(index, None) is not None:
                    self.record.dropped.add(index)
                    self.live.frames_dropped += 1
        elif warning.code == pb.WARNING_CODE_BAD_QUERY and self._query_sent_at:
            self._query_sent_at.popleft()  # refused: it will not be answered
