"""Task metrics: retrieval recall@K (streamed), classification and multi-label F1, entity-level P/R/F1.

Every function takes plain tensors or lists and returns a dict of floats, so evaluation can
write them to ``results.json`` as they are. F1 conventions follow scikit-learn with
``zero_division=0`` (a class with no predicted and no true positives scores 0); entity spans
follow conlleval (an ``I-X`` after anything but ``B-X``/``I-X`` opens a new entity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# ---------------------------------------------------------------- retrieval


class RunningTopK:
    """The ``k`` best (score, index) pairs per row, updated one column chunk at a time.

    Retrieval over 1,000 images x 5,000 captions never holds the whole score matrix: each
    block of scores is merged into a ``[rows, k]`` buffer and dropped.
    """

    def __init__(self, rows: int, k: int):
        self.k = k
        self.scores = torch.full((rows, k), float("-inf"))
        self.indices = torch.full((rows, k), -1, dtype=torch.long)

    def update(self, row_index: torch.Tensor, scores: torch.Tensor, column_index: torch.Tensor) -> None:
        """Merge ``scores[r, c]`` (rows ``row_index``, columns ``column_index``) into the buffer."""
        scores = scores.detach().float().cpu()
        row_index, column_index = row_index.cpu(), column_index.cpu()
        merged_scores = torch.cat([self.scores[row_index], scores], dim=1)
        merged_indices = torch.cat([self.indices[row_index], column_index.expand(len(row_index), -1)], dim=1)
        # Ties keep the earlier (lower) index first: stable sort on the concatenation does it.
        order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.scores[row_index] = merged_scores.gather(1, order)
        self.indices[row_index] = merged_indices.gather(1, order)


def retrieval_recall(
    score_block: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    caption_image: torch.Tensor,
    num_images: int,
    ks: Sequence[int] = (1, 5, 10),
    image_chunk: int = 100,
    caption_chunk: int = 500,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Recall@K both ways for a cross-encoder.

    ``score_block(image_ids [i], caption_ids [c]) -> [i, c]`` scores every pair of a block;
    ``caption_image[c]`` is the image caption ``c`` belongs to (several captions per image).
    Image-to-text: an image is a hit at K when any of its captions is among its K best;
    text-to-image: a caption is a hit when its image is among its K best. Memory is
    ``O((images + captions) * max(ks))`` plus one block.
    """
    caption_image = torch.as_tensor(caption_image, dtype=torch.long).cpu()
    num_captions = len(caption_image)
    k = min(max(ks), num_captions)
    image_best = RunningTopK(num_images, k)
    caption_best = RunningTopK(num_captions, min(max(ks), num_images))
    for i0 in range(0, num_images, image_chunk):
        image_ids = torch.arange(i0, min(i0 + image_chunk, num_images))
        for c0 in range(0, num_captions, caption_chunk):
            caption_ids = torch.arange(c0, min(c0 + caption_chunk, num_captions))
            block = score_block(image_ids, caption_ids)
            if block.shape != (len(image_ids), len(caption_ids)):
                raise ValueError(f"score_block returned {tuple(block.shape)}, expected {(len(image_ids), len(caption_ids))}")
            image_best.update(image_ids, block, caption_ids)
            caption_best.update(caption_ids, block.T, image_ids)
            if progress is not None:
                progress(len(image_ids) * len(caption_ids))
    return recall_from_topk(image_best.indices, caption_best.indices, caption_image, ks)


def recall_from_topk(
    image_topk: torch.Tensor, caption_topk: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int]
) -> dict[str, float]:
    """R@K from ranked candidate lists: ``image_topk[i]`` caption ids, ``caption_topk[c]`` image ids."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    valid = image_topk >= 0
    # image i ranks caption c correctly when caption c belongs to image i
    image_hit = (caption_image[image_topk.clamp(min=0)] == torch.arange(len(image_topk))[:, None]) & valid
    caption_hit = caption_topk == caption_image[:, None]
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * image_hit[:, :k].any(1).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * caption_hit[:, :k].any(1).float().mean().item()
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


# ---------------------------------------------------------------- classification


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom))


def classification_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Single-label: accuracy and macro F1 (mean over all ``num_classes`` classes)."""
    pred, target = torch.as_tensor(pred).long(), torch.as_tensor(target).long()
    onehot_pred = torch.nn.functional.one_hot(pred, num_classes).double()
    onehot_true = torch.nn.functional.one_hot(target, num_classes).double()
    tp = (onehot_pred * onehot_true).sum(0)
    fp = (onehot_pred * (1 - onehot_true)).sum(0)
    fn = ((1 - onehot_pred) * onehot_true).sum(0)
    return {
        "accuracy": 100.0 * (pred == target).double().mean().item(),
        "macro_f1": 100.0 * _f1(tp, fp, fn).mean().item(),
    }


def multilabel_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Multi-label ``[N, C]`` 0/1 predictions: micro, macro, weighted (by support) and samples F1."""
    pred, target = torch.as_tensor(pred).double(), torch.as_tensor(target).double()
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    tp, fp, fn = pred * target, pred * (1 - target), (1 - pred) * target
    per_class = _f1(tp.sum(0), fp.sum(0), fn.sum(0))
    support = target.sum(0)
    per_sample = _f1(tp.sum(1), fp.sum(1), fn.sum(1))
    return {
        "micro_f1": 100.0 * _f1(tp.sum(), fp.sum(), fn.sum()).item(),
        "macro_f1": 100.0 * per_class.mean().item(),
        "weighted_f1": 100.0 * ((per_class * support).sum() / support.sum().clamp(min=1)).item(),
        "samples_f1": 100.0 * per_sample.mean().item(),
        "exact_match": 100.0 * (pred == target).all(1).double().mean().item(),
    }


# ---------------------------------------------------------------- entities


def entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """``(start, end_exclusive, type)`` of every entity in a BIO sequence (conlleval rules)."""
    spans: set[tuple[int, int, str]] = set()
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and kind == label
        if start is not None and not continues:
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and not continues):
            start, kind = i, label
    return spans


def entity_metrics(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (an entity counts when its span and type both match)."""
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"{len(pred_tags)} predicted sequences but {len(gold_tags)} gold sequences")
    correct = predicted = gold = 0
    for i, (p, g) in enumerate(zip(pred_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(f"sequence {i}: {len(p)} predicted tags but {len(g)} gold tags")
        ps, gs = entity_spans(p), entity_spans(g)
        correct += len(ps & gs)
        predicted += len(ps)
        gold += len(gs)
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1}
