"""The bottom-up attention backend of ``preprocess.detector`` (``backend: butd``), without detectron2.

Runs ``preprocess.butd_model`` (the BUTD Visual Genome Faster R-CNN) on weights in either released
format (``preprocess.butd_weights``), through the shared ``TwoStageDetector.detect``:

* input: the image resized as py-bottom-up-attention does (shorter side to ``min_size`` unless the
  longer would pass ``max_size``, each side rounded, PIL bilinear on the uint8 image), BGR, minus
  the Caffe pixel means;
* regions: BUTD's rule on the RPN proposals themselves, as the original extraction script
  (``generate_tsv.py``) and MILVLG's ``extract_features.py`` do: per-class NMS of the proposal boxes
  over every class's score, each proposal kept at its best surviving class, those reaching
  ``conf_threshold`` kept, ``min_boxes..max_boxes`` (``preprocess.detector.choose_boxes``). The
  regressed per-class boxes are not used for regions (py-bottom-up-attention's notebooks report
  them instead, with features still pooled at the proposals);
* outputs: features, class and attribute distributions from the second pass at the chosen boxes
  (the same boxes, so the same values as the first pass).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from preprocess.butd_model import ButdModel, ButdShape
from preprocess.butd_weights import ButdWeightsError, load_butd_state, read_vocabulary
from preprocess.detector import TwoStageDetector, resolve_device
from preprocess.detector_config import DetectorConfig


class ButdDetector(TwoStageDetector):
    background_index = -1  # py-bottom-up-attention's layout: background last

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        path = str(cfg.weights)
        state, self.weights_format = load_butd_state(path)
        try:
            shape = ButdShape.of(state)
        except KeyError as err:
            raise ButdWeightsError(f"detector.weights {path}: not a BUTD Faster R-CNN checkpoint (no {err.args[0]})") from None
        model = ButdModel(shape)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a shape that does not fit
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
            raise ButdWeightsError(f"detector.weights {path}: {detail}") from None
        if missing or unexpected:
            raise ButdWeightsError(
                f"detector.weights {path} ({self.weights_format} format): missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        self.model = model.requires_grad_(False).to(self.device).eval()
        self.weights = os.path.abspath(path)

        self.num_classes = shape.num_classes - 1
        self.class_names = (
            read_vocabulary(cfg.object_vocab, self.num_classes, "object_vocab")
            if cfg.object_vocab else [f"class_{i}" for i in range(self.num_classes)]
        )
        if cfg.attributes:
            if not shape.num_attributes:
                raise ButdWeightsError(
                    f"detector.attributes: {path} has no attribute head (use the _attr weights, or attributes: false)"
                )
            count = shape.num_attributes - 1
            self.attribute_names = tuple(
                read_vocabulary(cfg.attribute_vocab, count, "attribute_vocab")
                if cfg.attribute_vocab else [f"attribute_{i}" for i in range(count)]
            )
        self.feature_dim = model.feature_dim
        self.given_only = False
        self.label_classes = 0
        depth = 3 * (sum(shape.blocks) + 3) + 2
        self.name = f"butd:R-{depth}-C4"

    def _prepare(self, images, canvas):
        tensors, sizes = [], []
        for image in images:
            resized = torch.from_numpy(reference_resize(image, self.cfg.min_size, self.cfg.max_size))
            bgr = resized.flip(-1).permute(2, 0, 1).to(self.device, torch.float32)
            tensors.append(bgr - self.model.pixel_mean)
            sizes.append((int(resized.shape[0]), int(resized.shape[1])))
        height, width = canvas if canvas is not None else (max(h for h, _ in sizes), max(w for _, w in sizes))
        batch = torch.zeros(len(images), 3, height, width, device=self.device)
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t  # zero after the mean: padding is the mean colour
        return (self._backbone(self.model.backbone, batch), sizes), sizes

    def _propose(self, state):
        features, sizes = state
        return self.model.proposals(features, sizes, self.cfg.butd_proposals)

    def _heads(self, state, boxes):
        features = self.model.region_features(state[0], boxes)
        predictor = self.model.roi_heads.box_predictor
        return features, predictor.cls_score(features), predictor.bbox_pred(features)

    def _class_boxes(self, deltas, boxes):
        # BUTD's regions are the proposals: every class "regresses" to the proposal itself.
        proposals = torch.cat(boxes)
        return proposals[:, None, :].expand(-1, self.num_classes, 4)

    def _attribute_logits(self, features, logits):
        if not self.attribute_names:
            return None
        return self.model.roi_heads.box_predictor.attribute_logits(features, logits)


def reference_resize(image: torch.Tensor, min_size: int, max_size: int) -> np.ndarray:
    """uint8 [3, H, W] RGB -> uint8 [H', W', 3] RGB resized as py-bottom-up-attention's predictor does
    (detectron2's ResizeShortestEdge: the scale from the shorter side, capped by the longer, each
    side rounded half up; PIL bilinear)."""
    h, w = int(image.shape[1]), int(image.shape[2])
    scale = min_size / min(h, w)
    new_h, new_w = (min_size, scale * w) if h < w else (scale * h, min_size)
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    new_h, new_w = max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))
    pixels = image.permute(1, 2, 0).cpu().numpy()
    if (new_h, new_w) == (h, w):
        return np.ascontiguousarray(pixels)
    return np.array(Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BILINEAR))
