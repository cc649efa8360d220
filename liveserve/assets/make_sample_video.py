"""Generate the bundled sample clip: ``python -m liveserve.assets.make_sample_video``.

It comes from the synthetic streaming generator the default model is trained on (liveserve.data.
synthetic), from a seed outside the training (0) and evaluation (1000) sets, so `liveserve run` and
`liveserve demo` show the default model narrating a clip it has never seen. 14 s at 2 fps, 128x128:

    0.7 s  A green square appears.       7.6 s  The green square turns purple.
    5.2 s  An orange circle appears.    13.3 s  The orange circle leaves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from liveserve.data.synthetic import encode_video, synthesize

DEFAULT_OUT = Path(__file__).parent / "sample.mp4"
SEED, INDEX, FPS, SIZE = 7, 2, 2.0, (128, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    video = synthesize(SEED, INDEX, fps=FPS, size=SIZE)
    codec = encode_video(args.out, video.frames, FPS)
    print(f"wrote {args.out} ({codec}, {len(video.frames)} frames at {FPS:g} fps)")
    for event in video.events:
        print(f"  {event.time:5.1f}s  {event.text}")


if __name__ == "__main__":
    main()
