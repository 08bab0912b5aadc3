"""Retrieval recall@K: the one implementation, for pretraining's zero-shot evaluation and fine-tuning.

A gallery of images and their captions, several captions per image allowed
(``caption_image[c]`` is the image caption ``c`` describes). Image->text: every image ranks all
captions and is a hit at K when one of its own captions is among the K best. Text->image: every
caption ranks all images and is a hit when its image is among the K best. Figures are percent.

Ties are a random order among the tied candidates, and a hit counts its probability: with ``a``
other candidates scored above a query's best positive, ``t`` others tied with it and ``p``
positives at that score, hit@K is 0 when a >= K, 1 when r = K - a > t, and otherwise
1 - C(t, r) / C(t + p, r). A model that scores every pair alike therefore gets chance exactly.

A cross-encoder scores pair by pair, and the whole score matrix is never held: the positive
pairs are scored first, then the gallery in blocks of images x captions, each block only adding,
per query, how many other candidates score above and equal to its best positive. Each block's
forwards are shared out over the ranks (``pretrain.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from pretrain.distributed import all_reduce_sum, shard

RECALL_AT = (1, 5, 10)

# score_batch(image_index [P], caption_index [P]) -> scores [P] of those pairs, in one forward.
ScoreBatch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def group_by_image(caption_images: Sequence[Hashable]) -> tuple[list[int], torch.Tensor]:
    """Captions labelled with their image -> ``(first, caption_image)``: ``first[i]`` is the position
    of image ``i``'s first caption (images numbered in order of first appearance) and
    ``caption_image[c]`` the number of caption ``c``'s image, as ``recall_at_k`` takes it."""
    number: dict[Hashable, int] = {}
    first: list[int] = []
    for position, image in enumerate(caption_images):
        if image not in number:
            number[image] = len(first)
            first.append(position)
    return first, torch.tensor([number[image] for image in caption_images], dtype=torch.long)


def score_pairs(
    score_batch: ScoreBatch, images: torch.Tensor, captions: torch.Tensor, batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Scores ``[P]`` of the pairs ``(images[p], captions[p])``, forwards shared out over the ranks."""
    starts = range(0, len(images), batch_size)
    scores = torch.zeros(len(images), dtype=torch.float32, device=device)
    for index in shard(len(starts)):
        start = starts[0 if index is None else index]
        end = min(start + batch_size, len(images))
        batch_scores = score_batch(images[start:end], captions[start:end])
        if index is not None:  # a padding forward (ZeRO-3 needs as many on every rank) is discarded
            scores[start:end] = batch_scores.float()
    return all_reduce_sum(scores).cpu()


def hit_probability(above: torch.Tensor, tied: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """Probability that one of ``positives`` best-scored candidates is in the top ``k`` (module docstring)."""
    above, tied, positives = above.double(), tied.double(), positives.double()
    room = k - above
    miss = torch.ones_like(room)
    for j in range(1, int(positives.max().item()) + 1):
        miss = miss * torch.where(j <= positives, (tied - room + j) / (tied + j), 1.0)
    hit = torch.where(room > tied, 1.0, 1.0 - miss)
    return torch.where(room <= 0, 0.0, hit)


def recall_at_k(
    score_batch: ScoreBatch,
    caption_image: torch.Tensor | Sequence[int],
    num_images: int,
    batch_size: int,
    ks: Sequence[int] = RECALL_AT,
    image_block: int = 100,
    caption_block: int = 500,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """``i2t_r{k}``, ``t2i_r{k}`` (percent), ``rsum``, their chance levels ``i2t_r{k}_chance``,
    ``t2i_r{k}_chance``, and ``num_images``, ``num_captions``."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long).cpu()
    num_captions = len(caption_image)
    captions_per_image = torch.bincount(caption_image, minlength=num_images)
    if num_captions == 0 or len(captions_per_image) != num_images or (captions_per_image == 0).any():
        raise ValueError(f"every one of the {num_images} images needs at least one caption; got {num_captions} captions")

    positive = score_pairs(score_batch, caption_image, torch.arange(num_captions), batch_size, device)  # [C]
    if progress is not None:
        progress(num_captions)
    best = torch.full((num_images,), float("-inf")).scatter_reduce(0, caption_image, positive, "amax")
    best_count = torch.bincount(caption_image, weights=(positive == best[caption_image]).double(), minlength=num_images)
    image_above, image_tied = torch.zeros(num_images), torch.zeros(num_images)
    caption_above, caption_tied = torch.zeros(num_captions), torch.zeros(num_captions)
    for i0 in range(0, num_images, image_block):
        images = torch.arange(i0, min(i0 + image_block, num_images))
        for c0 in range(0, num_captions, caption_block):
            captions = torch.arange(c0, min(c0 + caption_block, num_captions))
            pair_images, pair_captions = images.repeat_interleave(len(captions)), captions.repeat(len(images))
            block = score_pairs(score_batch, pair_images, pair_captions, batch_size, device).view(len(images), len(captions))
            other = caption_image[captions][None, :] != images[:, None]  # the pairs that are not positives
            image_above[images] += ((block > best[images, None]) & other).sum(1)
            image_tied[images] += ((block == best[images, None]) & other).sum(1)
            caption_above[captions] += ((block > positive[None, captions]) & other).sum(0)
            caption_tied[captions] += ((block == positive[None, captions]) & other).sum(0)
            if progress is not None:
                progress(len(pair_images))

    out: dict[str, float] = {}
    one = torch.ones(num_captions)
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * hit_probability(image_above, image_tied, best_count, k).mean().item()
        out[f"t2i_r{k}"] = 100.0 * hit_probability(caption_above, caption_tied, one, k).mean().item()
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    for k in ks:
        # Chance: every candidate tied with the positives.
        out[f"i2t_r{k}_chance"] = 100.0 * hit_probability(
            torch.zeros(num_images), num_captions - captions_per_image, captions_per_image, k
        ).mean().item()
        out[f"t2i_r{k}_chance"] = 100.0 * min(k, num_images) / num_images
    out["num_images"], out["num_captions"] = float(num_images), float(num_captions)
    return out
