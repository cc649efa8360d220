"""Perception: the stateless, batched frame encoder (image decoding + vision tower + pooling -> features).

One request is one gateway tick: the frames every session of that gateway sent meanwhile, encoded
together in batches of up to `max_batch_size`. Encoding runs one request at a time on the encoder's own
thread, so it overlaps the Decision engine's steps and never runs inside them; the images are decoded
before, on a few threads at once (the image codecs release the GIL). An image that is costly to decode
(`is_heavy`: a large PNG decodes in full, 0.2 s for 16 megapixels) is decoded on a thread of its own,
one at a time, so a client sending them holds up neither other requests nor more than one core; at most
`MAX_HEAVY_WAITING` wait, beyond which they are refused. A frame that cannot be decoded fails alone,
with the reason. The features are what the Decision and Reaction models' own
connectors read, in the model's dtype, so a larger Reaction model can share this pool; a replica
therefore loads only the checkpoint's vision tower (`load_perception_model`), never the LM.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from opentelemetry.trace import Status, StatusCode
from PIL import Image

from liveserve.model.live import LiveModel
from liveserve.model.vision import VisionModel
from liveserve.services.wire.contracts import EncodeRequest, EncodeResult, FrameImage
from liveserve.services.observability.telemetry import PerceptionMetrics
from liveserve.services.observability.tracing import extract, tracer

log = logging.getLogger(__name__)
# An object's repr in a decoder's message (PIL: "cannot identify image file <_io.BytesIO object at 0x7f..>"):
# an internal detail, and an address, that a client has no use for.
OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
# JPEGs decode at a reduced scale (video.decode_image_bytes), cheaply at any size; other formats decode
# every pixel: beyond a 1080p frame's pixels they are heavy.
HEAVY_PIXELS = 1920 * 1080
MAX_HEAVY_WAITING = 8


def is_heavy(image: bytes) -> bool:
    """Whether decoding `image` costs more than a video frame's usual few milliseconds, from its header
    alone (microseconds; an unreadable header is not heavy: it fails at once)."""
    try:
        with Image.open(io.BytesIO(image)) as img:
            return img.format != "JPEG" and img.size[0] * img.size[1] > HEAVY_PIXELS
    except Exception:
        return False


def load_perception_model(model: str, *, threads: int = 1) -> VisionModel:
    """A Perception replica's model ("default", "tiny" or a checkpoint directory): the vision tower alone,
    on CUDA in bfloat16 when there is a GPU, else on CPU in float32. `threads` caps torch's CPU threads."""
    from liveserve.model.loading import load_vision_model
    from liveserve.model.registry import resolve_model

    torch.set_num_threads(max(1, threads))
    cuda = torch.cuda.is_available()
    loaded = load_vision_model(resolve_model(model), device="cuda" if cuda else "cpu",
                               dtype=torch.bfloat16 if cuda else torch.float32)
    log.info("loaded the vision tower of %s on %s (no LM)", loaded.name, loaded.device)
    return loaded


