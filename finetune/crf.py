"""A linear-chain conditional random field: batched forward algorithm and Viterbi decoding.

Scores a tag sequence ``y`` over emissions ``e`` as
``start[y0] + sum_t e[t, y_t] + sum_t trans[y_{t-1}, y_t] + end[y_last]``; the log-likelihood
subtracts the log partition function, summed over all sequences by the forward algorithm.
Masks must be left-aligned (a sequence's real steps first, then padding) and every sequence
needs at least one real step.
"""

from __future__ import annotations

import torch
from torch import nn


class CRF(nn.Module):
    def __init__(self, num_tags: int):
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be >= 1, got {num_tags}")
        self.num_tags = num_tags
        # Small random start so decoding is not a tie before training breaks the symmetry.
        self.start_transitions = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.end_transitions = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))

    def _check(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if emissions.dim() != 3 or emissions.shape[-1] != self.num_tags:
            raise ValueError(f"emissions must be [batch, steps, {self.num_tags}], got {tuple(emissions.shape)}")
        if mask.shape != emissions.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match emissions {tuple(emissions.shape[:2])}")
        mask = mask.bool()
        if not mask[:, 0].all():
            raise ValueError("every sequence needs its first step unmasked (left-aligned, non-empty)")
        return mask

    def sequence_score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised score of ``tags`` per sequence, ``[batch]``."""
        mask = self._check(emissions, mask)
        emissions = emissions.float()
        tags = tags.masked_fill(~mask, 0)
        emit = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # [B, T]
        score = self.start_transitions[tags[:, 0]] + emit[:, 0]
        step = self.transitions[tags[:, :-1], tags[:, 1:]] + emit[:, 1:]  # [B, T-1]
        score = score + (step * mask[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        return score + self.end_transitions[last]

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``log sum_y exp(score(y))`` per sequence by the forward algorithm, ``[batch]``."""
        mask = self._check(emissions, mask)
        emissions = emissions.float()
        alpha = self.start_transitions + emissions[:, 0]  # [B, K]
        for t in range(1, emissions.shape[1]):
            # alpha_new[j] = logsumexp_i(alpha[i] + trans[i, j]) + e[t, j]
            candidate = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, dim=1) + emissions[:, t]
            alpha = torch.where(mask[:, t, None], candidate, alpha)
        return torch.logsumexp(alpha + self.end_transitions, dim=1)

    def log_likelihood(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``log p(tags | emissions)`` per sequence, ``[batch]``."""
        return self.sequence_score(emissions, tags, mask) - self.log_partition(emissions, mask)

    def forward(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood over the batch: the training loss."""
        return -self.log_likelihood(emissions, tags, mask).mean()

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The highest-scoring tag sequence of each sequence (Viterbi), cut to its length."""
        mask = self._check(emissions, mask)
        emissions = emissions.float()
        batch, steps, _ = emissions.shape
        score = self.start_transitions + emissions[:, 0]
        backpointers = []
        for t in range(1, steps):
            best, argbest = (score.unsqueeze(2) + self.transitions).max(dim=1)  # over previous tag
            candidate = best + emissions[:, t]
            score = torch.where(mask[:, t, None], candidate, score)
            # Padded steps point to themselves so backtracking passes through them unchanged.
            identity = torch.arange(self.num_tags, device=emissions.device).expand(batch, -1)
            backpointers.append(torch.where(mask[:, t, None], argbest, identity))
        best_last = (score + self.end_transitions).argmax(dim=1)
        path = [best_last]
        for pointers in reversed(backpointers):
            path.append(pointers.gather(1, path[-1].unsqueeze(1)).squeeze(1))
        tags = torch.stack(path[::-1], dim=1)  # [B, T]
        lengths = mask.sum(1).tolist()
        return [tags[b, : lengths[b]].tolist() for b in range(batch)]
