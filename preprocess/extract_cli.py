"""``python -m preprocess extract``'s command line (``preprocess.extract`` does the work).

The arguments, the launcher's work share and the config are checked here, before the extractor
and with it torch, torchvision and webdataset are imported: a mistake in them is one line on
stderr (exit 2) at once, not after seconds of imports.
"""

from __future__ import annotations

import argparse
import logging
import sys

from preprocess.config import ConfigError, load_config
from preprocess.extract_config import ExtractConfig
from preprocess.launch_env import read_work_share


def setup_logging(rank0: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess extract",
        description="Extract region features from raw image-caption shards (see docs/preprocess.md).",
    )
    parser.add_argument("--input", required=True, help="shard URLs: brace patterns, pipe:, s3:// ...; join several with ::")
    parser.add_argument("--output", required=True, help="output directory or bucket URL, e.g. s3://bucket/features (reruns resume)")
    parser.add_argument("--config", help="YAML config (ExtractConfig); defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. detector.max_boxes=36")
    args = parser.parse_args(argv)
    try:
        share = read_work_share()
    except ValueError as err:
        print(f"extract: error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(ExtractConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"extract: error: {err}", file=sys.stderr)
        return 2

    from preprocess.detector import DetectorError
    from preprocess.extract import ExtractError, plan_job, run_extract
    from preprocess.feature_writer import ShardWriteError
    from preprocess.raw_input import InputError

    try:
        setup_logging(share.index == 0)
        job = plan_job(args.input, args.output, cfg, share)
        summary = run_extract(job)
    except (ExtractError, InputError, DetectorError) as err:  # InputError: calibrating on an unusable input
        print(f"extract: error: {err}", file=sys.stderr)
        return 2
    except ShardWriteError as err:
        print(f"extract: error: {err}", file=sys.stderr)
        return 1
    if summary.get("shards_failed"):
        print(
            f"extract: error: {len(summary['shards_failed'])} shard(s) could not be read and stay incomplete "
            f"(rerun to retry): {', '.join(summary['shards_failed'])}",
            file=sys.stderr,
        )
        return 1
    return 0
