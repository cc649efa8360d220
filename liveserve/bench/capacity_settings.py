"""What one run of the capacity benchmark is asked to do (capacity.py runs it; open_loop.py and
single_stream.py read the same settings)."""

from __future__ import annotations

from dataclasses import dataclass

from liveserve.config import DEFAULT_THRESHOLD

INPUTS = ("pixels", "features")
MAX_LEVELS = 16


@dataclass(frozen=True, slots=True)
class CapacitySettings:
    fps: float = 2.0
    duration_s: float = 8.0
    warmup_s: float = 1.0  # frames due in the first seconds of a level are not measured
    slo_ms: float = 250.0
    input_kind: str = "features"
    reply_rate: float = 0.05  # share of frames that fire (calibrated, see module docs)
    reply_tokens: int = 16  # length of the reply the bench hands back
    reply_delay_s: float = 1.0  # how long the simulated Reaction model takes to write it
    prefill_frames: int = 64
    window_frames: int = 64
    single_stream_frames: int = 64
    max_new_tokens: int = 8  # single-stream inline replies
    threshold: float = DEFAULT_THRESHOLD
    drain_s: float = 5.0  # after the last frame is due, how long undecided frames may still finish
    max_tokens_per_chunk: int = 20  # commentary models: most tokens a turn says
    cuda_graphs: bool = False  # the engine's steps replay CUDA graphs (EngineConfig.cuda_graphs), single stream too

    def __post_init__(self) -> None:
        if self.input_kind not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {self.input_kind!r}")
        if not (self.fps > 0 and self.duration_s > 0 and self.slo_ms > 0):
            raise ValueError("fps, duration and slo_ms must be > 0")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be in [0, duration_s), got {self.warmup_s}")
        if not 0.0 <= self.reply_rate < 1.0:
            raise ValueError(f"reply_rate must be in [0, 1), got {self.reply_rate}")
        if min(self.prefill_frames, self.single_stream_frames) < 0 or self.reply_tokens < 1:
            raise ValueError("prefill_frames and single_stream_frames must be >= 0, reply_tokens >= 1")
