"""Validation of a pretraining run: masked-modelling and ITM metrics, zero-shot retrieval.

Masked modelling and ITM run on the first ``max_samples`` held-out samples, masked with a
fixed seed and paired with in-batch negatives (so the numbers of two evaluations compare).
Zero-shot retrieval takes the first N held-out samples: their images are the gallery and their
captions the queries; every one of the N x N (caption, image) pairs is scored with the ITM head
(``model.itm_scores``), and R@K is the share of images (captions) whose own caption (image)
ranks in the top K. Ties count as a random order among the tied candidates (expected hit rate),
so a model that scores everything alike gets exactly chance, K/N.

Every rank runs the same forwards in the same order: under ZeRO-3 each forward gathers
parameters from all ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm import tqdm

from preprocess.feature_format import FeatureSpec
from pretrain.data import (
    DataConfig,
    check_spec_matches_model,
    collate_eval_batches,
    pad_samples,
    read_eval_samples,
    to_device,
)
from pretrain.masking import MaskingConfig
from pretrain.model import IGNORE_INDEX, ImageBertForPretraining, ObjectiveWeights

RECALL_AT = (1, 5, 10)
# Validation masks and negatives are drawn from this seed, never from the training seed.
EVAL_SEED = 1234


@dataclass
class EvalConfig:
    """The ``eval:`` section of the pretraining config."""

    every_steps: int = 500
    max_samples: int = 512  # masked-modelling/ITM validation samples
    retrieval_candidates: int = 100  # N images x N captions ranked for zero-shot retrieval
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"eval.every_steps must be >= 1, got {self.every_steps}")
        if self.max_samples < 2:
            raise ValueError(f"eval.max_samples must be >= 2, got {self.max_samples}")
        if self.retrieval_candidates < 2:
            raise ValueError(f"eval.retrieval_candidates must be >= 2, got {self.retrieval_candidates}")
        if self.batch_size < 2:
            raise ValueError(f"eval.batch_size must be >= 2, got {self.batch_size}")


def recall_at_k(scores: torch.Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[int, float]:
    """R@K of a square score matrix whose true partner of row i is column i.

    Row i ranks all columns; with g columns scoring above the true one and e others tied with
    it, a random order of the ties puts the true column in the top K with probability
    clamp((K - g) / (e + 1), 0, 1). R@K is the mean of that over rows.
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"retrieval scores must be a square matrix, got shape {tuple(scores.shape)}")
    true = scores.diagonal().unsqueeze(1)
    above = (scores > true).sum(dim=1).double()
    tied = (scores == true).sum(dim=1).double() - 1  # minus the true column itself
    return {k: ((k - above) / (tied + 1)).clamp(0, 1).mean().item() for k in ks}


@torch.no_grad()
def masked_modelling_metrics(
    model: ImageBertForPretraining, batches: list[dict], device, dtype, objectives: ObjectiveWeights,
    show_progress: bool = False,
) -> dict[str, float]:
    """Accuracies and mean losses of MLM/MOC/MRFR/ITM over the validation batches."""
    weights = dataclasses.replace(objectives, mlm=1.0, moc=1.0, mrfr=1.0, itm=1.0)
    correct = {"mlm": 0, "moc": 0, "itm": 0}
    seen = {"mlm": 0, "moc": 0, "itm": 0}
    loss_sums = {"mlm": 0.0, "moc": 0.0, "mrfr": 0.0, "itm": 0.0}
    loss_counts = {"mlm": 0, "moc": 0, "mrfr": 0, "itm": 0}
    positives = 0
    for batch in tqdm(batches, desc="eval masked modelling", disable=not show_progress, leave=False):
        matched = batch["itm_labels"].bool()
        # What each loss is averaged over inside the model (masked positions of matched pairs),
        # so that batch means combine into the mean over the whole validation set.
        masked_regions = int((batch["region_masked"] & batch["region_mask"].bool() & matched[:, None]).sum())
        count = {
            "mlm": int(((batch["mlm_labels"] != IGNORE_INDEX) & matched[:, None]).sum()),
            "moc": masked_regions,
            "mrfr": masked_regions,
            "itm": len(matched),
        }
        out = model(to_device(batch, device, dtype), weights)
        for name, (hits, total) in out.counts.items():
            correct[name] += int(hits)
            seen[name] += int(total)
        for name, loss in out.losses.items():
            loss_sums[name] += float(loss) * count[name]
            loss_counts[name] += count[name]
        positives += int(matched.sum())
    metrics = {f"{name}_acc": correct[name] / max(seen[name], 1) for name in correct}
    metrics |= {f"{name}_loss": loss_sums[name] / max(loss_counts[name], 1) for name in loss_sums}
    share = positives / max(seen["itm"], 1)
    metrics["itm_chance"] = max(share, 1.0 - share)  # accuracy of always answering the majority label
    metrics["num_eval_samples"] = seen["itm"]
    return metrics


