"""What the sessions send: encoded frames and Poisson-timed queries, both deterministic from the seed.

Frames are encoded once, before the run, into a small bank that sessions cycle through: encoding a
JPEG per frame per session during the run would spend the load generator's CPU on image codecs and
make it, not the server, the bottleneck.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from liveserve.loadtest.config import LoadConfig

# Short, realistic viewer questions; drawn uniformly at random per query.
QUERIES = (
    "What is happening right now?",
    "Describe the scene.",
    "What colour is the shape in the middle?",
    "How many objects can you see?",
    "Did anything just change?",
    "Summarize the last few seconds.",
    "Is anything moving?",
    "What just appeared?",
)

SYNTHETIC_CLIPS = 4  # distinct clips; session k streams clip k % 4, so neighbours differ
SYNTHETIC_CLIP_FPS = 2.0  # content rate of the bank; the stream rate is the session's --fps
MAX_VIDEO_FRAMES = 240  # frames of a video file held in memory; longer streams loop over them


@dataclass(frozen=True, slots=True)
class ScheduledQuery:
    timestamp: float  # stream seconds after the session's first frame
    text: str


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG (quality 90, as `liveserve client` sends) or PNG bytes."""
    out = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class FrameBank:
    """Encoded frames per clip. Session k sends frame i of clip k % clips at content time i / fps,
    looping over the clip; `offset` staggers sessions that share a clip."""

    def __init__(self, clips: list[list[bytes]], content_fps: float, description: str) -> None:
        if not clips or not all(clips):
            raise ValueError("a frame bank needs at least one non-empty clip")
        self.clips, self.content_fps, self.description = clips, content_fps, description

    def frame(self, session: int, index: int, fps: float) -> bytes:
        clip = self.clips[session % len(self.clips)]
        offset = (session // len(self.clips)) * 7  # sessions sharing a clip start at different points
        content_index = int(index * self.content_fps / fps + 1e-9)  # 7 * 3 / 3 must be 7, not 6.999...
        return clip[(content_index + offset) % len(clip)]

    @property
    def mean_bytes(self) -> float:
        sizes = [len(f) for clip in self.clips for f in clip]
        return sum(sizes) / len(sizes)


def synthetic_bank(seed: int, size: int, image_format: str, clips: int = SYNTHETIC_CLIPS) -> FrameBank:
    """Clips of coloured shapes that appear, move, recolour and leave (the generator the bundled model was
    trained on, `liveserve.data.synthetic`), so a trained model has events to talk about."""
    from liveserve.data.synthetic import synthesize

    encoded = []
    for k in range(clips):
        video = synthesize(seed, k, fps=SYNTHETIC_CLIP_FPS, size=(size, size))
        encoded.append([encode_image(frame, image_format) for frame in video.frames])
    return FrameBank(encoded, SYNTHETIC_CLIP_FPS, f"synthetic clips (seed {seed}, {size}x{size} {image_format})")


def video_bank(path: str, fps: float, size: int, image_format: str) -> FrameBank:
    """The video sampled at the stream's fps, letterboxed to `size` as `liveserve client` does; raises
    liveserve.video.VideoError for an unreadable file."""
    from liveserve.video import iter_video_frames  # imports torch: only when a video is used

    frames = [encode_image(f.pixels.permute(1, 2, 0).numpy(), image_format)
              for f in iter_video_frames(path, fps=fps, size=size, max_frames=MAX_VIDEO_FRAMES)]
    if not frames:
        from liveserve.video import VideoError

        raise VideoError(f"{path}: no frames at {fps:g} fps")
    return FrameBank([frames], fps, f"{path} ({len(frames)} frames at {fps:g} fps, {size}x{size} {image_format})")


def frame_bank(config: LoadConfig) -> FrameBank:
    if config.video:
        return video_bank(config.video, config.fps, config.frame_size, config.image_format)
    return synthetic_bank(config.seed, config.frame_size, config.image_format)


def query_schedule(seed: int, session: int, per_minute: float, duration_s: float) -> list[ScheduledQuery]:
    """Poisson arrivals at `per_minute` over [0, duration_s): exponential gaps from a generator seeded by
    (seed, session), so every run of the same config sends the same queries at the same stream times,
    and the schedule of session k does not depend on how many sessions run."""
    if per_minute <= 0:
        return []
    rng = random.Random(f"liveserve-loadtest/{seed}/{session}")  # str seeds hash stably across processes
    rate_per_s, t, queries = per_minute / 60.0, 0.0, []
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            return queries
        timestamp = round(t, 3)  # readable logs; responses are matched to queries by this exact value
        if not queries or timestamp > queries[-1].timestamp:
            queries.append(ScheduledQuery(timestamp, rng.choice(QUERIES)))


def stream_plan(fps: float, frames: int, queries: list[ScheduledQuery]) -> Iterator[tuple[float, int | None, str]]:
    """Frames (stream time, index, "") and queries (stream time, None, text) in send order. A query at a
    frame's own time goes after that frame: the server then answers it at that frame, as `liveserve client`
    does."""
    q = 0
    for index in range(frames):
        timestamp = index / fps
        while q < len(queries) and queries[q].timestamp < timestamp:
            yield queries[q].timestamp, None, queries[q].text
            q += 1
        yield timestamp, index, ""
    for query in queries[q:]:
        yield query.timestamp, None, query.text
