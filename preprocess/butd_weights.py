"""Load the two circulating formats of the BUTD Visual Genome weights into ``preprocess.butd_model``'s names.

* py-bottom-up-attention (airsplay): a detectron2 checkpoint, a pickle ``{"model": {name: numpy
  array}, "__author__": ...}`` (``faster_rcnn_from_caffe.pkl``, ``faster_rcnn_from_caffe_attr.pkl``)
  or the same dict saved with ``torch.save``. Its names and conventions are ours: background is the
  LAST class (and the last attribute), the RPN has one objectness logit per anchor, box deltas are
  scaled by (10, 10, 5, 5) and exist for the foreground classes only.
* bottom-up-attention.pytorch (MILVLG): a ``.pth`` ``{"model": state_dict}``
  (``bua-caffe-frcn-r101-k10-100.pth``, ``...-k36.pth``), names as detectron2 but with Caffe's
  layouts: background FIRST, two RPN logits per anchor (all background logits, then all
  foreground), deltas for all 1,601 classes unscaled, trainable batch norms
  (``num_batches_tracked``), and the attribute head as ``cls_embed`` / ``attr_linear1`` /
  ``attr_linear2``. ``from_milvlg`` rewrites these exactly: softmax over (background, object) equals
  the sigmoid of their difference, and the delta weights fold into the box predictor's rows.

Both files are read from local paths only (never downloaded); a file that is neither format is a
one-line error naming it and the key that is missing.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from preprocess.butd_model import BOX_REG_WEIGHTS

BOX_PREDICTOR = "roi_heads.box_predictor."
RPN_OBJECTNESS = "proposal_generator.rpn_head.objectness_logits."
# MILVLG's attribute head names -> ours.
MILVLG_ATTRIBUTE_NAMES = {"cls_embed": "cls_embedding", "attr_linear1": "fc_attr", "attr_linear2": "attr_score"}


# What a detectron2 pickle of numpy arrays references (numpy < 2 wrote numpy.core, numpy 2 numpy._core).
PICKLE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}


class ButdWeightsError(ValueError):
    """A checkpoint that is not BUTD weights in either format; one line naming the file."""


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else: a pickle can name any callable to run on
    load, and a weights file from the web should not run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are loaded from a .pkl")
        return super().find_class(module, name)


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The raw name -> tensor dict of a ``.pkl`` (detectron2 pickle) or ``.pth``/``.pt`` file."""
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                # The detectron2 model-zoo format is a pickle of numpy arrays (Python 2 era: latin1).
                data = ArrayUnpickler(f, encoding="latin1").load()
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        raise ButdWeightsError(f"detector.weights {path}: cannot read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise ButdWeightsError(f"detector.weights {path}: not a checkpoint dict (got {type(data).__name__})")
    state = {}
    for name, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            state[name] = value.float() if value.is_floating_point() else value
    return state


def is_milvlg(state: dict[str, torch.Tensor]) -> bool:
    """MILVLG's layout: two RPN logits per anchor (py-bottom-up-attention has one)."""
    logits, deltas = state.get(RPN_OBJECTNESS + "weight"), state.get("proposal_generator.rpn_head.anchor_deltas.weight")
    return logits is not None and deltas is not None and 2 * logits.shape[0] == deltas.shape[0]


def background_last(t: torch.Tensor) -> torch.Tensor:
    """Move row 0 (Caffe's background / no-attribute) to the end."""
    return torch.cat([t[1:], t[:1]])


def from_milvlg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MILVLG's names and layouts -> py-bottom-up-attention's (see the module docstring)."""
    out = {}
    for name, value in state.items():
        if name.endswith(".num_batches_tracked"):
            continue
        if name.startswith(BOX_PREDICTOR):
            layer, param = name[len(BOX_PREDICTOR):].split(".", 1)
            name = BOX_PREDICTOR + MILVLG_ATTRIBUTE_NAMES.get(layer, layer) + "." + param
        out[name] = value
    for param in ("weight", "bias"):
        # (background, object) logits per anchor -> one logit: softmax(b, o)[o] = sigmoid(o - b).
        both = out[RPN_OBJECTNESS + param]
        anchors = both.shape[0] // 2
        out[RPN_OBJECTNESS + param] = both[anchors:] - both[:anchors]
        for layer in ("cls_score", "cls_embedding", "attr_score"):
            key = f"{BOX_PREDICTOR}{layer}.{param}"
            if key in out and not (layer == "cls_embedding" and param == "bias"):
                out[key] = background_last(out[key])
        # Drop the background's box and fold (10, 10, 5, 5) into the rows: we divide by it when decoding.
        deltas = out[f"{BOX_PREDICTOR}bbox_pred.{param}"][4:]
        scale = torch.tensor(BOX_REG_WEIGHTS).repeat(deltas.shape[0] // 4)
        out[f"{BOX_PREDICTOR}bbox_pred.{param}"] = deltas * scale.view(-1, *([1] * (deltas.dim() - 1)))
    return out


def load_butd_state(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in ``ButdModel``'s names, "py-bottom-up-attention" or "MILVLG") of a checkpoint file."""
    if not os.path.isfile(path):
        raise ButdWeightsError(f"detector.weights: file {path} does not exist")
    state = read_checkpoint(path)
    fmt = "MILVLG" if is_milvlg(state) else "py-bottom-up-attention"
    needed = ("backbone.stem.conv1.weight", RPN_OBJECTNESS + "weight", BOX_PREDICTOR + "cls_score.weight",
              BOX_PREDICTOR + "bbox_pred.weight", "roi_heads.res5.0.conv1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ButdWeightsError(
            f"detector.weights {path}: not a BUTD Faster R-CNN checkpoint (no {missing[0]}); give "
            "py-bottom-up-attention's .pkl or bottom-up-attention.pytorch's .pth"
        )
    return (from_milvlg(state) if fmt == "MILVLG" else state), fmt


def read_vocabulary(path: str, expected: int, key: str) -> list[str]:
    """Names from a vocabulary file of the BUTD release (``objects_vocab.txt``, ``attributes_vocab.txt``):
    one class per line, synonyms after commas; the first synonym, lower-cased, names the class."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.split(",")[0].strip().lower() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ButdWeightsError(f"detector.{key} {path}: cannot read ({err})") from None
    if len(names) != expected:
        raise ButdWeightsError(f"detector.{key} {path}: {len(names)} names, but the weights have {expected} classes")
    return names
