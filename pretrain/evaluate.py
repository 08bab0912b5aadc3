"""Validation of a pretraining run: masked-modelling and ITM metrics, zero-shot retrieval.

Masked modelling and ITM run on the first ``max_samples`` held-out samples, masked with a
fixed seed and paired with in-batch negatives (so the numbers of two evaluations compare).
Zero-shot retrieval takes the first N held-out samples: their images are the gallery and their
captions the queries; every (image, caption) pair is scored with the ITM head
(``model.itm_scores``) and ranked by ``pretrain.retrieval``. Accuracies and recalls are percent.

The forwards are shared out over the ranks and the sums reduced (``pretrain.distributed``), so
every rank returns the same metrics.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm import tqdm

from preprocess.feature_format import FeatureSpec
from pretrain.data import (
    check_spec_matches_model,
    collate_eval_batches,
    pad_samples,
    read_eval_samples,
    to_device,
)
from pretrain.data_config import DataConfig
from pretrain.distributed import all_reduce_sum, shard
from pretrain.evaluate_config import EvalConfig
from pretrain.masking_config import MaskingConfig
from pretrain.model import IGNORE_INDEX, ImageBertForPretraining, masked_rows
from pretrain.model_config import ObjectiveWeights
from pretrain.retrieval import recall_at_k

# Validation masks and negatives are drawn from this seed, never from the training seed.
EVAL_SEED = 1234


@torch.no_grad()
def masked_modelling_metrics(
    model: ImageBertForPretraining, batches: list[dict], device, objectives: ObjectiveWeights,
    show_progress: bool = False,
) -> dict[str, float]:
    """Accuracies (percent) and mean losses of MLM/MOC/MRFR/ITM over the validation batches."""
    weights = dataclasses.replace(objectives, mlm=1.0, moc=1.0, mrfr=1.0, itm=1.0)
    accuracies, losses = ("mlm", "moc", "itm"), ("mlm", "moc", "mrfr", "itm")
    names = [f"{n}_correct" for n in accuracies] + [f"{n}_seen" for n in accuracies]
    names += [f"{n}_loss_sum" for n in losses] + [f"{n}_loss_count" for n in losses] + ["positives"]
    sums = dict.fromkeys(names, 0.0)
    for index in tqdm(shard(len(batches)), desc="eval masked modelling", disable=not show_progress, leave=False):
        batch = batches[0 if index is None else index]
        out = model(to_device(batch, device), weights)
        if index is None:  # a padding forward: every rank runs as many (ZeRO-3)
            continue
        scored = masked_rows(batch)
        # What each loss is averaged over inside the model (masked positions of the rows it
        # scores), so that batch means combine into the mean over the whole validation set.
        masked_regions = int((batch["region_masked"] & batch["region_mask"].bool() & scored[:, None]).sum())
        count = {
            "mlm": int(((batch["mlm_labels"] != IGNORE_INDEX) & scored[:, None]).sum()),
            "moc": masked_regions, "mrfr": masked_regions, "itm": len(scored),
        }
        for name, (correct, seen) in out.counts.items():
            sums[f"{name}_correct"] += float(correct)
            sums[f"{name}_seen"] += seen
        for name, loss in out.losses.items():
            sums[f"{name}_loss_sum"] += float(loss) * count[name]
            sums[f"{name}_loss_count"] += count[name]
        sums["positives"] += int(batch["itm_labels"].sum())
    total = all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64, device=device)).tolist()
    sums = dict(zip(names, total))
    metrics = {f"{n}_acc": 100.0 * sums[f"{n}_correct"] / max(sums[f"{n}_seen"], 1) for n in accuracies}
    metrics |= {f"{n}_loss": sums[f"{n}_loss_sum"] / max(sums[f"{n}_loss_count"], 1) for n in losses}
    share = sums["positives"] / max(sums["itm_seen"], 1)
    metrics["itm_chance"] = 100.0 * max(share, 1.0 - share)  # always answering the majority label
    metrics["num_eval_samples"] = sums["itm_seen"]
    return metrics


@torch.no_grad()
def zero_shot_retrieval(
    model: ImageBertForPretraining, samples: list[dict], pad_token_id: int, device, batch_size: int,
    show_progress: bool = False,
) -> dict[str, float]:
    """Recall@K of ranking ``samples``' images and captions with the ITM score (``pretrain.retrieval``)."""
    n = len(samples)
    padded = to_device(pad_samples(samples, list(range(n)), pad_token_id), device)

    def score_batch(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        images, captions = images.to(device), captions.to(device)
        return model.itm_scores(
            padded["input_ids"][captions], padded["attention_mask"][captions], padded["region_features"][images],
            padded["region_geometry"][images], padded["region_mask"][images],
        )

    with tqdm(total=n * n + n, desc="eval retrieval", disable=not show_progress, leave=False) as bar:
        return recall_at_k(score_batch, torch.arange(n), n, batch_size, device=device, progress=bar.update)


def evaluate(
    model: ImageBertForPretraining, shards: str, tokenizer, spec: FeatureSpec, data: DataConfig,
    masking: MaskingConfig, eval_cfg: EvalConfig, device, objectives: ObjectiveWeights | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """All validation metrics of ``model`` on held-out ``shards``; call it on every rank.

    Returns mlm_acc, moc_acc, itm_acc (percent), the four ``*_loss`` values (mrfr_loss among
    them), itm_chance, and ``pretrain.retrieval.recall_at_k``'s fields: i2t_r1/5/10,
    t2i_r1/5/10, rsum, their ``*_chance`` levels, num_images and num_captions.
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
        metrics = masked_modelling_metrics(model, batches, device, objectives or ObjectiveWeights(), show_progress)
        metrics |= zero_shot_retrieval(
            model, samples[: eval_cfg.retrieval_candidates], tokenizer.pad_token_id, device, eval_cfg.batch_size,
            show_progress,
        )
    finally:
        model.train(was_training)
    return metrics
