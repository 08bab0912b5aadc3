"""The torchvision Faster R-CNN backend of ``preprocess.detector`` (backends torchvision and given_boxes).

Uses the model's own parts: ``GeneralizedRCNNTransform`` (normalise + resize), backbone, RPN,
``roi_heads.box_roi_pool`` / ``box_head`` / ``box_predictor`` and its box coder; only the
region choice (``preprocess.detector.choose_boxes``) replaces torchvision's postprocessing.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torchvision
from torchvision.models.detection.image_list import ImageList

from preprocess.detector import CalibrationSource, DetectorError, TwoStageDetector, resolve_device, warn_random_once
from preprocess.detector_config import DetectorConfig
from preprocess.feature_format import BatchnormCalibration

BOX_PREDICTOR_KEY = "roi_heads.box_predictor.cls_score.weight"
NOISE = "seeded noise"  # what batch norms calibrated on noise record as their source


class TorchvisionDetector(TwoStageDetector):
    """A torchvision Faster R-CNN; with backend given_boxes it only pools given boxes."""

    background_index = 0  # torchvision puts background first

    def __init__(
        self,
        cfg: DetectorConfig,
        calibration_images: CalibrationSource | None = None,
        calibration: BatchnormCalibration | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        weights_enum = torchvision.models.get_model_weights(cfg.model).DEFAULT
        state, self.weights = load_torchvision_weights(cfg, weights_enum)
        categories = list(weights_enum.meta["categories"])
        num_classes_bg = int(state[BOX_PREDICTOR_KEY].shape[0]) if state is not None else len(categories)
        # weights=None / weights_backbone=None: torchvision never downloads; we load the state below.
        model = torchvision.models.get_model(
            cfg.model, weights=None, weights_backbone=None, num_classes=num_classes_bg,
            min_size=cfg.min_size, max_size=cfg.max_size,
        )
        if state is not None:
            missing, unexpected = model.load_state_dict(state, strict=False)
            # Built without pretrained weights, torchvision uses BatchNorm2d instead of its frozen
            # variant; the only difference in the state dict is num_batches_tracked.
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(
                    f"detector.weights {self.weights}: does not fit {cfg.model} "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        model = model.requires_grad_(False).to(self.device)
        if state is not None:
            if calibration is not None:
                raise DetectorError(
                    f"{calibration.location}: batch-norm statistics for a randomly initialised detector, but this one "
                    f"has the weights {self.weights}; remove detector.calibration_from (or use a fresh --output)"
                )
        else:
            if calibration is not None:
                load_batchnorm_stats(model, calibration, cfg.model)
                self.calibration = calibration
            else:
                self.calibration = calibrate(model, cfg, self.device, calibration_images)
            if self.calibration.calibrated_on != NOISE:
                self.weights = f"random, batch norms calibrated on {self.calibration.calibrated_on}"
        self.model = model.eval()

        detector_names = categories[1:] if len(categories) == num_classes_bg else [
            f"class_{i}" for i in range(1, num_classes_bg)
        ]
        self.given_only = cfg.backend == "given_boxes"
        self.label_classes = len(cfg.class_names) if self.given_only else 0
        self.class_names = list(cfg.class_names) if self.label_classes else detector_names
        self.num_classes = len(self.class_names)
        self.feature_dim = int(self.model.roi_heads.box_predictor.cls_score.in_features)
        self.name = f"given_boxes:{cfg.model}" if self.given_only else f"torchvision:{cfg.model}"
        if self.label_classes:
            self.name += f":onehot{self.label_classes}"

    def _prepare(self, images, canvas):
        model = self.model
        batch = [im.to(self.device).float().div_(255.0) for im in images]
        image_list, _ = model.transform(batch)  # normalise, resize, pad to the batch's largest image
        sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]  # resized, before padding
        if canvas is not None:
            image_list = pad_to_canvas(image_list, canvas)
        feats = self._backbone(model.backbone, image_list.tensors)
        if isinstance(feats, torch.Tensor):
            feats = OrderedDict([("0", feats)])
        # torchvision's ROI pooler infers each level's stride from the largest image HEIGHT in
        # image_shapes; under padding (the canvas, or 32-px rounding of small images) that guess
        # is off by 2x. The padded size, of which the feature maps are exactly 1/stride, makes it
        # right; the pooler uses image_shapes for nothing else.
        pool_shapes = [tuple(image_list.tensors.shape[-2:])] * len(images)
        return (image_list, feats, pool_shapes), sizes

    def _propose(self, state):
        image_list, feats, _ = state
        proposals, _ = self.model.rpn(image_list, feats)
        return proposals

    def _heads(self, state, boxes):
        _, feats, pool_shapes = state
        heads = self.model.roi_heads
        features = heads.box_head(heads.box_roi_pool(feats, boxes, pool_shapes))
        logits, deltas = heads.box_predictor(features)
        return features, logits, deltas

    def _class_boxes(self, deltas, boxes):
        return self.model.roi_heads.box_coder.decode(deltas, boxes)[:, 1:]


def calibrate(
    model, cfg: DetectorConfig, device: torch.device, calibration_images: CalibrationSource | None
) -> BatchnormCalibration:
    """Calibrate a random model's batch norms as ``cfg`` says; returns the statistics for the output."""
    images, source = None, NOISE
    if cfg.batchnorm_calibration == "input":
        if calibration_images is None:
            raise ValueError(
                "detector.batchnorm_calibration: input needs the input's images; "
                "python -m preprocess extract passes them (or set it to noise)"
            )
        images, source = calibration_images()
    calibrate_random_batchnorm(model, min(cfg.max_size, 128), device, images=images)
    return BatchnormCalibration({name: t.cpu().numpy().copy() for name, t in batchnorm_buffers(model).items()}, source)


