"""An embeddable LiveStream client (asyncio): open a session, write frames and queries, read what comes
back, and go on by itself when the connection breaks.

    async with LiveStreamClient.connect("gateway:50051", pb.Open(fps=2.0)) as stream:
        opened = await stream.opened()
        await stream.send_frame(0.0, jpeg_bytes)
        await stream.close()
        async for event in stream.events():  # pb.ServerMessage, or Reconnected
            ...

A call that ends UNAVAILABLE after its session opened (the network broke, or the Gateway stopped) is
opened again with backoff (ResumePolicy), naming the session and its latest resume token, and whatever the
session had not settled is written again (resume.py). The caller reads one stream: SessionOpened once,
every frame's Decision once under the client's own frame numbers, and a Reconnected where the stream went
on. Queries are resent unless a later frame was settled, so one can be asked twice, never lost. The first
Open is not retried: a wrong address or a refused Open fails at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.services.client.resume import Outbox, Reconnected, ResumePolicy, SentInput

log = logging.getLogger(__name__)

# A call ending with these after its session opened is reconnected: the network, or a server going away.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# A resume refused NOT_FOUND is tried this many times before the session counts as gone: the old
# Gateway may still be parking it when the new call arrives.
RESUME_NOT_FOUND_TRIES = 2
_END = object()


def channel_options(policy: ResumePolicy) -> list[tuple[str, int]]:
    """Options for a channel that carries resuming streams: its own reconnection backoff no longer than the
    policy's. (A channel whose connection was refused fails calls at once until its next try, 1 s and then
    longer by default, so a server back within a second would not be seen for seconds.)"""
    return [("grpc.initial_reconnect_backoff_ms", int(policy.first_delay_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(policy.first_delay_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(policy.max_delay_s * 1000))]


class ClientError(RuntimeError):
    """The server ended the stream with an error status; the message names it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class _CallEnded(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, opened: bool) -> None:
        self.code, self.details, self.opened = code, details, opened


