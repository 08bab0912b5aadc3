"""Task evaluation: metrics of a fine-tuned model on task samples, and ``results.json``.

Metrics per task, in percent: retrieval R@1/5/10 both ways (every caption ranked for every image
and the reverse, ``pretrain.retrieval``); classification and sentiment accuracy and macro F1;
multi-label micro/macro/weighted/samples F1; NER entity-level precision, recall and F1. Within a
training run every rank evaluates a share of the batches and the predictions are summed over the
ranks. The command line is ``finetune.evaluate``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from finetune.config import FinetuneConfig
from finetune.data import TaskCollate
from finetune.metrics import classification_metrics, entity_metrics, multilabel_metrics
from preprocess import atomic
from pretrain.data import to_device
from pretrain.distributed import all_reduce_sum, shard
from pretrain.retrieval import group_by_image, recall_at_k

log = logging.getLogger("finetune.evaluation")

# The headline metric of each task: what tables and the quickstart print first.
HEADLINE = {"retrieval": "rsum", "classification": "accuracy", "sentiment": "accuracy", "multilabel": "samples_f1", "ner": "f1"}


@torch.no_grad()
def evaluate_samples(
    model, samples: list[dict], cfg: FinetuneConfig, pad_token_id: int, device: torch.device, progress: bool = False,
) -> dict[str, float]:
    """The task's metrics of ``model`` (a ``FinetuneModel``) on decoded ``samples``; call it on every rank."""
    task = cfg.task
    was_training = model.training
    model.eval()
    collate = TaskCollate(pad_token_id, task)
    try:
        if task.name == "retrieval":
            return _evaluate_retrieval(model, samples, cfg, collate, device, progress)
        predictions = _predict(model, samples, cfg, collate, device, progress)
        if task.name == "ner":
            names = task.label_names
            # Row i holds sample i's tags + 1, padded with 0.
            pred_tags = [[names[t - 1] for t in row[: len(s["tags"])]] for row, s in zip(predictions.tolist(), samples)]
            gold_tags = [[names[t] for t in s["tags"]] for s in samples]
            words = sum(len(seq) for seq in gold_tags)
            correct = sum(p == g for ps, gs in zip(pred_tags, gold_tags) for p, g in zip(ps, gs))
            return {**entity_metrics(pred_tags, gold_tags), "word_accuracy": 100.0 * correct / max(words, 1)}
        if task.name == "multilabel":
            return multilabel_metrics(predictions, torch.from_numpy(np.stack([s["target"] for s in samples])))
        return classification_metrics(predictions[:, 0], torch.tensor([s["label"] for s in samples]), task.num_labels)
    finally:
        model.train(was_training)


def _predict(model, samples: list[dict], cfg: FinetuneConfig, collate: TaskCollate, device, progress: bool) -> torch.Tensor:
    """``model.predict`` of every sample as rows of a ``[N, W]`` tensor (NER: tag ids + 1, 0-padded),
    the batches shared out over the ranks and the rows summed."""
    kind = cfg.task.name
    if kind == "ner":
        width = max(len(s["tags"]) for s in samples)
    else:
        width = cfg.task.num_labels if kind == "multilabel" else 1
    rows = torch.zeros(len(samples), width, dtype=torch.long, device=device)
    starts = range(0, len(samples), cfg.eval.batch_size)
    for index in tqdm(shard(len(starts)), desc="evaluate", disable=not progress, dynamic_ncols=True):
        start = starts[0 if index is None else index]
        chunk = samples[start : start + cfg.eval.batch_size]
        pred = model.predict(to_device(collate(chunk), device))
        if index is None:  # a padding forward (ZeRO-3 needs as many on every rank) is discarded
            continue
        if kind == "ner":
            for i, tags in enumerate(pred):
                rows[start + i, : len(tags)] = torch.tensor(tags, device=device) + 1
        else:
            rows[start : start + len(chunk)] = pred.view(len(chunk), -1)
    return all_reduce_sum(rows).cpu()


def _evaluate_retrieval(model, samples, cfg, collate, device, progress) -> dict[str, float]:
    """Every caption against every image: images are the distinct ``image_id``s, captions every
    caption the samples carry (``caption_input_ids``)."""
    rows = [row for row, s in enumerate(samples) for _ in s["caption_input_ids"]]
    captions = [ids for s in samples for ids in s["caption_input_ids"]]
    first, caption_image = group_by_image([samples[row]["image_id"] for row in rows])
    image_samples = [samples[rows[position]] for position in first]

    def score_batch(images: torch.Tensor, captions_: torch.Tensor) -> torch.Tensor:
        pairs = [{**image_samples[i], "input_ids": captions[c]} for i, c in zip(images.tolist(), captions_.tolist())]
        return model.predict(to_device(collate(pairs), device))

    total = len(image_samples) * len(captions) + len(captions)
    with tqdm(total=total, desc="retrieval pairs", disable=not progress, dynamic_ncols=True, unit="pair") as bar:
        return recall_at_k(
            score_batch, caption_image, len(image_samples), cfg.eval.batch_size,
            image_block=cfg.eval.retrieval_image_chunk, caption_block=cfg.eval.retrieval_caption_chunk,
            device=device, progress=bar.update,
        )


def results_record(cfg: FinetuneConfig, metrics: dict, data: str, num_samples: int, baselines: dict | None, **extra) -> dict:
    record = {
        "task": cfg.task.name,
        "fusion": cfg.fusion.name,
        "modalities": cfg.data.modalities,
        "data": data,
        "num_samples": num_samples,
        "headline": HEADLINE[cfg.task.name],
        "metrics": metrics,
        **extra,
    }
    if baselines is not None:
        record["baselines"] = baselines
    return record


def write_results(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, record)


def format_results(record: dict) -> str:
    """The metrics as a table, with the data's chance level and unimodal ceilings where known."""
    lines = [f"{record['task']} with fusion {record['fusion']} on {record['data']} ({record['num_samples']} samples)"]
    lines += [f"  {name:<16}{value:>9.2f}" for name, value in record["metrics"].items() if not name.startswith("num_")]
    stats = record.get("baselines")
    if stats:
        lines.append(f"  baselines of this data ({stats.get('metric', '?')}):")
        for key in ("chance", "text_only_ceiling", "image_only_ceiling"):
            if key in stats:
                lines.append(f"  {key:<20}{stats[key]:>9.2f}")
    return "\n".join(lines)
