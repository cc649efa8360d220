"""Deterministic synthetic streaming data: short rendered clips of simple shapes, narrated event by event.

Each clip is a plain background on which shapes appear, move, change colour and leave. Every event has a
time and a one-sentence narration ("A red circle appears.", "The red circle moves left.", "The red circle
turns blue.", "The red circle leaves.") and is visible at the first frame at or after its time:

- appear / leave: the shape is drawn from / not drawn from its time on;
- colour change: the new colour from its time on;
- move: the shape starts moving at its time and keeps moving for 1-2 s.

Event times sit 0.3-0.8 of a frame interval before the frame that answers them, so that frame always shows
the change (a move has visibly started), and events are more than 2 s apart, so each lands on its own frame.
At most two shapes are in view at once, always of different kinds, so "the red circle" is never ambiguous.

Everything is derived from (seed, video index) alone: the same seed gives identical frames and dialogues,
and video i does not depend on how many videos are generated.

    python -m liveserve.data.synthetic --out DIR --videos N --seed S
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from liveserve.data.dialogue import Dialogue, Event, dialogue_from_events, num_video_frames, save_dialogues

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 235), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = ((32, 32, 36), (28, 40, 56), (52, 44, 36))  # dark, so every colour (white included) stands out
INSTRUCTION = "Please narrate the video in real time."
MIN_SECONDS, MAX_SECONDS = 12, 20
MIN_EVENTS, MAX_EVENTS = 3, 8
MAX_IN_VIEW = 2
DATASET_DIALOGUES = "dialogues.json"
VIDEO_DIR = "videos"
# The verb of each event sentence names its kind ("turns": a colour change).
EVENT_KINDS = ("appears", "moves", "turns", "leaves")


@dataclass(frozen=True, slots=True)
class Move:
    start: float
    end: float
    velocity: tuple[float, float]  # pixels per second, (x, y)


@dataclass(frozen=True, slots=True)
class ShapeTrack:
    """One shape's life in a clip: where it appears, when it moves, recolours and leaves."""

    shape: str
    radius: float
    origin: tuple[float, float]  # centre (x, y) when it appears
    appear: float
    leave: float  # math.inf when it stays to the end
    colours: tuple[tuple[float, str], ...]  # (from time, colour name); the first starts at `appear`
    moves: tuple[Move, ...] = ()

    def centres(self, times: np.ndarray) -> np.ndarray:
        """Centres [len(times), 2] at `times`."""
        xy = np.tile(np.asarray(self.origin, dtype=np.float64), (len(times), 1))
        for m in self.moves:
            elapsed = np.clip(times - m.start, 0.0, m.end - m.start)
            xy += elapsed[:, None] * np.asarray(m.velocity)[None, :]
        return xy

    def visible(self, times: np.ndarray) -> np.ndarray:
        return (times >= self.appear) & (times < self.leave)

    def colour_names(self, times: np.ndarray) -> list[str]:
        starts = np.array([t for t, _ in self.colours])
        idx = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, None)
        return [self.colours[i][1] for i in idx]


@dataclass(frozen=True, slots=True)
class VideoSpec:
    name: str
    width: int
    height: int
    duration: float
    background: tuple[int, int, int]
    tracks: tuple[ShapeTrack, ...]
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True, eq=False)
class SyntheticVideo:
    name: str
    spec: VideoSpec
    frames: np.ndarray  # uint8 [T, H, W, 3], frame i at time i / fps
    fps: float
    events: tuple[Event, ...]
    dialogue: Dialogue


@dataclass(frozen=True, slots=True)
class Narration:
    """What a narration sentence names: its event kind, colours in order (old then new for "turns") and shape."""

    kind: str | None  # one of EVENT_KINDS; None when the sentence has no event verb
    colours: tuple[str, ...]
    shape: str | None


