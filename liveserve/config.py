"""Per-session settings: decision threshold, generation and cache policy.

Every field is validated on construction so a bad value fails before any state is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from liveserve.frame_format import RESIZE_MODES, check_pixel_bounds

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


REPLY_MODES = ("inline", "external", "on_request", "none")
SESSION_MODES = ("live", "commentary")


@dataclass(frozen=True, slots=True)
class CommentaryConfig:
    """StreamingVLM's commentary mode (Qwen2.5-VL family): one turn per `chunk_s` seconds of video.

    Each chunk (`chunk_s * fps` frames, a multiple of the tower's temporal patch: 2 frames at the defaults)
    becomes a user turn `Time=t-(t+1)s` + the chunk (+ `query` on the first turn, and any query pushed
    since), and the model then writes up to `max_tokens_per_chunk` tokens; a reply of only the no-comment
    marker " ..." is silence. The cache stays bounded as StreamingVLM's does: the last
    `vision_window_chunks` chunks' frames, the last `text_rounds` replies in place, and older replies moved
    (without recomputation) into a "previous text" block after the system prompt, trimmed to its first
    `text_sink_tokens` and last `text_window_tokens` tokens. `positions`: contiguous re-numbers the kept
    tokens after every eviction (M-RoPE stays in the trained range on endless streams); original keeps
    each token's first position (exact against a streaming-mask oracle, positions grow without bound).
    `repetition_penalty`: transformers' rule over the tokens the reply has said so far (1 = none); with
    SessionConfig's temperature, top_p and seed it makes the reply's decoding (`DECODINGS`).
    `query`: StreamingVLM's own default. `resize`: how frames are sized for the tower (frame_format.py):
    "smart", the reference's (aspect ratio kept, sides multiples of 28, within `min_pixels`..`max_pixels`,
    None: the model's, qwen-vl-utils' video bounds 100,352..602,112 for the released checkpoints: 360 x 640
    becomes 364 x 644, 299 tokens a chunk of two frames), or "square" (the model's square input).
    """

    chunk_s: float = 1.0
    fps: float = 2.0
    max_tokens_per_chunk: int = 20
    vision_window_chunks: int = 16
    text_rounds: int = 16
    text_sink_tokens: int = 512
    text_window_tokens: int = 512
    positions: str = "contiguous"
    query: str = "Commentate on this match"
    previous_text: str = ""
    max_query_tokens: int = 256
    repetition_penalty: float = 1.0
    resize: str = "smart"
    min_pixels: int | None = None
    max_pixels: int | None = None

    @property
    def frames_per_chunk(self) -> int:
        return round(self.chunk_s * self.fps)

    def __post_init__(self) -> None:
        if not self.chunk_s > 0 or not self.fps > 0:
            raise ValueError(f"chunk_s and fps must be > 0, got {self.chunk_s} and {self.fps}")
        if self.frames_per_chunk < 1 or abs(self.frames_per_chunk - self.chunk_s * self.fps) > 1e-6:
            raise ValueError(f"chunk_s * fps must be a whole number of frames, got {self.chunk_s} * {self.fps}")
        for name in ("max_tokens_per_chunk", "vision_window_chunks", "text_rounds", "max_query_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_sink_tokens < 0 or self.text_window_tokens < 0:
            raise ValueError("text_sink_tokens and text_window_tokens must be >= 0")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 28 * 28:
                raise ValueError(f"{name} must be at least one 28 x 28 patch (784), got {getattr(self, name)}")
        if self.min_pixels is not None and self.max_pixels is not None:
            check_pixel_bounds(self.min_pixels, self.max_pixels)


@dataclass(frozen=True, slots=True)
class Decoding:
    """How a commentary reply picks its tokens: SessionConfig's temperature and top_p, CommentaryConfig's
    repetition_penalty."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


# "greedy" (the default: the same stream always gets the same commentary, batched or alone, on any replica)
# and "reference", StreamingVLM's own sampling (temperature 0.9, repetition penalty 1.05, no top-p cut).
DECODINGS = {"greedy": Decoding(), "reference": Decoding(temperature=0.9, top_p=1.0, repetition_penalty=1.05)}


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
    # Who writes the replies. "inline": this session generates them (one model does everything).
    # "external": a Decision session; it reports ReplyRequested, keeps deciding frames without firing again,
    # and appends the reply another model wrote (push_reply). "on_request": a Reaction session; it never
    # fires by itself and answers push_respond / push_query triggers. "none": decisions only (event
    # detection): fired decisions are reported, no reply is written, and queries are refused.
    replies: str = "inline"
    # "live": frame-by-frame streaming-EOS decisions (LIVE models). "commentary": a turn per chunk of
    # video, the model writing or staying silent each time (StreamingVLM; Qwen2.5-VL models).
    mode: str = "live"
    commentary: CommentaryConfig = field(default_factory=CommentaryConfig)

    def __post_init__(self) -> None:
        if self.mode not in SESSION_MODES:
            raise ValueError(f"mode must be one of {', '.join(SESSION_MODES)}, got {self.mode!r}")
        if self.replies not in REPLY_MODES:
            raise ValueError(f"replies must be one of {', '.join(REPLY_MODES)}, got {self.replies!r}")
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


ATTENTION_KERNELS = ("auto", "sdpa", "flash", "flex", "flashinfer")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The KV pool of one model replica.

    The budget is `budget_tokens`, else `budget_bytes`, else on CUDA `memory_fraction` of the device memory
    still free when the pool is made (the weights are loaded by then; 0.9 by default, as serving engines
    do, the rest left for activations), and on CPU a fixed 1 GiB. Each admitted session reserves its cache
    policy's worst case (see docs); `full` sessions would reserve the model's whole context, so
    `max_session_tokens` caps them.
    """

    budget_tokens: int | None = None
    budget_bytes: int | None = None
    memory_fraction: float = 0.9
    block_size: int = 16
    max_session_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("budget_tokens", "budget_bytes", "max_session_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How one engine step is filled, and how a lagging session catches up.

    A step serves each ready session at most once (a session's next step needs this step's logits),
    least recently served first, up to `max_batch_tokens` new tokens: the token budget is what bounds a
    step's cost, so a step of frame steps (11 tokens each) takes ~370 sessions at the default.
    `max_batch_sessions` optionally caps the sessions as well (None: no cap).
    A session whose queued frames span more than `max_lag_s` seconds of stream time, or number more
    than `max_queued_frames`, drops its oldest queued frames (reported) and keeps the newest.
    """

    max_batch_sessions: int | None = None
    max_batch_tokens: int = 4096
    max_lag_s: float | None = 2.0
    max_queued_frames: int = 64

    def __post_init__(self) -> None:
        if (self.max_batch_sessions is not None and self.max_batch_sessions < 1) or self.max_batch_tokens < 1:
            raise ValueError("max_batch_sessions (or None) and max_batch_tokens must be >= 1")
        if self.max_lag_s is not None and not self.max_lag_s >= 0:
            raise ValueError(f"max_lag_s must be >= 0 or None, got {self.max_lag_s}")
        if self.max_queued_frames < 1:
            raise ValueError(f"max_queued_frames must be >= 1, got {self.max_queued_frames}")


@dataclass(frozen=True, slots=True)
class PerceptionConfig:
    """Dynamic batching of frame encoding. The encoder takes up to `max_batch_size` waiting frames as soon
    as it is free, so batches grow with load; `max_wait_ms` > 0 makes a small batch wait up to that long
    for company (fuller batches, for towers whose per-call cost dominates, at that much latency)."""

    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    # Encode on a thread of its own (on CUDA, its own stream), overlapping the LM step, instead of at the
    # start of each step. None: on CUDA only; on the CPU the two threads would fight over the same cores.
    overlap: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """A batched engine: many sessions on one model replica."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    attention: str = "auto"  # auto: flashinfer, else flash-attn, where they run (CUDA, fp16/bf16, installed), else SDPA
    # CUDA graphs of the direct Llama forward's fixed-shape pieces, per bucket of step sizes
    # (model/forward/graphed_step.py): CUDA only, models the direct forward takes (both families)
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")
