"""Detector throughput: images/s of ``RegionDetector.detect`` on whatever device is there, per detector.

    # GPU (or any machine), the bottom-up-attention setting: shorter side 600, longer <= 1000, 36 boxes
    python bench/extract_speed.py --json extract_speed.json \\
        --detector torchvision:fasterrcnn_resnet50_fpn \\
        --detector detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x.yaml
    # CPU smoke (the test suite runs this): 96-128 px images, 2 images, 1 timed batch
    python bench/extract_speed.py --quick --detector torchvision:fasterrcnn_resnet50_fpn --json out.json

1. writes a pool of synthetic images (``python -m preprocess synth --image-size MIN MAX``; each
   side uniform in MIN..MAX, so landscape and portrait images mix) and decodes it into memory
   with the extractor's reader (``read_shard``, which also shrinks images to the detector's input
   size as ``downscale_in_workers`` does);
2. per detector, builds it with ``preprocess.extract.load_detector`` (random weights, seeded;
   torchvision's batch norms calibrated on noise), with min_size/max_size and
   min_boxes = max_boxes = ``--boxes`` (36: the fixed-36 BUTD setting), the other detector keys at
   their defaults (fixed canvas, conf 0.2, NMS 0.3, the model's own proposal count);
3. runs ``--warmup`` batches untimed, then times ``--batches`` batches of ``--batch-size`` images
   (the pool is cycled), each timed alone between two ``torch.cuda.synchronize()`` calls on CUDA.

TIMED: one ``detector.detect(images)`` call per batch on decoded uint8 CPU tensors, i.e. the
copy to the device, normalise/resize/pad to the fixed canvas (one forward pass per orientation
present in the batch), backbone, RPN, box head on the proposals, box selection (per-class NMS),
box head again at the final boxes, and the copy of the regions back to the CPU. NOT timed: model
loading, image decoding, writing features (``bench/preprocess.py`` measures end to end).
images/s = timed images / sum of the timed batches' seconds.

Precision: ``--precision fp32 bf16`` measures each of the extractor's ``detector.precision``
values (bf16: the backbone under bf16 autocast in channels-last layout, the heads in fp32), one
detector built per value. On CUDA, cuDNN convolutions may use TF32 (torch's default
``cudnn.allow_tf32``), reported with the result.

Random weights make class scores near-uniform, so box selection sees far more (proposal, class)
pairs above its score floor than with a trained detector: that step is pessimistic here.

A detector whose backend is not importable (detectron2 is optional) is skipped with a one-line
reason. ``bench/device_bundle.sh`` prepares ``.d2/`` (detectron2's Python source and its missing
pure-Python dependencies; no compiled extension is needed for these models): run with
``PYTHONPATH=.d2`` where detectron2 is not installed.

Prints one JSON object; ``--json PATH`` also saves it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.detector import resolve_device  # noqa: E402
from preprocess.detector_config import DetectorConfig  # noqa: E402
from preprocess.extract import detector_inputs, load_detector, plan_job  # noqa: E402
from preprocess.extract_config import ExtractConfig  # noqa: E402
from preprocess.launch_env import WorkShare, cpu_info  # noqa: E402
from preprocess.raw_input import RawSample, plan_input_shards, read_shard  # noqa: E402

DEFAULT_DETECTORS = ("torchvision:fasterrcnn_resnet50_fpn", "detectron2:COCO-Detection/faster_rcnn_R_101_C4_3x.yaml")
PRECISIONS = ("fp32", "bf16")  # detector.precision values, decided (not auto)


def detector_config(spec: str, args, precision: str) -> DetectorConfig:
    """``torchvision:<builder>`` or ``detectron2:<config file or model-zoo name>``."""
    backend, _, model = spec.partition(":")
    common = {"min_size": args.min_size, "max_size": args.max_size, "min_boxes": args.boxes, "max_boxes": args.boxes,
              "device": args.device, "precision": precision}
    if backend == "torchvision":
        return DetectorConfig(backend="torchvision", model=model, **common)
    if backend == "detectron2":
        return DetectorConfig(backend="detectron2", detectron2_config=model,
                              detectron2_overrides=list(args.detectron2_overrides), **common)
    raise SystemExit(f"--detector {spec!r}: expected torchvision:<builder> or detectron2:<config>")


def synth_pool(work: Path, args) -> tuple[str, int]:
    """Raw shard of ``--pool`` synthetic images (one shard); returns (input spec, images)."""
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", "synth", "--out", str(work / "raw"), "--num-samples", str(args.pool),
         "--seed", "0", "--samples-per-shard", str(args.pool), "--image-size", *map(str, args.image_size)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"preprocess synth failed: {proc.stderr.strip()[-2000:]}")
    return str(work / "raw" / "00000.tar"), args.pool


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_info().get("model name", platform.machine())
    return f"cpu: {model}, {torch.get_num_threads()} torch threads of {os.cpu_count()} CPUs"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proposals_per_image(detector) -> int | None:
    """The model's post-NMS proposal count at test time (what the box head runs on), if known."""
    model = getattr(detector, "model", None)
    if hasattr(model, "rpn"):  # torchvision: {"training": n, "testing": n}
        return int(model.rpn._post_nms_top_n["testing"])
    if hasattr(model, "proposal_generator"):  # detectron2's RPN: (train, test)
        return int(model.proposal_generator.post_nms_topk[False])
    return None