@torch.no_grad()
def retrieval_scores(
    model: ImageBertForPretraining, samples: list[dict], pad_token_id: int, device, dtype, batch_size: int,
    show_progress: bool = False,
) -> torch.Tensor:
    """``scores[i, j]`` = ITM score of image i with caption j, for all pairs of ``samples``."""
    n = len(samples)
    padded = pad_samples(samples, list(range(n)), pad_token_id)
    padded = to_device({k: v for k, v in padded.items() if isinstance(v, torch.Tensor)}, device, dtype)
    scores = torch.empty(n * n, dtype=torch.float32)
    for start in tqdm(range(0, n * n, batch_size), desc="eval retrieval", disable=not show_progress, leave=False):
        pairs = torch.arange(start, min(start + batch_size, n * n), device=device)
        image, caption = pairs // n, pairs % n
        scores[start : start + len(pairs)] = model.itm_scores(
            padded["input_ids"][caption],
            padded["attention_mask"][caption],
            padded["region_target_features"][image],
            padded["region_geometry"][image],
            padded["region_mask"][image],
        ).float().cpu()
    return scores.view(n, n)


def retrieval_metrics(scores: torch.Tensor) -> dict[str, float]:
    n = scores.shape[0]
    metrics: dict[str, float] = {"num_candidates": n}
    for k, value in recall_at_k(scores).items():
        metrics[f"i2t_r{k}"] = value
    for k, value in recall_at_k(scores.T).items():
        metrics[f"t2i_r{k}"] = value
    for k in RECALL_AT:
        metrics[f"r{k}_chance"] = min(k, n) / n
    return metrics


def evaluate(
    model: ImageBertForPretraining, shards: str, tokenizer, spec: FeatureSpec, data: DataConfig,
    masking: MaskingConfig, eval_cfg: EvalConfig, device, dtype, objectives: ObjectiveWeights | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """All validation metrics of ``model`` on held-out ``shards``; the same work on every rank.

    Returns mlm_acc, moc_acc, itm_acc, the four ``*_loss`` values (mrfr_loss among them),
    i2t_r1/5/10, t2i_r1/5/10, num_candidates, and the chance levels itm_chance and r1/5/10_chance.
    """
    check_spec_matches_model(spec, model.config, shards)
    eval_data = dataclasses.replace(data, batch_size=eval_cfg.batch_size)
    samples = read_eval_samples(
        shards, tokenizer, spec, eval_data, max(eval_cfg.max_samples, eval_cfg.retrieval_candidates)
    )
    was_training = model.training
    model.eval()
    try:
        batches = collate_eval_batches(samples[: eval_cfg.max_samples], tokenizer, eval_data, masking, EVAL_SEED)
        metrics = masked_modelling_metrics(
            model, batches, device, dtype, objectives or ObjectiveWeights(), show_progress
        )
        scores = retrieval_scores(
            model, samples[: eval_cfg.retrieval_candidates], tokenizer.pad_token_id, device, dtype,
            eval_cfg.batch_size, show_progress,
        )
        metrics |= retrieval_metrics(scores)
    finally:
        model.train(was_training)
    return metrics
