"""The feature-shard format: what ``preprocess extract`` writes and every later stage reads.

A feature shard is a plain webdataset tar. Each sample ``KEY`` holds these members
(all readable by ``webdataset`` with its default decoders, no project code needed):

==========================  ==========================================================
member                      content
==========================  ==========================================================
``KEY.txt``                 caption, UTF-8
``KEY.json``                the raw sample's metadata JSON, passed through unchanged
``KEY.info.json``           ``{"image_width", "image_height", "num_boxes"}``
``KEY.features.npy``        float16 ``[num_boxes, feature_dim]`` pooled ROI features
``KEY.boxes.npy``           float32 ``[num_boxes, 4]`` x1, y1, x2, y2 in original-image pixels
``KEY.geometry.npy``        float32 ``[num_boxes, 5]`` x1/W, y1/H, x2/W, y2/H, area/(W*H)
``KEY.cls_prob.npy``        float16 ``[num_boxes, num_classes]`` detector class distribution
                            (``label_format: distribution``), or
``KEY.labels.npy`` +        int32 ``[num_boxes, topk]`` class ids and float16 scores
``KEY.label_scores.npy``    (``label_format: topk``)
``KEY.attr_prob.npy``       optional (``detector.attributes``): float16 ``[num_boxes, num_attributes]``
                            attribute distribution, or with ``label_format: topk``
``KEY.attr_labels.npy`` +   int32 ``[num_boxes, topk]`` attribute ids and float16 scores
``KEY.attr_label_scores.npy``
==========================  ==========================================================

Regions are sorted by detector confidence, highest first. ``feature_spec.json`` beside the
shards (``FeatureSpec``) names the detector, the sha256 of its network, feature dimension, class
count and box limits; later stages refuse shards whose spec does not match their model. When
the detector's batch norms were calibrated (random init), ``batchnorm_calibration.safetensors``
(``BatchnormCalibration``) beside them holds the statistics, so a later extraction can build the
same network (``detector.calibration_from``).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import storage
from preprocess.detector_config import (
    CALIBRATION_FILE,
    LABEL_FORMATS,
    calibration_location,
)
from preprocess.shard_reader import read_npy

logger = logging.getLogger(__name__)

# Fields added later have defaults, and load() ignores fields it does not know, so the version
# changes only when the shards themselves change. (extractor_sha256 came without a change.)
FORMAT_VERSION = 1
FEATURE_SPEC_FILE = "feature_spec.json"
MANIFEST_FILE = "manifest.parquet"
SKIPPED_FILE = "skipped.parquet"


@dataclass
class FeatureSpec:
    """Contents of ``feature_spec.json``: what produced the features and their shapes."""

    detector: str  # e.g. "torchvision:fasterrcnn_resnet50_fpn" or "detectron2:<config>" or "given_boxes:..."
    weights: str  # weights file, "torchvision-cache:<name>" or "random"
    feature_dim: int
    num_classes: int
    label_format: str  # "distribution" or "topk"
    topk: int  # labels kept per region when label_format == "topk" (0 otherwise)
    min_boxes: int
    max_boxes: int
    class_names: list[str] = field(default_factory=list)
    # Attribute names when the shards carry attribute distributions (attr_prob / attr_labels), else [].
    attribute_names: list[str] = field(default_factory=list)
    feature_dtype: str = "float16"
    geometry: str = "x1/W,y1/H,x2/W,y2/H,area/(W*H)"
    # sha256 of every parameter and buffer of the detector network (preprocess.detector.state_sha256):
    # "" in specs written before it existed, which can then not be verified.
    extractor_sha256: str = ""
    # What the detector's backbone computed in (detector.precision decided): "fp32" or "bf16";
    # "fp32" in specs written before it existed, when every extraction was fp32.
    backbone_precision: str = "fp32"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {self.label_format!r}")
        if self.feature_dim < 1 or self.num_classes < 1:
            raise ValueError("feature_dim and num_classes must be positive")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")

    def save(self, directory: str | Path | storage.Location) -> str:
        """Write ``feature_spec.json`` into a directory or bucket prefix; returns its location."""
        location = directory if isinstance(directory, storage.Location) else storage.Location(directory)
        location.write_json(FEATURE_SPEC_FILE, asdict(self))
        return location.url(FEATURE_SPEC_FILE)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSpec":
        """Load from a ``feature_spec.json`` file or the directory (or bucket prefix) holding it."""
        path = str(path)
        if not path.endswith(".json"):
            path = storage.join(path, FEATURE_SPEC_FILE)
        try:
            text = storage.read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no {FEATURE_SPEC_FILE} (was this directory written by preprocess extract?)") from None
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {data.get('format_version')} is not {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def model_fields(self) -> dict[str, Any]:
        """The fields a model depends on; two specs are compatible when these agree."""
        return {
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
            "detector": self.detector,
            "extractor_sha256": self.extractor_sha256,
        }

    def differences(self, other: "FeatureSpec", this_name: str, other_name: str, model_only: bool = False) -> list[str]:
        """``"field: mine vs theirs"`` for each field (``model_only``: of ``model_fields``) that differs.

        The extractor hash is compared only when both specs have one: a spec written before it
        existed is accepted with a warning (once per location), since nothing can verify it.
        """
        mine, theirs = (self.model_fields(), other.model_fields()) if model_only else (asdict(self), asdict(other))
        unhashed = [name for name, spec in ((this_name, self), (other_name, other)) if not spec.extractor_sha256]
        if unhashed:
            warn_unverified(unhashed, this_name, other_name)
            del mine["extractor_sha256"], theirs["extractor_sha256"]
        return [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    def check_compatible(self, other: "FeatureSpec", this_name: str, other_name: str) -> None:
        """Raise ``ValueError`` naming both sides if ``other`` cannot feed a model built for ``self``."""
        diffs = self.differences(other, this_name, other_name, model_only=True)
        if diffs:
            hint = ""
            if len(diffs) == 1 and diffs[0].startswith("extractor_sha256:"):
                hint = (": another network of the same detector (other weights, or batch norms calibrated on other "
                        "images); extract with the same network (detector.calibration_from, docs/preprocess.md)")
            raise ValueError(f"feature spec of {this_name} does not match {other_name} ({'; '.join(diffs)}){hint}")


_warned_unverified: set[str] = set()


def warn_unverified(unhashed: list[str], this_name: str, other_name: str) -> None:
    """Say once per location that a spec without ``extractor_sha256`` cannot be checked."""
    new = [name for name in unhashed if name not in _warned_unverified]
    if new:
        _warned_unverified.update(new)
        logger.warning(
            "feature spec of %s has no extractor_sha256 (written before it existed): cannot verify that %s and %s "
            "come from the same detector network", " and ".join(new), this_name, other_name,
        )


@dataclass
class BatchnormCalibration:
    """Contents of ``batchnorm_calibration.safetensors``: the running statistics a randomly
    initialised detector's batch norms were calibrated to. Loading them instead of calibrating
    again (another input, another thread count or device) builds the same network."""

    stats: dict[str, np.ndarray]  # state-dict name (e.g. backbone.body.bn1.running_mean) -> values
    calibrated_on: str  # "seeded noise" or e.g. "the first 64 images of input shard 00000.tar"
    extractor_sha256: str = ""  # the whole network's hash with these statistics (FeatureSpec's)
    location: str = ""  # where it was loaded from ("" if calibrated in this process); not saved

    def save(self, directory: storage.Location) -> str:
        """Write the file into an extraction's output, atomically; returns its location."""
        from safetensors.numpy import save

        # One metadata entry: safetensors writes several in a random order, and the same calibration
        # must give the same bytes whoever writes it.
        meta = json.dumps({"calibrated_on": self.calibrated_on, "extractor_sha256": self.extractor_sha256}, sort_keys=True)
        directory.write_bytes(CALIBRATION_FILE, save(self.stats, metadata={CALIBRATION_FILE: meta}))
        return directory.url(CALIBRATION_FILE)

    @classmethod
    def load(cls, path: str | Path) -> "BatchnormCalibration":
        """From the file or the extraction output holding it; ``FileNotFoundError`` or a one-line
        ``ValueError`` naming it."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        location = calibration_location(path)
        data = storage.read_bytes(location)
        try:
            stats = load(data)
            # safetensors reads metadata from files only; the header is 8 bytes of length, then JSON.
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            meta = json.loads(header["__metadata__"][CALIBRATION_FILE])
            return cls(stats, meta["calibrated_on"], meta["extractor_sha256"], location)
        except (SafetensorError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{location}: not a batch-norm calibration file ({err.__class__.__name__}: {err})") from None


def region_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised 5-d geometry (x1/W, y1/H, x2/W, y2/H, area/(W*H)) of ``[N, 4]`` pixel boxes."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w, h = float(width), float(height)
    area = (boxes[:, 2] - boxes[:, 0]).clip(min=0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0)
    geom = np.stack(
        [boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h, area / (w * h)], axis=1
    )
    return geom.astype(np.float32)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_feature_sample(
    key: str,
    caption: str,
    metadata_json: bytes,
    image_width: int,
    image_height: int,
    features: np.ndarray,
    boxes: np.ndarray,
    labels: dict[str, np.ndarray],
) -> dict[str, Any]:
    """A webdataset sample dict (member name -> bytes) for ``webdataset.TarWriter``.

    ``labels`` holds ``{"cls_prob": [N, C]}`` or ``{"labels": [N, k], "label_scores": [N, k]}``,
    and optionally the attributes alike (``attr_prob``, or ``attr_labels`` and ``attr_label_scores``).
    """
    n = int(features.shape[0])
    if boxes.shape != (n, 4):
        raise ValueError(f"sample {key}: boxes shape {boxes.shape} does not match {n} features")
    sample = {
        "__key__": key,
        "txt": caption.encode("utf-8"),
        "json": metadata_json,
        "info.json": json.dumps(
            {"image_width": int(image_width), "image_height": int(image_height), "num_boxes": n}
        ).encode("utf-8"),
        "features.npy": _npy(np.ascontiguousarray(features, dtype=np.float16)),
        "boxes.npy": _npy(np.ascontiguousarray(boxes, dtype=np.float32)),
        "geometry.npy": _npy(region_geometry(boxes, image_width, image_height)),
    }
    if "cls_prob" not in labels and "labels" not in labels:
        raise ValueError(f"sample {key}: labels need cls_prob or labels, got {sorted(labels)}")
    for name, values in labels.items():
        dtype = np.int32 if name.endswith("labels") else np.float16  # ids, or probabilities
        sample[f"{name}.npy"] = _npy(np.ascontiguousarray(values, dtype=dtype))
    return sample


@dataclass
class FeatureSample:
    """One decoded feature sample, as later stages use it."""

    key: str
    caption: str
    metadata: dict
    image_width: int
    image_height: int
    features: np.ndarray  # float16 [N, D]
    boxes: np.ndarray  # float32 [N, 4]
    geometry: np.ndarray  # float32 [N, 5]
    cls_prob: np.ndarray  # float32 [N, C], a distribution per region (top-k scattered and renormalised)
    attr_prob: np.ndarray | None = None  # float32 [N, A] likewise, when asked for and the shard has attributes


def decode_feature_sample(sample: dict[str, Any], num_classes: int, num_attributes: int = 0) -> FeatureSample:
    """Decode a raw webdataset sample (member name -> bytes) into a ``FeatureSample``; its
    attribute distribution too when ``num_attributes`` > 0 and the sample has one."""
    key = sample.get("__key__", "?")

    def member(name: str) -> bytes:
        if name not in sample:
            raise ValueError(f"sample {key} in {sample.get('__url__', '?')}: missing member {name}")
        return sample[name]

    def array(name: str) -> np.ndarray:
        try:
            return read_npy(member(name))
        except ValueError as exn:
            raise ValueError(f"sample {key} in {sample.get('__url__', '?')}: member {name}: {exn}") from None

    def distribution(prob: str, ids: str, scores: str, count: int) -> np.ndarray:
        if f"{prob}.npy" in sample:
            return array(f"{prob}.npy").astype(np.float32)
        top, top_scores = array(f"{ids}.npy"), array(f"{scores}.npy").astype(np.float32)
        dense = np.zeros((top.shape[0], count), dtype=np.float32)
        np.put_along_axis(dense, top.astype(np.int64), top_scores, axis=1)
        return dense / np.maximum(dense.sum(axis=1, keepdims=True), 1e-6)

    info = json.loads(member("info.json"))
    cls_prob = distribution("cls_prob", "labels", "label_scores", num_classes)
    has_attributes = "attr_prob.npy" in sample or "attr_labels.npy" in sample
    attr_prob = None
    if num_attributes > 0 and has_attributes:
        attr_prob = distribution("attr_prob", "attr_labels", "attr_label_scores", num_attributes)
    return FeatureSample(
        key=key,
        caption=member("txt").decode("utf-8"),
        metadata=json.loads(sample["json"]) if sample.get("json") else {},
        image_width=int(info["image_width"]),
        image_height=int(info["image_height"]),
        features=array("features.npy"),
        boxes=array("boxes.npy"),
        geometry=array("geometry.npy"),
        cls_prob=cls_prob,
        attr_prob=attr_prob,
    )
