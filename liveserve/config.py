"""Per-session settings: decision threshold, generation and cache policy.

Every field is validated on construction so a bad value fails before any state is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CACHE_POLICIES = ("full", "sink_window")
POSITION_MODES = ("contiguous", "original")

# VideoLLM-online's hard-coded streaming threshold: stay silent only when P(interval) >= 0.725.
DEFAULT_THRESHOLD = 0.725


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """How a session's KV cache stays bounded.

    full: keep every token (the reference behaviour); a step that would pass the model's position
        limit is refused with CacheFullError before anything is written.
    sink_window: keep the stream prefix (system prompt, the attention sink), the most recent
        `window_frames` frames and the most recent `text_window_tokens` of queries and replies.
        Whole frames and whole turns are evicted, `evict_frames` at a time so the per-eviction
        compaction (and, with contiguous positions, the key re-rotation) is amortised.
    positions: contiguous re-numbers kept tokens 0..n-1 after an eviction (RoPE stays in the
        trained range forever); original keeps each token's first position (exact against a
        streaming-mask oracle, but positions grow without bound).
    """

    policy: str = "full"
    positions: str = "contiguous"
    window_frames: int = 64
    text_window_tokens: int = 512
    evict_frames: int = 8

    def __post_init__(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(CACHE_POLICIES)}, got {self.policy!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"cache positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1, got {self.window_frames}")
        if self.text_window_tokens < 0:
            raise ValueError(f"text_window_tokens must be >= 0, got {self.text_window_tokens}")
        if not 1 <= self.evict_frames <= self.window_frames:
            raise ValueError(f"evict_frames must be in [1, window_frames={self.window_frames}], got {self.evict_frames}")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What one video session asks of the engine."""

    threshold: float = DEFAULT_THRESHOLD
    max_new_tokens: int = 100
    temperature: float = 0.0  # 0 = greedy, as the reference
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None  # None: the model's default system prompt
    max_query_tokens: int = 256
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_query_tokens < 1:
            raise ValueError(f"max_query_tokens must be >= 1, got {self.max_query_tokens}")
