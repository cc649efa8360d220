"""The shipped client goes on by itself when its connection breaks: through a TCP relay the test cuts, and
across a server stopped (as on SIGTERM) and started again on its port (one process, real gRPC on 127.0.0.1, real Redis).
Every frame is decided once, under the client's own numbers, and none is lost."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import grpc
import pytest
import redis

from engine_helpers import steered
from stream_helpers import jpeg
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.run import Printer
from liveserve.services.client import ClientError, LiveStreamClient, Reconnected, ResumePolicy
from liveserve.services.client.resume import Outbox
from liveserve.services.client.stream import stream_video
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings
from liveserve.video import SAMPLE_VIDEO

FPS = 20.0


class Deployment:
    """`serve --local` on a fixed port: restart() stops it as SIGTERM does (open sessions drain and end
    UNAVAILABLE) and starts it again on the same port with the same Redis."""

    def __init__(self, model, redis_url: str) -> None:
        self.model, self.redis_url = model, redis_url
        self.settings = ServiceSettings(pool_mb=16, max_lag_s=600.0, heartbeat_s=0.5, session_ttl_s=10.0)
        self.server = start_local(model, "127.0.0.1:0", self.settings, redis_url=redis_url)
        self.address = self.server.address

    def restart(self) -> None:
        self.server.stop(grace_s=5)
        self.server = start_local(self.model, self.address, self.settings, redis_url=self.redis_url)


@pytest.fixture(scope="module")
def local(tiny_model, redis_url):
    kwargs = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    redis_url = f"redis://{kwargs['host']}:{kwargs['port']}/6"  # a database of its own
    redis.Redis.from_url(redis_url).flushdb()
    deployment = Deployment(steered(tiny_model, interval_bias=8.0, eos_bias=7.8), redis_url)
    yield deployment
    deployment.server.stop(grace_s=1)


class Relay:
    """A TCP relay in front of the server: cut() breaks every connection through it, as a network would;
    new connections still go through."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.pairs.append((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for end in pair:
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        """Nothing answers at its address any more."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.cut()


async def until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Reader:
    """Reads a client's events as they come, keeping them for the test's checks."""

    def __init__(self, client: LiveStreamClient) -> None:
        self.decided: list[int] = []
        self.reconnects: list[Reconnected] = []
        self.kinds: list[str] = []
        self.task = asyncio.get_running_loop().create_task(self._read(client))

    async def _read(self, client: LiveStreamClient) -> None:
        async for event in client.events():
            if isinstance(event, Reconnected):
                self.reconnects.append(event)
                continue
            self.kinds.append(event.WhichOneof("kind"))
            if event.HasField("decision"):
                self.decided.append(event.decision.frame_index)


def frame(i: int) -> tuple[float, bytes]:
    return i / FPS, jpeg(i % 4)


# ---- what the client keeps, on its own --------------------------------------------------------------------

def test_the_outbox_settles_frames_by_decision_or_warning_and_resends_the_rest_in_order():
    outbox = Outbox()
    frames = [pb.ClientMessage(frame=pb.Frame(timestamp=i, image=b"x")) for i in range(4)]
    query = pb.ClientMessage(query=pb.Query(timestamp=0.5, text="q"))
    items = [outbox.add(m) for m in (frames[0], query, frames[1], frames[2], frames[3])]
    assert outbox.start_call(5, again=False) == items  # this call's numbering starts at 5
    for item in items:
        outbox.written(item)
    decided = outbox.translate(pb.ServerMessage(decision=pb.Decision(frame_index=6)))
    assert decided.decision.frame_index == 1  # the client's number, not the call's
    warned = outbox.translate(pb.ServerMessage(warning=pb.Warning(
        code=pb.WARNING_CODE_BAD_FRAME, frame_indexes=[8], timestamps=[3.0])))
    assert list(warned.warning.frame_indexes) == [3] and list(warned.warning.timestamps) == [3.0]
    assert outbox.translate(pb.ServerMessage(decision=pb.Decision(frame_index=6))) is None  # once only
    # Frame 1's decision shows the server took the query before it; frames 0 and 2 are still owed.
    resent = outbox.start_call(0, again=True)
    assert [item.frame for item in resent] == [0, 2] and outbox.resent == 2
    for item in resent:
        outbox.written(item)
    assert outbox.translate(pb.ServerMessage(decision=pb.Decision(frame_index=1))).decision.frame_index == 2
    assert len(outbox) == 1


def test_the_backoff_doubles_up_to_its_limit_and_checks_its_settings():
    policy = ResumePolicy(first_delay_s=0.1, max_delay_s=0.5, jitter=0.0)
    assert [policy.delay_s(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    assert 0.08 <= ResumePolicy(first_delay_s=0.1, jitter=0.2).delay_s(1) <= 0.1
    with pytest.raises(ValueError, match="resume attempts"):
        ResumePolicy(attempts=-1)


# ---- real connections that break --------------------------------------------------------------------------

def test_a_cut_connection_resumes_the_same_session_and_loses_no_frame(local):
    async def main() -> tuple[Reader, LiveStreamClient]:
        relay = Relay(local.address)
        client = LiveStreamClient.connect(relay.address, pb.Open(fps=FPS, decisions_only=True), timeout_s=60)
        try:
            async with client:
                opened = await client.opened()
                reader = Reader(client)
                for i in range(5):
                    await client.send_frame(*frame(i))
                await until(lambda: len(reader.decided) == 5)
                relay.cut()
                for i in range(5, 12):  # written while the connection is down: resent once it is back
                    await client.send_frame(*frame(i))
                await until(lambda: reader.reconnects)
                for i in range(12, 15):
                    await client.send_frame(*frame(i))
                await client.close()
                await asyncio.wait_for(reader.task, 30)
                assert client.session_id == opened.session_id
                return reader, client
        finally:
            relay.close()

    reader, client = asyncio.run(main())
    assert sorted(reader.decided) == list(range(15)) and len(reader.decided) == 15  # each once, none lost
    assert reader.kinds.count("opened") == 1 and reader.kinds[-1] == "closed"
    (reconnect,) = reader.reconnects
    assert reconnect.resumed and reconnect.session_id == client.session_id
    assert "UNAVAILABLE" in reconnect.reason and reconnect.took_s < 2.0, reconnect
    print(f"\ncut connection: resumed in {reconnect.took_s:.3f}s, {reconnect.resent} input(s) resent, 0 frames lost")


def test_a_gateway_stopped_mid_stream_loses_no_frame_and_the_stream_goes_on_within_2_s(local):
    async def main() -> Reader:
        client = LiveStreamClient.connect(local.address, pb.Open(fps=FPS, decisions_only=True), timeout_s=60)
        async with client:
            await client.opened()
            reader = Reader(client)
            sent = 0

            async def send_until(done) -> None:  # a camera: frames at FPS whatever happens to the server
                nonlocal sent
                while not done():
                    await client.send_frame(*frame(sent))
                    sent += 1
                    await asyncio.sleep(1 / FPS)

            await send_until(lambda: len(reader.decided) >= 4)
            sent_before_restart = sent
            restarting = asyncio.get_running_loop().run_in_executor(None, local.restart)
            await send_until(restarting.done)
            await restarting
            await until(lambda: reader.reconnects)
            await send_until(lambda: len(reader.decided) > sent_before_restart + 4)  # the new session decides
            await client.close()
            await asyncio.wait_for(reader.task, 30)
            assert sorted(reader.decided) == list(range(sent)), (sent, reader.decided)
            return reader

    reader = asyncio.run(main())
    assert len(reader.decided) == len(set(reader.decided))  # no frame decided twice for the caller
    (reconnect,) = reader.reconnects
    assert "shutting down" in reconnect.reason and reconnect.took_s < 2.0, reconnect
    print(f"\ngateway restart: the stream went on in {reconnect.took_s:.3f}s after {reconnect.attempts} attempt(s) "
          f"({'resumed' if reconnect.resumed else 'a new session'}), {reconnect.resent} input(s) resent, "
          f"0 frames lost")


def test_a_connection_that_stays_down_gives_up_after_its_attempts(local):
    async def main() -> ClientError:
        relay = Relay(local.address)
        policy = ResumePolicy(attempts=2, first_delay_s=0.01, max_delay_s=0.02)
        client = LiveStreamClient.connect(relay.address, pb.Open(fps=FPS, decisions_only=True), resume=policy)
        async with client:
            await client.opened()
            relay.close()  # nothing answers at its address any more
            with pytest.raises(ClientError) as failed:
                async for _ in client.events():
                    pass
            with pytest.raises(ClientError):
                await client.send_frame(*frame(0))
            return failed.value

    failed = asyncio.run(main())
    assert failed.code == grpc.StatusCode.UNAVAILABLE and "gave up after 2 reconnection attempt(s)" in failed.details


def test_liveserve_client_goes_on_across_a_gateway_restart(local):
    err = io.StringIO()
    restarter = threading.Timer(0.5, local.restart)
    restarter.start()
    try:
        result = stream_video(local.address, str(SAMPLE_VIDEO), fps=4, max_frames=12, size=64, realtime=True,
                              queries=[], printer=Printer(12, io.StringIO(), err), timeout_s=60)
    finally:
        restarter.join(30)
    assert result.decisions == 12, err.getvalue()
    (reconnect,) = result.reconnects
    assert "the connection broke (UNAVAILABLE: the server is shutting down" in err.getvalue()
    assert reconnect.took_s < 2.0


def test_the_load_generator_resumes_its_sessions_and_counts_the_resumes(local):
    from liveserve.loadtest.config import LoadConfig
    from liveserve.loadtest.progress import Progress
    from liveserve.loadtest.report import summary_text
    from liveserve.loadtest.runner import run

    relay = Relay(local.address)
    config = LoadConfig(address=relay.address, sessions=2, duration_s=1.5, fps=8, frame_size=64, threshold=1.0,
                        slo_ms=5000, streams_per_connection=1)
    cutter = threading.Timer(0.7, relay.cut)  # mid-stream: both sessions are sending
    cutter.start()
    try:
        report = run(config, progress=Progress(io.StringIO()))
    finally:
        cutter.join(10)
        relay.close()
    (level,) = report.levels
    assert level.sessions_sustained == 2 and level.errors == {}, level.error_messages
    assert level.resumes == 2 and level.resume_ms.max_ms < 2000
    assert level.frames_sent == level.frames_scheduled == 2 * 12
    # None lost: a resumed session's time goes on from its last decided frame, so the frames in flight at
    # the cut are taken again, in order, when the client writes them again.
    assert level.warnings.get("BAD_FRAME", 0) == 0, level.warnings
    assert level.frames_decided == level.frames_sent and level.frames_undecided == 0
    assert "2 resume(s) after a broken connection" in summary_text(report)
