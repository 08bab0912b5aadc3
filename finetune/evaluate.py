"""``python -m finetune.evaluate --checkpoint PATH --data SPEC [--out results.json]``.

``--checkpoint`` is a fine-tuning run directory (its latest checkpoint), one checkpoint tag
directory inside ``RUN_DIR/checkpoints``, or a directory written by ``python -m finetune.export``
(``finetune.export.load_finetuned`` reads all three). The data's ``feature_spec.json`` must
match the model's. ``--baselines task.json`` (written by ``finetune.synth_tasks``) adds the
data's chance level and unimodal ceilings to the results and the printed table. The metrics are
``finetune.evaluation``'s.

The arguments are checked (the checkpoint located, the baselines read) before torch and the
model are imported: a mistake is one line on stderr (exit 2) at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("finetune.evaluate")

RESULTS_FILE = "results.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="fine-tuning run directory, RUN_DIR/checkpoints/<tag>, or an export")
    parser.add_argument("--data", required=True, help="task feature shards, brace pattern or '::' list")
    parser.add_argument("--out", help=f"results file (default: {RESULTS_FILE} in the run or export directory)")
    parser.add_argument("--baselines", help="task.json of the data (chance and unimodal ceilings) to report beside")
    parser.add_argument("--batch-size", type=int, help="override eval.batch_size")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate the first N samples only (0: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from finetune.export import locate

    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_samples < 0:
            raise ValueError(f"--max-samples must be >= 0 (0: all), got {args.max_samples}")
        baselines = read_baselines(args.baselines) if args.baselines else None
        where = locate(args.checkpoint)  # imports torch only for a run directory, to read its latest checkpoint
    except (OSError, ValueError) as err:
        print(f"finetune.evaluate: error: {err}", file=sys.stderr)
        return 2

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from finetune.data import read_samples
    from finetune.evaluation import evaluate_samples, format_results, results_record, write_results
    from finetune.export import load_finetuned
    from preprocess.feature_format import FeatureSpec
    from pretrain.data import feature_spec_of

    try:
        FeatureSpec.load(where.root).check_compatible(feature_spec_of(args.data, "--data"), f"fine-tuned model {where.root}", f"data {args.data}")
        finetuned = load_finetuned(where)
    except (OSError, ValueError, KeyError) as err:  # OSError: missing files, unreadable bucket
        print(f"finetune.evaluate: error: {err}", file=sys.stderr)
        return 2
    cfg = finetuned.cfg
    if args.batch_size:
        cfg.eval.batch_size = args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = finetuned.model.to(device)
    start = time.perf_counter()
    samples = read_samples(args.data, finetuned.tokenizer, finetuned.spec, cfg.data, cfg.task, args.max_samples)
    metrics = evaluate_samples(model, samples, cfg, finetuned.tokenizer.pad_token_id, device, progress=True)
    record = results_record(
        cfg, metrics, args.data, len(samples), baselines, checkpoint=str(finetuned.source),
        seconds=round(time.perf_counter() - start, 2),
    )
    out = Path(args.out) if args.out else finetuned.run_dir / RESULTS_FILE
    write_results(out, record)
    print(format_results(record))
    log.info("wrote %s", out)
    return 0


def read_baselines(path: str) -> dict:
    """The ``statistics`` of a ``task.json`` (``finetune.synth_tasks``); one-line errors."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))["statistics"]
    except FileNotFoundError:
        raise FileNotFoundError(f"--baselines {path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--baselines {path}: not a task.json with a 'statistics' object (finetune.synth_tasks writes one)") from None


if __name__ == "__main__":
    sys.exit(main())
