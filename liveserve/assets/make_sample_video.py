"""Generate the bundled synthetic sample clip (deterministic): ``python -m liveserve.assets.make_sample_video``.

12 s, 8 fps, 320x240 (non-square so letterbox padding is exercised) with a few simple events:
shapes appear, move across the frame, change colour and leave, on a plain background.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 8, 12
DEFAULT_OUT = Path(__file__).parent / "sample.mp4"
BACKGROUND = (40, 60, 90)  # plain dark blue-grey


def _events(rng: np.random.Generator) -> list[dict]:
    # Fixed-seed jitter keeps the clip reproducible while avoiding perfectly symmetric paths.
    j = rng.integers(-10, 11, size=4)
    return [
        # Red disc enters left, crosses to the right, leaves.
        dict(kind="disc", t0=1.0, t1=5.0, xy0=(-30, 80 + j[0]), xy1=(350, 80 + j[0]), r=25,
             colors=[(220, 40, 40)]),
        # Square appears mid-left, drifts right and turns from blue to green halfway.
        dict(kind="square", t0=3.0, t1=8.0, xy0=(60, 170 + j[1]), xy1=(260, 150 + j[1]), r=22,
             colors=[(40, 90, 230), (40, 200, 70)]),
        # Yellow triangle falls from the top and leaves at the bottom.
        dict(kind="triangle", t0=6.5, t1=11.0, xy0=(200 + j[2], -30), xy1=(200 + j[2], 270), r=28,
             colors=[(240, 220, 40)]),
        # White disc blinks on in the corner near the end.
        dict(kind="disc", t0=9.0, t1=11.5, xy0=(50 + j[3], 40), xy1=(50 + j[3], 40), r=15,
             colors=[(245, 245, 245)]),
    ]


def _render(t: float, events: list[dict], yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    img = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for ev in events:
        if not ev["t0"] <= t < ev["t1"]:
            continue
        a = (t - ev["t0"]) / (ev["t1"] - ev["t0"])
        cx = ev["xy0"][0] + a * (ev["xy1"][0] - ev["xy0"][0])
        cy = ev["xy0"][1] + a * (ev["xy1"][1] - ev["xy0"][1])
        r = ev["r"]
        colors = ev["colors"]
        color = colors[min(int(a * len(colors)), len(colors) - 1)]
        if ev["kind"] == "disc":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif ev["kind"] == "square":
            mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
        else:  # upward-pointing triangle: width grows linearly from apex to base
            rel = (yy - (cy - r)) / (2 * r)
            mask = (rel >= 0) & (rel <= 1) & (abs(xx - cx) <= rel * r)
        img[mask] = color
    return img


def write_sample(out: Path, seed: int = 0) -> str:
    """Write the clip to ``out``; returns the codec name used."""
    events = _events(np.random.default_rng(seed))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    for codec in ("libx264", "mpeg4"):  # prefer H.264; mpeg4 is always in the PyAV wheel
        try:
            with av.open(str(out), mode="w") as container:
                stream = container.add_stream(codec, rate=FPS)
                stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": "28", "preset": "medium"}
                else:
                    stream.bit_rate = 200_000
                for i in range(FPS * SECONDS):
                    frame = av.VideoFrame.from_ndarray(_render(i / FPS, events, yy, xx), format="rgb24")
                    frame.pts, frame.time_base = i, Fraction(1, FPS)
                    container.mux(stream.encode(frame))
                container.mux(stream.encode(None))  # flush delayed frames
            return codec
        except (av.FFmpegError, ValueError):
            out.unlink(missing_ok=True)
    raise RuntimeError("no usable video encoder (tried libx264, mpeg4)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output path (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    codec = write_sample(args.out)
    print(f"wrote {args.out} ({codec}, {args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
