"""The ``eval:`` section of the pretraining config (``EvalConfig``), without torch.

Kept apart from the evaluation (``pretrain.evaluation``) so that ``python -m pretrain`` checks a
config, and reports a mistake, before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """The ``eval:`` section of the pretraining config."""

    every_steps: int = 500
    max_samples: int = 512  # masked-modelling/ITM validation samples
    retrieval_candidates: int = 100  # N held-out images (0: all), each with all its captions, for zero-shot retrieval
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"eval.every_steps must be >= 1, got {self.every_steps}")
        if self.max_samples < 2:
            raise ValueError(f"eval.max_samples must be >= 2, got {self.max_samples}")
        if self.retrieval_candidates < 2 and self.retrieval_candidates != 0:
            raise ValueError(f"eval.retrieval_candidates must be >= 2 images, or 0 for all, got {self.retrieval_candidates}")
        if self.batch_size < 2:
            raise ValueError(f"eval.batch_size must be >= 2, got {self.batch_size}")
