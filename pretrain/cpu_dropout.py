"""Dropout with a cheap random mask on CPUs, for the encoder's hidden states and attention weights.

torch's CPU dropout draws every element's Bernoulli from the generator one call at a time, serially:
at the reference shape of ``bench/pretrain.py`` (hidden 384, 6 layers, 76 positions, batch 32) that
was 17-20 % of a whole fp32 training step on a 2-core Xeon. Here one 64-bit draw from the same
generator (``torch.manual_seed`` still makes a run reproducible) gives four 16-bit draws, each kept
where it is at or above ``p`` rounded to 1/65536; the input is multiplied by ``keep / (1 - p)`` in
one pass. Same distribution as torch's dropout up to that rounding (0.1 becomes 0.100006), a
different random stream.

The attention weights' dropout sits inside SDPA, which on a CPU falls back to its plain-ops path
whenever dropout is on. ``sdpa_cpu_dropout`` (a transformers attention function, registered on
import, the encoder's default: ``pretrain.model``) runs that same path itself with the cheap mask
while training on a CPU, and is transformers' SDPA everywhere else: evaluation, GPUs (whose
dropout is fused and fast), and whenever dropout is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

ATTENTION = "sdpa_cpu_dropout"
_LEVELS = 1 << 16  # p is rounded to a multiple of 1 / _LEVELS


def keep_scale(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``shape``: 0 where dropped, ``1 / (1 - p)`` where kept, each element dropped
    with probability ``p`` rounded to 1/65536."""
    dropped_levels = round(p * _LEVELS)
    if dropped_levels >= _LEVELS:
        return torch.zeros(shape, dtype=dtype)
    count = shape.numel()
    # random_(-2**63, None) is the generator's 64 raw bits per draw: four uniform int16s.
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    draws = words.view(torch.int16)[:count].view(shape)
    kept = draws >= dropped_levels - _LEVELS // 2
    return kept.to(dtype) * (_LEVELS / (_LEVELS - dropped_levels))


def apply_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the cheap mask when training on a CPU."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * keep_scale(x.shape, p, x.dtype)


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` with the cheap mask on CPUs (no parameters, so checkpoints are unaffected)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)


def use_cpu_dropout(module: nn.Module) -> None:
    """Replace every ``nn.Dropout`` inside ``module`` with a ``CpuDropout`` of the same ``p``."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, CpuDropout(child.p))


def attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, heads, Q, d]
    key: torch.Tensor,  # [B, heads, K, d]
    value: torch.Tensor,  # [B, heads, K, d]
    attention_mask: torch.Tensor | None,  # [B, 1, Q, K]: bool (True attends) or additive, or None
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: output ``[B, Q, heads, d]`` and no weights."""
    if dropout == 0 or query.device.type != "cpu" or getattr(module, "is_causal", False) or kwargs.get("is_causal"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(attention_mask.logical_not(), torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = apply_dropout(torch.softmax(scores, dim=-1), dropout, training=True)
    return torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, attention)
# The same masks as SDPA's (without a mask function transformers would build none).
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
