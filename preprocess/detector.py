"""The region detector behind one small interface: images in, top-K regions with features out.

``build_detector(DetectorConfig)`` loads a detector once (the config and its checks live in
``preprocess.detector_config``, free of torch); ``RegionDetector.detect`` runs one
batched forward pass over a list of uint8 RGB images and returns, per image, ``Regions``:
boxes in the pixels of the image it was given, the box head's pooled feature at each box,
the class distribution and a confidence. (Extraction may give it a copy already shrunk to
the detector's input size, and scales the boxes back to the file's pixels:
``preprocess.extract``.) The detector itself resizes its inputs once more, to its own input
size ("detector-input pixels" below); boxes are mapped back before they are returned.

Backends:

* ``torchvision``: a torchvision Faster R-CNN (``model`` names the builder). Region
  selection follows bottom-up attention (Anderson et al. 2018): per-class NMS over the
  class-specific regressed boxes of every proposal, each proposal keeps its best surviving
  class, regions whose confidence reaches ``conf_threshold`` are kept (at most
  ``max_boxes``), and if fewer than ``min_boxes`` pass the list is filled with the next best
  proposals. A detector that yields too few usable proposals (random weights, a 1x1 or a
  uniform image) is filled up with the whole-image box and then the cells of ever finer
  grids (2x2, 3x3, ...), so ``min_boxes`` always holds and no box has zero area.
  Features, class distributions and scores are then computed by a second box-head pass AT
  THE FINAL BOXES, so all four describe the same region.
* ``given_boxes``: the same torchvision model, but the boxes come with the data (no
  detection). They are returned exactly as given, in the given order; ``min_boxes`` does
  not apply. With ``class_names`` set, ``cls_prob`` is the one-hot of the given labels.
* ``detectron2``: see ``preprocess/detectron2_backend.py`` (imported only when asked for).
* ``butd``: the bottom-up attention Visual Genome model without detectron2
  (``preprocess/butd_backend.py``); its regions also carry attribute distributions.

``cls_prob`` EXCLUDES background: the detector's softmax over all classes with the
background column removed and the rest renormalised to sum to 1 (a proper MOC target).
``scores`` is the best non-background probability BEFORE renormalising (so background
mass lowers it): that is the confidence regions are ranked by.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms
from torchvision.ops import boxes as box_ops

from preprocess.detector_config import DetectorConfig
from preprocess.feature_format import BatchnormCalibration
from preprocess.launch_env import native_bf16

logger = logging.getLogger(__name__)

# A detected box narrower or lower than this many DETECTOR-INPUT pixels (after the resize) is
# degenerate and never chosen. Measured after the resize so that selection does not depend on
# the given image's resolution (the same picture at 2x gives the same regions).
MIN_BOX_SIDE = 1.0
# Class scores below this never take part in per-class NMS unless they are a proposal's best
# class: bounds the work at (proposals x 100) pairs even for 1600-class detectors.
PAIR_SCORE_FLOOR = 0.01

_warned_random: set[str] = set()

CalibrationSource = Callable[[], tuple[list[torch.Tensor], str]]


class DetectorError(ValueError):
    """The detector cannot be built as configured (e.g. calibration statistics that do not fit);
    one line naming the key or file."""


@dataclass
class Regions:
    """One image's regions. Detected regions are sorted by ``scores``, highest first; given
    boxes keep the given order."""

    boxes: torch.Tensor  # float32 [N, 4] x1, y1, x2, y2 in the given image's pixels
    features: torch.Tensor  # float32 [N, D] the box head's pooled representation at each box
    cls_prob: torch.Tensor  # float32 [N, C] class distribution, background excluded, rows sum to 1
    scores: torch.Tensor  # float32 [N] best non-background probability (background included in the softmax)
    # float32 [N, A] attribute distribution, "no attribute" excluded, rows sum to 1 (detectors with
    # an attribute head: butd); None otherwise.
    attr_prob: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def topk(self, k: int, attributes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most likely classes (or attributes) per region: (int64 ids [N, k], float32 probs [N, k])."""
        dist = self.attr_prob if attributes else self.cls_prob
        if dist is None:
            raise ValueError("these regions have no attribute distribution")
        probs, ids = dist.topk(min(k, dist.shape[1]), dim=1)
        return ids, probs


