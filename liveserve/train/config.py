"""Training settings (no heavy imports: the command line builds its parser from these defaults)."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("lora", "full")
# As the reference: every projection of the LM and the LM head.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data: str  # dataset directory with dialogues.json (and the videos it names)
    out: str
    model: str = "tiny"  # base model: a directory, "tiny" or "default"
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    lr: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 8
    stream_loss_weight: float = 1.0
    mode: str = "lora"
    train_vision: bool = False  # also train the vision tower, in full (else frozen, its features cached)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    resume: bool = False
    threads: int | None = None  # torch CPU threads; None: torch's default

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_accum < 1 or self.log_every < 1 or self.save_every < 0:
            raise ValueError("grad_accum and log_every must be >= 1 and save_every >= 0")
        if self.stream_loss_weight < 0:
            raise ValueError(f"stream_loss_weight must be >= 0, got {self.stream_loss_weight}")
        if self.mode == "lora" and (self.lora_r < 1 or not self.lora_targets):
            raise ValueError("LoRA needs lora_r >= 1 and at least one target module")
