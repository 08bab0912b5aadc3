"""The model's settings that the pretraining config names, without torch: ``POOLINGS`` (the
choices of ``model.pooling``) and ``ObjectiveWeights`` (the ``objectives:`` section).

Kept apart from the model (``pretrain.model``) so that ``python -m pretrain`` checks a config,
and reports a mistake, before torch and transformers are imported.
"""

from __future__ import annotations

from dataclasses import dataclass

POOLINGS = ("cls", "mean")


@dataclass
class ObjectiveWeights:
    mlm: float = 1.0
    moc: float = 1.0
    mrfr: float = 1.0
    itm: float = 1.0
    moc_kl: bool = False  # False: cross-entropy to the detector's top label; True: KL to its distribution (UNITER)