def backbone_norms(model) -> dict[str, torch.nn.Module]:
    """The backbone's batch norms (the layers calibration sets), by state-dict name."""
    return {
        f"backbone.{name}": m
        for name, m in model.backbone.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }


def batchnorm_buffers(model) -> dict[str, torch.Tensor]:
    """Their running statistics (mean, var, batches seen), by state-dict name."""
    return {f"{prefix}.{key}": buf for prefix, bn in backbone_norms(model).items() for key, buf in bn.named_buffers(recurse=False)}


def load_batchnorm_stats(model, calibration: BatchnormCalibration, model_name: str) -> None:
    """Set the batch norms to saved statistics instead of calibrating; they must fit exactly."""
    own, saved = batchnorm_buffers(model), calibration.stats
    wrong = sorted(set(own) ^ set(saved)) or [n for n in own if tuple(own[n].shape) != saved[n].shape]
    if wrong:
        raise DetectorError(
            f"{calibration.location}: batch-norm statistics of another model than {model_name} ({wrong[0]} does not "
            "fit); give the calibration of an extraction with the same detector.model"
        )
    with torch.no_grad():
        for name, buffer in own.items():
            buffer.copy_(torch.from_numpy(saved[name]))


def calibrate_random_batchnorm(
    model, side: int, device: torch.device, steps: int = 2, images: list[torch.Tensor] | None = None
) -> None:
    """Give a RANDOMLY initialised backbone's batch norms real running statistics.

    Without pretrained weights torchvision builds plain BatchNorm2d with mean 0 / var 1, so in
    eval mode nothing normalises: measured on fasterrcnn_mobilenet_v3_large_320_fpn, activations
    shrink ~20x per stage to ~1e-8 at the FPN, the box head's bias swamps them and EVERY region
    gets the same feature (relative spread 3e-7). Estimating the statistics keeps each layer
    at unit scale. On seeded noise images (fixed generator: every process builds the same
    network) random features still differ with colour and shape; on the input's own
    ``images`` (uint8 CHW, resized like the detector's input) they describe them far better,
    because every layer is then normalised for the statistics it will actually see.
    Pretrained weights never come here.
    """
    norms = list(backbone_norms(model).values())
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    with torch.no_grad():
        if images:
            for start in range(0, len(images), 8):
                chunk = [im.to(device).float().div_(255.0) for im in images[start : start + 8]]
                model.backbone(model.transform(chunk)[0].tensors)
        else:
            generator = torch.Generator().manual_seed(0)
            for _ in range(steps):
                noise = torch.rand(4, 3, side, side, generator=generator).to(device)
                model.backbone(model.transform.normalize(noise))
    for bn in norms:
        bn.eval()


def pad_to_canvas(image_list: ImageList, canvas: tuple[int, int]) -> ImageList:
    """Pad a batch to the fixed ``canvas`` (H, W) (``preprocess.detector.canvas_for``).

    Padding is not neutral: the FPN's biased convs and the batch norms turn the zero pad into
    non-zero activations that reach features near the image border. With a fixed canvas, an
    image's features no longer depend on which images share its batch.
    """
    tensors = image_list.tensors
    pad_h, pad_w = canvas[0] - tensors.shape[-2], canvas[1] - tensors.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise RuntimeError(f"resized batch {tuple(tensors.shape[-2:])} exceeds the {canvas} canvas")
    return ImageList(torch.nn.functional.pad(tensors, (0, pad_w, 0, pad_h)), image_list.image_sizes)


def load_torchvision_weights(cfg: DetectorConfig, weights_enum) -> tuple[dict | None, str]:
    """(state_dict or None, description): the configured file, torchvision's cache, or random."""
    if cfg.weights:
        state = torch.load(cfg.weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or BOX_PREDICTOR_KEY not in state:
            raise ValueError(f"detector.weights {cfg.weights}: not a torchvision Faster R-CNN state_dict")
        return state, os.path.abspath(cfg.weights)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_enum.url))
    if os.path.isfile(cached):
        return torch.load(cached, map_location="cpu", weights_only=True), f"torchvision-cache:{weights_enum}"
    how = f"from {cfg.calibration_from}" if cfg.calibration_from else f"calibrated on {cfg.batchnorm_calibration}"
    warn_random_once(f"torchvision:{cfg.model}", note=f"batch norms {how}")
    return None, "random"
