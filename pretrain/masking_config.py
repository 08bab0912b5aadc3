"""The ``masking:`` section of the pretraining config (``MaskingConfig``), without torch.

Kept apart from the masking itself (``pretrain.masking``, which describes the rates) so that
``python -m pretrain`` checks a config, and reports a mistake, before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MaskingConfig:
    text_rate: float = 0.15
    text_mask_token: float = 0.8  # share of chosen tokens replaced by [MASK]
    text_random_token: float = 0.1  # share replaced by a random token (the rest stay unchanged)
    region_rate: float = 0.15
    region_blank: float = 0.9  # share of chosen regions whose feature is hidden (the rest stay unchanged)
    conditional: bool = False  # UNITER: mask either text or regions in a sample, never both

    def __post_init__(self) -> None:
        for name in ("text_rate", "text_mask_token", "text_random_token", "region_rate", "region_blank"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"masking.{name} must be in [0, 1], got {value}")
        if self.text_mask_token + self.text_random_token > 1.0:
            raise ValueError("masking.text_mask_token + masking.text_random_token must be <= 1")
