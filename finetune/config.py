"""The fine-tuning job config: one YAML file (``configs/finetune/*.yaml``) plus dotted overrides.

Sections: ``task`` (head and loss), ``fusion`` (``finetune.fusion.FusionConfig``), ``data``,
``eval``, and the training engine's (``pretrain.engine_config``, the same as pretraining's):
``train`` (steps and learning-rate schedule), ``deepspeed``, ``checkpoint``, ``logging``. Every
dataclass checks itself and names the key and the fix; ``docs/finetune.md`` lists every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from finetune.fusion import FusionConfig
from preprocess import storage
from pretrain.engine_config import (
    CheckpointConfig, DeepSpeedConfig, LoggingConfig, NonFiniteLossConfig, ScheduleConfig,
)

TASKS = ("retrieval", "classification", "multilabel", "sentiment", "ner")
RETRIEVAL_LOSSES = ("binary", "multiclass", "triplet")


@dataclass
class TaskConfig:
    name: str = ""  # retrieval | classification | multilabel | sentiment | ner
    # classification/sentiment: class names; multilabel: label names; ner: BIO tags, "O" first.
    # Sample JSON may give labels as indices into this list or as the names themselves.
    label_names: list[str] = field(default_factory=list)
    # Hidden width of the MLP head on each pooled summary (0: one linear layer). MSA's MLP head.
    head_hidden: int = 0
    dropout: float = 0.1  # on pooled summaries / token states before the head (ner: crf_dropout instead)
    # ner: the tagger (emission layers and CRF) as MuSE's reference trains it: its own learning
    # rate (null: train.lr; the reference's scripts set it equal to the learning rate) and dropout
    # on what the emission layers read (the reference: 0.5).
    crf_lr: float | None = None
    crf_dropout: float = 0.5
    multilabel_threshold: float = 0.5  # sigmoid probability above which a label is predicted
    # Retrieval: ImageBERT's three fine-tuning losses over cross-encoder scores.
    retrieval_loss: Literal["binary", "multiclass", "triplet"] = "multiclass"
    retrieval_negatives: int = 3  # sampled per positive pair and direction (negative captions and images)
    triplet_margin: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task.name is {self.name!r}; choose one of {', '.join(TASKS)}")
        if self.name != "retrieval" and len(self.label_names) < 2:
            raise ValueError(f"task.label_names needs at least 2 names for task {self.name!r}, got {self.label_names}")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"task.label_names has duplicates: {self.label_names}")
        if self.name == "ner":
            if self.label_names[0] != "O" or any(t[:2] not in ("B-", "I-") for t in self.label_names[1:]):
                raise ValueError(f"task.label_names for ner must be 'O' then B-/I- tags, got {self.label_names}")
        if self.head_hidden < 0:
            raise ValueError(f"task.head_hidden must be >= 0 (0: linear head), got {self.head_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"task.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.crf_dropout < 1.0:
            raise ValueError(f"task.crf_dropout must be in [0, 1), got {self.crf_dropout}")
        if self.crf_lr is not None and self.crf_lr <= 0:
            raise ValueError(f"task.crf_lr must be > 0 (or null: train.lr), got {self.crf_lr}")
        if not 0.0 < self.multilabel_threshold < 1.0:
            raise ValueError(f"task.multilabel_threshold must be in (0, 1), got {self.multilabel_threshold}")
        if self.retrieval_negatives < 1:
            raise ValueError(f"task.retrieval_negatives must be >= 1, got {self.retrieval_negatives}")
        if self.triplet_margin <= 0:
            raise ValueError(f"task.triplet_margin must be > 0, got {self.triplet_margin}")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class DataConfig:
    train: str = ""  # training shards, brace pattern or '::' list (relative to shards_root unless absolute)
    val: str = ""  # validation shards evaluated during and after training ('' skips validation)
    batch_size: int = 16  # per rank, per micro-step
    max_text_length: int = 40  # word pieces incl. [CLS]/[SEP]
    max_regions: int = 100  # highest-confidence regions kept per image
    num_workers: int = 1
    shuffle_buffer: int = 500
    # Which modalities the model sees: "text" blanks the image (one blanked region), "image" masks
    # every caption word piece ([MASK], lengths kept). The unimodal baselines.
    modalities: Literal["both", "text", "image"] = "both"

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train must name the training shards (e.g. data.train='train/{00000..00003}.tar')")
        if self.batch_size < 2:
            raise ValueError(f"data.batch_size must be >= 2 (retrieval negatives come from the batch), got {self.batch_size}")
        if self.max_text_length < 3:
            raise ValueError(f"data.max_text_length must be >= 3, got {self.max_text_length}")
        if self.max_regions < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.max_regions and data.shuffle_buffer must be >= 1, data.num_workers >= 0")


@dataclass
class TrainConfig(ScheduleConfig):
    """The ``train:`` section: the engine's schedule, with fine-tuning's smaller default learning rate."""

    lr: float = 5e-5


@dataclass
class EvalConfig:
    every_steps: int = 500  # validation during training (and always at the end)
    batch_size: int = 64  # samples (retrieval: image-caption pairs) per forward
    max_samples: int = 0  # validation samples read (0: all)
    retrieval_image_chunk: int = 100  # images x captions scored per block; bounds memory
    retrieval_caption_chunk: int = 500

    def __post_init__(self) -> None:
        if min(self.every_steps, self.batch_size, self.retrieval_image_chunk, self.retrieval_caption_chunk) < 1:
            raise ValueError("eval.every_steps, eval.batch_size and the retrieval chunks must be >= 1")
        if self.max_samples < 0:
            raise ValueError(f"eval.max_samples must be >= 0 (0: all), got {self.max_samples}")


@dataclass
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Directory or bucket URL relative shard patterns in `data` are resolved against (the quickstart
    # points it at its output).
    shards_root: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig(zero_stage=1))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite_loss: NonFiniteLossConfig = field(default_factory=NonFiniteLossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0

    def shard_path(self, pattern: str) -> str:
        return storage.resolve(self.shards_root, pattern)
