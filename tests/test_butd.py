"""The BUTD Visual Genome detector without detectron2 (``backend: butd``).

Checkpoints are written by the tests with the original names and shapes of both released formats
(``butd_checkpoints``): the real ResNet-101 shapes for loading, and the same layout at 1/8 width
and fewer blocks for the end-to-end runs (seconds on one core). That the network computes what
py-bottom-up-attention computes was measured once against its own code (docs/detector.md).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from butd_checkpoints import original_shapes, random_state, write_checkpoint, write_vocabulary
from extract_helpers import good_sample, read_features, write_shard
from torchvision.ops import box_iou, nms

from preprocess import extract_cli
from preprocess.butd_model import BOX_REG_WEIGHTS
from preprocess.config import ConfigError, load_config
from preprocess.detector import build_detector
from preprocess.detector_config import DetectorConfig
from preprocess.extract_config import ExtractConfig
from preprocess.feature_format import FeatureSpec, decode_feature_sample

AIRSPLAY, MILVLG = "py-bottom-up-attention", "MILVLG"
SMALL = dict(blocks=(1, 1, 2), width=8, rpn=32)  # 256-d features, all 1,601 classes and 401 attributes
PREDICTOR = "roi_heads.box_predictor."


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def noise_image(height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small airsplay-format checkpoint (with its state) and vocabularies."""
    root = tmp_path_factory.mktemp("butd")
    state = random_state(original_shapes(AIRSPLAY, **SMALL), seed=1)
    return {
        "state": state,
        "pkl": write_checkpoint(root / "small.pkl", AIRSPLAY, state),
        "objects": write_vocabulary(root / "objects_vocab.txt", 1600, "object"),
        "attributes": write_vocabulary(root / "attributes_vocab.txt", 400, "attribute"),
        "root": root,
    }


def detector(weights: str, **overrides):
    cfg = dict(backend="butd", weights=weights, device="cpu", min_size=96, max_size=128, butd_proposals=60, fixed_canvas=False)
    cfg.update(overrides)
    return build_detector(DetectorConfig(**cfg))


@pytest.mark.parametrize("fmt", [AIRSPLAY, MILVLG])
def test_full_size_checkpoints_load_every_key_and_detect(fmt, tmp_path):
    """ResNet-101 with the released shapes (2048-d, 1,601 classes, 401 attributes) in either format:
    no missing or unexpected key (the backend refuses either), each tensor where it belongs, and
    a detection at full size (few proposals, a tiny image)."""
    shapes = original_shapes(fmt)
    state = random_state(shapes, seed=2)
    assert len(state) == (639 if fmt == MILVLG else 535)  # MILVLG: + 104 num_batches_tracked
    path = write_checkpoint(tmp_path / f"full.{'pth' if fmt == MILVLG else 'pkl'}", fmt, state)
    det = detector(path, attributes=True, butd_proposals=4, min_boxes=2, max_boxes=3, min_size=64, max_size=64)
    (tmp_path / path).unlink()  # 250 MB: not left for pytest's last three runs to keep
    assert (det.name, det.feature_dim, det.num_classes, len(det.attribute_names)) == ("butd:R-101-C4", 2048, 1600, 400)
    assert det.weights_format == fmt
    own = det.model.state_dict()
    assert len(own) == 535
    for name in ("backbone.stem.conv1.weight", "backbone.res4.22.conv2.norm.running_var", "roi_heads.res5.2.conv3.weight"):
        torch.testing.assert_close(own[name], state[name], rtol=0, atol=0)
    if fmt == MILVLG:  # Caffe's background-first rows moved last; the background box dropped
        torch.testing.assert_close(own[PREDICTOR + "cls_score.weight"][-1], state[PREDICTOR + "cls_score.weight"][0])
        torch.testing.assert_close(own[PREDICTOR + "cls_embedding.weight"][:-1], state[PREDICTOR + "cls_embed.weight"][1:])
        torch.testing.assert_close(own[PREDICTOR + "attr_score.bias"][-1], state[PREDICTOR + "attr_linear2.bias"][0])
        torch.testing.assert_close(own[PREDICTOR + "fc_attr.weight"], state[PREDICTOR + "attr_linear1.weight"])
    else:
        for name, value in state.items():
            torch.testing.assert_close(own[name], value, rtol=0, atol=0, msg=name)
    (regions,) = det.detect([noise_image(48, 64, seed=3)])
    assert 2 <= len(regions) <= 3 and regions.features.shape == (len(regions), 2048)
    assert regions.attr_prob.shape == (len(regions), 400) and torch.isfinite(regions.features).all()


