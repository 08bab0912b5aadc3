"""MBT's parameter and classifier options side by side on a task only fusion solves.

The held-out match task of ``tests/test_fusion_needs_both.py`` (a colour only the text names
against one only a region shows), trained from the same tiny random encoder for ``--steps``
AdamW steps per seed; prints each variant's held-out accuracy per seed and its mean. A small
CPU-only comparison of how fast each variant learns to fuse, not a benchmark of the paper's
tasks (use ``bench/fusion_accuracy.py`` for those).

    .venv/bin/python bench/mbt_variants.py --steps 60 100 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# The repository first: this directory's preprocess.py would shadow the preprocess package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tests.test_fusion_needs_both as task  # noqa: E402
from finetune.fusion import FusionConfig  # noqa: E402

VARIANTS = [(p, c) for p in ("per_modality", "shared") for c in ("shared", "per_modality")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[60, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| steps | mbt_parameters | mbt_classifier | held-out accuracy per seed | mean | s per run |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        task.STEPS = steps
        for parameters, classifier in VARIANTS:
            task.FusionConfig = lambda name, p=parameters, c=classifier: FusionConfig(
                name=name, mbt_parameters=p, mbt_classifier=c
            )
            start = time.perf_counter()
            accuracies = [task.held_out_accuracy("mbt", seed) for seed in args.seeds]
            seconds = (time.perf_counter() - start) / len(args.seeds)
            per_seed = " ".join(f"{a:.2f}" for a in accuracies)
            mean = sum(accuracies) / len(accuracies)
            print(f"| {steps} | {parameters} | {classifier} | {per_seed} | {mean:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
