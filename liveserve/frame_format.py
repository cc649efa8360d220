"""How a frame is sized for its model's vision tower: squared, or its aspect ratio kept under a pixel budget.

square  the long side scaled to `size`, centred on a black `size x size` canvas (VideoLLM-online's
        preprocessing; LIVE models always, Qwen-VL models as an option).
smart   Qwen-VL's own rule (transformers' `smart_resize` in its Qwen2-VL image processor, and qwen-vl-utils
        for StreamingVLM's video frames): each side rounded to the nearest multiple of `unit` (patch x merge,
        28 px), then, if the area leaves [min_pixels, max_pixels], both sides scaled by one factor into it
        (rounded down when shrinking, up when growing). 360 x 640 becomes 364 x 644: 13 x 23 = 299 LM
        tokens a temporal group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RESIZE_MODES = ("smart", "square")
# qwen-vl-utils' bounds for a video frame (128 and 768 LM tokens of 28 x 28 px), what StreamingVLM runs with.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_ASPECT_RATIO = 200  # the rule's own limit: a thinner image is refused


def smart_size(height: int, width: int, unit: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of a `height x width` image under the smart rule (see the module's docstring)."""
    if min(height, width) < 1:
        raise ValueError(f"cannot size an empty {width}x{height} image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"a {width}x{height} image is too thin: the aspect ratio must be at most {MAX_ASPECT_RATIO}")
    h, w = round(height / unit) * unit, round(width / unit) * unit
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(unit, math.floor(height / scale / unit) * unit)
        w = max(unit, math.floor(width / scale / unit) * unit)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / unit) * unit, math.ceil(width * scale / unit) * unit
    return h, w


@dataclass(frozen=True, slots=True)
class FrameFormat:
    """The size frames reach the tower at: `size` square ("square"), or by the smart rule ("smart")."""

    size: int
    resize: str = "square"
    unit: int = 28
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.size < 1 or self.unit < 1:
            raise ValueError(f"size and unit must be >= 1, got {self.size} and {self.unit}")
        check_pixel_bounds(self.min_pixels, self.max_pixels, self.unit)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of a `height x width` frame once sized."""
        if self.resize == "square":
            return self.size, self.size
        return smart_size(height, width, self.unit, self.min_pixels, self.max_pixels)

    @property
    def largest_area(self) -> int:
        """The most pixels a sized frame has (what a session's cache is reserved for)."""
        if self.resize == "square":
            return self.size * self.size
        # Shrunk frames fit max_pixels; grown ones are min_pixels plus under a unit on each side, most for
        # the thinnest frame the rule takes.
        thin = math.sqrt(MAX_ASPECT_RATIO) + 1 / math.sqrt(MAX_ASPECT_RATIO)
        grown = self.min_pixels + self.unit * math.sqrt(self.min_pixels) * thin + self.unit ** 2
        return max(self.max_pixels, math.ceil(grown))


def stream_pixel_bounds(processor_min: int | None, processor_max: int | None) -> tuple[int, int]:
    """A checkpoint's (min_pixels, max_pixels) for video frames: qwen-vl-utils' video bounds within its image
    processor's own (a released checkpoint's allow 3,136..12.8 M pixels: the video bounds stand)."""
    high = min(VIDEO_MAX_PIXELS, processor_max or VIDEO_MAX_PIXELS)
    return max(processor_min or 0, min(VIDEO_MIN_PIXELS, high)), high


def check_pixel_bounds(min_pixels: int, max_pixels: int, unit: int = 28) -> None:
    if not unit * unit <= min_pixels <= max_pixels:
        raise ValueError(f"min_pixels and max_pixels must satisfy {unit * unit} <= min_pixels <= max_pixels, "
                         f"got {min_pixels} and {max_pixels}")
