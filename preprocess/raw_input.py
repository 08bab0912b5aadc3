"""Reading raw image-caption shards (img2dataset layout: KEY.jpg|png|webp, KEY.txt, KEY.json).

The flat pipeline for one shard, run inside a DataLoader worker:

    open the URL (``preprocess.storage``: local paths, ``pipe:``, http; fsspec for s3:// and friends)
    -> tar members (webdataset, errors recorded by a log-and-continue handler)
    -> samples grouped by key (webdataset)
    -> each sample validated and its image decoded: a ``RawSample`` or a ``SkippedSample`` with a reason
    -> batches of ``batch_size`` samples *of that shard only*, then a ``ShardEnd`` marker.

Batches never mix shards: a shard redone after a crash then sees exactly the batches of an
uninterrupted run, so its features come out bit-identical (batched detectors pad images to the
batch's largest size, which changes features near the border).
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import math
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from preprocess import storage
from preprocess.captions import captions_of, image_id_of
from preprocess.raw_image import DecodedImage, RejectedSample, decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Errors that mean "the bytes of this tar stop or go bad here" (a data problem: the shard is
# finished with a truncated_tar row). Anything else while reading (network, a pipe command that
# exits non-zero) fails the shard instead, so a rerun retries it.
TRUNCATION_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
SAMPLE_META = ("__key__", "__url__", "__local_path__")


class InputError(ValueError):
    """The --input spec names nothing usable; the message names the shard."""


@dataclass(frozen=True)
class InputShard:
    url: str  # as given (after brace expansion)
    name: str  # output tar name, e.g. "00012.tar"
    position: int  # index in the expanded --input list: the order of the final tables


@dataclass
class SampleRules:
    """What a raw sample must satisfy; built from ExtractConfig, shipped to the workers."""

    max_image_pixels: int
    min_size: int
    max_size: int
    downscale: bool
    caption_min_chars: int
    caption_max_chars: int
    given_boxes: bool
    max_boxes: int = 100
    boxes_field: str = "boxes"
    labels_field: str = "labels"
    class_names: list[str] = field(default_factory=list)


@dataclass
class RawSample:
    key: str
    index: int  # position among all samples of its source shard
    caption: str
    metadata: bytes  # the raw JSON member, unchanged
    image: DecodedImage
    image_id: int | None = None  # the JSON's image_id (preprocess.captions.image_id_of)
    # numpy, not torch: small tensors would each cost a shared-memory handle between processes
    given_boxes: np.ndarray | None = None  # float32 [N, 4] original-image pixels
    given_labels: np.ndarray | None = None  # int64 [N]


@dataclass
class SkippedSample:
    key: str  # "" when unknown (a tar that breaks between samples)
    index: int
    reason: str
    detail: str


@dataclass
class ShardBatch:
    shard: InputShard
    samples: list[RawSample]
    skipped: list[SkippedSample]
    packed: torch.Tensor | None = None  # every image of the batch, flat, while crossing processes
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    def pack(self) -> "ShardBatch":
        """Move all images into one tensor: a DataLoader worker then hands the main process one
        shared-memory block per batch instead of one per image (each costs a round trip to
        the worker, ~1 ms apiece on a busy machine)."""
        if self.samples and self.packed is None:
            self.shapes = [tuple(s.image.pixels.shape) for s in self.samples]
            self.packed = torch.cat([s.image.pixels.reshape(-1) for s in self.samples])
            for sample in self.samples:
                sample.image.pixels = None
        return self

    def unpack(self) -> "ShardBatch":
        """Give every sample its image again, as a view into the packed block."""
        if self.packed is not None:
            offset = 0
            for sample, shape in zip(self.samples, self.shapes):
                size = math.prod(shape)
                sample.image.pixels = self.packed[offset : offset + size].view(shape)
                offset += size
            self.packed = None
        return self


@dataclass
class ShardEnd:
    shard: InputShard
    samples_read: int
    failed: str | None = None  # why the shard could not be read; it stays incomplete for a retry


# ---------------------------------------------------------------- input specs


def output_shard_name(url: str) -> str:
    """The output tar name for an input shard: the last ``*.tar``-like token of the URL.

    ``/data/00012.tar``, ``pipe:cat /data/00012.tar`` and ``s3://b/00012.tar.gz`` all give
    ``00012.tar``; outputs are always uncompressed tars.
    """
    tokens = [t for t in re.split(r"[\s/:=]+", url) if re.search(r"\.(tar|tgz)\b", t)]
    if not tokens:
        raise InputError(f"input {url!r}: cannot derive an output shard name (no '*.tar' in the URL)")
    stem = re.split(r"\.(?:tar|tgz)\b", tokens[-1])[0]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip(".")
    if not stem:
        raise InputError(f"input {url!r}: cannot derive an output shard name from {tokens[-1]!r}")
    return stem + ".tar"


def plan_input_shards(spec: str) -> list[InputShard]:
    """Expand and check --input without reading any shard: every local file and bucket object must
    exist (one listing per prefix), output names must be unique. ``pipe:`` and http inputs are
    only checked when read."""
    try:
        urls = storage.expand(spec)
        if not urls:
            raise InputError(f"--input {spec!r} expands to no shards")
        absent = storage.missing(urls)
    except storage.StorageError as err:
        raise InputError(f"--input: {err}") from None
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise InputError(f"input shard {absent[0]}{more} does not exist (from --input {spec!r})")
    shards: list[InputShard] = []
    by_name: dict[str, str] = {}
    for position, url in enumerate(urls):
        name = output_shard_name(url)
        if name in by_name:
            raise InputError(f"inputs {by_name[name]} and {url} would both write {name}; give shards unique names")
        by_name[name] = url
        shards.append(InputShard(url=url, name=name, position=position))
    return shards


# ---------------------------------------------------------------- tar stream


class TarTail:
    """Pass-through reader that remembers the last 1 KiB of an uncompressed tar.

    Python's tarfile treats a stream that stops exactly between two members as a normal end, so
    a shard truncated there would look complete. A real tar ends with two zero blocks and a size
    that is a multiple of 512; ``ended_properly`` checks that after the stream is drained.
    """

    def __init__(self, stream):
        self.stream = stream
        self.total = 0
        self.tail = b""
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if len(self.head) < 512:
            self.head += data[: 512 - len(self.head)]
        self.total += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def ended_properly(self) -> bool:
        if self.head[257:262] != b"ustar":
            return True  # compressed or pre-POSIX tar: its own decoder reports truncation
        return self.total % 512 == 0 and len(self.tail) == 1024 and not self.tail.strip(b"\0")

    def close(self) -> None:
        self.stream.close()

    def __str__(self) -> str:
        return str(self.stream)


class ShardErrors:
    """webdataset exception handler: record, log, continue. One per shard."""

    def __init__(self, url: str):
        self.url = url
        self.truncations: list[str] = []
        self.failures: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        message = f"{exn.__class__.__name__}: {exn.args[0] if exn.args else exn}"
        if isinstance(exn, TRUNCATION_ERRORS):
            self.truncations.append(message)
        else:
            self.failures.append(message)
        log.warning("shard %s: %s", self.url, message)
        return True


def _duplicate_member(exn: Exception) -> bool:
    log.warning("duplicate member ignored (the first one is kept): %s", exn.args[0] if exn.args else exn)
    return True


# ---------------------------------------------------------------- samples


def _members(group: dict[str, Any]) -> frozenset[str]:
    return frozenset(k for k in group if k not in SAMPLE_META)


def parse_given_boxes(meta: dict, rules: SampleRules, width: int, height: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Boxes (and labels) from the sample JSON, in original pixels, clipped to the image."""
    raw = meta.get(rules.boxes_field)
    if raw is None:
        raise RejectedSample("no_given_boxes", f"metadata JSON has no {rules.boxes_field!r}")
    try:
        boxes = np.asarray(raw, dtype=np.float64).reshape(-1, 4) if len(raw) else np.zeros((0, 4))
    except (TypeError, ValueError):
        raise RejectedSample("bad_given_boxes", f"{rules.boxes_field!r} is not a list of [x1, y1, x2, y2]") from None
    if len(boxes) == 0:
        raise RejectedSample("no_given_boxes", f"{rules.boxes_field!r} is empty")
    if len(boxes) > rules.max_boxes:
        raise RejectedSample("too_many_given_boxes", f"{len(boxes)} boxes > detector.max_boxes={rules.max_boxes}")
    if np.asarray(raw, dtype=object).shape != (len(boxes), 4) or not np.isfinite(boxes).all():
        raise RejectedSample("bad_given_boxes", f"{rules.boxes_field!r} must be finite [x1, y1, x2, y2] rows")
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    empty = np.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0]
    if len(empty):
        raise RejectedSample("bad_given_boxes", f"box {int(empty[0])} has no area inside the {width}x{height} image")
    if not rules.class_names:
        return boxes.astype(np.float32), None  # the detector's classifier labels them
    raw_labels = meta.get(rules.labels_field)
    if raw_labels is None:
        raise RejectedSample("bad_given_labels", f"metadata JSON has no {rules.labels_field!r} (detector.class_names is set)")
    if not isinstance(raw_labels, list) or len(raw_labels) != len(boxes):
        raise RejectedSample("bad_given_labels", f"{rules.labels_field!r} must be a list with one label per box")
    ids = []
    for label in raw_labels:
        if isinstance(label, str):
            if label not in rules.class_names:
                raise RejectedSample("bad_given_labels", f"label {label!r} is not in detector.class_names")
            ids.append(rules.class_names.index(label))
        elif isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(rules.class_names):
                raise RejectedSample("bad_given_labels", f"label id {label} outside 0..{len(rules.class_names) - 1}")
            ids.append(label)
        else:
            raise RejectedSample("bad_given_labels", f"label {label!r} is neither a class name nor an id")
    return boxes.astype(np.float32), np.asarray(ids, dtype=np.int64)


