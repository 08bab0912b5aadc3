"""Task metrics: classification and multi-label F1, entity-level P/R/F1 (retrieval: ``pretrain.retrieval``).

Every function takes plain tensors or lists and returns a dict of floats, so evaluation can
write them to ``results.json`` as they are. F1 conventions follow scikit-learn with
``zero_division=0`` (a class with no predicted and no true positives scores 0); entity spans
follow conlleval (an ``I-X`` after anything but ``B-X``/``I-X`` opens a new entity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