class RegionDetector:
    """A loaded detector. Subclasses set the attributes and implement ``detect``."""

    name: str  # e.g. "torchvision:fasterrcnn_resnet50_fpn"; goes in feature_spec.json
    weights: str  # weights path, "torchvision-cache:<weights>" or "random"
    feature_dim: int
    num_classes: int  # without background
    class_names: list[str]
    attribute_names: tuple[str, ...] = ()  # non-empty when ``detect`` fills ``Regions.attr_prob``
    model: torch.nn.Module  # the network that makes the features, all of it
    extractor_sha256: str = ""  # state_sha256(model), set by build_detector once the network is final
    precision: str = "fp32"  # what the backbone computes in ("fp32" | "bf16"), set by build_detector
    calibration: BatchnormCalibration | None = None  # the batch-norm statistics, when calibrated (random init)

    def detect(
        self,
        images: list[torch.Tensor],
        given_boxes: list[torch.Tensor | None] | None = None,
        given_labels: list[torch.Tensor | None] | None = None,
    ) -> list[Regions]:
        """Regions for each image (uint8 [3, H, W] RGB, any sizes): one batched forward pass
        (one per orientation with ``fixed_canvas``).

        ``given_boxes[i]`` (float [K, 4], the given image's pixels) replaces detection for image ``i``.
        """
        raise NotImplementedError


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model``, in name order: name, dtype, shape, bytes.

    Non-persistent buffers too (detectron2's pixel mean and std are not in its state dict but
    change every feature). Equal hashes mean the same network, bit for bit.
    """
    tensors = dict(model.named_buffers())
    tensors.update(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warn_random_once(what: str, note: str = "") -> None:
    """Random weights make meaningless features; say so loudly, but once per process and model."""
    if what not in _warned_random:
        _warned_random.add(what)
        logger.warning(
            "%s: NO pretrained weights found, using RANDOM initialisation%s; regions and features are not "
            "semantic: fine for tests and the quickstart, wrong for real data (set the detector's weights)",
            what,
            f" ({note})" if note else "",
        )


# --- input checks shared by the backends ------------------------------------------------------


def check_detect_inputs(
    images: list[torch.Tensor],
    given_boxes: list[torch.Tensor | None] | None,
    given_labels: list[torch.Tensor | None] | None,
    *,
    require_given: bool,
    label_classes: int,
    max_boxes: int,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Validate a ``detect`` call; returns per-image given boxes (float32 CPU) and labels (int64).

    ``label_classes`` > 0 means given labels are required and must lie in ``[0, label_classes)``.
    """
    if not images:
        raise ValueError("detect: empty image list")
    n = len(images)
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            desc = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"detect: image {i} must be a uint8 [3, H, W] RGB tensor, got {desc}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"detect: image {i} is empty ({tuple(image.shape)})")
    boxes_in = list(given_boxes) if given_boxes is not None else [None] * n
    labels_in = list(given_labels) if given_labels is not None else [None] * n
    if len(boxes_in) != n or len(labels_in) != n:
        raise ValueError(f"detect: {n} images but {len(boxes_in)} given_boxes and {len(labels_in)} given_labels entries")
    boxes_out: list[torch.Tensor | None] = []
    labels_out: list[torch.Tensor | None] = []
    for i, (image, boxes, labels) in enumerate(zip(images, boxes_in, labels_in)):
        if boxes is None:
            if require_given:
                raise ValueError(f"detect: image {i} has no given boxes, but backend given_boxes needs them")
            boxes_out.append(None)
            labels_out.append(None)
            continue
        boxes = torch.as_tensor(boxes).detach().to("cpu", torch.float32)
        h, w = int(image.shape[1]), int(image.shape[2])
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"detect: given boxes of image {i} must be [K, 4], got {tuple(boxes.shape)}")
        if boxes.shape[0] == 0:
            raise ValueError(f"detect: image {i} has zero given boxes")
        if boxes.shape[0] > max_boxes:
            raise ValueError(f"detect: image {i} has {boxes.shape[0]} given boxes, more than detector.max_boxes={max_boxes}")
        bad = ~torch.isfinite(boxes).all(1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        bad |= (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(
                f"detect: image {i} ({w}x{h}) given box {j} {boxes[j].tolist()} is not x1<x2, y1<y2 inside the image"
            )
        boxes_out.append(boxes)
        if label_classes > 0:
            if labels is None:
                raise ValueError(f"detect: image {i} has given boxes but no given labels (detector.class_names is set)")
            labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).reshape(-1)
            if labels.shape[0] != boxes.shape[0]:
                raise ValueError(f"detect: image {i} has {boxes.shape[0]} given boxes but {labels.shape[0]} labels")
            if labels.numel() and (labels.min() < 0 or labels.max() >= label_classes):
                raise ValueError(f"detect: image {i} has a label outside [0, {label_classes}) (detector.class_names)")
        labels_out.append(labels if label_classes > 0 else None)
    return boxes_out, labels_out


# --- geometry and selection shared by the backends --------------------------------------------


def scale_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Map ``[..., 4]`` x1,y1,x2,y2 boxes from an image of size ``from_hw`` (H, W) to ``to_hw``.

    x scales with the width ratio, y with the height ratio. The detector's resize uses one
    scale factor but floors each side, so the two ratios differ (a lot on thin images).
    """
    ratio_h = to_hw[0] / from_hw[0]
    ratio_w = to_hw[1] / from_hw[1]
    scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def canvas_for(height: int, width: int, cfg: DetectorConfig, stride: int = 32) -> tuple[int, int]:
    """The fixed padded (H, W) for an image of this orientation.

    The resize scales by min(min_size / short side, max_size / long side), so a landscape
    image ends up at most min_size high and max_size wide (portrait: the transpose). Two
    canvases instead of one max_size square save ~40% of the backbone's work on 600/1000.
    """
    short, long = -(-cfg.min_size // stride) * stride, -(-cfg.max_size // stride) * stride
    return (short, long) if width >= height else (long, short)


def fallback_boxes(width: int, height: int, count: int) -> torch.Tensor:
    """``count`` boxes: the whole image, then the cells of 2x2, 3x3, ... grids (row-major).

    Used when a detector yields too few usable boxes; every box has positive area, even on a
    1x1 image (cells are then sub-pixel, which ROI align handles by bilinear sampling).
    """
    boxes: list[list[float]] = []
    n = 1
    while len(boxes) < count:
        cw, ch = width / n, height / n
        for row in range(n):
            for col in range(n):
                boxes.append([col * cw, row * ch, (col + 1) * cw, (row + 1) * ch])
        n += 1
    return torch.tensor(boxes[:count], dtype=torch.float32)


def choose_boxes(
    class_boxes: torch.Tensor,
    class_scores: torch.Tensor,
    width: int,
    height: int,
    cfg: DetectorConfig,
    input_pixel: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Pick ``min_boxes..max_boxes`` boxes for one image (bottom-up attention's rule).

    ``class_boxes`` [P, C, 4]: each proposal's class-specific regressed box in the given image's
    pixels, clipped; ``class_scores`` [P, C]: non-background class probabilities; ``input_pixel``:
    the (width, height) of one detector-input pixel in the given image's pixels. Returns [n, 4].
    """
    num_props, num_classes = class_scores.shape
    device = class_scores.device
    sides_ok = ((class_boxes[..., 2] - class_boxes[..., 0]) >= MIN_BOX_SIDE * input_pixel[0]) & (
        (class_boxes[..., 3] - class_boxes[..., 1]) >= MIN_BOX_SIDE * input_pixel[1]
    )
    masked = torch.where(sides_ok, class_scores, torch.full_like(class_scores, -1.0))
    best_score, best_class = masked.max(dim=1)
    usable = best_score >= 0  # proposals with at least one non-degenerate class box
    pair_ok = sides_ok & (class_scores >= PAIR_SCORE_FLOOR)
    usable_idx = usable.nonzero(as_tuple=True)[0]
    pair_ok[usable_idx, best_class[usable_idx]] = True
    prop_idx, cls_idx = pair_ok.nonzero(as_tuple=True)
    pair_boxes, pair_scores = class_boxes[prop_idx, cls_idx], class_scores[prop_idx, cls_idx]
    kept = batched_nms(pair_boxes, pair_scores, cls_idx, cfg.nms_threshold)  # sorted by score, descending
    # Each proposal becomes at most one region: its best class that survived NMS. ``kept`` is
    # sorted by score, so that is the proposal's first entry in it. (Not an index_put with
    # duplicate indices, whose winner PyTorch leaves undefined.)
    kept_props = prop_idx[kept]
    rank = torch.arange(kept.shape[0], device=device)
    first = torch.full((num_props,), kept.shape[0], device=device, dtype=torch.long)
    first = first.scatter_reduce(0, kept_props, rank, reduce="amin")
    survived = first < kept.shape[0]
    conf = torch.full((num_props,), -1.0, device=device)
    survivor_box = torch.zeros(num_props, 4, device=device)
    conf[survived] = pair_scores[kept[first[survived]]]
    survivor_box[survived] = pair_boxes[kept[first[survived]]]

    order = torch.argsort(conf, descending=True, stable=True)
    order = order[survived[order]]
    passing = int((conf[order] >= cfg.conf_threshold).sum())
    take = min(max(passing, cfg.min_boxes), cfg.max_boxes)
    chosen = [survivor_box[order[:take]]]
    count = int(chosen[0].shape[0])
    if count < take:
        # Not enough NMS survivors: next best are suppressed proposals with their best usable box.
        rest = (~survived & usable).nonzero(as_tuple=True)[0]
        rest = rest[torch.argsort(best_score[rest], descending=True, stable=True)][: take - count]
        chosen.append(class_boxes[rest, best_class[rest]])
        count += int(rest.shape[0])
    if count < cfg.min_boxes:
        chosen.append(fallback_boxes(width, height, cfg.min_boxes - count).to(device))
    return torch.cat(chosen).float()


def drop_background(probs: torch.Tensor, background_index: int) -> torch.Tensor:
    """The columns of ``probs`` [N, C+1] other than background (torchvision: 0, detectron2: last)."""
    bg = background_index % probs.shape[1]
    return torch.cat([probs[:, :bg], probs[:, bg + 1 :]], dim=1)


def class_probs(logits: torch.Tensor, background_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls_prob without background, renormalised; score = best non-background probability)."""
    fg = drop_background(torch.softmax(logits.float(), dim=1), background_index)
    scores = fg.max(dim=1).values
    return fg / fg.sum(dim=1, keepdim=True).clamp_min(1e-12), scores


def one_hot_regions(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    cls_prob = torch.nn.functional.one_hot(labels, num_classes).float()
    return cls_prob, torch.ones(labels.shape[0])


# --- the two-stage flow shared by the backends --------------------------------------------------


class TwoStageDetector(RegionDetector):
    """``detect`` for Faster R-CNN-style detectors; backends implement the four hooks.

    One backbone pass over the padded batch; proposals; per-class boxes and scores from the
    box head; ``choose_boxes``; then a second box-head pass AT THE FINAL BOXES, so feature,
    class distribution and box describe one region.
    """

    cfg: DetectorConfig
    device: torch.device
    given_only: bool  # backend given_boxes: every image must come with boxes
    label_classes: int  # > 0: given labels become one-hot cls_prob over this many classes
    background_index: int  # column of the box predictor's logits that is background

    def _backbone(self, backbone: torch.nn.Module, batch: torch.Tensor):
        """``backbone(batch)`` in ``self.precision``, its feature maps (a tensor or a dict of them)
        returned in fp32 for the heads. Every backend's ``_prepare`` runs its backbone through this."""
        if self.precision == "fp32":
            return backbone(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            features = backbone(batch.contiguous(memory_format=torch.channels_last))
        if isinstance(features, torch.Tensor):
            return features.float()
        return type(features)((name, value.float()) for name, value in features.items())

    def _prepare(
        self, images: list[torch.Tensor], canvas: tuple[int, int] | None
    ) -> tuple[object, list[tuple[int, int]]]:
        """Normalise, resize, pad (to ``canvas`` (H, W) when given) and run the backbone:
        (backend state, resized (H, W) per image)."""
        raise NotImplementedError

    def _propose(self, state: object) -> list[torch.Tensor]:
        """Proposals per image, [P, 4] in resized pixels."""
        raise NotImplementedError

    def _heads(self, state: object, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box head at ``boxes`` (resized pixels): (features [N, D], logits [N, C+1], box deltas)."""
        raise NotImplementedError

    def _class_boxes(self, deltas: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Class-specific regressed boxes [N, C, 4] (background excluded), resized pixels."""
        raise NotImplementedError

    def _attribute_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Attribute logits [N, A+1] (last column: no attribute) at the final boxes, from the
        box head's ``features`` and class ``logits``; None for detectors without an attribute head."""
        return None

    @torch.inference_mode()
    def detect(self, images, given_boxes=None, given_labels=None):
        given, labels = check_detect_inputs(
            images, given_boxes, given_labels, require_given=self.given_only,
            label_classes=self.label_classes, max_boxes=self.cfg.max_boxes,
        )
        if not self.cfg.fixed_canvas:
            return self._detect_batch(images, given, labels, canvas=None)
        out: list[Regions | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(canvas_for(image.shape[1], image.shape[2], self.cfg), []).append(i)
        for canvas, idx in groups.items():
            found = self._detect_batch([images[i] for i in idx], [given[i] for i in idx], [labels[i] for i in idx], canvas)
            for i, regions in zip(idx, found):
                out[i] = regions
        return out

    def _detect_batch(self, images, given, labels, canvas: tuple[int, int] | None) -> list[Regions]:
        orig_hw = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        state, sizes = self._prepare(images, canvas)
        final = [g.to(self.device) if g is not None else None for g in given]  # the given image's pixels
        if any(g is None for g in given):
            proposals = self._propose(state)
            props = [p if g is None else p[:0] for p, g in zip(proposals, given)]
            counts = [len(p) for p in props]
            if sum(counts):
                _, logits, deltas = self._heads(state, props)
                class_boxes = self._class_boxes(deltas, props).split(counts)
                fg = drop_background(torch.softmax(logits.float(), dim=1), self.background_index).split(counts)
            for i, g in enumerate(given):
                if g is not None:
                    continue
                (h, w), (rh, rw) = orig_hw[i], sizes[i]
                if counts[i]:
                    cb = box_ops.clip_boxes_to_image(class_boxes[i], (rh, rw))
                    cb = box_ops.clip_boxes_to_image(scale_boxes(cb, (rh, rw), (h, w)), (h, w))
                    scores = fg[i]
                else:
                    cb, scores = torch.zeros(0, 1, 4, device=self.device), torch.zeros(0, 1, device=self.device)
                final[i] = choose_boxes(cb, scores, w, h, self.cfg, input_pixel=(w / rw, h / rh))

        resized = [scale_boxes(final[i], orig_hw[i], sizes[i]) for i in range(len(images))]
        counts = [len(b) for b in resized]
        features, logits, _ = self._heads(state, resized)
        attr_logits = self._attribute_logits(features, logits)
        attrs = attr_logits.split(counts) if attr_logits is not None else [None] * len(counts)
        out = []
        for i, (feat, lg, attr) in enumerate(zip(features.split(counts), logits.split(counts), attrs)):
            cls_prob, scores = class_probs(lg, self.background_index)
            if labels[i] is not None:
                cls_prob, scores = one_hot_regions(labels[i].to(self.device), self.label_classes)
            attr_prob = class_probs(attr, -1)[0] if attr is not None else None
            boxes = final[i].float()
            if given[i] is None:
                order = torch.argsort(scores, descending=True, stable=True)
                boxes, feat, cls_prob, scores = boxes[order], feat[order], cls_prob[order], scores[order]
                attr_prob = attr_prob[order] if attr_prob is not None else None
            tensors = [t.detach().float().cpu() for t in (boxes, feat, cls_prob, scores)]
            out.append(Regions(*tensors, attr_prob=attr_prob.detach().float().cpu() if attr_prob is not None else None))
        return out


def build_detector(
    cfg: DetectorConfig,
    calibration_images: CalibrationSource | None = None,
    calibration: BatchnormCalibration | None = None,
) -> RegionDetector:
    """Load the configured detector once (model weights, eval mode, on ``cfg.device``) and hash it.

    ``calibration_images`` is called only for a randomly initialised torchvision model with
    ``batchnorm_calibration: input``; it returns (uint8 CHW images, where they came from).
    ``calibration``: batch-norm statistics to load instead of calibrating (by default those of
    ``cfg.calibration_from``; ``preprocess extract`` also passes its output's own).
    """
    if calibration is None and cfg.calibration_from:
        calibration = BatchnormCalibration.load(cfg.calibration_from)
    if cfg.backend == "detectron2":
        try:
            import detectron2  # noqa: F401
        except ImportError:
            raise ImportError(
                "detector.backend detectron2 needs detectron2: pip install 'setuptools<81' fvcore iopath pycocotools "
                "omegaconf hydra-core && pip install --no-build-isolation -e <detectron2 checkout> (see docs/detector.md)"
            ) from None
        from preprocess.detectron2_backend import Detectron2Detector

        detector = Detectron2Detector(cfg)
    elif cfg.backend == "butd":
        from preprocess.butd_backend import ButdDetector

        detector = ButdDetector(cfg)
    else:
        from preprocess.torchvision_backend import TorchvisionDetector

        detector = TorchvisionDetector(cfg, calibration_images, calibration)
    detector.extractor_sha256 = state_sha256(detector.model)
    check_calibrated_network(detector)
    detector.precision = choose_backbone_precision(cfg.precision, detector.device)
    if detector.precision == "bf16":
        # Convolutions in bf16 run fastest on channels-last tensors (oneDNN on CPUs, cuDNN's
        # tensor-core kernels); with both, the quickstart's extraction takes 0.59x fp32's time
        # (docs/detector.md).
        detector.model.backbone.to(memory_format=torch.channels_last)
    return detector


def choose_backbone_precision(requested: str, device: torch.device) -> str:
    """``detector.precision`` decided: itself, or for ``auto`` bf16 where ``device`` computes it natively."""
    native = native_bf16(device) if requested != "fp32" else None
    if requested == "bf16" and native is None:
        logger.warning("detector.precision bf16: %s has no native bf16; it is emulated, slower than fp32", device)
    if requested != "auto":
        return requested
    logger.info("detector backbone precision: %s (auto: %s)", "bf16" if native else "fp32", native or "no native bf16 here")
    return "bf16" if native else "fp32"


def check_calibrated_network(detector: RegionDetector) -> None:
    """Loaded statistics must give the network they were saved from; record the hash with them."""
    saved = detector.calibration
    if saved is None:
        return
    if saved.extractor_sha256 and saved.extractor_sha256 != detector.extractor_sha256:
        raise DetectorError(
            f"{saved.location}: these batch-norm statistics belong to network {saved.extractor_sha256}, but with them "
            f"this config builds {detector.extractor_sha256} (another seed, model or torch version?)"
        )
    saved.extractor_sha256 = detector.extractor_sha256
