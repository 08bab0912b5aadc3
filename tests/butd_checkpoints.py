"""Random BUTD checkpoints in the two released formats, with the ORIGINAL parameter names and shapes.

The names and shapes are written out here from the released layouts (py-bottom-up-attention's
detectron2 model with the attribute head; MILVLG's bottom-up-attention.pytorch caffe model), not
taken from ``preprocess.butd_model``, so loading them tests the backend's names and key maps.

``width`` scales every channel count (64: the real ResNet, 2048-d features; smaller widths give
fast test networks of the same layout), ``blocks`` the residual blocks of res2..res4 ((3, 4, 23):
ResNet-101). The values are random but keep activations finite through the deep residual stack
(the last batch norm of each block is small) and give the class head a spread of confidences.
"""

from __future__ import annotations

import pickle

import torch

RESNET101 = (3, 4, 23)
ANCHORS = 12  # 4 sizes x 3 ratios


def original_shapes(fmt: str, *, blocks=RESNET101, width=64, rpn=512, classes=1601, attributes=401) -> dict[str, tuple]:
    """name -> shape of a checkpoint in ``fmt`` ("py-bottom-up-attention" or "MILVLG")."""
    milvlg = fmt == "MILVLG"
    shapes: dict[str, tuple] = {}

    def conv_norm(name: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.norm.{buffer}"] = (cout,)
        if milvlg:  # trainable BatchNorm2d in MILVLG's "BN" norm
            shapes[f"{name}.norm.num_batches_tracked"] = ()

    def stage(prefix: str, count: int, cin: int, mid: int, cout: int) -> None:
        for b in range(count):
            if b == 0:
                conv_norm(f"{prefix}.{b}.shortcut", cout, cin, 1)
            conv_norm(f"{prefix}.{b}.conv1", mid, cin if b == 0 else cout, 1)
            conv_norm(f"{prefix}.{b}.conv2", mid, mid, 3)
            conv_norm(f"{prefix}.{b}.conv3", cout, mid, 1)

    conv_norm("backbone.stem.conv1", width, 3, 7)
    stage("backbone.res2", blocks[0], width, width, 4 * width)
    stage("backbone.res3", blocks[1], 4 * width, 2 * width, 8 * width)
    stage("backbone.res4", blocks[2], 8 * width, 4 * width, 16 * width)
    stage("roi_heads.res5", 3, 16 * width, 8 * width, 32 * width)
    rpn_head = "proposal_generator.rpn_head"
    shapes.update({
        f"{rpn_head}.conv.weight": (rpn, 16 * width, 3, 3), f"{rpn_head}.conv.bias": (rpn,),
        f"{rpn_head}.objectness_logits.weight": ((2 if milvlg else 1) * ANCHORS, rpn, 1, 1),
        f"{rpn_head}.objectness_logits.bias": ((2 if milvlg else 1) * ANCHORS,),
        f"{rpn_head}.anchor_deltas.weight": (4 * ANCHORS, rpn, 1, 1), f"{rpn_head}.anchor_deltas.bias": (4 * ANCHORS,),
    })
    dim, predictor = 32 * width, "roi_heads.box_predictor"
    boxes = classes if milvlg else classes - 1  # MILVLG keeps a box for background
    shapes.update({
        f"{predictor}.cls_score.weight": (classes, dim), f"{predictor}.cls_score.bias": (classes,),
        f"{predictor}.bbox_pred.weight": (4 * boxes, dim), f"{predictor}.bbox_pred.bias": (4 * boxes,),
    })
    if attributes:
        embed, fc, score = ("cls_embed", "attr_linear1", "attr_linear2") if milvlg else ("cls_embedding", "fc_attr", "attr_score")
        shapes.update({
            f"{predictor}.{embed}.weight": (classes, dim // 8),
            f"{predictor}.{fc}.weight": (dim // 4, dim + dim // 8), f"{predictor}.{fc}.bias": (dim // 4,),
            f"{predictor}.{score}.weight": (attributes, dim // 4), f"{predictor}.{score}.bias": (attributes,),
        })
    return shapes


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for ``original_shapes``: He-initialised convs, batch norms near identity
    (the last of each block at 0.1 so 30+ residual blocks stay finite), a class head whose
    confidences vary from region to region."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0, dtype=torch.int64)
        elif name.endswith("norm.running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith(("norm.running_mean", "norm.bias")):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("norm.weight"):
            scale = 0.1 if ".conv3." in name or ".shortcut." in name else 1.0
            state[name] = scale * (0.5 + torch.rand(shape, generator=g))
        elif "anchor_deltas" in name:  # small deltas: proposals near their anchors, not slivers
            fan_in = shape[1] if len(shape) > 1 else 1
            state[name] = 0.01 * torch.randn(shape, generator=g) / fan_in**0.5
        elif len(shape) == 4:  # conv
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif len(shape) == 2 and "cls_score" in name:
            state[name] = torch.randn(shape, generator=g) * (400.0 / shape[1]) ** 0.5
        elif len(shape) == 2:
            state[name] = torch.randn(shape, generator=g) * (1.0 / shape[1]) ** 0.5
        else:
            state[name] = 0.1 * torch.randn(shape, generator=g)
    return state


def write_checkpoint(path, fmt: str, state: dict[str, torch.Tensor]) -> str:
    """Save as the format is distributed: a latin1-loadable pickle of numpy arrays (py-bottom-up-attention's
    ``.pkl``) or a ``torch.save``d ``{"model": state_dict}`` (MILVLG's ``.pth``)."""
    path = str(path)
    if fmt == "MILVLG":
        torch.save({"model": state}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    return path


def write_vocabulary(path, count: int, stem: str) -> str:
    """A vocabulary file as distributed: one class per line, synonyms after commas."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(f"{stem.title()}{i},{stem}{i} alias\n")
    return str(path)
