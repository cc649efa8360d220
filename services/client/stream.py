"""`liveserve client`: stream a video file or live source over the public API and print what comes back, as it comes.

Frames are sampled at `fps`, letterboxed to `size` pixels and sent as JPEG with their stream
timestamps; queries are sent when the video reaches their time. With `realtime`, a file's frames leave
at wall-clock pace (what a camera does); otherwise as fast as the server takes them. A live source
(URL or device) always sends at its own pace, and is reopened when it drops. The stream runs on
LiveStreamClient (session.py): a broken connection to the server is resumed, nothing lost.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
from PIL import Image

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.engine.events import FrameDecision, ResponseDone
from liveserve.run import Printer, RunStats
from liveserve.services.client.resume import Reconnected, ResumePolicy
from liveserve.services.client.session import ClientError, LiveStreamClient
from liveserve.services.wire.messages import from_message
from liveserve.services.security.tls import open_channel
from liveserve.live_source import ReconnectPolicy, open_frame_source
from liveserve.video import VideoFrame


@dataclass(slots=True)
class ClientResult:
    session_id: str = ""
    decisions: int = 0
    fired: int = 0
    responses: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_lag_s: float = 0.0
    live: bool = False
    source_dropped: int = 0  # live sources: sampling slots with no frame (the source stalled or was away)
    source_reconnects: int = 0
    reconnects: list[Reconnected] = field(default_factory=list)  # where the connection to the server broke


def encode_jpeg(pixels, quality: int = 90) -> bytes:
    """uint8 [3, H, W] -> JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def requests(frames: Iterable[VideoFrame], *, queries: list[tuple[float, str]], open_message: pb.Open):
    yield pb.ClientMessage(open=open_message)
    due = sorted(queries)
    for frame in frames:
        while due and due[0][0] < frame.timestamp:
            timestamp, text = due.pop(0)
            yield pb.ClientMessage(query=pb.Query(timestamp=timestamp, text=text))
        yield pb.ClientMessage(frame=pb.Frame(timestamp=frame.timestamp, image=encode_jpeg(frame.pixels)))
        # A query at a frame's own time goes after that frame: the engine answers it at that frame, as it
        # would if both were queued together (and as the models are trained), whatever the network timing.
        while due and due[0][0] <= frame.timestamp:
            timestamp, text = due.pop(0)
            yield pb.ClientMessage(query=pb.Query(timestamp=timestamp, text=text))
    for timestamp, text in due:  # queries timed after the last frame
        yield pb.ClientMessage(query=pb.Query(timestamp=timestamp, text=text))
    yield pb.ClientMessage(close=pb.Close())


def stream_video(address: str, video: str, *, fps: float = 2.0, size: int = 384, realtime: bool = False,
                 queries: list[tuple[float, str]] = (), threshold: float | None = None,
                 max_frames: int | None = None, printer: Printer | None = None,
                 timeout_s: float = 3600.0, credentials: grpc.ChannelCredentials | None = None,
                 api_key: str = "", reconnect: ReconnectPolicy = ReconnectPolicy(), model: str = "",
                 resume: ResumePolicy = ResumePolicy()) -> ClientResult:
    """`credentials`: TLS (tls.channel_credentials), else plaintext; `api_key` goes in Open.credentials.
    `model`: the served model (ListModels) the session runs; "": the deployment's default.
    `video`: a file, or a live source (URL or device; `realtime` does not apply, it sends at its own pace).
    `reconnect`: reopening a live source; `resume`: going on when the connection to the server breaks."""
    # Fail on a bad file or an unreachable source before connecting. The printer is bound before the source
    # reports anything: events only come once frames are read.
    source = open_frame_source(video, fps=fps, size=size, realtime=realtime, max_frames=max_frames,
                               reconnect=reconnect, on_event=lambda event: printer.source_event(event))
    printer = printer or Printer(source.total)
    open_message = pb.Open(model=model, fps=fps, credentials={"api_key": api_key} if api_key else {})
    if threshold is not None:
        open_message.threshold = threshold
    messages = requests(source.frames, queries=list(queries), open_message=open_message)
    # grpc.aio channels belong to the loop they are made on: the client is made inside it
    result = asyncio.run(_stream(lambda: LiveStreamClient.connect(address, open_message, credentials=credentials,
                                                                  resume=resume, timeout_s=timeout_s),
                                 messages, printer))
    result.live = source.live
    result.source_dropped, result.source_reconnects = source.counters.dropped, source.counters.reconnects
    return result


