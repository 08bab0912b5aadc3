"""The ``data:`` section of the pretraining config (``DataConfig``), without torch.

Kept apart from the data pipeline (``pretrain.data``) so that ``python -m pretrain`` checks a
config, and reports a mistake, before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

# What ITM scores. ``unmasked`` (ImageBERT, UNITER): the pairs as they are, negatives included,
# as second sequences of the encoder call (2B rows), while the masked objectives run on every
# sample with its own caption.
# ``masked``: one forward for everything, ITM on the masked pairs and the masked objectives on
# the matched ones only (cheaper per step; the masked positions of negatives score nothing).
ITM_PAIRS = ("unmasked", "masked")


@dataclass
class DataConfig:
    """The ``data:`` section of the pretraining config."""

    batch_size: int = 32  # per rank, per micro-step
    max_text_length: int = 40  # tokens incl. [CLS]/[SEP]; longer captions are truncated
    max_regions: int = 100  # regions kept per image (highest detector confidence first)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    itm_negative_rate: float = 0.5  # share of pairs whose caption is replaced by another sample's
    itm_pairs: str = "unmasked"  # see ITM_PAIRS

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"data.batch_size must be >= 2 (ITM negatives come from the batch), got {self.batch_size}")
        if self.max_text_length < 3:
            raise ValueError(f"data.max_text_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_text_length}")
        if self.max_regions < 1:
            raise ValueError(f"data.max_regions must be >= 1, got {self.max_regions}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 disables shuffling), got {self.shuffle_buffer}")
        if not 0.0 <= self.itm_negative_rate < 1.0:
            raise ValueError(f"data.itm_negative_rate must be in [0, 1), got {self.itm_negative_rate}")
        if self.itm_pairs not in ITM_PAIRS:
            raise ValueError(f"data.itm_pairs must be one of {list(ITM_PAIRS)}, got {self.itm_pairs!r}")
