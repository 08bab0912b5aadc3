"""Masking for the pretraining objectives (ImageBERT section 3.2; UNITER where it is silent).

Text: 15% of the real (non-special) tokens are chosen; of those 80% become [MASK], 10% a
random token, 10% stay unchanged (BERT). Regions: 15% of the real regions are chosen; of
those 90% are blanked (the model sees the box, not the feature) and 10% stay unchanged. The labels mark every chosen
position, changed or not. With ``conditional`` (UNITER) each sample masks one modality only,
so the other is seen whole.
"""

from __future__ import annotations

import torch

from pretrain.masking_config import MaskingConfig
from pretrain.model import IGNORE_INDEX


def mask_text(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    config: MaskingConfig,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, MLM labels with ``IGNORE_INDEX`` where not chosen).

    ``maskable`` is True at real, non-special tokens.
    """
    chosen = (torch.rand(input_ids.shape, generator=generator) < config.text_rate) & maskable.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (action < config.text_mask_token)
    to_random = chosen & (action >= config.text_mask_token) & (action < config.text_mask_token + config.text_random_token)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked[to_random] = random_ids[to_random]
    return masked, labels


def mask_regions(
    region_mask: torch.Tensor, config: MaskingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return boolean ``(region_blanked, region_masked)``: the regions whose feature the model does
    not see (90 % of the chosen), and every chosen region (the MOC/MRFR targets).

    ``region_mask`` is True at real regions. The features themselves are left as they are: the
    model replaces a blanked region's feature by its learned blank embedding, and MRFR regresses
    the unchanged feature.
    """
    shape = region_mask.shape
    chosen = (torch.rand(shape, generator=generator) < config.region_rate) & region_mask.bool()
    blanked = chosen & (torch.rand(shape, generator=generator) < config.region_blank)
    return blanked, chosen


def choose_modality(batch_size: int, config: MaskingConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (mask_text, mask_regions) flags: both True unless ``conditional``."""
    if not config.conditional:
        ones = torch.ones(batch_size, dtype=torch.bool)
        return ones, ones
    text = torch.rand(batch_size, generator=generator) < 0.5
    return text, ~text
