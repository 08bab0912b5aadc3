"""``python -m preprocess extract``: raw image-caption shards -> region-feature shards.

    python -m preprocess extract --input 'raw/{00000..00099}.tar' --output features/ \\
        --config configs/preprocess/quickstart.yaml detector.max_boxes=36

One output shard per input shard (same name), so the work divides by shard across ranks
(RANK/WORLD_SIZE, a SLURM array or SLURM tasks), a finished shard is never redone, and the
final tables do not depend on how the job was split or interrupted. The order of events:

1. validate everything cheap: the arguments and the config first, before torch is imported
   (``preprocess.extract_cli``, the config in ``preprocess.extract_config``), then the inputs,
   the output dir and earlier runs into the same dir (``plan_job``),
2. start the decode workers, then load the detector while they fill their queues,
3. main thread: detector on per-shard batches; writer thread: encode and append to the tar,
4. each finished shard: tar renamed into place, then its table parts (the manifest part last),
5. whoever finds every shard complete assembles manifest.parquet, skipped.parquet, summary.json.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from torchvision.ops import clip_boxes_to_image
from tqdm import tqdm

from preprocess.config import to_dict
from preprocess.detector import RegionDetector, Regions, build_detector
from preprocess.detector_config import DetectorConfig
from preprocess.extract_config import ExtractConfig
from preprocess.feature_format import FEATURE_SPEC_FILE, MANIFEST_FILE, SKIPPED_FILE, BatchnormCalibration, FeatureSpec
from preprocess.feature_writer import DetectedBatch, FeatureWriter
from preprocess.launch_env import WorkShare, read_work_share, stop_safe_worker_init
from preprocess.raw_input import (
    InputError,
    InputShard,
    ShardBatch,
    ShardBatches,
    ShardEnd,
    first_images,
    pass_through,
    plan_input_shards,
)
from preprocess.shard_output import PARTS_DIR, SUMMARY_FILE, assemble_tables, complete_shards
from preprocess.storage import Location, StorageError

log = logging.getLogger("preprocess.extract")

CONFIG_FILE = "extract_config.yaml"
# Keys that only change speed, not what is written: a rerun may change them freely. Everything
# else must match the run that started the directory. (batch_size is here because the detector
# pads every batch to a fixed canvas, detector.fixed_canvas, so features do not depend on it.)
SPEED_ONLY_KEYS = {
    "batch_size",
    "num_workers",
    "prefetch_batches",
    "write_queue_batches",
    "torch_threads",
    "progress",
    "detector.device",
}
# Keys whose decided value feature_spec.json records and write_or_check_spec compares instead:
# a run with detector.precision auto may be continued with what auto decided, and vice versa.
CHECKED_IN_SPEC_KEYS = {"detector.precision"}


class ExtractError(ValueError):
    """A problem that stops the job before it starts; one line naming the file, key or shard."""


@dataclass
class ExtractJob:
    """A validated job: what this worker must do. Building one loads no model."""

    cfg: ExtractConfig
    input_spec: str
    output: Location
    shards: list[InputShard]  # every input shard, in --input order
    todo: list[InputShard]  # this worker's share, minus shards already complete
    share: WorkShare
    calibration: BatchnormCalibration | None = None  # batch-norm statistics to load instead of calibrating


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_saved_config(output: Location, cfg: ExtractConfig) -> None:
    """Refuse to continue a directory started with settings that change the output."""
    try:
        saved_text = output.read_text(CONFIG_FILE)
    except FileNotFoundError:
        return
    path = output.url(CONFIG_FILE)
    saved = _flatten(yaml.safe_load(saved_text) or {})
    now = _flatten(to_dict(cfg))
    # A key newer than the saved config had, when the run started, the behaviour of its default.
    defaults = _flatten(to_dict(ExtractConfig()))
    for key in sorted(set(saved) | set(now)):
        if key in SPEED_ONLY_KEYS or key in CHECKED_IN_SPEC_KEYS:
            continue
        if saved.get(key, defaults.get(key)) != now.get(key):
            raise ExtractError(
                f"{path}: this directory was written with {key}={saved.get(key)!r} but this run has "
                f"{key}={now.get(key)!r}; use the same setting or a fresh --output"
            )


def plan_job(input_spec: str, output: str | Path, cfg: ExtractConfig, share: WorkShare | None = None) -> ExtractJob:
    """Validate inputs, the output location and earlier runs (no model is loaded); save the config."""
    share = share or read_work_share()
    try:
        shards = plan_input_shards(input_spec)
        location = Location(output)
        if not location.remote and location.dir.exists() and not location.dir.is_dir():
            raise ExtractError(f"--output {output} exists and is not a directory")
        location.prepare(PARTS_DIR)
        check_saved_config(location, cfg)
        location.write_text(CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        complete = complete_shards(location)
        calibration = saved_calibration(location, cfg.detector)
    except (InputError, StorageError) as err:
        raise ExtractError(str(err)) from None
    todo = [s for s in share.take(shards) if s.name not in complete]
    return ExtractJob(
        cfg=cfg, input_spec=input_spec, output=location, shards=shards, todo=todo, share=share, calibration=calibration
    )


def saved_calibration(output: Location, detector: DetectorConfig) -> BatchnormCalibration | None:
    """The batch-norm statistics the detector loads instead of calibrating: those of
    ``detector.calibration_from``, else those an earlier run or worker saved in this output.
    (Calibrating again would give the same network only up to the last bits, which change with
    the thread count, the CPU or the device: then the extractor hash would not match.)"""
    try:
        if detector.calibration_from:
            return BatchnormCalibration.load(detector.calibration_from)
        try:
            return BatchnormCalibration.load(output.root)
        except FileNotFoundError:
            return None
    except (FileNotFoundError, ValueError) as err:
        key = "detector.calibration_from: " if detector.calibration_from else ""
        raise ExtractError(f"{key}{err}") from None


def feature_spec_for(detector: RegionDetector, cfg: ExtractConfig) -> FeatureSpec:
    d = cfg.detector
    given = d.backend == "given_boxes"
    return FeatureSpec(
        detector=detector.name,
        weights=detector.weights,
        feature_dim=detector.feature_dim,
        num_classes=detector.num_classes,
        label_format=d.label_format,
        topk=min(d.topk, detector.num_classes) if d.label_format == "topk" else 0,
        min_boxes=1 if given else d.min_boxes,  # given boxes: as many as the data has, 1..max_boxes
        max_boxes=d.max_boxes,
        class_names=list(detector.class_names),
        attribute_names=list(detector.attribute_names),
        extractor_sha256=detector.extractor_sha256,
        backbone_precision=detector.precision,
    )


def write_or_check_spec(output: Location, spec: FeatureSpec, calibration: BatchnormCalibration | None = None) -> None:
    """Write the spec (and the batch-norm calibration) of a new output; an existing spec must match."""
    path = output.url(FEATURE_SPEC_FILE)
    try:
        existing = FeatureSpec.load(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        diffs = existing.differences(spec, path, "this run's detector")
        if diffs:
            hint = ""
            if any(d.startswith("backbone_precision:") for d in diffs):
                hint = f" or set detector.precision={existing.backbone_precision} to continue it"
            raise ExtractError(f"{path} does not match this run's detector ({'; '.join(diffs)[:600]}); use a fresh --output{hint}")
    if existing is None:
        if calibration is not None:
            # Before the spec: whoever finds a spec finds its calibration (and a rerun or another
            # worker, finding the spec, loaded this file rather than writing it again).
            calibration.save(output)
        spec.save(output)


def detector_inputs(samples) -> tuple[list, list | None, list | None]:
    """``detect`` arguments for a list of RawSample: images, and given boxes/labels if any."""
    images = [s.image.pixels for s in samples]
    if samples[0].given_boxes is None:
        return images, None, None
    boxes = []
    for s in samples:
        # Given boxes are in original pixels; the decoded image may have been shrunk.
        sx, sy = s.image.scale_xy
        scaled = torch.from_numpy(s.given_boxes) / torch.tensor([sx, sy, sx, sy])
        boxes.append(clip_boxes_to_image(scaled, tuple(s.image.pixels.shape[1:])))
    labels = [torch.from_numpy(s.given_labels) if s.given_labels is not None else None for s in samples]
    return images, boxes, labels


def to_original_pixels(regions: Regions, sample) -> Regions:
    """Detected boxes are in the (possibly shrunk) decoded image; scale them to the original."""
    sx, sy = sample.image.scale_xy
    if sx == 1.0 and sy == 1.0:
        return regions
    boxes = clip_boxes_to_image(regions.boxes * torch.tensor([sx, sy, sx, sy]), (sample.image.height, sample.image.width))
    return replace(regions, boxes=boxes)


def detect_batch(detector: RegionDetector, batch: ShardBatch) -> DetectedBatch:
    """Run the detector on one batch; if the batch fails, retry image by image so one bad image
    costs only itself (recorded as detector_error). If every image fails alone too, the
    problem is not the data: raise."""
    samples = batch.samples
    if not samples:
        return DetectedBatch(batch, [], [])
    try:
        found = detector.detect(*detector_inputs(samples))
        return DetectedBatch(batch, [to_original_pixels(r, s) for r, s in zip(found, samples)], [""] * len(samples))
    except (RuntimeError, ValueError) as err:
        log.warning("detector failed on a batch of %s (%s); retrying image by image", batch.shard.name, err)
    regions: list[Regions | None] = []
    errors: list[str] = []
    for sample in samples:
        try:
            (found,) = detector.detect(*detector_inputs([sample]))
            regions.append(to_original_pixels(found, sample))
            errors.append("")
        except (RuntimeError, ValueError) as err:
            if len(samples) > 1 and len(errors) == len(samples) - 1 and all(errors):
                raise  # every image of the batch fails on its own: a broken setup, not bad images
            regions.append(None)
            errors.append(f"{err.__class__.__name__}: {err}"[:500])
    return DetectedBatch(batch, regions, errors)


def make_loader(job: ExtractJob) -> DataLoader:
    cfg = job.cfg
    workers = min(cfg.num_workers, len(job.todo))
    return DataLoader(
        ShardBatches(job.todo, cfg.sample_rules(), cfg.batch_size),
        batch_size=None,
        collate_fn=pass_through,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_batches if workers else None,
        worker_init_fn=stop_safe_worker_init(),  # a SIGTERM for the job stops the main process, not a decode worker mid-batch
    )


def load_detector(job: ExtractJob) -> RegionDetector:
    """The job's detector, seeded; a random one calibrated on the first input shard if so configured."""
    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    return build_detector(
        cfg.detector,
        lambda: first_images(job.shards[0], cfg.sample_rules(), cfg.detector.calibration_images),
        job.calibration,
    )


