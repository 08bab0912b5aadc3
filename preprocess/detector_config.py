"""The ``detector:`` section of an extract config (``DetectorConfig``), without torch.

Kept apart from the detector itself (``preprocess.detector``) so that a config is checked, and
a mistake reported, before torch and torchvision are imported. The two checks that used to ask
torch and torchvision compare with constants instead: ``TORCHVISION_FASTER_RCNN_MODELS`` (the
Faster R-CNN builders of torchvision) and ``TORCH_DEVICE_TYPES`` (the device types
``torch.device`` parses); ``tests/test_detector.py`` checks both against the installed versions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from preprocess import storage

BACKENDS = ("torchvision", "detectron2", "given_boxes", "butd")
BATCHNORM_CALIBRATIONS = ("noise", "input")
# How region labels are stored in the feature shards (detector.label_format, FeatureSpec.label_format).
LABEL_FORMATS = ("distribution", "topk")
PRECISIONS = ("auto", "fp32", "bf16")
# torchvision.models.list_models(module=torchvision.models.detection) starting with "fasterrcnn_".
TORCHVISION_FASTER_RCNN_MODELS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
)
# The device types torch.device parses, in the order its error message lists them.
TORCH_DEVICE_TYPES = (
    "cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia", "xla",
    "lazy", "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone",
)
# What torch.device accepts: a device type, optionally ":" and an index without sign or leading zeros.
TORCH_DEVICE = re.compile(rf"(?:{'|'.join(TORCH_DEVICE_TYPES)})(?::(?:0|[1-9][0-9]*))?")
# Where an extraction saves its detector's batch-norm statistics (preprocess.feature_format.BatchnormCalibration).
CALIBRATION_FILE = "batchnorm_calibration.safetensors"


def calibration_location(path: str | Path) -> str:
    """The calibration file named by ``path``: the file itself or the directory (or bucket prefix) holding it."""
    path = str(path)
    return path if path.endswith(".safetensors") else storage.join(path, CALIBRATION_FILE)


@dataclass
class DetectorConfig:
    """The ``detector:`` section of a preprocess config."""

    backend: str = "torchvision"  # "torchvision" | "detectron2" | "given_boxes" | "butd"
    model: str = "fasterrcnn_resnet50_fpn"  # torchvision builder name
    # torchvision: local .pth state_dict; None -> torchvision cache, else random init.
    # butd: the BUTD checkpoint (py-bottom-up-attention's .pkl or MILVLG's .pth); required.
    weights: str | None = None
    min_size: int = 600  # detector resize: shorter side to min_size unless the longer exceeds max_size
    max_size: int = 1000
    min_boxes: int = 10  # bottom-up attention's 10..100 rule
    max_boxes: int = 100
    conf_threshold: float = 0.2
    nms_threshold: float = 0.3
    label_format: str = "distribution"  # or "topk"
    topk: int = 5
    device: str = "auto"  # "auto" -> cuda if available else cpu
    # What the backbone (the image-level trunk, most of the extraction's arithmetic) computes in:
    # "fp32" (the default) as the reference extractors do, so features match those released
    # checkpoints were trained on and are the same on every node; "bf16" under bf16 autocast in
    # channels-last layout (1.7x the quickstart extraction's images/s on an AVX-512 BF16 CPU);
    # "auto": bf16 where the device computes it natively (a GPU with bf16, a CPU with AVX-512
    # BF16 or AMX), else fp32. The RPN, box head, box decoding and NMS stay fp32 either way, so
    # box coordinates are not rounded to bf16. feature_spec.json records what was decided
    # (backbone_precision); a resumed output must keep it.
    precision: str = "fp32"
    # Pad every image to a fixed canvas for its orientation (landscape: min_size x max_size,
    # rounded up to 32; portrait: transposed), one forward pass per orientation present, so
    # features do not depend on batch composition (resume-safe, batch-size independent).
    # false: one pass padded to the batch's largest image; features near borders then vary.
    fixed_canvas: bool = True
    detectron2_config: str | None = None  # config file or model-zoo name (e.g. COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml)
    detectron2_weights: str | None = None  # checkpoint for detectron2; None -> random init
    detectron2_overrides: list[str] = field(default_factory=list)  # detectron2 KEY VALUE pairs (merge_from_list)
    class_names: list[str] = field(default_factory=list)  # given_boxes: class list of the JSON labels
    # butd only: the vocabularies distributed with the weights (objects_vocab.txt: 1,600 lines,
    # attributes_vocab.txt: 400); without them feature_spec.json names classes class_<i>.
    object_vocab: str | None = None
    attribute_vocab: str | None = None
    attributes: bool = False  # butd only: also write each region's attribute distribution
    butd_proposals: int = 300  # butd only: RPN proposals kept after NMS (BUTD's test setting)
    # Random init only (torchvision backends, no weights found): what the backbone's batch norms
    # are calibrated on. "noise": seeded noise images. "input": the first `calibration_images`
    # decodable images of the FIRST input shard, so every worker and every rerun calibrates on
    # the same images and builds the same network. Measured on the synth scenes with
    # fasterrcnn_resnet50_fpn (linear probe of given-box features, 6 colours / 5 shapes): noise
    # 0.71 / 0.33, input 0.98 / 0.87 (docs/detector.md).
    batchnorm_calibration: str = "noise"
    calibration_images: int = 64
    # Load the batch-norm statistics an earlier extraction saved (its output directory or its
    # batchnorm_calibration.safetensors) instead of calibrating: new data then goes through the
    # same network as that extraction (the same extractor_sha256), not one calibrated on itself.
    calibration_from: str | None = None

    def _check_butd(self) -> None:
        butd = self.backend == "butd"
        if butd and self.weights is None:
            raise ValueError("detector.weights is required with backend butd (py-bottom-up-attention's .pkl or MILVLG's .pth)")
        for key in ("object_vocab", "attribute_vocab"):
            path = getattr(self, key)
            if path is not None and not butd:
                raise ValueError(f"detector.{key} only applies to backend butd; remove it or set backend: butd")
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"detector.{key}: file {path} does not exist")
        if self.attributes and not butd:
            raise ValueError("detector.attributes only applies to backend butd (the only detector with an attribute head)")
        if self.butd_proposals < 1:
            raise ValueError(f"detector.butd_proposals must be >= 1, got {self.butd_proposals}")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"detector.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend in ("torchvision", "given_boxes"):
            if self.model not in TORCHVISION_FASTER_RCNN_MODELS:
                raise ValueError(
                    f"detector.model {self.model!r} is not a torchvision Faster R-CNN; use one of {list(TORCHVISION_FASTER_RCNN_MODELS)}"
                )
        if self.weights is not None:
            if self.backend == "detectron2":
                raise ValueError("detector.weights is for torchvision and butd models; set detector.detectron2_weights instead")
            if not os.path.isfile(self.weights):
                raise ValueError(f"detector.weights: file {self.weights} does not exist; give a local checkpoint file or null")
        self._check_butd()
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(
                f"detector.min_size/max_size must satisfy 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}"
            )
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(
                f"detector.min_boxes/max_boxes must satisfy 1 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}"
            )
        if not 0.0 <= self.conf_threshold <= 1.0:
            raise ValueError(f"detector.conf_threshold must be in [0, 1], got {self.conf_threshold}")
        if not 0.0 < self.nms_threshold <= 1.0:
            raise ValueError(f"detector.nms_threshold must be in (0, 1], got {self.nms_threshold}")
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"detector.label_format must be one of {list(LABEL_FORMATS)}, got {self.label_format!r}")
        if self.topk < 1:
            raise ValueError(f"detector.topk must be >= 1, got {self.topk}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"detector.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.device != "auto" and not TORCH_DEVICE.fullmatch(self.device):
            raise ValueError(f"detector.device {self.device!r} is not a torch device; use auto, cpu, cuda or cuda:N")
        if self.backend == "detectron2" and not self.detectron2_config:
            raise ValueError("detector.detectron2_config is required with backend detectron2 (a config file or model-zoo name)")
        if len(self.detectron2_overrides) % 2:
            raise ValueError("detector.detectron2_overrides must be KEY VALUE pairs, e.g. [MODEL.RPN.POST_NMS_TOPK_TEST, 100]")
        if self.detectron2_weights is not None and not os.path.isfile(self.detectron2_weights):
            raise ValueError(f"detector.detectron2_weights: file {self.detectron2_weights} does not exist")
        if self.batchnorm_calibration not in BATCHNORM_CALIBRATIONS:
            raise ValueError(
                f"detector.batchnorm_calibration must be one of {list(BATCHNORM_CALIBRATIONS)}, got {self.batchnorm_calibration!r}"
            )
        if self.calibration_images < 1:
            raise ValueError(f"detector.calibration_images must be >= 1, got {self.calibration_images}")
        if self.calibration_from is not None:
            if self.backend == "detectron2" or self.weights is not None:
                raise ValueError("detector.calibration_from is for randomly initialised torchvision detectors; "
                                 "remove it, or detector.weights / backend detectron2")
            wanted = calibration_location(self.calibration_from)
            # Local files only: a bucket is read (and so checked) when the extraction is planned.
            if not storage.is_remote(wanted) and not os.path.isfile(wanted):
                raise ValueError(f"detector.calibration_from: {wanted} does not exist; give the output directory "
                                 "of an extraction whose batch norms were calibrated, or its calibration file")
        if self.class_names:
            if self.backend != "given_boxes":
                raise ValueError("detector.class_names only applies to backend given_boxes; remove it or set backend: given_boxes")
            if len(set(self.class_names)) != len(self.class_names) or not all(self.class_names):
                raise ValueError("detector.class_names must be non-empty and unique")
