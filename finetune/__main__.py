"""``python -m finetune --config FILE --init RELEASE_DIR [--run-dir DIR] [--resume] [key=value ...]``

Start it once per rank, like pretraining: ``torchrun --nproc_per_node N``, the ``deepspeed``
launcher, or ``srun``. Without a GPU it trains on the CPU with gloo. Exit status 0 also after
SIGTERM/SIGUSR1 (a checkpoint was saved; rerun with ``--resume``); ``RUN_DIR/done.json`` tells a
finished run from a stopped one. ``docs/finetune.md`` lists every config key.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="job YAML, e.g. configs/finetune/classification.yaml")
    parser.add_argument("--init", required=True, help="release directory written by python -m pretrain.export")
    parser.add_argument("--run-dir", help="checkpoints, TensorBoard events, results.json (default: runs/finetune-<task>-<fusion>)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint if there is one")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. fusion.name=mbt train.steps=200")
    args = parser.parse_args(argv)

    from preprocess.config import ConfigError, load_config

    from finetune.config import FinetuneConfig

    try:  # before torch is imported: a mistake in the config is reported at once
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or os.path.join("runs", f"finetune-{cfg.task.name}-{cfg.fusion.name}")

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator on first use

    from finetune.trainer import check_inputs, run

    try:
        spec = check_inputs(cfg, args.init)  # missing shards, unreadable bucket, mismatched specs: one line, before any rank starts
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pretrain.checkpoint import CheckpointWriteError
    from pretrain.engine import NonFiniteLossError

    try:
        run(cfg, args.init, run_dir, resume=args.resume, spec=spec)
    except (CheckpointWriteError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
