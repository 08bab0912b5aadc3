"""Accuracy of each fusion strategy against the unimodal and late-fusion baselines on the synthetic tasks.

Every run goes through the real trainer: one ``python -m finetune --config
configs/finetune/TASK.yaml --init RELEASE --run-dir RUN key=value ...`` subprocess per (task,
variant), from the same release and seed, and the test metrics are read from the run's
``results.json`` (``finetune.evaluate.RESULTS_FILE``, written by the trainer's final
validation on the test shard). The variants:

- ``text only``: single stream with the image blanked (``data.modalities=text``),
- ``image only``: single stream with every caption word piece masked (``data.modalities=image``),
- ``late``, ``single_stream``, ``mbt``, ``muse``, ``mi2p``: the fusion strategies, each with the
  config's (the papers') settings; ``--set fusion.KEY=VALUE`` changes them for a sweep.

The release: ``--init DIR`` with ``--features`` (any release and its pretraining features, e.g. the
quickstart's ``quickstart-out/release`` and ``quickstart-out/features``), or
by default a small one the bench pretrains itself in about 12 minutes on one CPU core, under
``WORK/pretrain``: ``python -m preprocess synth`` (1,200 scenes) and ``preprocess extract``
(``configs/preprocess/quickstart.yaml``), ``python -m pretrain --config
configs/pretrain/bench-small.yaml`` (a random ImageBERT, hidden 128, 3 layers, 3,000 steps of
MLM/MOC/MRFR/ITM) and ``python -m pretrain.export`` to ``WORK/release``.

The data: per task, ``finetune.synth_tasks`` train and test shards and ``preprocess extract``
through the pretraining extraction's network (``detector.calibration_from``, as ``make
quickstart`` does), so the features match what the release learned on.

Results: a markdown table (each task's headline test metric beside the data's chance level and
unimodal ceilings from ``task.json``) and every metric in ``WORK/results.json``. A (task,
variant) result is reused only when its key matches: the settings, the release, and the code's
version (``project_runs.code_version``: a hash of every tracked ``.py``/``.yaml`` file,
``pyproject.toml`` and ``constraints.txt`` as they are), so a rerun after a code change measures
again. Each key has its own run directory, so a killed bench resumes each run from its last
checkpoint.

    .venv/bin/python bench/fusion_accuracy.py --work /tmp/fusion-acc --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.evaluation import HEADLINE  # noqa: E402
from finetune.synth_tasks import TASK_FILE, TASKS  # noqa: E402
from preprocess import atomic  # noqa: E402
from project_runs import (  # noqa: E402  (bench/, this script's directory)
    code_version, finetune_run, prepare_task, pretrained, pretraining_features,
)

VARIANTS = {
    "text only": ("single_stream", "text"),
    "image only": ("single_stream", "image"),
    "late": ("late", "both"),
    "single_stream": ("single_stream", "both"),
    "mbt": ("mbt", "both"),
    "muse": ("muse", "both"),
    "mi2p": ("mi2p", "both"),
}
def pretrained_release(work: Path) -> Path:
    """The bench's own small release (see the module docstring); every step skips what is done."""
    root = work / "pretrain"
    features = pretraining_features(root, log=root / "log.txt")
    return pretrained(features, root / "run", work / "release", [], log=root / "log.txt")


# What the measured code is: a change that only touches docs does not invalidate the results.
CODE_PATHS = ("*.py", "*.yaml", "pyproject.toml", "constraints.txt")


def overrides(task: str, variant: str, root: Path, args) -> list[str]:
    """The ``key=value`` overrides of one run: data, variant, and the bench's training length."""
    fusion, modalities = VARIANTS[variant]
    return [
        f"shards_root={root}", "data.train=train/00000.tar", "data.val=test/00000.tar",
        f"fusion.name={fusion}", f"data.modalities={modalities}", f"data.batch_size={args.batch}",
        f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}",
        # validate (on the test shard) and checkpoint once, at the end: the table reads only the final metrics
        f"eval.every_steps={args.steps}", f"checkpoint.every_steps={args.steps}",
        "logging.progress_bar=false", f"seed={args.seed}", *args.set,
    ]


def run_settings(task: str, variant: str, root: Path, release: Path, args, code: str) -> tuple[dict, str]:
    """What a result depends on, and its key: a result is reused only for the same key."""
    settings = {"overrides": overrides(task, variant, root, args), "release": str(release), "code": code}
    return settings, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_variant(task: str, variant: str, release: Path, settings: dict, key: str, work: Path) -> dict:
    """One ``python -m finetune`` run in a run directory of its own key; its final test metrics."""
    run_dir = work / "runs" / f"{task}-{variant.replace(' ', '_')}-{key}"
    record, seconds = finetune_run(run_dir, "--config", str(REPO / "configs" / "finetune" / f"{task}.yaml"),
                                   "--init", str(release), *settings["overrides"])
    return {"key": key, "run_dir": str(run_dir), "seconds": seconds, **settings,
            "metrics": record["metrics"], "num_samples": record["num_samples"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="data, release, runs and results (reused across runs)")
    parser.add_argument("--init", type=Path, help="release directory (default: pretrain the bench's small one, see above)")
    parser.add_argument("--features", type=Path, help="the release's pretraining features, whose batch-norm calibration "
                        "the task extraction loads (default: WORK/pretrain/features; the quickstart's: quickstart-out/features)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--test-samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run, e.g. fusion.mbt_bottlenecks=16 (part of the result key)")
    parser.add_argument("--label", default="", help="suffix of the table's row names, for a sweep's --set")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each one CPU thread)")
    args = parser.parse_args()
    if args.init and not args.features:  # the task features must come through the release's own extraction network
        parser.error("--init needs --features: the release's pretraining features (e.g. quickstart-out/features)")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    release = args.init.resolve() if args.init else pretrained_release(args.work)
    calibration = args.features or args.work / "pretrain" / "features"
    roots = {task: prepare_task(task, args.work, args.train_samples, args.test_samples, calibration) for task in args.tasks}
    code = code_version(CODE_PATHS)
    pending = []
    for task in args.tasks:
        for variant in args.variants:
            settings, key = run_settings(task, variant, roots[task], release, args, code)
            name = f"{task}/{variant}{args.label}"
            if results.get(name, {}).get("key") != key:
                pending.append((name, task, variant, settings, key))

    def one(item):
        name, task, variant, settings, key = item
        entry = run_variant(task, variant, release, settings, key, args.work)
        entry["baselines"] = json.loads((roots[task] / "raw" / "test" / TASK_FILE).read_text())["statistics"]
        return name, entry

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait on the subprocesses
        for name, entry in pool.map(one, pending):
            # re-read first: another bench on the same --work (other tasks) may have added results since
            results = json.loads(results_file.read_text()) if results_file.is_file() else {}
            results[name] = entry
            atomic.write_json(results_file, results)
            task = name.split("/")[0]
            print(f"{name}: {HEADLINE[task]}={entry['metrics'][HEADLINE[task]]:.2f} ({entry['seconds']:.0f} s)", flush=True)
    print(table(results, args.tasks, [v + args.label for v in args.variants]))
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
