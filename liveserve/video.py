"""Video/image frame preparation matching VideoLLM-online's ffmpeg preprocessing.

The reference pipeline is ``ffmpeg -vf fps=F,scale=<long side=S, short side -2>,pad=S:S:centred``:
frames are resampled to a target fps, scaled (bicubic) so the long side equals ``size`` with the
short side rounded to an even number of pixels, then centred on a black ``size x size`` canvas.
Where a ``size`` is taken, a FrameFormat (frame_format.py) may be given instead: "smart" keeps the
aspect ratio (Qwen-VL's rule), scaling bicubic to its size without padding.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from liveserve.frame_format import FrameFormat

SAMPLE_VIDEO = Path(__file__).parent / "assets" / "sample.mp4"

# Tolerance when comparing frame presentation times with sampling targets (float rounding of pts*tb).
_EPS = 1e-6


class VideoError(Exception):
    """A video or image could not be read; the message is one user-facing line."""


@dataclass(frozen=True, slots=True)
class VideoFrame:
    index: int  # 0, 1, 2, ... in sampled order
    timestamp: float  # seconds: start_s + index / fps (a live source: its sampling slot's k / fps, see live_source)
    pixels: torch.Tensor  # uint8 [3, H, W], RGB: size x size, or a smart FrameFormat's size


@dataclass(frozen=True, slots=True)
class VideoInfo:
    path: str
    width: int
    height: int
    duration_s: float
    native_fps: float

    def num_frames_at(self, fps: float) -> int:
        """Frames iter_video_frames yields for the whole clip at ``fps`` (targets t_k < duration)."""
        _check_positive("fps", fps)
        return max(0, math.ceil(self.duration_s * fps - _EPS))


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """ffmpeg ``scale='if(gt(iw,ih),S,-2)':'if(gt(iw,ih),-2,S)'``: long side = S, short side even.

    ffmpeg's -2 is av_rescale (round half away from zero) to a multiple of 2; we clamp to [2, S]
    (ffmpeg would fail instead for degenerate shapes or odd S).
    """

    def even(num: int, den: int) -> int:
        return min(size, max(2, int(Fraction(num, 2 * den) + Fraction(1, 2)) * 2))

    if width > height:
        return size, even(size * height, width)
    return even(size * width, height), size


def _to_chw_tensor(image: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # a copy: PIL's buffer is read-only
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] array, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, [H, W, 3] array or PIL image, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return image


def resize_and_pad(image: torch.Tensor | np.ndarray | Image.Image, size: int) -> torch.Tensor:
    """Scale the long side to ``size`` (bicubic, antialiased) and centre on a black square canvas."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size!r}")
    chw = _to_chw_tensor(image)
    h, w = chw.shape[1:]
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize an empty image of shape {tuple(chw.shape)}")
    new_w, new_h = _scaled_size(w, h, size)
    if (new_h, new_w) != (h, w):
        chw = scale_to(chw, new_h, new_w)
    elif (h, w) == (size, size):
        return chw.contiguous()  # already square at the tower's size: nothing to pad
    out = torch.zeros((3, size, size), dtype=torch.uint8)
    x0, y0 = (size - new_w) // 2, (size - new_h) // 2
    out[:, y0 : y0 + new_h, x0 : x0 + new_w] = chw
    return out


def fit_frame(image: torch.Tensor | np.ndarray | Image.Image, size: int | FrameFormat) -> torch.Tensor:
    """`image` sized for the tower: an int or a square format squares it (resize_and_pad), a smart format
    scales it to its size (bicubic, antialiased), aspect ratio kept."""
    if isinstance(size, int):
        return resize_and_pad(image, size)
    if size.resize == "square":
        return resize_and_pad(image, size.size)
    chw = _to_chw_tensor(image)
    return scale_to(chw, *size.output_size(*chw.shape[1:]))


def scale_to(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, h, w] -> [3, height, width], bicubic and antialiased (unpadded: the aspect ratio may change)."""
    if tuple(chw.shape[1:]) == (height, width):
        return chw.contiguous()
    # Interpolate in float and round back: bicubic overshoots, so clamp to the uint8 range.
    resized = F.interpolate(chw.unsqueeze(0).float(), size=(height, width), mode="bicubic", align_corners=False,
                            antialias=True)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


class ImageTooLarge(VideoError):
    """The image's header claims more pixels than allowed; nothing was decoded."""


