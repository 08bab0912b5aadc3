"""Building blocks of CMG's pretraining objectives (Xia et al., "Achieving Cross Modal
Generalization with Multimodal Unified Representation", NeurIPS 2023), for text tokens and regions.

Each modality's unimodal encoder states ``h`` (``[B, L, H]`` with a ``[B, L]`` validity mask) are
split by ``ModalityAutoencoder`` into a semantic part ``z = S(h)`` and a modality-specific part
``s = P(h)``; ``z`` is quantised by the ``SharedCodebook`` (one codebook for both modalities) and
``h`` is reconstructed from ``(q(z), s)``. ``SequenceCLUB`` estimates (and so lets the model
minimise) an upper bound of I(z; s) inside each modality; ``CrossCPC`` maximises a lower bound of
the mutual information between the two modalities' semantic sequences by predicting one's next
items from the other's prefix. The codebook is not trained by gradient: ``SharedCodebook.update``
moves it by the multimodal exponential moving average, where each semantic vector and its
cross-attended counterpart from the other modality both pull the code it was assigned to.

Model code only: tensors in, tensors out. ``ImageBertForPretraining`` holds a ``CMGObjectives``
when its config's ``cmg`` is set (the ``cmg:`` section of a pretraining config; docs/pretrain.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pretrain.distributed import all_reduce_sum


def _two_layer(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The ``[B, L]`` boolean mask, all positions valid when ``mask`` is None."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.bool()


def squared_distances(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` squared Euclidean distances of ``[N, D]`` vectors to ``[M, D]`` codes, as one matmul."""
    return vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codes.t() + codes.pow(2).sum(1)


def cross_attend(query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """For each query vector, the softmax(q k^T / sqrt(D))-weighted mean of the same sample's
    valid ``keys``: its counterpart in the other modality (``[B, Lq, D]``). Parameter-free, so the
    counterpart lives in the same space as the codebook. A sample with no valid key gets zeros."""
    scores = query @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])
    valid = _valid(key_mask, keys)[:, None, :]
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.nan_to_num(weights) @ keys