class FrameEncoder:
    def __init__(self, model: LiveModel | VisionModel, max_batch_size: int = 32,
                 max_pixels: int | None = None) -> None:
        """`max_pixels`: images claiming more pixels are refused from their header, never decoded."""
        if model.family == "live" and model.vision is None:  # (a commentary model's frames go on as pixels)
            raise ValueError(f"model {model.name!r} has no vision tower to encode frames with")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.max_batch_size, self.max_pixels = model, max_batch_size, max_pixels
        self.metrics, self.tracer = PerceptionMetrics(), tracer("perception")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="perception")
        self._decoders = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="perception-decode")
        self._heavy = ThreadPoolExecutor(1, thread_name_prefix="perception-decode-heavy")
        self.heavy_waiting = 0  # heavy images waiting or being decoded
        self.waiting = 0  # frames waiting or being encoded
        self._busy_s = 0.0  # time spent encoding, all requests
        self._sampled = (time.monotonic(), 0.0)  # (when, busy seconds) at the last busy_fraction()

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        """Decode the request's images (heavy ones on their own thread), then encode on the encoder's thread."""
        self.waiting += len(request.frames)
        self.metrics.queue_depth.set(self.waiting)
        loop = asyncio.get_running_loop()
        try:
            started, spans = time.perf_counter(), self._start_spans(request)
            decoded = await asyncio.gather(*(self._decode_on_its_thread(loop, frame) for frame in request.frames))
            return await loop.run_in_executor(self._thread, self._encode_decoded, decoded, spans, started)
        finally:
            self.waiting -= len(request.frames)
            self.metrics.queue_depth.set(self.waiting)

    async def _decode_on_its_thread(self, loop: asyncio.AbstractEventLoop, frame: FrameImage) -> torch.Tensor | str:
        if not is_heavy(frame.image):
            return await loop.run_in_executor(self._decoders, self._decode, frame)
        if self.heavy_waiting >= MAX_HEAVY_WAITING:
            return (f"frame at {frame.timestamp:.3f}s refused: {self.heavy_waiting} large images (over "
                    f"{HEAVY_PIXELS} pixels, not JPEG) are already waiting to be decoded")
        self.heavy_waiting += 1
        try:
            return await loop.run_in_executor(self._heavy, self._decode, frame)
        finally:
            self.heavy_waiting -= 1

    def _decode(self, frame: FrameImage) -> torch.Tensor | str:
        """The frame's pixels, or why it cannot be decoded."""
        from liveserve.video import VideoError, decode_image_bytes

        try:
            # A commentary model's frames keep their aspect ratio (FramePixels.frame_format); a LIVE model's are square.
            size = getattr(self.model, "frame_format", self.model.frame_size)
            return decode_image_bytes(frame.image, size, self.max_pixels)
        except (ValueError, VideoError) as exc:
            return f"bad frame image at {frame.timestamp:.3f}s: {OBJECT_REPR.sub('', str(exc))}"

    def encode_now(self, request: EncodeRequest) -> EncodeResult:
        """Decode and encode every frame of `request` (from the calling thread)."""
        started, spans = time.perf_counter(), self._start_spans(request)
        return self._encode_decoded(list(self._decoders.map(self._decode, request.frames)), spans, started)

    def _start_spans(self, request: EncodeRequest) -> list:
        return [self.tracer.start_span("perception.encode", context=extract(f.trace),
                                       attributes={"liveserve.session_id": f.session_id,
                                                   "liveserve.frame_timestamp": f.timestamp})
                if f.trace else None for f in request.frames]

    def _encode_decoded(self, decoded: list[torch.Tensor | str], spans: list, started: float) -> EncodeResult:
        """The vision tower over the decoded frames (the encoder's thread); `decoded`: pixels or why not."""
        errors = [d if isinstance(d, str) else "" for d in decoded]
        pixels = [None if isinstance(d, str) else d for d in decoded]
        good = [i for i, p in enumerate(pixels) if p is not None]
        features: list[torch.Tensor | None] = [None] * len(pixels)
        for start in range(0, len(good), self.max_batch_size):
            chunk = good[start:start + self.max_batch_size]
            with torch.inference_mode():
                rows = self.model.encode_frames(torch.stack([pixels[i] for i in chunk]).to(self.model.device))
            for i, row in zip(chunk, rows):
                features[i] = row
            self.metrics.batch_size.observe(len(chunk))
        self.metrics.frames_encoded.inc(len(good))
        for span, error in zip(spans, errors):
            if span is not None:
                if error:
                    span.set_status(Status(StatusCode.ERROR, error))
                span.end()
        elapsed = time.perf_counter() - started
        self._busy_s += elapsed
        return EncodeResult(tuple(features), tuple(errors), elapsed)

    def busy_fraction(self) -> float:
        """The share of the time since the previous call that the encoder spent encoding (what the pool
        scales on, services/deploy/autoscaling.py)."""
        now, busy = time.monotonic(), self._busy_s
        then, busy_then = self._sampled
        self._sampled = (now, busy)
        return min(1.0, (busy - busy_then) / (now - then)) if now > then else 0.0

    def close(self) -> None:
        for pool in (self._thread, self._decoders, self._heavy):
            pool.shutdown(wait=False, cancel_futures=True)