def parse_narration(text: str) -> Narration:
    """The parts of a sentence in this module's grammar; words it does not know are ignored, so a model's
    garbled sentence still yields whatever kind, colours and shape it names."""
    words = re.findall(r"[a-z]+", text.lower())
    kind = next((w for w in words if w in EVENT_KINDS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return Narration(kind, tuple(w for w in words if w in COLOURS), shape)


# ---- rendering ---------------------------------------------------------------------------------------------------

def _shape_mask(shape: str, radius: float, cx: np.ndarray, cy: np.ndarray, xx: np.ndarray,
                yy: np.ndarray) -> np.ndarray:
    """[T, H, W] masks of `shape` centred at (cx[t], cy[t]); cx, cy are [T, 1, 1]."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":  # half-side 0.85 r: about the circle's area
        return (np.abs(dx) <= 0.85 * radius) & (np.abs(dy) <= 0.85 * radius)
    if shape == "triangle":  # apex up; half-width grows from 0 at the apex to 1.1 r at the base
        rel = (dy + radius) / (2 * radius)
        return (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * 1.1 * radius)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_video(spec: VideoSpec, fps: float) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of `spec` at times i / fps, for every i with i / fps < duration."""
    times = np.arange(num_video_frames(spec.duration, fps), dtype=np.float64) / fps
    frames = np.empty((len(times), spec.height, spec.width, 3), dtype=np.uint8)
    frames[:] = spec.background
    yy = np.arange(spec.height, dtype=np.float64)[None, :, None] + 0.5  # pixel centres
    xx = np.arange(spec.width, dtype=np.float64)[None, None, :] + 0.5
    for track in spec.tracks:  # later tracks are drawn on top
        shown = track.visible(times)
        if not shown.any():
            continue
        t = times[shown]
        xy = track.centres(t)
        mask = _shape_mask(track.shape, track.radius, xy[:, 0, None, None], xy[:, 1, None, None], xx, yy)
        rgb = np.array([COLOURS[c] for c in track.colour_names(t)], dtype=np.uint8)
        frames[shown] = np.where(mask[..., None], rgb[:, None, None, :], frames[shown])
    return frames


# ---- planning ----------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Draft:
    """A shape track while its events are being planned."""

    shape: str
    radius: float
    origin: tuple[float, float]
    appear: float
    leave: float = math.inf
    colours: list[tuple[float, str]] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)

    def freeze(self) -> ShapeTrack:
        return ShapeTrack(self.shape, self.radius, self.origin, self.appear, self.leave, tuple(self.colours),
                          tuple(self.moves))

    def centre(self, t: float) -> np.ndarray:
        return self.freeze().centres(np.array([t]))[0]

    def colour(self, t: float) -> str:
        return self.freeze().colour_names(np.array([t]))[0]

    def moving(self, t: float) -> bool:
        return any(m.start <= t < m.end for m in self.moves)


class _Planner:
    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.rng, self.width, self.height = rng, width, height
        self.scale = min(width, height) / 128  # sizes and speeds are tuned for 128 px
        self.drafts: list[_Draft] = []

    def in_view(self, t: float) -> list[_Draft]:
        return [d for d in self.drafts if d.appear <= t < d.leave]

    def _clear(self, path: Callable[[np.ndarray], np.ndarray], radius: float, t0: float, t1: float,
               others: list[_Draft]) -> bool:
        """Whether a shape following `path` over [t0, t1] keeps its distance from `others` (as planned so far)."""
        times = np.linspace(t0, t1, 12)
        mine = path(times)
        for other in others:
            gap = np.linalg.norm(mine - other.freeze().centres(times), axis=1)
            if (gap < radius + other.radius + 6 * self.scale).any():
                return False
        return True

    def appear(self, t: float) -> str | None:
        busy = {d.shape for d in self.in_view(t)}
        shape = str(self.rng.choice([s for s in SHAPES if s not in busy]))
        radius = float(self.rng.uniform(12, 18)) * self.scale
        colour = str(self.rng.choice(list(COLOURS)))
        margin = radius + 4 * self.scale
        for _ in range(30):
            xy = (float(self.rng.uniform(margin, self.width - margin)),
                  float(self.rng.uniform(margin, self.height - margin)))
            # Others may still be moving; check against their planned paths for the next 3 s.
            if self._clear(lambda ts: np.tile(xy, (len(ts), 1)), radius, t, t + 3.0, self.in_view(t)):
                self.drafts.append(_Draft(shape, radius, xy, t, colours=[(t, colour)]))
                article = "An" if colour[0] in "aeiou" else "A"
                return f"{article} {colour} {shape} appears."
        return None

    def move(self, d: _Draft, t: float) -> str | None:
        speed = float(self.rng.uniform(20, 32)) * self.scale
        length = float(self.rng.uniform(1.0, 2.0))
        start = d.centre(t)
        margin = d.radius + 2 * self.scale
        others = [o for o in self.in_view(t) if o is not d]
        for name in self.rng.permutation(list(DIRECTIONS)):
            vx, vy = (speed * c for c in DIRECTIONS[str(name)])
            end = start + np.array([vx, vy]) * length
            if not (margin <= end[0] <= self.width - margin and margin <= end[1] <= self.height - margin):
                continue

            def path(ts: np.ndarray, vx=vx, vy=vy) -> np.ndarray:
                return start + np.clip(ts - t, 0, length)[:, None] * np.array([vx, vy])[None, :]

            if self._clear(path, d.radius, t, t + length, others):
                d.moves.append(Move(t, t + length, (vx, vy)))
                return f"The {d.colour(t)} {d.shape} moves {name}."
        return None

    def recolour(self, d: _Draft, t: float) -> str:
        old = d.colour(t)
        new = str(self.rng.choice([c for c in COLOURS if c != old]))
        d.colours.append((t, new))
        return f"The {old} {d.shape} turns {new}."

    def leave(self, d: _Draft, t: float) -> str:
        d.leave = t
        return f"The {d.colour(t)} {d.shape} leaves."

    def event(self, t: float) -> str:
        view = self.in_view(t)
        options: list[tuple[float, Callable[[], str | None]]] = []
        if len(view) < MAX_IN_VIEW:
            options.append((3.0 if not view else 1.0, lambda: self.appear(t)))
        for d in view:
            if not d.moving(t):
                options.append((1.5 / len(view), lambda d=d: self.move(d, t)))
            options.append((1.0 / len(view), lambda d=d: self.recolour(d, t)))
            options.append((0.6 / len(view), lambda d=d: self.leave(d, t)))
        weights = np.array([w for w, _ in options])
        for k in self.rng.choice(len(options), size=len(options), replace=False, p=weights / weights.sum()):
            if (text := options[int(k)][1]()) is not None:  # an option fails only when it has no room
                return text
        raise RuntimeError(f"no feasible event at {t:.2f} s")  # unreachable: a colour change always fits


def plan_video(rng: np.random.Generator, name: str, fps: float, size: tuple[int, int]) -> VideoSpec:
    """A random clip spec: 12-20 s, 3-8 events, each answered by its own frame at `fps`."""
    width, height = size
    n = int(rng.integers(math.ceil(MIN_SECONDS * fps), math.floor(MAX_SECONDS * fps) + 1))
    gap = math.ceil(2 * fps) + 1  # frames between event frames: > 2 s between events (offsets below)
    # Event frames lie in [1, n - 1]; spread the slack left after the minimum gaps at random.
    most = 1 + (n - 2) // gap
    count = min(int(rng.integers(MIN_EVENTS, MAX_EVENTS + 1)), most)
    slack = (n - 2) - (count - 1) * gap
    shifts = np.sort(rng.integers(0, slack + 1, size=count))
    frames = [1 + i * gap + int(s) for i, s in enumerate(shifts)]
    planner = _Planner(rng, width, height)
    events = []
    for k in frames:
        # 0.3-0.8 of a frame interval before frame k, which therefore is the first frame showing the event.
        t = round((k - float(rng.uniform(0.3, 0.8))) / fps, 3)
        events.append(Event(t, planner.event(t)))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return VideoSpec(name, width, height, n / fps, background, tuple(d.freeze() for d in planner.drafts),
                     tuple(events))


# ---- datasets ----------------------------------------------------------------------------------------------------

def video_name(seed: int, index: int) -> str:
    return f"synth_s{seed}_{index:05d}"


def _check_args(fps: float, size: tuple[int, int]) -> tuple[int, int]:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    width, height = (int(v) for v in size)
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"size must be even and at least 64x64 (yuv420p video), got {size!r}")
    return width, height