def to_milvlg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same network in MILVLG's layout (the inverse of the backend's key map, written out here)."""
    out = {}
    for name, value in state.items():
        if name.endswith(".norm.running_var"):
            out[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
        for ours, theirs in (("cls_embedding", "cls_embed"), ("fc_attr", "attr_linear1"), ("attr_score", "attr_linear2")):
            name = name.replace(f"{PREDICTOR}{ours}.", f"{PREDICTOR}{theirs}.")
        if any(name.startswith(PREDICTOR + layer) for layer in ("cls_score", "cls_embed.", "attr_linear2")):
            value = torch.cat([value[-1:], value[:-1]])  # background first
        if name.startswith("proposal_generator.rpn_head.objectness_logits"):
            value = torch.cat([torch.zeros_like(value), value])  # background logits 0, then the objects'
        if name.startswith(PREDICTOR + "bbox_pred"):
            scale = torch.tensor(BOX_REG_WEIGHTS).repeat(value.shape[0] // 4).view(-1, *([1] * (value.dim() - 1)))
            value = torch.cat([torch.zeros_like(value[:4]), value / scale])  # a background box, unscaled deltas
        out[name] = value
    return out


def test_both_formats_of_one_network_detect_the_same(small):
    milvlg = write_checkpoint(small["root"] / "small-milvlg.pth", MILVLG, to_milvlg(small["state"]))
    images = [noise_image(70, 120, seed=4), noise_image(100, 60, seed=5)]
    a = detector(small["pkl"], attributes=True).detect(images)
    b = detector(milvlg, attributes=True).detect(images)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb) >= 10
        torch.testing.assert_close(rb.boxes, ra.boxes, rtol=0, atol=1e-4)
        for field in ("features", "cls_prob", "attr_prob", "scores"):
            torch.testing.assert_close(getattr(rb, field), getattr(ra, field), rtol=1e-4, atol=1e-5, msg=field)


def butd_rule(proposals: torch.Tensor, probs: torch.Tensor, conf: float, lo: int, hi: int) -> torch.Tensor:
    """The original rule as MILVLG's save_roi_features writes it: per-class NMS (0.3) of the
    proposals over every class's score, a proposal's confidence is its best surviving score."""
    max_conf = torch.zeros(len(proposals))
    for c in range(probs.shape[1]):
        keep = nms(proposals, probs[:, c], 0.3)
        max_conf[keep] = torch.maximum(max_conf[keep], probs[keep, c])
    keep = (max_conf >= conf).nonzero().flatten()
    if not lo <= len(keep) <= hi:
        keep = max_conf.argsort(descending=True)[: max(lo, min(hi, len(keep)))]
    return keep


@pytest.mark.parametrize("limits", [(5, 100), (36, 36), (2, 5)], ids=["threshold-5-100", "fixed-36", "capped-2-5"])
def test_regions_are_the_proposals_butd_keeps(small, limits):
    lo, hi = limits
    det = detector(small["pkl"], min_boxes=lo, max_boxes=hi)
    image = noise_image(70, 120, seed=6)
    with torch.inference_mode():
        state, ((h, w),) = det._prepare([image], None)
        (proposals,) = det._propose(state)
        _, logits, _ = det._heads(state, [proposals])
    probs = torch.softmax(logits, dim=1)[:, :-1]
    # The one deliberate difference: proposals under one input pixel wide or high are never
    # regions (the RPN can keep clipped slivers; the script could pick one to fill up to min_boxes).
    usable = ((proposals[:, 2:] - proposals[:, :2]) >= 1.0).all(dim=1)
    proposals, probs = proposals[usable], probs[usable]
    keep = butd_rule(proposals, probs, 0.2, lo, hi)
    (regions,) = det.detect([image])
    expected = proposals[keep] * torch.tensor([120 / w, 70 / h] * 2)
    assert len(regions) == len(keep)
    # Same set; the backend orders by confidence, the script by proposal index.
    match = box_iou(regions.boxes, expected)
    assert (match.max(dim=1).values > 0.9999).all() and (match.max(dim=0).values > 0.9999).all()
    torch.testing.assert_close(regions.scores, probs[keep].max(dim=1).values.sort(descending=True).values, rtol=1e-4, atol=1e-6)
    if limits == (5, 100):  # this image's count comes from the threshold, not from a limit
        assert 5 < int((regions.scores >= 0.2).sum()) == len(regions) < 100


def test_attribute_and_class_heads_match_the_checkpoint(small):
    """cls_prob and attr_prob recomputed from the checkpoint's tensors at the returned features:
    the attribute head embeds the argmax over all 1,601 classes (background included)."""
    (regions,) = detector(small["pkl"], attributes=True).detect([noise_image(90, 110, seed=7)])
    s = {k[len(PREDICTOR):]: v for k, v in small["state"].items() if k.startswith(PREDICTOR)}
    logits = regions.features @ s["cls_score.weight"].T + s["cls_score.bias"]
    probs = torch.softmax(logits, 1)[:, :-1]
    torch.testing.assert_close(regions.cls_prob, probs / probs.sum(1, keepdim=True), rtol=1e-4, atol=1e-6)
    hidden = torch.cat([regions.features, s["cls_embedding.weight"][logits.argmax(1)]], 1) @ s["fc_attr.weight"].T
    attr = torch.softmax(torch.relu(hidden + s["fc_attr.bias"]) @ s["attr_score.weight"].T + s["attr_score.bias"], 1)[:, :-1]
    torch.testing.assert_close(regions.attr_prob, attr / attr.sum(1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_given_boxes_are_pooled_where_given(small):
    det = detector(small["pkl"])
    image = noise_image(80, 100, seed=8)
    (detected,) = det.detect([image])
    (again,) = det.detect([image], given_boxes=[detected.boxes.flip(0)])
    torch.testing.assert_close(again.features, detected.features.flip(0), rtol=1e-4, atol=1e-5)


def test_fixed_canvas_features_do_not_depend_on_the_batch(small):
    det = detector(small["pkl"], fixed_canvas=True, attributes=True)
    landscape, portrait, other = noise_image(70, 120, seed=9), noise_image(110, 60, seed=10), noise_image(40, 128, seed=11)
    alone = det.detect([landscape])[0]
    batched = det.detect([other, landscape, portrait])
    assert batched[2].boxes.shape[0] >= 10
    torch.testing.assert_close(batched[1].boxes, alone.boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(batched[1].features, alone.features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1].attr_prob, alone.attr_prob, rtol=1e-5, atol=1e-6)


def extract(small, tmp_path, *options: str) -> tuple[FeatureSpec, dict]:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_shard(raw / "00000.tar", [good_sample(f"k{i}", seed=i, width=120, height=90) for i in range(3)])
    out = tmp_path / "out"
    args = ["--config", "configs/preprocess/butd-vg.yaml", "--input", str(raw / "00000.tar"), "--output", str(out),
            f"detector.weights={small['pkl']}", f"detector.object_vocab={small['objects']}",
            f"detector.attribute_vocab={small['attributes']}", "detector.min_size=96", "detector.max_size=128",
            "detector.butd_proposals=60", "detector.device=cpu", "num_workers=0", "progress=false", "torch_threads=1",
            *options]
    assert extract_cli.cli(args) == 0
    return FeatureSpec.load(out), read_features(out)


@pytest.mark.parametrize("boxes", ["adaptive", "fixed36"])
def test_extraction_with_the_preset(small, tmp_path, boxes):
    """The preset end to end (adaptive 10-100 as configured, or fixed 36): top-k classes and
    attributes in the shards, names from the vocabulary files."""
    options = ["detector.min_boxes=36", "detector.max_boxes=36"] if boxes == "fixed36" else []
    spec, samples = extract(small, tmp_path, *options)
    assert spec.detector == "butd:R-23-C4" and spec.feature_dim == 256 and spec.num_classes == 1600
    assert spec.class_names[:2] == ["object0", "object1"] and spec.attribute_names[-1] == "attribute399"
    assert (spec.min_boxes, spec.max_boxes, spec.label_format, spec.topk) == ((36, 36, "topk", 10) if options else (10, 100, "topk", 10))
    assert sorted(samples) == ["k0", "k1", "k2"]
    for sample in samples.values():
        n = sample["info.json"]["num_boxes"]
        assert n == 36 if options else 10 <= n <= 100
        assert sample["features.npy"].shape == (n, 256) and sample["boxes.npy"].shape == (n, 4)
        assert sample["labels.npy"].shape == sample["attr_labels.npy"].shape == (n, 10)
        assert sample["attr_labels.npy"].max() < 400 and (np.diff(sample["attr_label_scores.npy"], axis=1) <= 0).all()
    # Raw members decode with the project's reader, attributes included.
    tar = sorted((tmp_path / "out").glob("*.tar"))[0]
    raw = next(iter(wds.WebDataset(str(tar), shardshuffle=False)))
    decoded = decode_feature_sample(raw, spec.num_classes, len(spec.attribute_names))
    assert decoded.attr_prob.shape == (decoded.boxes.shape[0], 400)
    np.testing.assert_allclose(decoded.attr_prob.sum(1), 1.0, rtol=1e-3)


def test_extraction_with_full_distributions(small, tmp_path):
    _, samples = extract(small, tmp_path, "detector.label_format=distribution", "detector.min_boxes=2", "detector.max_boxes=4")
    for sample in samples.values():
        n = sample["features.npy"].shape[0]
        assert sample["cls_prob.npy"].shape == (n, 1600) and sample["attr_prob.npy"].shape == (n, 400)
        np.testing.assert_allclose(sample["attr_prob.npy"].astype(np.float32).sum(1), 1.0, rtol=2e-3)


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(ExtractConfig, "configs/preprocess/butd-vg.yaml", list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_preset_needs_weights_and_existing_vocabularies(small):
    assert "detector.weights is required with backend butd" in config_error()
    assert "detector.object_vocab: file /nowhere.txt does not exist" in config_error(
        f"detector.weights={small['pkl']}", "detector.object_vocab=/nowhere.txt")
    assert "detector.attributes only applies to backend butd" in config_error(
        "detector.backend=torchvision", "detector.object_vocab=null", "detector.attribute_vocab=null")


def test_bad_weights_and_vocabularies_are_one_line_errors(small, tmp_path):
    no_attributes = {k: v for k, v in small["state"].items() if not k.startswith((PREDICTOR + "cls_emb", PREDICTOR + "fc_attr", PREDICTOR + "attr"))}
    plain = write_checkpoint(tmp_path / "plain.pkl", AIRSPLAY, no_attributes)
    assert detector(plain).attribute_names == ()
    cases = [
        (dict(weights=plain, attributes=True), "has no attribute head"),
        (dict(weights=small["pkl"], object_vocab=small["attributes"]), "400 names, but the weights have 1600 classes"),
        (dict(weights=write_checkpoint(tmp_path / "tv.pkl", AIRSPLAY, {"backbone.body.conv1.weight": torch.zeros(1)})),
         "not a BUTD Faster R-CNN checkpoint (no backbone.stem.conv1.weight)"),
    ]
    broken = dict(small["state"])
    broken[PREDICTOR + "cls_score.weight"] = broken[PREDICTOR + "cls_score.weight"][:, :5]
    cases.append((dict(weights=write_checkpoint(tmp_path / "broken.pkl", AIRSPLAY, broken)), "size mismatch for roi_heads.box_predictor.cls_score.weight"))
    extra = dict(small["state"], **{"roi_heads.mask_head.weight": torch.zeros(2)})
    cases.append((dict(weights=write_checkpoint(tmp_path / "extra.pkl", AIRSPLAY, extra)), "unexpected ['roi_heads.mask_head.weight']"))
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    cases.append((dict(weights=str(tmp_path / "junk.pkl")), "cannot read"))
    # A pickle may name any callable to run on load; only numpy arrays are let through.
    (tmp_path / "code.pkl").write_bytes(pickle.dumps({"model": {"x": Path("/etc")}}))
    cases.append((dict(weights=str(tmp_path / "code.pkl")), "refusing pathlib"))
    for overrides, message in cases:
        with pytest.raises(ValueError) as err:
            detector(**overrides)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
