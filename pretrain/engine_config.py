"""The config sections of the training engine (``pretrain.engine``), shared by both job configs.

``deepspeed:``, ``checkpoint:``, ``nonfinite_loss:`` and ``logging:`` are sections of the pretraining and the
fine-tuning config alike. ``ScheduleConfig`` (steps and learning-rate schedule) is embedded in
each: every pretraining stage is one (``pretrain.config.StageConfig``), and so is fine-tuning's
``train:`` section. DeepSpeed's own config is generated from a ``DeepSpeedConfig`` and a
``ScheduleConfig`` (``pretrain.engine.deepspeed_config``). No heavy imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ScheduleConfig:
    """Optimizer steps and the learning-rate schedule of one stretch of training."""

    steps: int = 1000  # optimizer steps
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: Literal["linear", "cosine"] = "linear"  # decay after warm-up: linear to 0, or cosine
    min_lr_ratio: float = 0.0  # floor of the cosine decay as a share of lr (linear decays to 0)

    def __post_init__(self) -> None:
        key = self.config_key()
        if self.steps < 1:
            raise ValueError(f"{key}.steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"{key}.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"{key}.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{key}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def config_key(self) -> str:
        """Where this section sits in the job config, for error messages."""
        return "train"


@dataclass
class DeepSpeedConfig:
    """The ``deepspeed:`` section: ZeRO, precision and the AdamW optimizer."""

    # auto: ZeRO-0 on one rank (partitioning saves nothing there and ZeRO's per-parameter work
    # costs time: docs/benchmarks.md), ZeRO-2 on several or with ZeRO-Offload; a resumed run keeps
    # the stage its checkpoint was written with (pretrain.engine.choose_zero_stage). A pretraining
    # stage with objectives "cmg" takes ZeRO-0 (pretrain.trainer.stage_deepspeed).
    zero_stage: int | Literal["auto"] = "auto"
    # auto: bf16 where the hardware computes it natively (a GPU with bf16, a CPU with AVX-512 BF16
    # or AMX), else fp32; decided at start by every rank together (pretrain.engine.choose_precision).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0  # max global grad norm; 0 disables
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # Merged last into the generated DeepSpeed config, for knobs this file does not name
    # (e.g. {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage not in ("auto", 0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be auto, 0, 1, 2 or 3, got {self.zero_stage}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("deepspeed.gradient_accumulation_steps must be >= 1")
        if self.gradient_clipping < 0:
            raise ValueError("deepspeed.gradient_clipping must be >= 0 (0 disables clipping)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"deepspeed.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # also saved at the end of each stage and on SIGTERM/SIGUSR1
    keep: int = 2  # newest checkpoints kept; at least 2 so a save cut short never leaves none

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError("checkpoint.every_steps must be >= 1")
        if self.keep < 2:
            raise ValueError(f"checkpoint.keep must be >= 2 (a save killed halfway needs an older one), got {self.keep}")


@dataclass
class NonFiniteLossConfig:
    """The ``nonfinite_loss:`` section. A batch whose loss (or any logged part of it) is NaN or
    infinite on any rank is skipped: no backward, no optimizer update from it, counted in the logs
    and ``metrics.jsonl``; the next batch takes its place in the step."""

    # Stop the run after this many non-finite batches in a row, naming the last good checkpoint
    # (a model that has diverged gives nothing but non-finite losses).
    max_consecutive: int = 20

    def __post_init__(self) -> None:
        if self.max_consecutive < 1:
            raise ValueError(f"nonfinite_loss.max_consecutive must be >= 1, got {self.max_consecutive}")


@dataclass
class LoggingConfig:
    every_steps: int = 10  # TensorBoard scalars (averaged over the interval and over ranks)
    progress_bar: bool = True  # tqdm on rank 0

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError("logging.every_steps must be >= 1")
