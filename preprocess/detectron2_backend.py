"""The detectron2 backend of ``preprocess.detector`` (imported only for ``backend: detectron2``).

Runs any detectron2 ``GeneralizedRCNN`` with ``StandardROIHeads`` (FPN configs: box head
features, e.g. 1024-d) or ``Res5ROIHeads`` (C4 configs: res5 output averaged over the 14x14
pool, 2048-d; this is the Visual Genome bottom-up-attention model's layout, 1600 classes).
Only the model's parts are used (backbone, proposal generator, the ROI heads' pooler and
head, the box predictor and its box transform); region choice and the second pass at the
final boxes are the shared ``TwoStageDetector.detect``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList

from preprocess.detector import TwoStageDetector, resolve_device, warn_random_once
from preprocess.detector_config import DetectorConfig


class Detectron2Detector(TwoStageDetector):
    background_index = -1  # detectron2 puts background last

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        d2 = get_cfg()
        # Bottom-up-attention configs carry keys vanilla detectron2 lacks (attribute heads).
        d2.set_new_allowed(True)
        d2.merge_from_file(resolve_config_file(cfg.detectron2_config))
        if cfg.detectron2_overrides:
            try:
                d2.merge_from_list(list(cfg.detectron2_overrides))
            except (KeyError, ValueError, AssertionError) as err:
                raise ValueError(f"detector.detectron2_overrides: {err}") from None
        d2.MODEL.DEVICE = str(self.device)
        d2.MODEL.WEIGHTS = ""  # loaded below, never downloaded
        try:
            model = build_model(d2)
        except KeyError as err:  # an unregistered META_ARCHITECTURE / ROI_HEADS.NAME
            raise ValueError(
                f"detector.detectron2_config {cfg.detectron2_config}: {err}; for bottom-up-attention configs set "
                "detectron2_overrides: [MODEL.ROI_HEADS.NAME, Res5ROIHeads]"
            ) from None
        if cfg.detectron2_weights:
            DetectionCheckpointer(model).load(cfg.detectron2_weights)
            self.weights = os.path.abspath(cfg.detectron2_weights)
        else:
            warn_random_once(f"detectron2:{cfg.detectron2_config}")
            self.weights = "random"
        self.model = model.eval().requires_grad_(False)

        roi = model.roi_heads
        if getattr(model, "proposal_generator", None) is None:
            raise ValueError(f"detector.detectron2_config {cfg.detectron2_config}: needs a model with a proposal generator")
        if hasattr(roi, "box_pooler") and hasattr(roi, "box_head"):
            self.res5 = False
        elif hasattr(roi, "pooler") and hasattr(roi, "res5"):
            self.res5 = True
        else:
            raise ValueError(
                f"detector.detectron2_config {cfg.detectron2_config}: ROI heads {type(roi).__name__} unsupported "
                "(use StandardROIHeads or Res5ROIHeads)"
            )
        if getattr(roi.box_predictor, "use_sigmoid_ce", False):
            raise ValueError("detector.detectron2_config: sigmoid box classifiers are unsupported (need softmax scores)")
        self.given_only = False
        self.label_classes = 0
        self.num_classes = int(roi.num_classes)
        self.feature_dim = int(roi.box_predictor.cls_score.in_features)
        self.class_names = dataset_class_names(d2, self.num_classes)
        self.input_bgr = d2.INPUT.FORMAT == "BGR"
        self.name = f"detectron2:{cfg.detectron2_config}"

    def _prepare(self, images, canvas):
        model = self.model
        # The resize detectron2's DefaultPredictor does, with this config's min/max size.
        resize = ResizeShortestEdge([self.cfg.min_size, self.cfg.min_size], self.cfg.max_size)
        tensors, sizes = [], []
        for image in images:
            hwc = image.permute(1, 2, 0).cpu().numpy()
            if self.input_bgr:
                hwc = hwc[:, :, ::-1]
            resized = resize.get_transform(hwc).apply_image(np.ascontiguousarray(hwc))
            chw = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).to(self.device).float()
            tensors.append((chw - model.pixel_mean) / model.pixel_std)
            sizes.append((int(resized.shape[0]), int(resized.shape[1])))
        image_list = ImageList.from_tensors(tensors, model.backbone.size_divisibility)
        if canvas is not None:
            # Same reason as the torchvision backend: features must not depend on the batch.
            pad_h, pad_w = canvas[0] - image_list.tensor.shape[-2], canvas[1] - image_list.tensor.shape[-1]
            if pad_h < 0 or pad_w < 0:
                raise RuntimeError(f"resized batch {tuple(image_list.tensor.shape[-2:])} exceeds the {canvas} canvas")
            image_list = ImageList(torch.nn.functional.pad(image_list.tensor, (0, pad_w, 0, pad_h)), image_list.image_sizes)
        features = self._backbone(model.backbone, image_list.tensor)
        return (image_list, features), sizes

    def _propose(self, state):
        image_list, features = state
        proposals, _ = self.model.proposal_generator(image_list, features, None)
        return [p.proposal_boxes.tensor for p in proposals]

    def _heads(self, state, boxes):
        _, features = state
        roi = self.model.roi_heads
        boxes = [Boxes(b) for b in boxes]
        if self.res5:
            pooled = roi._shared_roi_transform([features[f] for f in roi.in_features], boxes).mean(dim=[2, 3])
        else:
            pooled = roi.box_head(roi.box_pooler([features[f] for f in roi.box_in_features], boxes)).flatten(1)
        logits, deltas = roi.box_predictor(pooled)
        return pooled, logits, deltas

    def _class_boxes(self, deltas, boxes):
        transform = self.model.roi_heads.box_predictor.box2box_transform
        n = deltas.shape[0]
        class_boxes = transform.apply_deltas(deltas, torch.cat(boxes)).view(n, -1, 4)
        if class_boxes.shape[1] == 1:  # class-agnostic regression
            class_boxes = class_boxes.expand(n, self.num_classes, 4)
        return class_boxes


def resolve_config_file(name: str) -> str:
    """A config file path, or a name from detectron2's model zoo (COCO-Detection/...yaml)."""
    if os.path.isfile(name):
        return name
    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise ValueError(
            f"detector.detectron2_config {name!r}: neither a file nor a detectron2 model-zoo config"
        ) from None


def dataset_class_names(d2_cfg, num_classes: int) -> list[str]:
    """Class names from the config's test dataset metadata (COCO has them), else class_<i>."""
    for dataset in d2_cfg.DATASETS.TEST:
        names = MetadataCatalog.get(dataset).get("thing_classes", None)
        if names and len(names) == num_classes:
            return list(names)
    return [f"class_{i}" for i in range(num_classes)]
