"""The writer thread: detector regions -> feature samples -> output shards, overlapping compute.

The main thread runs the detector and hands each batch's results here through a bounded
queue; this thread encodes the arrays, appends them to the shard's tar and commits a shard when
its ``ShardEnd`` arrives. Encoding and file I/O mostly release the GIL, so they overlap the
detector's forward pass; the bound keeps memory flat if the disk is slower than the detector.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from preprocess.detector import Regions
from preprocess.feature_format import encode_feature_sample
from preprocess.raw_input import RawSample, ShardBatch, ShardEnd, SkippedSample
from preprocess.shard_output import ShardOutput
from preprocess.storage import Location

log = logging.getLogger(__name__)


class ShardWriteError(OSError):
    """An output shard or its table parts could not be written; nothing partial is visible."""


@dataclass
class DetectedBatch:
    """One ShardBatch and, per sample, its regions in original-image pixels (None: detector failed)."""

    batch: ShardBatch
    regions: list[Regions | None]
    errors: list[str]


@dataclass
class WriterStats:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards_done: list[str] = field(default_factory=list)
    shards_failed: dict[str, str] = field(default_factory=dict)


def region_labels(regions: Regions, label_format: str, topk: int) -> dict[str, np.ndarray]:
    """The shard members of the class (and, when the detector has them, attribute) distributions."""
    if label_format == "distribution":
        labels = {"cls_prob": regions.cls_prob.numpy()}
        if regions.attr_prob is not None:
            labels["attr_prob"] = regions.attr_prob.numpy()
        return labels
    ids, probs = regions.topk(topk)
    labels = {"labels": ids.numpy(), "label_scores": probs.numpy()}
    if regions.attr_prob is not None:
        ids, probs = regions.topk(topk, attributes=True)
        labels.update(attr_labels=ids.numpy(), attr_label_scores=probs.numpy())
    return labels


def feature_sample(sample: RawSample, regions: Regions, label_format: str, topk: int) -> dict:
    # Given boxes are written exactly as given (not as round-tripped through the detector).
    boxes = sample.given_boxes if sample.given_boxes is not None else regions.boxes.numpy()
    return encode_feature_sample(
        key=sample.key,
        caption=sample.caption,
        metadata_json=sample.metadata,
        image_width=sample.image.width,
        image_height=sample.image.height,
        features=regions.features.numpy(),
        boxes=boxes,
        labels=region_labels(regions, label_format, topk),
    )


class FeatureWriter(threading.Thread):
    """Consumes DetectedBatch and ShardEnd items; ``put`` re-raises this thread's failure."""

    def __init__(self, output: Location, label_format: str, topk: int, queue_size: int):
        super().__init__(name="feature-writer", daemon=True)
        self.output = output
        self.label_format = label_format
        self.topk = topk
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.open: dict[str, ShardOutput] = {}
        self.stats = WriterStats()
        self.error: BaseException | None = None

    def put(self, item: DetectedBatch | ShardEnd | None) -> None:
        while True:
            if self.error is not None:
                self._raise()
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def finish(self) -> WriterStats:
        """Wait for everything queued to be written; re-raise the writer's failure."""
        self.put(None)
        self.join()
        if self.error is not None:
            self._raise()
        return self.stats

    def _raise(self) -> None:
        """The writer's failure in the main thread: an OSError (a full disk, a bucket refusing an
        upload) as a ShardWriteError with one line to say, anything else as it is."""
        if isinstance(self.error, OSError):
            raise ShardWriteError(
                f"writing to {self.output} failed ({self.error}); the shard being written was discarded and "
                "the shards finished before it are kept: rerun the same command to resume once the cause is fixed"
            ) from self.error
        raise RuntimeError(f"feature writer failed: {self.error}") from self.error

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                if isinstance(item, ShardEnd):
                    self._end(item)
                else:
                    self._write(item)
        except BaseException as err:  # handed to the main thread by put()/finish()
            self.error = err
            for output in self.open.values():
                output.abort()
            # Keep consuming so that the main thread's put() never blocks on a full queue.
            while self.queue.get() is not None:
                pass

    def _output(self, shard_name: str, item_shard) -> ShardOutput:
        if shard_name not in self.open:
            self.open[shard_name] = ShardOutput(self.output, item_shard)
        return self.open[shard_name]

    def _write(self, item: DetectedBatch) -> None:
        batch = item.batch
        output = self._output(batch.shard.name, batch.shard)
        for skipped in batch.skipped:
            output.skip(skipped)
            self.stats.skipped[skipped.reason] += 1
        for sample, regions, error in zip(batch.samples, item.regions, item.errors):
            if regions is None:
                output.skip(SkippedSample(sample.key, sample.index, "detector_error", error))
                self.stats.skipped["detector_error"] += 1
                continue
            encoded = feature_sample(sample, regions, self.label_format, self.topk)
            output.write(
                encoded, sample.index, len(regions), sample.image.width, sample.image.height, sample.caption, sample.image_id
            )
            self.stats.written += 1

    def _end(self, end: ShardEnd) -> None:
        output = self.open.pop(end.shard.name, None)
        if end.failed:
            if output is not None:
                output.abort()
            self.stats.shards_failed[end.shard.url] = end.failed
            log.error("shard %s could not be read (left incomplete, a rerun retries it): %s", end.shard.url, end.failed)
            return
        if output is None:
            output = ShardOutput(self.output, end.shard)  # a shard with no readable sample
        try:
            written, skipped = output.commit()
        except BaseException:
            output.abort()
            raise
        self.stats.shards_done.append(end.shard.name)
        log.debug("shard %s done: %d written, %d skipped", end.shard.name, written, sum(skipped.values()))
