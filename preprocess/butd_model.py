"""The bottom-up attention (BUTD) Faster R-CNN of Anderson et al. 2018, in plain torch and torchvision ops.

The Visual Genome detector behind the region features of UNITER, LXMERT, VisualBERT, Oscar and
ImageBERT: a ResNet C4 (ResNet-101 in the released weights) whose stem max-pools Caffe-style
(kernel 3, stride 2, no padding, ceil mode), a region proposal network on res4 (a 512-channel
3x3 conv, 12 anchors per cell: sizes 64..512 x ratios 0.5/1/2, stride 16), ROI max pooling to
14x14, and res5 as the box head with stride 1 and dilation 2 (so res5 keeps 14x14), mean-pooled
to the 2048-d region feature. The box predictor scores 1,600 object classes plus background and
regresses one box per class; the attribute head embeds the most likely class (background
included), concatenates the embedding with the region feature and scores 400 attributes plus
"no attribute".

Parameter names are those of py-bottom-up-attention's detectron2 checkpoint
(``backbone.res4.22.conv2.norm.running_var``, ``roi_heads.box_predictor.cls_embedding.weight``,
...), so that format loads as is; ``preprocess.butd_weights`` maps MILVLG's names onto them.
Batch norms are frozen (an affine transform from the stored statistics), as in both originals.
The network is built from the checkpoint's shapes (blocks per stage, widths, class counts), so
any ResNet depth of this layout loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_pool

# BGR pixel means of the Caffe model; inputs are BGR 0..255 minus these, not scaled.
PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
ANCHOR_SIZES = (64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
FEATURE_STRIDE = 16  # res4
POOL_SIZE = 14
RPN_PRE_NMS_TOPK = 6000
RPN_NMS_THRESHOLD = 0.7
BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the box head's delta scaling (Caffe's BBOX_NORMALIZE_STDS 0.1/0.2)
SCALE_CLAMP = math.log(1000.0 / 16)  # largest log-scale change a delta may make
FROZEN_BN_EPS = 1e-5


@dataclass(frozen=True)
class ButdShape:
    """What the network's size depends on, read from a checkpoint (``ButdShape.of``)."""

    blocks: tuple[int, int, int]  # residual blocks in res2, res3, res4 (3, 4, 23 for ResNet-101)
    stem_channels: int  # 64
    res2_channels: int  # 256 (res3 512, res4 1024, res5 2048)
    bottleneck_channels: int  # 64 in res2, doubling per stage
    rpn_channels: int  # 512
    num_classes: int  # including background (1601)
    num_attributes: int  # including "no attribute" (401); 0: no attribute head
    attribute_embedding: int  # 256
    attribute_hidden: int  # 512

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> "ButdShape":
        """The shape of a state dict in this module's names; KeyError names a missing key."""

        def count(stage: str) -> int:
            return len({k.split(".")[2] for k in state if k.startswith(f"backbone.{stage}.")})

        attr = "roi_heads.box_predictor.attr_score.weight"
        return cls(
            blocks=(count("res2"), count("res3"), count("res4")),
            stem_channels=int(state["backbone.stem.conv1.weight"].shape[0]),
            res2_channels=int(state["backbone.res2.0.conv3.weight"].shape[0]),
            bottleneck_channels=int(state["backbone.res2.0.conv1.weight"].shape[0]),
            rpn_channels=int(state["proposal_generator.rpn_head.conv.weight"].shape[0]),
            num_classes=int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]),
            num_attributes=int(state[attr].shape[0]) if attr in state else 0,
            attribute_embedding=int(state["roi_heads.box_predictor.cls_embedding.weight"].shape[1]) if attr in state else 0,
            attribute_hidden=int(state[attr].shape[1]) if attr in state else 0,
        )