async def _stream(make_client: Callable[[], LiveStreamClient], messages: Iterator[pb.ClientMessage],
                  printer: Printer) -> ClientResult:
    result, stats, started = ClientResult(), RunStats(), time.perf_counter()
    async with make_client() as client:
        sender = asyncio.create_task(_send(client, messages))
        sender.add_done_callback(lambda task: task.cancelled() or task.exception() is None or client.cancel())
        try:
            async for message in client.events():
                if isinstance(message, Reconnected):
                    result.session_id = message.session_id
                    result.reconnects.append(message)
                    printer.warn(describe_reconnection(message))
                    continue
                kind = message.WhichOneof("kind")
                if kind == "opened":
                    result.session_id = message.opened.session_id
                elif kind == "warning":
                    result.warnings.append(message.warning.message)
                    printer.warn(message.warning.message)
                event = from_message(message)
                if isinstance(event, FrameDecision):
                    result.decisions += 1
                    result.fired += event.fired
                    result.max_lag_s = max(result.max_lag_s, event.lag_s)
                    stats.frames, stats.fired = result.decisions, result.fired
                    stats.busy_s = time.perf_counter() - started
                    printer.progress(stats)
                elif isinstance(event, ResponseDone):
                    result.responses.append(event.text)
                    stats.responses += 1
                if event is not None:
                    printer.event(event)
        except ClientError:
            failed = sender.done() and not sender.cancelled() and sender.exception()
            if failed and not isinstance(failed, ClientError):
                raise failed from None  # reading the source failed: that is the error, not the cancelled call
            raise
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            printer.finish()
    return result


async def _send(client: LiveStreamClient, messages: Iterator[pb.ClientMessage]) -> None:
    """Everything after the Open (the client sends that itself), read from the source off the loop."""
    next(messages)
    while (message := await asyncio.to_thread(next, messages, None)) is not None:
        await client.write(message)


def describe_reconnection(event: Reconnected) -> str:
    """A Reconnected as one line for the user."""
    how = (f"resumed session {event.session_id}" if event.resumed else
           f"the server could not resume the session: it goes on as session {event.session_id}")
    return (f"the connection broke ({event.reason}); {how} after {event.took_s:.2f}s and {event.attempts} "
            f"attempt(s), {event.resent} unsettled input(s) sent again")


def list_models(address: str, *, credentials: grpc.ChannelCredentials | None = None, api_key: str = "",
                timeout_s: float = 30.0) -> list[pb.ModelInfo]:
    """The models the deployment serves, the default first (ListModels); ClientError when refused."""
    request = pb.ListModelsRequest(credentials={"api_key": api_key} if api_key else {})
    with open_channel(address, credentials) as channel:
        try:
            return list(pb_grpc.LiveStreamStub(channel).ListModels(request, timeout=timeout_s).models)
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details() or "") from None


def fetch_transcript(address: str, session_id: str, *, credentials: grpc.ChannelCredentials | None = None,
                     api_key: str = "", timeout_s: float = 30.0) -> pb.Transcript:
    """A session's transcript (GetTranscript); ClientError names the status when the server refuses."""
    request = pb.GetTranscriptRequest(session_id=session_id, credentials={"api_key": api_key} if api_key else {})
    with open_channel(address, credentials) as channel:
        try:
            return pb_grpc.LiveStreamStub(channel).GetTranscript(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details() or "") from None