class SharedCodebook(nn.Module):
    """One vector-quantisation codebook for both modalities, moved by the multimodal EMA.

    All state is registered buffers (a DeepSpeed or ``state_dict`` checkpoint carries it):
    ``embedding`` [M, D], ``ema_count`` [M] (N_i), ``ema_weight`` [M, D] (m_i), ``unused_steps``
    [M] (updates since the code was last chosen) and ``updates`` (how many updates so far, which
    also seeds the dead-code reset).

    One ``update`` with decay g, for code i, with a_j the text vectors assigned to it, b_j the
    region vectors assigned to it and x^ a vector's cross-attended counterpart in the other
    modality of its own sample (``cross_attend``):

        n_i = #a_j + #b_j
        N_i <- g N_i + (1 - g) n_i,     then Laplace smoothing N_i <- (N_i + eps) / (N + M eps) N
        m_i <- g m_i + (1 - g) [ sum_j (a_j + a^_j) / 2 + sum_j (b_j + b^_j) / 2 ]
        e_i <- m_i / N_i

    so the other modality's counterpart pulls the code a vector chose (the paper's MM-EMA; its
    released code pairs time-aligned vectors instead, which text and regions are not). Both
    modalities update in one step (the released code applies two decays per step, one for each).
    ``multimodal=False`` (the paper's ablation) drops the counterparts: each vector alone pulls
    its code, m_i <- g m_i + (1 - g) [ sum_j a_j + sum_j b_j ], a plain per-modality EMA on the
    one shared codebook.

    Dead-code reset: a code not chosen for ``dead_after`` updates is moved onto a live code plus
    uniform noise of half-width ``reset_noise`` (with its m_i rescaled to match, so the next EMA
    step does not undo the move). The donor and the noise come from a generator seeded with
    ``(seed, updates)``: the reset is a function of the state, so it resumes exactly.
    ``code_reset=False`` (the paper's ablation) never resets; ``unused_steps`` still counts.

    Several ranks: ``update`` all-reduces the assignment counts and the sums over the
    data-parallel group (when torch.distributed is initialised), so every rank computes the same
    step from the global batch and keeps the same codebook; the reset then draws the same donors.
    """

    def __init__(
        self, num_codes: int, dim: int, decay: float = 0.99, epsilon: float = 1e-5,
        dead_after: int = 300, reset_noise: float = 1 / 1024, seed: int = 0,
        multimodal: bool = True, code_reset: bool = True,
    ):
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise ValueError(f"SharedCodebook: num_codes must be >= 2 and dim >= 1, got {num_codes}, {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"SharedCodebook: decay must be in [0, 1), got {decay}")
        if dead_after < 1:
            raise ValueError(f"SharedCodebook: dead_after must be >= 1, got {dead_after}")
        self.decay, self.epsilon = float(decay), float(epsilon)
        self.dead_after, self.reset_noise, self.seed = int(dead_after), float(reset_noise), int(seed)
        self.multimodal, self.code_reset = bool(multimodal), bool(code_reset)
        for name, value in self.initial_state(num_codes, dim).items():
            self.register_buffer(name, value)

    def initial_state(self, num_codes: int | None = None, dim: int | None = None) -> dict[str, torch.Tensor]:
        """The buffers before any update, a function of the seed alone (a model loaded without
        them, such as one initialised from BERT, is given these)."""
        num_codes = self.num_codes if num_codes is None else num_codes
        dim = self.embedding.shape[1] if dim is None else dim
        init = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes,
                                                    generator=torch.Generator().manual_seed(self.seed))
        return {
            "embedding": init, "ema_count": torch.ones(num_codes), "ema_weight": init.clone(),
            "unused_steps": torch.zeros(num_codes, dtype=torch.long), "updates": torch.zeros((), dtype=torch.long),
        }

    @property
    def num_codes(self) -> int:
        return self.embedding.shape[0]

    def _apply(self, fn, recurse=True):
        """Moves the buffers like any module's but keeps them float32: DeepSpeed's bf16 and fp16
        modes cast a model's floating buffers too (``module.bfloat16()``), and an EMA in bf16
        loses its small steps (at decay 0.99 a step moves a value by 1 % of its distance to the
        batch's, often below bf16's resolution of 0.4 % of the value)."""
        kept = {name: buffer for name, buffer in self._buffers.items() if buffer is not None and buffer.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance) for each vector of ``[..., D]``,
        computed in float32 whatever the autocast around it."""
        flat = z.detach().reshape(-1, z.shape[-1]).to(self.embedding.dtype)
        with torch.autocast(flat.device.type, enabled=False):
            distances = squared_distances(flat, self.embedding)
        return distances.argmin(dim=1).reshape(z.shape[:-1])

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest code of each vector of ``z``, in ``z``'s dtype, without gradient."""
        return self.embedding[self.nearest(z)].to(z.dtype)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the nearest codes with a straight-through gradient to ``z``, their indices)."""
        indices = self.nearest(z)
        codes = self.embedding[indices].to(z.dtype)
        return z + (codes - z).detach(), indices

    def commitment_loss(self, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean squared distance of the valid vectors to their (fixed) codes: keeps the encoder
        near the codebook; the codebook itself has no loss, only the EMA."""
        valid = _valid(mask, z)
        return (z - self.codes(z)).pow(2).mean(-1)[valid].mean()

    @torch.no_grad()
    def update(
        self, text: torch.Tensor, text_mask: torch.Tensor | None,
        regions: torch.Tensor, region_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """One EMA step (multimodal unless ``multimodal`` is off) from both modalities' semantic
        vectors, then the dead-code reset (unless ``code_reset`` is off). Returns the usage
        statistics of this (global) batch. Computed in float32, also under a bf16 autocast
        (ZeRO-0's mixed precision), so the sums keep their small terms."""
        with torch.autocast(text.device.type, enabled=False):
            return self._update(text.detach().float(), text_mask, regions.detach().float(), region_mask)

    def _update(self, text, text_mask, regions, region_mask) -> dict[str, torch.Tensor]:
        text_valid, region_valid = _valid(text_mask, text), _valid(region_mask, regions)
        text_pulled, region_pulled = text, regions
        if self.multimodal:
            text_pulled = (text + cross_attend(text, regions, region_valid)) / 2
            region_pulled = (regions + cross_attend(regions, text, text_valid)) / 2
        m = self.num_codes

        def assigned(vectors, pulled, valid):
            # One-hot matmuls rather than index_add_: deterministic on GPUs too.
            onehot = F.one_hot(self.nearest(vectors), m).float() * valid[..., None]
            onehot = onehot.reshape(-1, m)
            return onehot.sum(0), onehot.t() @ pulled.reshape(-1, vectors.shape[-1])

        text_counts, text_sums = assigned(text, text_pulled, text_valid)
        region_counts, region_sums = assigned(regions, region_pulled, region_valid)
        for tensor in (text_counts, text_sums, region_counts, region_sums):
            all_reduce_sum(tensor)  # over the data-parallel ranks: every rank takes the same step
        counts, sums = text_counts + region_counts, text_sums + region_sums

        g = self.decay
        self.ema_count.mul_(g).add_((1 - g) * counts)
        total = self.ema_count.sum()
        self.ema_count.copy_((self.ema_count + self.epsilon) / (total + m * self.epsilon) * total)
        self.ema_weight.mul_(g).add_((1 - g) * sums)
        self.embedding.copy_(self.ema_weight / self.ema_count[:, None])

        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        reset = self._reset_dead_codes()
        self.updates.add_(1)
        return {
            "perplexity_text": _perplexity(text_counts),
            "perplexity_regions": _perplexity(region_counts),
            "perplexity": _perplexity(counts),
            "codes_used": (counts > 0).sum(),
            "codes_reset": reset,
        }

    def _reset_dead_codes(self) -> torch.Tensor:
        dead = self.unused_steps >= self.dead_after
        live = (~dead).nonzero().flatten()
        if not self.code_reset or not dead.any() or live.numel() == 0:
            return torch.zeros((), dtype=torch.long, device=dead.device)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.updates))
        dead_codes = dead.nonzero().flatten()
        donors = live[torch.randint(live.numel(), (dead_codes.numel(),), generator=generator).to(live.device)]
        noise = torch.empty(dead_codes.numel(), self.embedding.shape[1]).uniform_(
            -self.reset_noise, self.reset_noise, generator=generator)
        self.embedding[dead_codes] = self.embedding[donors] + noise.to(self.embedding)
        self.ema_weight[dead_codes] = self.embedding[dead_codes] * self.ema_count[dead_codes, None]
        self.unused_steps[dead_codes] = 0
        return dead.sum()


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code-usage distribution: 1 when one code takes everything, M at best."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