def synthesize(seed: int, index: int, fps: float = 2.0, size: tuple[int, int] = (128, 128)) -> SyntheticVideo:
    """Video `index` of the dataset with `seed`: its spec, frames at `fps`, events and narration dialogue."""
    size = _check_args(fps, size)
    name = video_name(seed, index)
    spec = plan_video(np.random.default_rng([seed, index]), name, fps, size)
    dialogue = dialogue_from_events(spec.events, fps, spec.duration, INSTRUCTION, video=f"{VIDEO_DIR}/{name}.mp4")
    return SyntheticVideo(name, spec, render_video(spec, fps), fps, spec.events, dialogue)


def generate(seed: int, num_videos: int, fps: float = 2.0, size: tuple[int, int] = (128, 128)) -> list[SyntheticVideo]:
    """`num_videos` synthetic videos (size is width, height); identical for identical arguments."""
    return [synthesize(seed, i, fps, size) for i in range(num_videos)]


def encode_video(path: Path, frames: np.ndarray, fps: float) -> str:
    """Write frames [T, H, W, 3] uint8 as an mp4 at exactly `fps` (frame i at i / fps); returns the codec."""
    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    for codec in ("libx264", "mpeg4"):  # prefer H.264; mpeg4 is always in the PyAV wheel
        try:
            with av.open(str(path), mode="w") as container:
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": "18", "preset": "medium"}  # low loss: colours stay nameable
                else:
                    stream.bit_rate = 1_000_000
                for i, pixels in enumerate(frames):
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
                    frame.pts, frame.time_base = i, 1 / rate
                    container.mux(stream.encode(frame))
                container.mux(stream.encode(None))  # flush delayed frames
            return codec
        except (av.FFmpegError, ValueError):
            path.unlink(missing_ok=True)
    raise RuntimeError("no usable video encoder (tried libx264, mpeg4)")


