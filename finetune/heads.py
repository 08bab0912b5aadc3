"""Task heads over a ``FusedOutput``, and the retrieval losses.

A fusion strategy hands over one or more pooled summaries (MBT: one per modality; late fusion:
the concatenation; the others: one). Heads apply one layer (or MLP) per summary, or one shared
layer to every summary when the strategy says so (``FusionEncoder.shared_head``: MBT's
classifier), and average the logits; with one summary that is a plain head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.crf import CRF


class PooledHead(nn.Module):
    """One linear layer (or a one-hidden-layer MLP) per pooled summary, or one for all of them
    (``shared``); logits averaged over summaries."""

    def __init__(
        self, pooled_dims: list[int], num_outputs: int, hidden: int = 0, dropout: float = 0.1, shared: bool = False
    ):
        super().__init__()
        if shared and len(set(pooled_dims)) != 1:
            raise ValueError(f"a shared head needs summaries of one width, got {pooled_dims}")
        self.dropout = nn.Dropout(dropout)
        self.shared = shared
        self.num_summaries = len(pooled_dims)

        def head(dim: int) -> nn.Module:
            if hidden == 0:
                return nn.Linear(dim, num_outputs)
            return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_outputs))

        self.heads = nn.ModuleList(head(d) for d in (pooled_dims[:1] if shared else pooled_dims))

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        if len(pooled) != self.num_summaries:
            raise ValueError(f"head built for {self.num_summaries} pooled summaries, got {len(pooled)}")
        heads = [self.heads[0]] * len(pooled) if self.shared else self.heads
        logits = [head(self.dropout(p)) for head, p in zip(heads, pooled)]
        return torch.stack(logits, 0).float().mean(0)

    def init_from_itm(self, itm_head: nn.Linear) -> int:
        """Start every summary of the ITM head's width from ImageBERT's ITM head; returns how many.

        The score is logit(match) - logit(mismatch), so retrieval starts where pretraining's
        zero-shot ranking is.
        """
        copied = 0
        with torch.no_grad():
            for head in self.heads:
                if isinstance(head, nn.Linear) and head.out_features == 1 and head.in_features == itm_head.in_features:
                    head.weight.copy_((itm_head.weight[1] - itm_head.weight[0]).unsqueeze(0))
                    head.bias.copy_((itm_head.bias[1] - itm_head.bias[0]).unsqueeze(0))
                    copied += 1
        return copied


class WordTagger(nn.Module):
    """Emissions per word from its first word piece's state plus the pooled summaries, then a CRF.

    The pooled summaries reach every word through their own linear maps: for late fusion that is
    the only way image information gets to the tokens; for the other strategies it is a small
    addition to states that have already seen the image.
    """

    def __init__(self, hidden_size: int, pooled_dims: list[int], num_tags: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.token = nn.Linear(hidden_size, num_tags)
        self.pooled = nn.ModuleList(nn.Linear(d, num_tags, bias=False) for d in pooled_dims)
        self.crf = CRF(num_tags)

    def emissions(self, text_states: torch.Tensor, pooled: list[torch.Tensor], word_starts: torch.Tensor) -> torch.Tensor:
        """``[B, W, num_tags]`` scores of each word's tags."""
        index = word_starts.unsqueeze(-1).expand(-1, -1, text_states.shape[-1])
        words = text_states.gather(1, index)
        scores = self.token(self.dropout(words))
        for linear, summary in zip(self.pooled, pooled):
            scores = scores + linear(self.dropout(summary)).unsqueeze(1)
        return scores.float()

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        return self.crf(emissions, tags.clamp(min=0), word_mask)

    def decode(self, emissions: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        return self.crf.decode(emissions, word_mask)


def retrieval_loss(positive: torch.Tensor, negatives: torch.Tensor, kind: str, margin: float) -> torch.Tensor:
    """ImageBERT's retrieval fine-tuning losses over cross-encoder scores.

    ``positive`` [A] scores each anchor's matched pair; ``negatives`` [A, N] its sampled
    mismatched pairs. ``binary``: logistic loss on every pair as matched/mismatched;
    ``multiclass``: softmax cross-entropy picking the positive among 1 + N candidates;
    ``triplet``: hinge on the hardest negative, ``max(0, margin - s_pos + max s_neg)``.
    """
    positive, negatives = positive.float(), negatives.float()
    if kind == "binary":
        scores = torch.cat([positive, negatives.flatten()])
        targets = torch.cat([torch.ones_like(positive), torch.zeros_like(negatives.flatten())])
        return F.binary_cross_entropy_with_logits(scores, targets)
    if kind == "multiclass":
        logits = torch.cat([positive.unsqueeze(1), negatives], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(positive), dtype=torch.long, device=positive.device))
    if kind == "triplet":
        return F.relu(margin - positive + negatives.max(dim=1).values).mean()
    raise ValueError(f"retrieval loss must be binary, multiclass or triplet, got {kind!r}")
