"""`liveserve client`: stream a video file or live source over the public API and print what comes back, as it comes.

Frames are sampled at `fps`, letterboxed to `size` pixels and sent as JPEG with their stream
timestamps; queries are sent when the video reaches their time. With `realtime`, a file's frames leave
at wall-clock pace (what a camera does); otherwise as fast as the server takes them. A live source
(URL or device) always sends at its own pace, and is reopened when it drops.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from PIL import Image

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.engine.events import FrameDecision, ResponseDone
from liveserve.run import Printer, RunStats
from liveserve.services.wire.messages import from_message
from liveserve.services.security.tls import open_channel
from liveserve.live_source import ReconnectPolicy, open_frame_source
from liveserve.video import VideoFrame


class ClientError(RuntimeError):
    """The server ended the stream with an error status; the message names it."""


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
                 api_key: str = "", reconnect: ReconnectPolicy = ReconnectPolicy(), model: str = "") -> ClientResult:
    """`credentials`: TLS (tls.channel_credentials), else plaintext; `api_key` goes in Open.credentials.
    `model`: the served model (ListModels) the session runs; "": the deployment's default.
    `video`: a file, or a live source (URL or device; `realtime` does not apply, it sends at its own pace)."""
    # Fail on a bad file or an unreachable source before connecting. The printer is bound before the source
    # reports anything: events only come once frames are read.
    source = open_frame_source(video, fps=fps, size=size, realtime=realtime, max_frames=max_frames,
                               reconnect=reconnect, on_event=lambda event: printer.source_event(event))
    printer = printer or Printer(source.total)
    open_message = pb.Open(model=model, fps=fps, credentials={"api_key": api_key} if api_key else {})
    if threshold is not None:
        open_message.threshold = threshold
    result, stats, started = ClientResult(), RunStats(), time.perf_counter()
    with open_channel(address, credentials) as channel:
        call = pb_grpc.LiveStreamStub(channel).Stream(
            requests(source.frames, queries=list(queries), open_message=open_message), timeout=timeout_s)
        try:
            for message in call:
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
        except grpc.RpcError as exc:
            raise ClientError(f"{exc.code().name}: {exc.details()}") from None
        finally:
            printer.finish()
    result.live = source.live
    result.source_dropped, result.source_reconnects = source.counters.dropped, source.counters.reconnects
    return result


def list_models(address: str, *, credentials: grpc.ChannelCredentials | None = None, api_key: str = "",
                timeout_s: float = 30.0) -> list[pb.ModelInfo]:
    """The models the deployment serves, the default first (ListModels); ClientError when refused."""
    request = pb.ListModelsRequest(credentials={"api_key": api_key} if api_key else {})
    with open_channel(address, credentials) as channel:
        try:
            return list(pb_grpc.LiveStreamStub(channel).ListModels(request, timeout=timeout_s).models)
        except grpc.RpcError as exc:
            raise ClientError(f"{exc.code().name}: {exc.details()}") from None


def fetch_transcript(address: str, session_id: str, *, credentials: grpc.ChannelCredentials | None = None,
                     api_key: str = "", timeout_s: float = 30.0) -> pb.Transcript:
    """A session's transcript (GetTranscript); ClientError names the status when the server refuses."""
    request = pb.GetTranscriptRequest(session_id=session_id, credentials={"api_key": api_key} if api_key else {})
    with open_channel(address, credentials) as channel:
        try:
            return pb_grpc.LiveStreamStub(channel).GetTranscript(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ClientError(f"{exc.code().name}: {exc.details()}") from None
