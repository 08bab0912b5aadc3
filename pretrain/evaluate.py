"""``python -m pretrain.evaluate --release DIR --data SHARDS [--out FILE]``: zero-shot evaluation of a release.

Runs pretraining's own held-out evaluation (``pretrain.evaluation.evaluate``, the same functions)
on a release and any feature shards whose ``feature_spec.json`` matches it: ITM, MLM and MOC
accuracy on the first ``--itm-samples`` samples, and zero-shot image->text and text->image
R@1/5/10 under ImageBERT's protocol: a gallery of the first ``--max-images`` images (1,000 for
Flickr30k's test split and COCO 1K, 5,000 for COCO 5K; 0 for all) with all of their captions as
queries, a hit when any caption of the right image ranks (images grouped by ``image_id``, see
``preprocess.captions``). Every figure comes with its chance level; the results go to a JSON file
(written atomically) and are printed as a table, with the pairs scored per second.

The arguments, the release directory and every data shard are checked before torch is imported:
a mistake is one line on stderr (exit 2) at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("pretrain.evaluate")

RESULTS_FILE = "zero_shot.json"

# The numeric flags: (flag, default, least value, help). --max-images also takes 0 (every image).
NUMBERS = (
    ("--max-images", 1000, 2, "retrieval gallery: the first N images with all their captions (0: all)"),
    ("--itm-samples", 1000, 2, "the first N samples score ITM, MLM and MOC accuracy"),
    ("--batch-size", 64, 2, "pairs per forward"),
    ("--max-text-length", 40, 3, "tokens per caption, [CLS] and [SEP] included (pass the pretraining run's)"),
    ("--max-regions", 100, 1, "regions per image, most confident first (pass the pretraining run's)"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="release directory (python -m pretrain.export)")
    parser.add_argument("--data", required=True, help="feature shards: brace pattern or '::' list, local or bucket")
    parser.add_argument("--out", default=RESULTS_FILE, help=f"results JSON (default: ./{RESULTS_FILE})")
    for flag, default, _, text in NUMBERS:
        parser.add_argument(flag, type=int, default=default, help=f"{text}; default {default}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from preprocess import storage
    from pretrain.data_config import DataConfig
    from pretrain.evaluate_config import EvalConfig

    try:  # before torch is imported
        for flag, _, least, _ in NUMBERS:
            value = getattr(args, flag[2:].replace("-", "_"))
            if value < least and not (flag == "--max-images" and value == 0):
                raise ValueError(f"{flag} must be >= {least}{' (or 0: all)' if flag == '--max-images' else ''}, got {value}")
        eval_cfg = EvalConfig(max_samples=args.itm_samples, retrieval_candidates=args.max_images, batch_size=args.batch_size)
        data = DataConfig(batch_size=args.batch_size, max_text_length=args.max_text_length, max_regions=args.max_regions)
        if not Path(args.release).is_dir():
            raise FileNotFoundError(f"--release {args.release}: no such directory")
        shards = storage.check_exist(args.data, "--data")
    except (OSError, ValueError) as err:
        print(f"pretrain.evaluate: error: {err}", file=sys.stderr)
        return 2
    log.info("%d data shard(s); loading the release %s", len(shards), args.release)

    import torch

    from pretrain.data import feature_spec_of
    from pretrain.evaluation import evaluate, metrics_table
    from pretrain.masking_config import MaskingConfig
    from pretrain.release import load_release

    try:
        release = load_release(args.release)
        release.feature_spec.check_compatible(feature_spec_of(args.data, "--data"), f"release {args.release}", f"data {args.data}")
    except (OSError, ValueError, KeyError) as err:
        print(f"pretrain.evaluate: error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = release.model.to(device)
    timings: dict = {}
    start = time.perf_counter()
    metrics = evaluate(
        model, args.data, release.tokenizer, release.feature_spec, data, MaskingConfig(), eval_cfg, device,
        show_progress=True, timings=timings,
    )
    pairs_per_s = timings["retrieval_pairs"] / max(timings["retrieval_s"], 1e-9)
    record = {
        "release": str(args.release),
        "data": args.data,
        "device": str(device),
        "settings": {
            "max_images": args.max_images, "itm_samples": args.itm_samples, "batch_size": args.batch_size,
            "max_text_length": args.max_text_length, "max_regions": args.max_regions,
        },
        "metrics": metrics,
        "retrieval_pairs": timings["retrieval_pairs"],
        "pairs_per_s": round(pairs_per_s, 1),
        "seconds": {name: round(value, 2) for name, value in timings.items() if name.endswith("_s")}
        | {"total": round(time.perf_counter() - start, 2)},
    }
    from preprocess import atomic

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, record)
    per_image = metrics["num_captions"] / metrics["num_images"]
    print("\n".join([
        f"zero-shot evaluation of {args.release} on {args.data}",
        f"retrieval: {metrics['num_images']:.0f} images x {metrics['num_captions']:.0f} captions ({per_image:.2f} per image), "
        f"{record['retrieval_pairs']} pairs at {pairs_per_s:.1f} pairs/s; ITM/MLM/MOC on {metrics['num_eval_samples']:.0f} samples",
        *metrics_table(metrics),
    ]), flush=True)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