def write_dataset(out_dir: str | Path, num_videos: int, seed: int, fps: float = 2.0, size: tuple[int, int] = (128, 128),
                  progress: Callable[[int, int, SyntheticVideo], None] | None = None) -> Path:
    """Write videos/{name}.mp4 and dialogues.json (video paths relative to `out_dir`); returns `out_dir`.

    Videos are generated one at a time, so memory stays flat; `progress(done, total, video)` follows each.
    """
    out = Path(out_dir)
    dialogues = []
    for i in range(num_videos):
        video = synthesize(seed, i, fps, size)
        encode_video(out / video.dialogue.video, video.frames, fps)
        dialogues.append(video.dialogue)
        if progress is not None:
            progress(i + 1, num_videos, video)
    save_dialogues(out / DATASET_DIALOGUES, dialogues)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic streaming-narration dataset.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--videos", type=int, default=100, help="number of videos (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--fps", type=float, default=2.0, help="stream frame rate (default: 2)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("W", "H"),
                        help="frame size in pixels (default: 128 128)")
    args = parser.parse_args(argv)
    if args.videos < 1:
        parser.error("--videos must be >= 1")

    def report(done: int, total: int, video: SyntheticVideo) -> None:
        print(f"[{done}/{total}] {video.name}: {len(video.frames)} frames, {len(video.events)} events", flush=True)

    try:
        out = write_dataset(args.out, args.videos, args.seed, args.fps, tuple(args.size), progress=report)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.videos} videos and {out / DATASET_DIALOGUES}", file=sys.stderr)


if __name__ == "__main__":
    main()