def time_batches(detector, batches, device: torch.device) -> list[float]:
    """Seconds of each ``detect`` call, each between two device synchronisations."""
    seconds = []
    for samples in batches:
        sync(device)
        started = time.perf_counter()
        detector.detect(*detector_inputs(samples))
        sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(spec: str, input_spec: str, samples: list[RawSample], work: Path, args) -> list[dict]:
    """One entry per precision for this detector, or one skipped entry."""
    entries = []
    for precision in args.precision:
        cfg = ExtractConfig(detector=detector_config(spec, args, precision), batch_size=args.batch_size, progress=False)
        try:
            name = f"job-{spec.replace('/', '_').replace(':', '_')}-{precision}"
            detector = load_detector(plan_job(input_spec, work / name, cfg, WorkShare(0, 1, "single")))
        except ImportError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            hint = "; bench/device_bundle.sh then PYTHONPATH=.d2" if spec.startswith("detectron2:") else ""
            print(f"skip {spec}: backend not importable ({reason}){hint}", flush=True)
            return [{"detector": spec, "skipped": f"backend not importable: {reason}"}]
        device = resolve_device(cfg.detector.device)
        cycle = itertools.cycle(samples)
        n = args.batch_size
        entry = {
            "detector": detector.name,
            "weights": detector.weights,
            "feature_dim": detector.feature_dim,
            "precision": detector.precision,
            "device": device_name(device),
            "batch_size": n,
            "boxes_per_image": args.boxes,
            "detector_input": f"shorter side {args.min_size}, longer <= {args.max_size} (fixed canvas)",
            "proposals_per_image": proposals_per_image(detector),
        }
        try:
            time_batches(detector, [[next(cycle) for _ in range(n)] for _ in range(args.warmup)], device)
            seconds = time_batches(detector, [[next(cycle) for _ in range(n)] for _ in range(args.batches)], device)
        except (RuntimeError, ValueError) as err:
            reason = str(err).strip().splitlines()[0]
            print(f"{detector.name} {precision}: failed ({type(err).__name__}: {reason})", flush=True)
            entries.append({**entry, "failed": f"{type(err).__name__}: {reason}"})
            continue
        images = n * len(seconds)
        entry.update(
            warmup_batches=args.warmup,
            timed_batches=len(seconds),
            timed_images=images,
            seconds=round(sum(seconds), 4),
            images_per_s=round(images / sum(seconds), 3),
            batch_seconds=[round(s, 4) for s in seconds],
        )
        if device.type == "cuda":
            entry["peak_cuda_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            entry["tf32"] = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                             "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
        print(f"{detector.name} {precision}: {entry['images_per_s']} images/s ({images} images, batch {n})", flush=True)
        entries.append(entry)
        del detector
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", action="append", help=f"backend:model, repeatable; default: {' and '.join(DEFAULT_DETECTORS)}")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke: 96-128 px images resized to 128/192, 4 boxes, 2 images per batch, "
                             "1 warm-up and 1 timed batch, detectron2 on 100 proposals")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed batches")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--pool", type=int, default=32, help="distinct synthetic images, cycled")
    parser.add_argument("--image-size", nargs=2, type=int, default=[600, 1000], metavar=("MIN", "MAX"),
                        help="synthetic image sides (each uniform in MIN..MAX)")
    parser.add_argument("--min-size", type=int, default=600, help="detector resize: shorter side")
    parser.add_argument("--max-size", type=int, default=1000, help="detector resize: longer side at most")
    parser.add_argument("--boxes", type=int, default=36, help="regions per image (min_boxes = max_boxes)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    parser.add_argument("--detectron2-overrides", nargs="*", default=[], metavar="KEY VALUE")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.batches, args.warmup, args.pool = 2, 1, 1, 2
        args.image_size, args.min_size, args.max_size, args.boxes = [96, 128], 128, 192, 4
        args.detectron2_overrides = ["MODEL.RPN.POST_NMS_TOPK_TEST", "100", *args.detectron2_overrides]
    detectors = args.detector or list(DEFAULT_DETECTORS)
    logging.basicConfig(level=logging.ERROR)  # not the random-weights warning on every detector
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # detectron2.model_zoo's import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="bench-extract-speed-"))
    try:
        input_spec, _ = synth_pool(work, args)
        # Decoded once, as the extractor's workers do (shrunk to the detector's input size).
        rules = ExtractConfig(detector=DetectorConfig(min_size=args.min_size, max_size=args.max_size)).sample_rules()
        (shard,) = plan_input_shards(input_spec)
        samples = [s for s in read_shard(shard, rules) if isinstance(s, RawSample)]
        landscape = sum(s.image.pixels.shape[2] >= s.image.pixels.shape[1] for s in samples)
        results = []
        for spec in detectors:
            results.extend(measure(spec, input_spec, samples, work, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "what": "detector.detect images/s on decoded images (device copy, detection, regions back to CPU); "
                "no decoding, no writing; random weights",
        "quick": args.quick,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "image_pool": f"{len(samples)} synthetic images, sides {args.image_size[0]}-{args.image_size[1]} px, "
                      f"{landscape} landscape / {len(samples) - landscape} portrait",
        "results": results,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