class ModalityAutoencoder(nn.Module):
    """One modality's semantic encoder S, specific encoder P and decoder R:
    z = S(h) (the part to quantise), s = P(h), and h^ = R([W q(z); s]) reconstructs h."""

    def __init__(self, hidden_size: int, code_dim: int, specific_dim: int):
        super().__init__()
        self.semantic = _two_layer(hidden_size, hidden_size, code_dim)
        self.specific = _two_layer(hidden_size, hidden_size, specific_dim)
        self.code_proj = nn.Linear(code_dim, specific_dim)
        self.decoder = _two_layer(2 * specific_dim, hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.semantic(hidden), self.specific(hidden)

    def reconstruction_loss(
        self, hidden: torch.Tensor, quantized: torch.Tensor, specific: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean squared error of h^ over the valid positions. The target is detached: the encoder
        states are trainable here, and a live target could shrink towards an easy one."""
        rebuilt = self.decoder(torch.cat([self.code_proj(quantized), specific], dim=-1))
        return (rebuilt - hidden.detach()).pow(2).mean(-1)[_valid(mask, hidden)].mean()


class SequenceCLUB(nn.Module):
    """CLUB (Cheng et al. 2020), sequence version: an upper bound of I(x; y) between two
    sequences of one modality (semantic x and specific y, position by position), with a Gaussian
    approximation q(y | x) = N(mu(x), diag exp(logvar(x))).

    ``approximation_loss`` (-log-likelihood of the pairs, on detached inputs) trains q;
    ``mi_upper_bound`` is what the main network minimises, with q's parameters detached:

        I = E_(i,t) [ log q(y_it | x_it) - E_y' log q(y' | x_it) ]

    over the valid positions (i, t), y' ranging over every valid y of the batch. With Gaussian q
    the inner mean is closed-form, -((mu - mean y)^2 + var y) / (2 var), so all pairs count at O(N D).

    y is standardised per dimension over the batch's valid positions first (mean 0, variance 1,
    the statistics part of the graph). That map is invertible, so I(x; y) is unchanged, and it
    takes away the main network's cheapest move: growing y faster than q can follow, which
    drives the bound towards -inf. (Seen in pretraining: the bound at -2e4 after 400 steps, a
    gradient norm of 1e4 that, clipped to 1, left the masked objectives nothing.) CMG's code
    keeps q close instead with five q steps per main step, which one DeepSpeed engine cannot take.
    Summing both losses gives each network the other's pre-step parameters in one optimizer step,
    the alternation the paper describes without a second optimizer (one DeepSpeed engine).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int):
        super().__init__()
        self.mu = _two_layer(x_dim, hidden, y_dim)
        self.logvar = nn.Sequential(_two_layer(x_dim, hidden, y_dim), nn.Tanh())

    def _gaussian(self, x: torch.Tensor, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not frozen:
            return self.mu(x), self.logvar(x)
        # The same networks with detached parameters: gradients reach x, never q.
        def detached(net):
            return {name: p.detach() for name, p in net.named_parameters()}

        return functional_call(self.mu, detached(self.mu), (x,)), functional_call(self.logvar, detached(self.logvar), (x,))

    def approximation_loss(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Negative log-likelihood of (standardised) y given x (up to a constant), mean over valid
        positions and over y's dimensions. Per dimension, not summed: q's optimum is the same, and
        the loss's scale does not grow with the code width (it was the one CMG loss that did).
        This did not lower a bench run's global gradient norm, which stayed about 24 at step 300;
        what raises it is not yet pinned down (docs/benchmarks.md, Cross-modal transfer)."""
        valid = _valid(mask, x)
        x, y = x.detach()[valid], _standardised(y.detach()[valid])
        mu, logvar = self._gaussian(x, frozen=False)
        return ((mu - y).pow(2) / logvar.exp() + logvar).mean() / 2

    def mi_upper_bound(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        valid = _valid(mask, x)
        x, y = x[valid], _standardised(y[valid])
        mu, logvar = self._gaussian(x, frozen=True)
        variance = logvar.exp()
        positive = -(mu - y).pow(2) / variance
        negative = -((mu - y.mean(0)).pow(2) + y.var(0, unbiased=False)) / variance
        return (positive - negative).sum(-1).mean() / 2


def _standardised(y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``[N, D]`` vectors with each dimension at mean 0 and variance 1 over the N."""
    mean, var = y.mean(0), y.var(0, unbiased=False)
    return (y - mean) / (var + eps).sqrt()


class CrossCPC(nn.Module):
    """Cross-modal contrastive predictive coding: an LSTM reads modality A's semantic sequence
    up to position t, and W_k of its state predicts modality B's item at t + k; InfoNCE scores the
    prediction against B's items at t + k in every sample of the batch (the true sample is the
    positive). Both directions, k = 1 .. ``steps``, averaged over every position where A's t and
    B's t + k are valid. ``self_weight`` adds the within-modality CPC terms (the released code
    uses 0.1; the paper's loss has only the cross terms, the default here).

    Regions have no order of their own: the caller sorts them with ``reading_order``.
    """

    def __init__(self, dim: int, context_dim: int, steps: int = 1, self_weight: float = 0.0):
        super().__init__()
        if steps < 1:
            raise ValueError(f"CrossCPC: steps must be >= 1, got {steps}")
        self.steps, self.self_weight = int(steps), float(self_weight)
        self.context = nn.ModuleList([nn.LSTM(dim, context_dim, batch_first=True) for _ in range(2)])
        self.predict = nn.ModuleList(
            [nn.ModuleList([nn.Linear(context_dim, dim) for _ in range(steps)]) for _ in range(2)])

    def forward(
        self, a: torch.Tensor, a_mask: torch.Tensor | None, b: torch.Tensor, b_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(InfoNCE loss, accuracy of the cross predictions)."""
        sequences, masks = (a, b), (_valid(a_mask, a), _valid(b_mask, b))
        contexts = [self.context[m](sequences[m])[0] for m in range(2)]
        total, weight_sum, correct, counted = a.new_zeros(()), 0.0, a.new_zeros(()), a.new_zeros(())
        for source in range(2):
            for target, weight in ((1 - source, 1.0), (source, self.self_weight)):
                if weight == 0.0:
                    continue
                for k in range(1, self.steps + 1):
                    loss, hits, rows = self._info_nce(
                        self.predict[source][k - 1], contexts[source], masks[source],
                        sequences[target], masks[target], k)
                    if rows == 0:
                        continue
                    total, weight_sum = total + weight * loss, weight_sum + weight
                    if target != source:
                        correct, counted = correct + hits, counted + rows
        if weight_sum == 0.0:
            return total, total
        return total / weight_sum, correct / counted.clamp(min=1)

    @staticmethod
    def _info_nce(predictor, context, context_valid, target, target_valid, k):
        span = min(context.shape[1], target.shape[1] - k)
        if span <= 0:
            return None, None, 0
        predicted = predictor(context[:, :span])  # [B, T, D]: from positions 0 .. T-1
        future = target[:, k:k + span]  # [B, T, D]: positions k .. T-1+k
        future_valid = target_valid[:, k:k + span]
        scores = torch.einsum("itd,jtd->tij", predicted, future)  # [T, B(pred), B(candidate)]
        scores = scores.masked_fill(~future_valid.t()[:, None, :], float("-inf"))
        rows = (context_valid[:, :span] & future_valid).t()  # [T, B]
        if not rows.any():
            return None, None, 0
        log_probs = torch.log_softmax(scores, dim=-1).diagonal(dim1=1, dim2=2)  # [T, B]
        hits = (scores.argmax(-1) == torch.arange(scores.shape[1], device=scores.device)) & rows
        return -log_probs[rows].mean(), hits.sum(), rows.sum()


def code_matching_loss(
    codebook: SharedCodebook, text: torch.Tensor, text_mask: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
) -> torch.Tensor:
    """CMG's L_cmcm (cross-modal code matching, after Liu et al. 2021): each sample's caption and
    regions should choose the same codes. Per position a soft assignment over the codes,
    softmax(-distance); its mean over the sample's valid positions is the sample's code
    distribution P (``[B, M]``, one per modality). The pair score is
    S_ij = sum_k P_text_i(k) log P_regions_j(k) + P_regions_i(k) log P_text_j(k), and the loss is
    the cross-entropy of picking j = i in each row of S. Samples without a valid position on
    either side do not count (0 when none is left). The gradient reaches the semantic vectors;
    the codebook moves only by its EMA."""
    keep = text_mask.any(1) & region_mask.any(1)
    if not keep.any():
        return text.sum() * 0.0 + regions.sum() * 0.0
    with torch.autocast(text.device.type, enabled=False):
        codes = codebook.embedding.clone()  # the EMA step moves the buffer in place before backward

        def distribution(vectors, mask):
            vectors, mask = vectors[keep].float(), mask[keep]
            squared = squared_distances(vectors.flatten(0, 1), codes).unflatten(0, vectors.shape[:2])
            soft = torch.softmax(-squared.clamp(min=1e-12).sqrt(), dim=-1) * mask[..., None]
            return soft.sum(1) / mask.sum(1, keepdim=True)

        p_text, p_regions = distribution(text, text_mask), distribution(regions, region_mask)
        scores = p_text @ torch.log(p_regions + 1e-10).t() + p_regions @ torch.log(p_text + 1e-10).t()
        return F.cross_entropy(scores, torch.arange(len(scores), device=scores.device))


def reading_order(geometry: torch.Tensor, mask: torch.Tensor | None, bands: int = 3) -> torch.Tensor:
    """The permutation ``[B, R]`` that puts each image's regions in reading order of their box
    centres: ``bands`` horizontal bands top to bottom, left to right inside a band; padded
    regions last. ``geometry`` is the normalised ``(x1, y1, x2, y2, area)`` of each region.

    Why this order: Cross-CPC needs "the next region", and the detector's order (by confidence)
    changes with every threshold; an order read from the boxes alone is stable, keeps neighbouring
    regions next to each other, and goes the way captions tend to be read off a scene."""
    x_centre = (geometry[..., 0] + geometry[..., 2]) / 2
    y_centre = (geometry[..., 1] + geometry[..., 3]) / 2
    band = (y_centre.clamp(0, 1) * bands).floor().clamp(max=bands - 1)
    key = band * 2 + x_centre.clamp(0, 1)
    key = key.masked_fill(~_valid(mask, geometry), float("inf"))
    return key.argsort(dim=1, stable=True)


class CMGObjectives(nn.Module):
    """All CMG objectives over one batch's unimodal encoder states, text and regions.

    ``forward`` returns the unweighted losses (``reconstruction``, ``commitment``, ``club`` (the
    two modalities' I(z; s) bounds, summed), ``club_approximation`` (trains the CLUB networks
    only; weight it 1), ``cross_cpc``, ``code_matching`` (L_cmcm)) and the codebook's usage
    statistics. In training mode it
    also moves the codebook one multimodal EMA step (after quantising, so the straight-through
    codes are the ones the step started with). Regions are put in ``reading_order`` first.
    ``multimodal_ema`` and ``code_reset``: ``SharedCodebook``'s ``multimodal`` and ``code_reset``.
    """

    def __init__(
        self, hidden_size: int, num_codes: int = 512, code_dim: int = 256, specific_dim: int = 256,
        club_hidden: int = 256, cpc_context: int = 256, cpc_steps: int = 1, decay: float = 0.99,
        dead_after: int = 300, seed: int = 0, multimodal_ema: bool = True, code_reset: bool = True,
    ):
        super().__init__()
        self.text = ModalityAutoencoder(hidden_size, code_dim, specific_dim)
        self.regions = ModalityAutoencoder(hidden_size, code_dim, specific_dim)
        self.codebook = SharedCodebook(num_codes, code_dim, decay=decay, dead_after=dead_after, seed=seed,
                                       multimodal=multimodal_ema, code_reset=code_reset)
        self.text_club = SequenceCLUB(code_dim, specific_dim, club_hidden)
        self.region_club = SequenceCLUB(code_dim, specific_dim, club_hidden)
        self.cross_cpc = CrossCPC(code_dim, cpc_context, steps=cpc_steps)

    def forward(
        self, text_states: torch.Tensor, text_mask: torch.Tensor, region_states: torch.Tensor,
        region_mask: torch.Tensor, region_geometry: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        order = reading_order(region_geometry, region_mask)
        region_states = region_states.gather(1, order[..., None].expand_as(region_states))
        text_mask, region_mask = text_mask.bool(), region_mask.bool().gather(1, order)

        encoded = {}  # modality -> (autoencoder, CLUB, states, mask, semantic, specific, quantised)
        for name, auto, club, states, mask in (
            ("text", self.text, self.text_club, text_states, text_mask),
            ("regions", self.regions, self.region_club, region_states, region_mask),
        ):
            semantic, specific = auto(states)
            quantized, _ = self.codebook.quantize(semantic)
            encoded[name] = (auto, club, states, mask, semantic, specific, quantized)

        losses = dict.fromkeys(("reconstruction", "commitment", "club", "club_approximation"), 0.0)
        for auto, club, states, mask, semantic, specific, quantized in encoded.values():
            losses["reconstruction"] = losses["reconstruction"] + auto.reconstruction_loss(states, quantized, specific, mask)
            losses["commitment"] = losses["commitment"] + self.codebook.commitment_loss(semantic, mask)
            losses["club"] = losses["club"] + club.mi_upper_bound(semantic, specific, mask)
            losses["club_approximation"] = losses["club_approximation"] + club.approximation_loss(semantic, specific, mask)
        *_, text_valid, text_semantic, _, text_quantized = encoded["text"]
        *_, region_valid, region_semantic, _, region_quantized = encoded["regions"]
        losses["cross_cpc"], cpc_accuracy = self.cross_cpc(text_quantized, text_valid, region_quantized, region_valid)
        losses["code_matching"] = code_matching_loss(self.codebook, text_semantic, text_valid, region_semantic, region_valid)
        stats = {"cross_cpc_accuracy": cpc_accuracy.detach()}
        if self.training:
            stats.update(self.codebook.update(text_semantic, text_valid, region_semantic, region_valid))
        return losses, stats
