"""Benchmark ``preprocess extract``: end-to-end images/s against the detector alone.

    python bench/preprocess.py --config configs/preprocess/quickstart.yaml --num-samples 1200

1. writes synthetic raw shards (``python -m preprocess synth``, quickstart-sized images) unless
   --raw points at existing ones;
2. loads the detector once (both measurements share it, so model loading is in neither);
3. detector alone: every image decoded into memory first, then only ``detect`` is timed, on the
   same per-shard batches the extractor forms (same batch size, same partial last batches);
4. end to end: ``run_extract`` on the same shards into a fresh directory (decode workers,
   detector, writer thread, tar/parquet output), timed from its first batch to its last commit;
5. efficiency = end-to-end images/s / detector-alone images/s (goal >= 0.9);
6. one ``python -m preprocess extract`` subprocess on the same shards: wall time including the
   model load, and peak memory (PSS of the process and its decode workers, sampled every 0.5 s; reading smaps costs CPU).

Steps 3 and 4 alternate ``--repeats`` times; the medians are reported (the machine is shared).
Prints one JSON object; ``--json PATH`` also saves it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.config import load_config  # noqa: E402
from preprocess.extract import detector_inputs, load_detector, plan_job, run_extract  # noqa: E402
from preprocess.extract_config import ExtractConfig  # noqa: E402
from preprocess.launch_env import WorkShare  # noqa: E402
from preprocess.raw_input import RawSample, ShardBatch, plan_input_shards, read_shard  # noqa: E402


class PeakMemory:
    """Peak memory of a process tree (the process plus its decode workers), sampled in a thread.

    Counts PSS, not RSS: forked workers share the parent's pages, and summing RSS would count
    those pages once per process.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:  # a worker that just exited
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except psutil.Error:  # the root process has exited
                return
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cli_run(input_spec: str, out: Path, args) -> tuple[float, int]:
    """Wall time and peak PSS of one ``python -m preprocess extract`` run, model load included."""
    command = [sys.executable, "-m", "preprocess", "extract", "--input", input_spec, "--output", str(out),
               "--config", args.config, *args.overrides, "progress=false"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as memory:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"extract failed: {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - started, memory.peak


def decoded_batches(input_spec: str, cfg: ExtractConfig) -> list[ShardBatch]:
    """The extractor's own batches, decoded up front (same reader, same per-shard batching)."""
    batches = []
    for shard in plan_input_shards(input_spec):
        samples = [s for s in read_shard(shard, cfg.sample_rules()) if isinstance(s, RawSample)]
        for i in range(0, len(samples), cfg.batch_size):
            batches.append(ShardBatch(shard, samples[i : i + cfg.batch_size], []))
    return batches


def time_detector(detector, batches: list[ShardBatch]) -> float:
    started = time.perf_counter()
    for batch in batches:
        detector.detect(*detector_inputs(batch.samples))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/preprocess/quickstart.yaml"))
    parser.add_argument("--raw", help="existing raw shard spec; default: synthesise --num-samples")
    parser.add_argument("--num-samples", type=int, default=1200)
    parser.add_argument("--samples-per-shard", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. batch_size=32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cfg = load_config(ExtractConfig, args.config, [*args.overrides, "progress=false"])
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        if args.raw:
            input_spec = args.raw
        else:
            subprocess.run(
                [sys.executable, "-m", "preprocess", "synth", "--out", str(work / "raw"), "--num-samples",
                 str(args.num_samples), "--seed", "0", "--samples-per-shard", str(args.samples_per_shard)],
                cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            shards = -(-args.num_samples // args.samples_per_shard)
            input_spec = str(work / "raw" / f"{{00000..{shards - 1:05d}}}.tar")

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        detector = load_detector(plan_job(input_spec, work / "features-0", cfg, WorkShare(0, 1, "single")))
        batches = decoded_batches(input_spec, cfg)
        images = sum(len(b.samples) for b in batches)
        time_detector(detector, batches[:2])  # warm-up: first-call allocations, oneDNN kernel choice

        alone, e2e, breakdowns = [], [], []
        for r in range(args.repeats):
            alone.append(images / time_detector(detector, batches))
            out = work / f"features-{r}"
            summary = run_extract(plan_job(input_spec, out, cfg, WorkShare(0, 1, "single")), detector=detector)
            assert summary["written"] == images, summary
            e2e.append(summary["images_per_second"])
            breakdowns.append({k: summary[k] for k in ("seconds", "data_wait_s", "detect_s", "write_wait_s")})
            shutil.rmtree(out)
        del batches
        cli_wall, cli_peak = cli_run(input_spec, work / "features-cli", args)
        result = {
            "config": os.path.relpath(args.config, REPO),
            "overrides": args.overrides,
            "images": images,
            "batch_size": cfg.batch_size,
            "num_workers": cfg.num_workers,
            "torch_threads": torch.get_num_threads(),
            "detector": detector.name,
            "device": str(getattr(detector, "device", "?")),
            "detector_alone_img_per_s": round(statistics.median(alone), 2),
            "end_to_end_img_per_s": round(statistics.median(e2e), 2),
            "efficiency": round(statistics.median(e2e) / statistics.median(alone), 3),
            "cli_wall_s_with_model_load": round(cli_wall, 2),
            "cli_peak_pss_mib": round(cli_peak / 2**20, 1),
            "runs": {"detector_alone": alone, "end_to_end": e2e, "end_to_end_breakdown": breakdowns},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