RESNET101 = ButdShape((3, 4, 23), 64, 256, 64, 512, 1601, 401, 256, 512)


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, as in detectron2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + FROZEN_BN_EPS).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by its frozen batch norm (``<conv>.norm.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel - 1) // 2
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck, MSRA style: the stride sits in the first 1x1 convolution."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride) if cin != cout else None
        self.conv1 = ConvNorm(cin, mid, 1, stride=stride)
        self.conv2 = ConvNorm(mid, mid, 3, dilation=dilation)
        self.conv3 = ConvNorm(mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


def stage(blocks: int, cin: int, mid: int, cout: int, stride: int, dilation: int = 1) -> nn.Sequential:
    layers = [Bottleneck(cin, mid, cout, stride=stride, dilation=dilation)]
    layers += [Bottleneck(cout, mid, cout, dilation=dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, channels, 7, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Caffe's pooling: no padding, output size rounded up (detectron2 pads 1 and rounds down;
        # on a 600x1000 input the two grids are offset by a pixel and every feature differs).
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """Stem, res2, res3, res4: the stride-16 feature map the RPN and the ROI pooling read."""

    def __init__(self, shape: ButdShape) -> None:
        super().__init__()
        c, m = shape.res2_channels, shape.bottleneck_channels
        self.stem = Stem(shape.stem_channels)
        self.res2 = stage(shape.blocks[0], shape.stem_channels, m, c, stride=1)
        self.res3 = stage(shape.blocks[1], c, 2 * m, 2 * c, stride=2)
        self.res4 = stage(shape.blocks[2], 2 * c, 4 * m, 4 * c, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


class RpnHead(nn.Module):
    def __init__(self, cin: int, hidden: int, anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class ProposalGenerator(nn.Module):
    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.rpn_head = RpnHead(cin, hidden, len(ANCHOR_SIZES) * len(ANCHOR_RATIOS))


class BoxPredictor(nn.Module):
    """Class scores, per-class box deltas and (optionally) the attribute head."""

    def __init__(self, dim: int, shape: ButdShape) -> None:
        super().__init__()
        self.cls_score = nn.Linear(dim, shape.num_classes)
        self.bbox_pred = nn.Linear(dim, (shape.num_classes - 1) * 4)  # no box for background
        if shape.num_attributes:
            self.cls_embedding = nn.Embedding(shape.num_classes, shape.attribute_embedding)
            self.fc_attr = nn.Linear(dim + shape.attribute_embedding, shape.attribute_hidden)
            self.attr_score = nn.Linear(shape.attribute_hidden, shape.num_attributes)

    def attribute_logits(self, features: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
        # The embedded class is the argmax over ALL classes, background included, as in both originals.
        embedded = self.cls_embedding(class_logits.argmax(dim=1))
        return self.attr_score(F.relu(self.fc_attr(torch.cat([features, embedded], dim=1))))


class RoiHeads(nn.Module):
    def __init__(self, shape: ButdShape) -> None:
        super().__init__()
        c, m = shape.res2_channels, shape.bottleneck_channels
        # BUTD's res5: stride 1 and dilation 2 instead of stride 2 (the 14x14 pool stays 14x14).
        self.res5 = stage(3, 4 * c, 8 * m, 8 * c, stride=1, dilation=2)
        self.box_predictor = BoxPredictor(8 * c, shape)


class ButdModel(nn.Module):
    def __init__(self, shape: ButdShape) -> None:
        super().__init__()
        self.shape = shape
        self.backbone = Backbone(shape)
        self.proposal_generator = ProposalGenerator(4 * shape.res2_channels, shape.rpn_channels)
        self.roi_heads = RoiHeads(shape)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN_BGR).view(3, 1, 1), persistent=False)
        self.register_buffer("cell_anchors", cell_anchors(), persistent=False)

    @property
    def feature_dim(self) -> int:
        return 8 * self.shape.res2_channels

    def proposals(self, features: torch.Tensor, sizes: list[tuple[int, int]], post_nms_topk: int) -> list[torch.Tensor]:
        """RPN proposals per image, [P, 4] in input pixels, by objectness, highest first.

        Per image: the ``RPN_PRE_NMS_TOPK`` best anchors, their boxes clipped to the image
        (unpadded ``sizes``, (H, W)), empty boxes dropped, NMS at 0.7, the first ``post_nms_topk``.
        """
        logits, deltas = self.proposal_generator.rpn_head(features)
        n, a, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)  # location-major, anchor-minor
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        anchors = grid_anchors(self.cell_anchors, h, w)
        out = []
        for i, (ih, iw) in enumerate(sizes):
            scores, order = logits[i].sort(descending=True)
            order, scores = order[:RPN_PRE_NMS_TOPK], scores[:RPN_PRE_NMS_TOPK]
            boxes = apply_deltas(deltas[i, order], anchors[order], (1.0, 1.0, 1.0, 1.0))
            boxes = box_ops.clip_boxes_to_image(boxes, (ih, iw))
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores = boxes[nonempty], scores[nonempty]
            keep = box_ops.nms(boxes, scores, RPN_NMS_THRESHOLD)[:post_nms_topk]
            out.append(boxes[keep])
        return out

    def region_features(self, features: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """ROI max pooling to 14x14 at ``boxes`` (input pixels, per image), res5, mean over the grid."""
        pooled = roi_pool(features, [b.to(features.dtype) for b in boxes], POOL_SIZE, 1.0 / FEATURE_STRIDE)
        return self.roi_heads.res5(pooled).mean(dim=(2, 3))


def cell_anchors() -> torch.Tensor:
    """The 12 anchors of one cell centred on 0: size-major, ratio-minor (h / w = ratio)."""
    anchors = []
    for size in ANCHOR_SIZES:
        for ratio in ANCHOR_RATIOS:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors)


def grid_anchors(cell: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Anchors at every cell of a ``height`` x ``width`` map: [H*W*A, 4], location-major."""
    xs = torch.arange(0, width * FEATURE_STRIDE, FEATURE_STRIDE, dtype=torch.float32, device=cell.device)
    ys = torch.arange(0, height * FEATURE_STRIDE, FEATURE_STRIDE, dtype=torch.float32, device=cell.device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([x.reshape(-1), y.reshape(-1)] * 2, dim=1)
    return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Decode ``deltas`` [N, k*4] (dx, dy, dw, dh) relative to ``boxes`` [N, 4]: [N, k*4] boxes.

    Widths are x2 - x1 (no Caffe "+1"), as in py-bottom-up-attention.
    """
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[:, 3::4] / wh).clamp(max=SCALE_CLAMP)
    cx, cy = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    w, h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.empty_like(deltas)
    out[:, 0::4], out[:, 1::4], out[:, 2::4], out[:, 3::4] = cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h
    return out