def decode_image_bytes(data: bytes, size: int | FrameFormat, max_pixels: int | None = None) -> torch.Tensor:
    """Decode JPEG/PNG/WebP (anything PIL reads) into a uint8 tensor sized by `fit_frame` (an int: ``[3, size,
    size]``; a smart format: its size for the image's full dimensions, even when decoded at a reduced scale).
    An image with more
    than `max_pixels` pixels is refused from its header, before any pixel is decoded (a small, highly
    compressed file can claim gigapixels)."""
    if not data:
        raise VideoError("cannot decode image: empty data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            # A JPEG much larger than the tower's input is decoded at a reduced scale (libjpeg scales in the
            # DCT, a fraction of the cost), never below twice the input size, then resized as any image.
            smart = isinstance(size, FrameFormat) and size.resize == "smart"
            target = size.output_size(height, width) if smart else None
            side = max(target) if smart else size if isinstance(size, int) else size.size
            img.draft("RGB", (2 * side, 2 * side))
            img.load()
            # Honour EXIF orientation so phone photos are upright, as a viewer would show them (transposing
            # copies the image, so only when a tag asks for it).
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
                if smart and orientation in _EXIF_TRANSPOSED:
                    target = size.output_size(width, height)
            pixels = _to_chw_tensor(img)  # read before the file (and the image with it) is closed
    except ImageTooLarge:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise VideoError(f"cannot decode image: {exc}") from exc
    return scale_to(pixels, *target) if target is not None else fit_frame(pixels, size)


def _open(path: str | os.PathLike[str]) -> tuple[str, av.container.InputContainer, av.video.stream.VideoStream]:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise VideoError(f"{name}: no such file")
    if not os.path.isfile(name):
        raise VideoError(f"{name}: not a file")
    try:
        container = av.open(name, mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{name}: not a readable video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: contains no video stream")
    return name, container, container.streams.video[0]


def _native_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read the container header: size, duration and native frame rate of the first video stream."""
    name, container, stream = _open(path)
    with container:
        fps = _native_fps(stream)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        elif stream.frames and fps:
            duration = stream.frames / fps
        else:
            duration = 0.0
        ctx = stream.codec_context
        return VideoInfo(path=name, width=ctx.width, height=ctx.height, duration_s=duration, native_fps=fps)


def _rgb_frame(frame: av.VideoFrame, size: int | FrameFormat) -> torch.Tensor:
    rgb = frame.to_ndarray(format="rgb24")  # swscale handles the YUV->RGB colour conversion
    return fit_frame(rgb, size)


def iter_video_frames(
    path: str | os.PathLike[str],
    fps: float = 2.0,
    size: int | FrameFormat = 384,
    *,
    max_frames: int | None = None,
    start_s: float = 0.0,
) -> Iterator[VideoFrame]:
    """Stream frames sampled at ``fps``: for t_k = start_s + k/fps, the latest frame with pts <= t_k.

    Times are relative to the stream's start_time. Targets before the first decoded frame reuse that
    frame (as ffmpeg's fps filter does); sampling stops once t_k reaches the end of the last frame.
    """
    _check_positive("fps", fps)
    if isinstance(size, int) and size <= 0:
        raise ValueError(f"size must be > 0, got {size!r}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames!r}")
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0, got {start_s!r}")
    # Open eagerly so a bad path fails at call time rather than on the first next().
    name, container, stream = _open(path)
    return _decode_loop(name, container, stream, fps, size, max_frames, start_s)


def _decode_loop(
    name: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    fps: float,
    size: int | FrameFormat,
    max_frames: int | None,
    start_s: float,
) -> Iterator[VideoFrame]:
    with container:
        if max_frames == 0:
            return
        tb = stream.time_base or Fraction(1, 1)
        origin = stream.start_time or 0
        native = _native_fps(stream)
        stream.thread_type = "AUTO"
        try:
            if start_s > 0:
                # Jump to the keyframe at or before start_s instead of decoding everything before it.
                container.seek(origin + int(start_s / tb), stream=stream, backward=True)
        except av.FFmpegError:
            container.seek(0)  # unseekable input: decode from the beginning instead
        k = 0
        held: av.VideoFrame | None = None  # latest decoded frame not yet superseded
        held_t = 0.0
        held_dur = 1.0 / native if native else 0.0
        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    t = float((frame.pts - origin) * tb)
                else:  # no timestamp: assume constant rate after the previous frame
                    t = held_t + held_dur if held is not None else 0.0
                if held is not None:
                    # Every target strictly before this frame's time is served by the held frame.
                    while start_s + k / fps < t - _EPS:
                        yield VideoFrame(k, start_s + k / fps, _rgb_frame(held, size))
                        k += 1
                        if k == max_frames:
                            return
                held, held_t = frame, t
                if frame.duration:
                    held_dur = float(frame.duration * tb)
            # End of stream: the last frame covers targets until it stops being displayed.
            if held is not None:
                while start_s + k / fps < held_t + held_dur - _EPS:
                    yield VideoFrame(k, start_s + k / fps, _rgb_frame(held, size))
                    k += 1
                    if k == max_frames:
                        return
        except av.FFmpegError as exc:
            raise VideoError(f"{name}: decoding failed ({exc})") from exc


def paced(
    frames: Iterable[VideoFrame],
    speed: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[VideoFrame]:
    """Release frames in wall-clock time: frame i no earlier than (ts_i - ts_0) / speed after frame 0."""
    _check_positive("speed", speed)
    t0 = ts0 = 0.0
    first = True
    for frame in frames:
        if first:
            t0, ts0, first = clock(), frame.timestamp, False
        else:
            delay = t0 + (frame.timestamp - ts0) / speed - clock()
            if delay > 0:
                sleep(delay)
        yield frame