class LiveStreamClient:
    def __init__(self, stub: pb_grpc.LiveStreamStub, open_: pb.Open, *, resume: ResumePolicy = ResumePolicy(),
                 timeout_s: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                 max_unsettled: int = 1024) -> None:
        """`stub`: over a grpc.aio channel the caller owns (connect() makes one; give one of your own
        channel_options(resume)). `open_`: the session's
        Open (resuming sets its resume fields on a copy). `timeout_s`: each call's deadline. Writes wait
        while `max_unsettled` inputs are unsettled (kept for resending)."""
        self._stub, self._open, self._policy = stub, open_, resume
        self._timeout_s, self._metadata, self._max_unsettled = timeout_s, tuple(metadata), max_unsettled
        self._channel: grpc.aio.Channel | None = None  # owned: closed with the client
        self._outbox = Outbox()
        self._queue: asyncio.Queue[SentInput] | None = None  # the current call's writes; None between calls
        self._events: asyncio.Queue = asyncio.Queue()
        self._room = asyncio.Event()
        self._opened: asyncio.Future[pb.SessionOpened] | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._write_broke = False  # the current call's write failed in the transport
        self.session_id, self.resume_token = "", ""
        self.reconnects: list[Reconnected] = []
        self.failure: BaseException | None = None  # why the stream ended, when not OK

    @classmethod
    def connect(cls, address: str, open_: pb.Open, *, credentials: grpc.ChannelCredentials | None = None,
                options: Sequence[tuple[str, object]] = (), **kwargs) -> LiveStreamClient:
        """A client on its own channel to `address` (TLS with `credentials`, else plaintext). Call it on the
        event loop that will use it: a grpc.aio channel belongs to the loop it was made on."""
        options = [*channel_options(kwargs.get("resume", ResumePolicy())), *options]
        channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials is not None
                   else grpc.aio.insecure_channel(address, options=options))
        client = cls(pb_grpc.LiveStreamStub(channel), open_, **kwargs)
        client._channel = channel
        return client

    # ---- the caller's side ----------------------------------------------------------------------------------

    async def __aenter__(self) -> LiveStreamClient:
        self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    def start(self) -> None:
        """Send the Open (once); what comes back is read with opened(), read() or events()."""
        if self._task is None:
            self._opened = asyncio.get_running_loop().create_future()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def opened(self) -> pb.SessionOpened:
        """The first SessionOpened; ClientError when the Open was refused."""
        self.start()
        return await asyncio.shield(self._opened)

    async def send_frame(self, timestamp: float, image: bytes) -> int:
        """Queue a frame (JPEG, PNG or WebP); returns its number, the frame_index its Decision will carry."""
        await self.write(pb.ClientMessage(frame=pb.Frame(timestamp=timestamp, image=image)))
        return self._outbox.frames_sent - 1

    async def send_query(self, timestamp: float, text: str) -> None:
        await self.write(pb.ClientMessage(query=pb.Query(timestamp=timestamp, text=text)))

    async def close(self) -> None:
        """No more input: the session decides what was sent, then ends (SessionClosed)."""
        await self.write(pb.ClientMessage(close=pb.Close()))

    async def write(self, message: pb.ClientMessage) -> None:
        """Queue a frame, query or Close; waits while `max_unsettled` inputs are unsettled. ClientError
        once the stream has failed."""
        if self._closing:
            raise ValueError("the stream was closed: nothing more can be written")
        self.start()
        while len(self._outbox) >= self._max_unsettled and not self._task.done():
            self._room.clear()
            await self._room.wait()
        if self._task.done():
            raise self.failure or ClientError(grpc.StatusCode.CANCELLED, "the stream has ended")
        self._closing = message.HasField("close")
        item = self._outbox.add(message)
        if self._queue is not None:
            self._queue.put_nowait(item)

    async def read(self) -> pb.ServerMessage | Reconnected | object:
        """The next event: a pb.ServerMessage (frame indexes in the client's numbering) or a Reconnected;
        grpc.aio.EOF once the stream ended OK; ClientError when it ended with an error status."""
        self.start()
        item = await self._events.get()
        if item is _END:
            self._events.put_nowait(_END)  # every later read sees the end too
            if self.failure is not None:
                raise self.failure
            return grpc.aio.EOF
        return item

    async def events(self) -> AsyncIterator[pb.ServerMessage | Reconnected]:
        while (item := await self.read()) is not grpc.aio.EOF:
            yield item

    def cancel(self) -> None:
        """End the stream now (the server frees the session; a broken call is not resumed)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    @property
    def resent(self) -> int:
        """Inputs written again after reconnections."""
        return self._outbox.resent

    # ---- calls ------------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._calls()
        except asyncio.CancelledError:
            self.failure = ClientError(grpc.StatusCode.CANCELLED, "the client cancelled the stream")
        except ClientError as exc:
            self.failure = exc
        except BaseException as exc:  # a bug here: the caller sees it rather than a quiet end
            self.failure = exc
            raise
        finally:
            if not self._opened.done():
                self._opened.set_exception(self.failure or ClientError(grpc.StatusCode.UNKNOWN, "no SessionOpened"))
                self._opened.exception()  # read() reports it too: a caller that never asks opened() is fine
            self._room.set()
            self._events.put_nowait(_END)

    async def _calls(self) -> None:
        broke_at: float | None = None  # when the last opened call broke; None: none has
        reason, failures, not_found = "", 0, 0
        while True:
            resuming = broke_at is not None and bool(self.resume_token)
            open_ = self._open
            if resuming:
                open_ = pb.Open()
                open_.CopyFrom(self._open)
                open_.resume_session_id, open_.resume_token = self.session_id, self.resume_token
            try:
                await self._call_once(open_, broke_at, reason, failures + 1, resuming)
                return
            except _CallEnded as ended:
                delay: float | None = None  # None: the policy's backoff
                if ended.opened:
                    if ended.code not in RETRYABLE or self._policy.attempts == 0:
                        raise ClientError(ended.code, ended.details) from None
                    broke_at, failures, not_found = time.monotonic(), 0, 0
                    reason = f"{ended.code.name}: {ended.details}"
                elif broke_at is None:  # the first Open: fail fast
                    raise ClientError(ended.code, ended.details) from None
                elif ended.code == grpc.StatusCode.NOT_FOUND and resuming:
                    not_found += 1
                    delay = self._policy.first_delay_s  # the server answers: no need to back off further
                    if not_found >= RESUME_NOT_FOUND_TRIES:
                        if not self._policy.new_session:
                            raise ClientError(ended.code, ended.details) from None
                        self.resume_token, delay = "", 0.0  # the session is gone: go on in a new one, now
                elif ended.code not in RETRYABLE:
                    raise ClientError(ended.code, ended.details) from None
                failures += 1
                if failures > self._policy.attempts:
                    raise ClientError(ended.code, f"{ended.details} (gave up after {self._policy.attempts} "
                                                  f"reconnection attempt(s); the connection broke with {reason})")
                delay = self._policy.delay_s(failures) if delay is None else delay
                log.info("session %s: reconnection attempt %d failed (%s: %s); next in %.2fs", self.session_id,
                         failures, ended.code.name, ended.details, delay)
                await asyncio.sleep(delay)

    async def _call_once(self, open_: pb.Open, broke_at: float | None, reason: str, attempt: int,
                         resuming: bool) -> None:
        call = self._stub.Stream(timeout=self._timeout_s, metadata=self._metadata or None)
        try:
            try:
                await call.write(pb.ClientMessage(open=open_))
                first = await call.read()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                first = grpc.aio.EOF  # the call has ended: its status says why
            if first is grpc.aio.EOF:
                raise _CallEnded(await call.code(), await call.details() or "", opened=False)
            if first.WhichOneof("kind") != "opened":  # a server breaking the protocol: nothing to resume
                raise ClientError(grpc.StatusCode.UNKNOWN, f"expected SessionOpened first, got {first.WhichOneof('kind')}")
            await self._serve(call, first, broke_at, reason, attempt, resuming)
        finally:
            if not call.done():
                call.cancel()

    async def _serve(self, call, first: pb.ServerMessage, broke_at: float | None, reason: str, attempt: int,
                     resuming: bool) -> None:
        opened = first.opened
        previous = self.session_id
        self.session_id, self.resume_token = opened.session_id, opened.resume_token
        queue: asyncio.Queue[SentInput] = asyncio.Queue()
        for item in self._outbox.start_call(opened.next_frame_index, again=broke_at is not None):
            queue.put_nowait(item)
        if broke_at is None:
            self._opened.set_result(opened)
            self._events.put_nowait(first)
        else:
            event = Reconnected(opened.session_id, resumed=resuming and opened.session_id == previous,
                                attempts=attempt, took_s=time.monotonic() - broke_at, resent=queue.qsize(),
                                reason=reason)
            self.reconnects.append(event)
            self._events.put_nowait(event)
        self._queue, self._write_broke = queue, False
        writer = asyncio.get_running_loop().create_task(self._write(call, queue))
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                translated = self._outbox.translate(message)
                self._room.set()
                if translated is not None:
                    self._events.put_nowait(translated)
            code, details = await call.code(), await call.details() or ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        try:
            if self._write_broke and code == grpc.StatusCode.INTERNAL:
                code, details = grpc.StatusCode.UNAVAILABLE, f"the connection broke (a write failed: {details})"
            if code != grpc.StatusCode.OK:
                raise _CallEnded(code, details, opened=True)
            self._outbox.settle_close()
        finally:
            self._queue = None
            writer.cancel()
            (written,) = await asyncio.gather(writer, return_exceptions=True)
            if isinstance(written, Exception) and not isinstance(written, (grpc.aio.AioRpcError,
                                                                           asyncio.InvalidStateError)):
                raise written  # a bug, not the connection

    async def _write(self, call, queue: asyncio.Queue[SentInput]) -> None:
        while True:
            item = await queue.get()
            self._outbox.written(item)
            try:
                await call.write(item.message)
            except grpc.aio.AioRpcError as exc:
                # grpc ends a call whose write the transport refused INTERNAL, from this side: the
                # connection broke, as UNAVAILABLE would have said had the read noticed first.
                if exc.code() == grpc.StatusCode.INTERNAL:
                    self._write_broke = True
                raise
            if item.message.HasField("close"):
                await call.done_writing()
                return
