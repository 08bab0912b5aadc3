"""Task evaluation, and ``python -m finetune.evaluate --checkpoint DIR --data SPEC [--out results.json]``.

``--checkpoint`` is a fine-tuning run directory (its latest checkpoint) or one checkpoint tag
directory inside ``RUN_DIR/checkpoints``. The run directory holds what rebuilds the model
without the release: the resolved config, the BERT config with the region fields, the
tokenizer and the feature spec. The data's ``feature_spec.json`` must match the run's.

Metrics per task: retrieval R@1/5/10 both ways (every caption ranked for every image and
the reverse, scored in blocks, see ``finetune.metrics.retrieval_recall``); classification and
sentiment accuracy and macro F1; multi-label micro/macro/weighted/samples F1; NER entity-level
precision, recall and F1. ``--baselines task.json`` (written by ``finetune.synth_tasks``) adds
the data's chance level and unimodal ceilings to the results and the printed table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from finetune.config import FinetuneConfig
from finetune.data import TaskCollate, batches_of, read_samples, to_device
from finetune.metrics import classification_metrics, entity_metrics, multilabel_metrics, retrieval_recall

log = logging.getLogger("finetune.evaluate")

RESULTS_FILE = "results.json"
# The headline metric of each task: what tables and the quickstart print first.
HEADLINE = {"retrieval": "rsum", "classification": "accuracy", "sentiment": "accuracy", "multilabel": "samples_f1", "ner": "f1"}


@torch.no_grad()
def evaluate_samples(
    model, samples: list[dict], cfg: FinetuneConfig, pad_token_id: int, device: torch.device,
    dtype: torch.dtype = torch.float32, progress: bool = False,
) -> dict[str, float]:
    """The task's metrics of ``model`` (a ``FinetuneModel``) on decoded ``samples``."""
    task = cfg.task
    was_training = model.training
    model.eval()
    collate = TaskCollate(pad_token_id, task)
    try:
        if task.name == "retrieval":
            return _evaluate_retrieval(model, samples, cfg, collate, device, dtype, progress)
        predictions, targets = [], []
        batches = batches_of(samples, cfg.eval.batch_size, collate)
        total = -(-len(samples) // cfg.eval.batch_size)
        for batch in tqdm(batches, total=total, desc="evaluate", disable=not progress, dynamic_ncols=True):
            pred = model.predict(to_device(batch, device, dtype))
            if task.name == "ner":
                predictions += pred
                targets += [row[mask].tolist() for row, mask in zip(batch["tags"], batch["word_mask"])]
            else:
                predictions.append(pred.cpu())
                targets.append(batch["labels"])
        if task.name == "ner":
            names = task.label_names
            pred_tags = [[names[t] for t in seq] for seq in predictions]
            gold_tags = [[names[t] for t in seq] for seq in targets]
            words = sum(len(seq) for seq in gold_tags)
            correct = sum(p == g for ps, gs in zip(pred_tags, gold_tags) for p, g in zip(ps, gs))
            return {**entity_metrics(pred_tags, gold_tags), "word_accuracy": 100.0 * correct / max(words, 1)}
        pred, target = torch.cat(predictions), torch.cat(targets)
        if task.name == "multilabel":
            return multilabel_metrics(pred, target.round())
        return classification_metrics(pred, target, task.num_labels)
    finally:
        model.train(was_training)


def _evaluate_retrieval(model, samples, cfg, collate, device, dtype, progress) -> dict[str, float]:
    """Every caption against every image: images are the distinct ``image_id``s, captions every sample."""
    image_rows: dict[int, int] = {}
    for row, sample in enumerate(samples):
        image_rows.setdefault(sample["image_id"], row)
    image_ids = list(image_rows)
    image_index = {image_id: i for i, image_id in enumerate(image_ids)}
    caption_image = torch.tensor([image_index[s["image_id"]] for s in samples])
    image_samples = [samples[image_rows[i]] for i in image_ids]

    def score_block(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        pairs = [(i, c) for i in images.tolist() for c in captions.tolist()]
        scores = []
        for start in range(0, len(pairs), cfg.eval.batch_size):
            chunk = [
                {**image_samples[i], "input_ids": samples[c]["input_ids"], "caption_id": samples[c]["caption_id"]}
                for i, c in pairs[start : start + cfg.eval.batch_size]
            ]
            scores.append(model.predict(to_device(collate(chunk), device, dtype)).cpu())
        return torch.cat(scores).view(len(images), len(captions))

    total = len(image_ids) * len(samples)
    with tqdm(total=total, desc="retrieval pairs", disable=not progress, dynamic_ncols=True, unit="pair") as bar:
        metrics = retrieval_recall(
            score_block, caption_image, len(image_ids), image_chunk=cfg.eval.retrieval_image_chunk,
            caption_chunk=cfg.eval.retrieval_caption_chunk, progress=bar.update,
        )
    return {**metrics, "num_images": float(len(image_ids)), "num_captions": float(len(samples))}


# ---------------------------------------------------------------- loading a fine-tuned checkpoint


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """``(run_dir, tag)`` for a run directory (its latest checkpoint) or a tag directory inside it."""
    from pretrain import checkpoint

    path = Path(path)
    if (path / "config.yaml").is_file():
        state = checkpoint.latest_state(path / "checkpoints")
        if state is None:
            raise FileNotFoundError(f"{path}: no checkpoint yet ({path / 'checkpoints' / checkpoint.LATEST_FILE} is missing)")
        return path, state.tag
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path.name
    raise FileNotFoundError(f"{path} is neither a fine-tuning run directory (config.yaml) nor a checkpoint inside one")


def load_finetuned(path: str | Path):
    """Rebuild a fine-tuned model from its run directory; returns (model, cfg, tokenizer, spec, run_dir, tag)."""
    from transformers import AutoTokenizer, BertConfig

    from finetune.tasks import build_finetune_model
    from preprocess.config import load_config
    from preprocess.feature_format import FeatureSpec
    from pretrain import checkpoint
    from pretrain.model import ImageBertForPretraining

    run_dir, tag = resolve_checkpoint(path)
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    model_dir = run_dir / "model"
    bert_config = BertConfig.from_pretrained(model_dir)
    bert_config._attn_implementation = "sdpa"
    model = build_finetune_model(ImageBertForPretraining(bert_config), cfg.task, cfg.fusion)
    weights = checkpoint.consolidated_weights(run_dir / "checkpoints", tag)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{run_dir / 'checkpoints' / tag}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), cfg, tokenizer, FeatureSpec.load(run_dir), run_dir, tag


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="fine-tuning run directory, or RUN_DIR/checkpoints/<tag>")
    parser.add_argument("--data", required=True, help="task feature shards, brace pattern or '::' list")
    parser.add_argument("--out", help=f"results file (default: RUN_DIR/{RESULTS_FILE})")
    parser.add_argument("--baselines", help="task.json of the data (chance and unimodal ceilings) to report beside")
    parser.add_argument("--batch-size", type=int, help="override eval.batch_size")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate the first N samples only (0: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from preprocess.config import ConfigError
    from pretrain.data import feature_spec_of

    try:
        run_dir, tag = resolve_checkpoint(args.checkpoint)
        data_spec = feature_spec_of(args.data)
        from preprocess.feature_format import FeatureSpec

        FeatureSpec.load(run_dir).check_compatible(data_spec, f"fine-tuning run {run_dir}", f"data {args.data}")
        baselines = json.loads(Path(args.baselines).read_text(encoding="utf-8"))["statistics"] if args.baselines else None
        model, cfg, tokenizer, spec, run_dir, tag = load_finetuned(args.checkpoint)
    except (FileNotFoundError, ValueError, ConfigError, KeyError) as err:
        print(f"finetune.evaluate: error: {err}", file=sys.stderr)
        return 2
    if args.batch_size:
        cfg.eval.batch_size = args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    start = time.perf_counter()
    samples = read_samples(args.data, tokenizer, spec, cfg.data, cfg.task, args.max_samples)
    metrics = evaluate_samples(model, samples, cfg, tokenizer.pad_token_id, device, progress=True)
    record = results_record(
        cfg, metrics, args.data, len(samples), baselines, checkpoint=str(run_dir / "checkpoints" / tag),
        seconds=round(time.perf_counter() - start, 2),
    )
    out = Path(args.out) if args.out else run_dir / RESULTS_FILE
    write_results(out, record)
    print(format_results(record))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