def make_raw_sample(group: dict[str, Any], index: int, rules: SampleRules) -> RawSample:
    """Validate one grouped sample (cheap checks first) and decode its image; raises RejectedSample."""
    key = group["__key__"]
    image_suffix = next((s for s in IMAGE_SUFFIXES if s in group), None)
    if image_suffix is None:
        raise RejectedSample("no_image", f"members {sorted(_members(group))} include no image ({'/'.join(IMAGE_SUFFIXES)})")
    if "txt" not in group:
        raise RejectedSample("missing_caption", "no .txt member")
    try:
        caption = group["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise RejectedSample("caption_not_utf8", str(err)) from None
    if len(caption) < rules.caption_min_chars:
        raise RejectedSample("empty_caption", f"{len(caption)} characters < caption_min_chars={rules.caption_min_chars}")
    caption = caption[: rules.caption_max_chars]
    metadata = group.get("json", b"{}")
    try:
        meta = json.loads(metadata.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RejectedSample("bad_metadata_json", str(err)) from None
    if not isinstance(meta, dict):
        raise RejectedSample("bad_metadata_json", f"top level is {type(meta).__name__}, expected an object")
    try:  # what retrieval evaluation reads from the JSON must be readable there
        image_id = image_id_of(meta)
        captions_of(caption, meta)
    except ValueError as err:
        raise RejectedSample("bad_metadata_json", str(err)) from None
    # Given boxes are checked after the decode because clipping needs the image size.
    image = decode_image(group[image_suffix], rules.max_image_pixels, rules.min_size, rules.max_size, rules.downscale)
    sample = RawSample(key=key, index=index, caption=caption, metadata=metadata, image=image, image_id=image_id)
    if rules.given_boxes:
        sample.given_boxes, sample.given_labels = parse_given_boxes(meta, rules, image.width, image.height)
    return sample


def read_shard(shard: InputShard, rules: SampleRules) -> Iterator[RawSample | SkippedSample | ShardEnd]:
    """Every sample of one shard, in order, as RawSample or SkippedSample; then one ShardEnd."""
    errors = ShardErrors(shard.url)
    try:
        stream = TarTail(storage.open_for_reading(shard.url))
    except Exception as err:  # any failure to open (missing object, auth, network) is retried later
        yield ShardEnd(shard, 0, failed=f"cannot open {shard.url}: {err.__class__.__name__}: {err}")
        return
    files = tar_file_expander([{"url": shard.url, "stream": stream}], handler=errors, eof_value=None)
    groups = group_by_keys(files, handler=_duplicate_member)

    seen: set[str] = set()
    index = 0
    previous_members: frozenset[str] | None = None
    held: dict[str, Any] | None = None

    def process(group: dict[str, Any], at: int) -> RawSample | SkippedSample:
        key = group["__key__"]
        if key in seen:
            return SkippedSample(key, at, "duplicate_key", "key already seen earlier in this shard")
        seen.add(key)
        try:
            return make_raw_sample(group, at, rules)
        except RejectedSample as rejected:
            return SkippedSample(key, at, rejected.reason, rejected.detail)

    # The last sample is held back until the stream has ended: if the tar turns out truncated,
    # it may be missing members and is recorded as the truncation instead.
    for group in groups:
        if held is not None:
            previous_members = _members(held)
            yield process(held, index)
            index += 1
        held = group
    try:
        stream.drain()
        stream.close()
    except Exception as err:  # a pipe: command's non-zero exit surfaces here (gopen raises on close)
        errors(err)
    if errors.failures:
        yield ShardEnd(shard, index, failed="; ".join(errors.failures))
        return
    truncated = errors.truncations or ([] if stream.ended_properly() else ["stream ends without the tar end-of-archive blocks"])
    detail = "; ".join(truncated)
    if held is not None:
        members = _members(held)
        if previous_members is None:  # no sample to compare with: complete if it has what we use
            complete = "txt" in members and any(s in members for s in IMAGE_SUFFIXES)
        else:
            complete = members >= previous_members
        if truncated and not complete:
            yield SkippedSample(held["__key__"], index, "truncated_tar", f"sample incomplete at the break: {detail}")
            truncated = []
        else:
            yield process(held, index)
        index += 1
    if truncated:
        yield SkippedSample("", index, "truncated_tar", detail)
    yield ShardEnd(shard, index)


def first_images(shard: InputShard, rules: SampleRules, count: int) -> tuple[list[torch.Tensor], str]:
    """The pixels of the first ``count`` usable samples of ``shard``, in order, and a description.

    For ``detector.batchnorm_calibration: input``: every worker reads the same images, so all
    of them build the same network.
    """
    images: list[torch.Tensor] = []
    skipped: dict[str, SkippedSample] = {}  # the first sample skipped for each reason
    counts: Counter = Counter()
    samples = read_shard(shard, rules)
    for item in samples:
        if isinstance(item, RawSample):
            images.append(item.image.pixels)
            if len(images) == count:
                break
        elif isinstance(item, SkippedSample):
            skipped.setdefault(item.reason, item)
            counts[item.reason] += 1
        elif isinstance(item, ShardEnd) and item.failed:
            raise InputError(f"detector.batchnorm_calibration: input: cannot read {shard.url}: {item.failed}")
    samples.close()
    if not images:
        raise InputError(f"detector.batchnorm_calibration: input: no sample of {shard.url} is usable, "
                         f"{_why_skipped(counts, skipped, rules)}")
    return images, f"the first {len(images)} images of input shard {shard.name}"


def _why_skipped(counts: Counter, skipped: dict[str, SkippedSample], rules: SampleRules) -> str:
    """The reasons samples were skipped, the most common with its first sample and the config key to check."""
    if not counts:
        return "it holds no sample"
    reason, n = counts.most_common(1)[0]
    first = skipped[reason]
    text = f"{n} skipped as {reason} (first: sample {first.key!r}: {first.detail})"
    if reason in ("no_given_boxes", "bad_given_boxes", "too_many_given_boxes"):
        text += (f"; detector.backend: given_boxes reads each sample's boxes from its JSON field boxes_field="
                 f"{rules.boxes_field!r}: name the field your data uses, or detect boxes (detector.backend: torchvision)")
    elif reason == "bad_given_labels":
        text += f"; labels come from the JSON field labels_field={rules.labels_field!r} when detector.class_names is set"
    others = {r: c for r, c in counts.items() if r != reason}
    return text + (f"; also skipped: {others}" if others else "")


class ShardBatches(IterableDataset):
    """DataLoader dataset: each worker reads whole shards (``shards[worker::num_workers]``) and
    yields per-shard batches of decoded samples, then the shard's ``ShardEnd``."""

    def __init__(self, shards: list[InputShard], rules: SampleRules, batch_size: int):
        super().__init__()
        self.shards = shards
        self.rules = rules
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[ShardBatch | ShardEnd]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            samples: list[RawSample] = []
            skipped: list[SkippedSample] = []
            for item in read_shard(shard, self.rules):
                if isinstance(item, RawSample):
                    samples.append(item)
                    if len(samples) == self.batch_size:
                        yield ShardBatch(shard, samples, skipped).pack()
                        samples, skipped = [], []
                elif isinstance(item, SkippedSample):
                    skipped.append(item)
                else:
                    if samples or skipped:
                        yield ShardBatch(shard, samples, skipped).pack()
                    yield item


def pass_through(item):
    """DataLoader collate_fn: items are already batches (module-level so workers can pickle it)."""
    return item