def run_extract(job: ExtractJob, detector: RegionDetector | None = None) -> dict[str, Any]:
    """Process this worker's shards, then assemble the final tables if every shard is complete.

    Returns this worker's summary (also logged and saved under DIR/.parts/). ``detector``
    lets a caller reuse a loaded model (the benchmark); by default it is built here.
    """
    cfg, out = job.cfg, job.output
    started = time.time()
    rank0 = job.share.index == 0
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    summary: dict[str, Any] = {
        "worker": f"{job.share.index}/{job.share.count} ({job.share.source})",
        "input": job.input_spec,
        "shards_in_share": len(job.share.take(job.shards)),
        "shards_already_complete": len(job.share.take(job.shards)) - len(job.todo),
    }
    if job.todo:
        for name in (MANIFEST_FILE, SKIPPED_FILE, SUMMARY_FILE):  # stale until every shard is done
            out.delete(name)
        for shard in job.todo:  # a killed run's partial shard: this worker redoes it from scratch
            out.spool_file(shard.name).unlink(missing_ok=True)
        # Workers start (fork) before the model loads: they decode while it loads, and they do
        # not inherit the model's memory.
        batches = iter(make_loader(job))
        if detector is None:
            detector = load_detector(job)
        spec = feature_spec_for(detector, cfg)
        write_or_check_spec(out, spec, detector.calibration)
        writer = FeatureWriter(out, spec.label_format, spec.topk, cfg.write_queue_batches)
        writer.start()
        images = 0
        bar = tqdm(
            unit="img", desc=f"extract {len(job.todo)} shards", disable=not (cfg.progress and rank0),
            mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True,
        )
        # Where the main thread's time goes: waiting for decoded batches (input-bound), in the
        # detector, or waiting for room in the writer's queue (output-bound).
        waits = {"data_wait_s": 0.0, "detect_s": 0.0, "write_wait_s": 0.0}
        compute_started = tick = time.perf_counter()
        try:
            for item in batches:
                now = time.perf_counter()
                waits["data_wait_s"] += now - tick
                if "first_batch_wait_s" not in waits:  # worker start-up; hidden by the model load in a CLI run
                    waits["first_batch_wait_s"] = now - tick
                if isinstance(item, ShardEnd):
                    writer.put(item)
                    bar.set_postfix(shards=f"{len(writer.stats.shards_done)}/{len(job.todo)}", refresh=False)
                else:
                    detected = detect_batch(detector, item.unpack())
                    tick = time.perf_counter()
                    waits["detect_s"] += tick - now
                    writer.put(detected)
                    waits["write_wait_s"] += time.perf_counter() - tick
                    images += len(item.samples)
                    bar.update(len(item.samples))
                tick = time.perf_counter()
            stats = writer.finish()
        finally:
            bar.close()
        seconds = time.perf_counter() - compute_started
        summary.update(
            {
                "shards_done": len(stats.shards_done),
                "shards_failed": stats.shards_failed,
                "written": stats.written,
                "skipped": sum(stats.skipped.values()),
                "skipped_by_reason": dict(sorted(stats.skipped.items())),
                "images_through_detector": images,
                "seconds": round(seconds, 3),
                "images_per_second": round(images / seconds, 3) if seconds > 0 else None,
                **{k: round(v, 3) for k, v in waits.items()},
            }
        )
    summary["seconds_total"] = round(time.time() - started, 3)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    out.write_json(f"{PARTS_DIR}/run-{stamp}-w{job.share.index}of{job.share.count}-{os.getpid()}.json", summary)
    log.info("worker summary: %s", summary)
    final = assemble_tables(out, job.shards)
    if final is not None:
        log.info(
            "all %d shards complete: %d samples written, %d skipped %s -> %s",
            final["shards"], final["written"], final["skipped"], final["skipped_by_reason"], out.url(MANIFEST_FILE),
        )
    else:
        complete = complete_shards(out)
        done = sum(s.name in complete for s in job.shards)
        log.info("%d/%d shards complete; the final tables are assembled by the worker that completes the last one "
                 "(or by rerunning this command)", done, len(job.shards))
    summary["final"] = final
    return summary
