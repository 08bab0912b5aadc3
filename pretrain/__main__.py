"""``python -m pretrain --config FILE --run-dir DIR [--resume] [key=value ...]``

Start it once per rank: ``torchrun --nproc_per_node N``, the ``deepspeed`` launcher, or
``srun`` (one task per GPU; ranks come from SLURM's variables). Without a GPU it trains on
the CPU with gloo. Exit status 0 also after SIGTERM/SIGUSR1 (a checkpoint was saved; rerun
with ``--resume``); ``RUN_DIR/done.json`` tells a finished run from a stopped one.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="job YAML, e.g. configs/pretrain/quickstart.yaml")
    parser.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events go here")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint if there is one")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=16")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from preprocess.config import ConfigError, load_config
    from pretrain.config import PretrainConfig

    try:  # before torch is imported: a mistake in the config is reported at once
        cfg = load_config(PretrainConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator on first use; without CUDA it must be told.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from pretrain.trainer import check_feature_specs, check_release, run

    try:
        spec = check_feature_specs(cfg)  # missing shards, unreadable bucket, mismatched specs: one line, before any rank starts
        check_release(cfg, spec)  # model.release: not a release, or one that does not fit the config or the shards
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pretrain.checkpoint import CheckpointWriteError
    from pretrain.engine import NonFiniteLossError

    try:
        run(cfg, args.run_dir, resume=args.resume, spec=spec)
    except (CheckpointWriteError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
