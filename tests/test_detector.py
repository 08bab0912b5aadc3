"""The region detector: box mapping, given boxes, batching, box limits, config errors.

Real torchvision Faster R-CNN (ResNet-50 FPN, random weights, no downloads) on tiny images.
Random mobilenet weights are avoided on purpose: its random features barely depend on the
input, so feature comparisons against it would pass even with broken box mapping.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

from preprocess.config import ConfigError, load_config
from preprocess.detector import (
    RegionDetector,
    Regions,
    build_detector,
    canvas_for,
    choose_boxes,
    fallback_boxes,
    state_sha256,
)
from preprocess.detector_config import TORCH_DEVICE, TORCH_DEVICE_TYPES, TORCHVISION_FASTER_RCNN_MODELS, DetectorConfig
from preprocess.feature_format import region_geometry
from torchvision.ops import box_iou, roi_align

MODEL = "fasterrcnn_resnet50_fpn"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make_detector(**overrides) -> RegionDetector:
    """Detectors are stateless after loading, so tests share one per configuration."""
    return _cached_detector(tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _cached_detector(overrides: tuple) -> RegionDetector:
    torch.manual_seed(0)
    cfg = dict(model=MODEL, min_size=128, max_size=200, device="cpu", min_boxes=10, max_boxes=100)
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides})
    return build_detector(DetectorConfig(**cfg))


def noise_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


def assert_valid_regions(regions: Regions, image: torch.Tensor, lo: int, hi: int, dim: int, classes: int) -> None:
    h, w = image.shape[1:]
    n = len(regions)
    assert lo <= n <= hi
    assert regions.boxes.shape == (n, 4) and regions.boxes.dtype == torch.float32
    assert regions.features.shape == (n, dim) and torch.isfinite(regions.features).all()
    assert regions.cls_prob.shape == (n, classes) and regions.scores.shape == (n,)
    torch.testing.assert_close(regions.cls_prob.sum(1), torch.ones(n), rtol=0, atol=1e-5)
    x1, y1, x2, y2 = regions.boxes.unbind(1)
    assert (x2 > x1).all() and (y2 > y1).all(), "zero-area box"
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all(), "box outside the image"


def test_given_boxes_are_returned_exactly_on_non_square_image():
    det = make_detector(backend="given_boxes")
    image = noise_image(70, 150)  # H=70, W=150
    boxes = torch.tensor([[100.5, 3.25, 149.0, 60.0], [0.0, 0.0, 150.0, 70.0], [10.0, 20.0, 30.0, 69.5]])
    (regions,) = det.detect([image], given_boxes=[boxes])
    assert torch.equal(regions.boxes, boxes)  # same order, same values, not re-sorted
    assert_valid_regions(regions, image, 3, 3, det.feature_dim, det.num_classes)
    geom = region_geometry(regions.boxes.numpy(), width=150, height=70)
    np.testing.assert_allclose(geom[0], [100.5 / 150, 3.25 / 70, 149.0 / 150, 60.0 / 70, 48.5 * 56.75 / (150 * 70)], rtol=1e-6)
    np.testing.assert_allclose(geom[1], [0, 0, 1, 1, 1], rtol=1e-6)
    assert det.name == f"given_boxes:{MODEL}"


def test_given_box_features_equal_manual_roi_pool_at_correctly_scaled_box():
    # A 7x160 image resized with min_size 64 / max_size 80 becomes 3x80: width ratio 0.5 but
    # height ratio 3/7 (the resize floors each side), so mapping x with the height ratio (or
    # the ratios inverted) pools a visibly different region.
    det = make_detector(backend="given_boxes", min_size=64, max_size=80)
    image = noise_image(7, 160, seed=3)
    boxes = torch.tensor([[40.0, 0.0, 120.0, 7.0], [0.0, 0.0, 160.0, 7.0], [100.0, 2.0, 160.0, 5.0]])
    (regions,) = det.detect([image], given_boxes=[boxes])

    model = det.model
    with torch.inference_mode():
        image_list, _ = model.transform([image.float() / 255])
        (h2, w2) = image_list.image_sizes[0]
        assert (h2, w2) == (3, 80)
        padded = torch.zeros(1, 3, 64, 96)  # the landscape canvas: (64, 80) rounded up to multiples of 32
        padded[..., :h2, :w2] = image_list.tensors[..., :h2, :w2]
        finest = model.backbone(padded)["0"]  # stride 4; all three boxes are small enough for this FPN level

        def pooled(scale: torch.Tensor) -> torch.Tensor:
            crops = roi_align(finest, [boxes * scale], output_size=7, spatial_scale=0.25, sampling_ratio=2)
            return model.roi_heads.box_head(crops)

        right = pooled(torch.tensor([w2 / 160, h2 / 7, w2 / 160, h2 / 7]))
        swapped = pooled(torch.tensor([h2 / 7, w2 / 160, h2 / 7, w2 / 160]))
        inverted = pooled(torch.tensor([160 / w2, 7 / h2, 160 / w2, 7 / h2]))
    torch.testing.assert_close(regions.features, right, rtol=1e-5, atol=1e-5)
    scale = right.abs().max()
    assert (regions.features - swapped).abs().max() > 1e-3 * scale, "test cannot tell swapped ratios apart"
    assert (regions.features - inverted).abs().max() > 1e-3 * scale, "test cannot tell inverted ratios apart"


def test_detections_on_2x_image_are_2x_boxes():
    # With min_size = 60, the 60x100 image is not resized and its nearest-neighbour 2x copy is
    # bilinearly halved back to exactly the same pixels, so the detector sees identical inputs
    # and the only difference must be the mapping back to original pixels.
    det = make_detector(min_size=60, max_size=100, min_boxes=5, max_boxes=30)
    small = noise_image(60, 100, seed=5)
    large = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    r_small, r_large = det.detect([small, large])
    assert len(r_small) == len(r_large) >= 5
    torch.testing.assert_close(r_large.boxes, 2 * r_small.boxes, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(r_large.features, r_small.features, rtol=1e-4, atol=1e-4)
    assert r_small.boxes.max() > 2, "degenerate boxes would make this test trivial"


def test_detected_features_describe_the_returned_boxes():
    # Features come from a second pass at the final boxes: pooling the returned boxes again
    # as given boxes must reproduce them (also checks detect's box mapping against given mode's).
    det = make_detector(min_boxes=5, max_boxes=20)
    image = noise_image(90, 160, seed=7)
    (detected,) = det.detect([image])
    (again,) = det.detect([image], given_boxes=[detected.boxes])
    torch.testing.assert_close(again.features, detected.features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again.cls_prob, detected.cls_prob, rtol=1e-4, atol=1e-5)
    assert (detected.scores[:-1] >= detected.scores[1:]).all(), "detected regions must be sorted by score"


def test_batched_equals_one_at_a_time():
    # The fixed canvas makes a batch the same computation per image as a batch of one; what is
    # left is float rounding from kernels chosen per batch size (measured on CPU: feature maps
    # differ by <1e-4 absolute, only in the coarsest FPN level). Hence:
    # * pooling given boxes: features agree within 1e-4 of their largest magnitude;
    # * detection: NMS and thresholds are discontinuous, so rounding can swap a near-tied
    #   region. At least 80% of regions must match (IoU > 0.99), with features within 1e-4.
    # Without the canvas features differ by >1% (last block), so this test has teeth.
    images = [noise_image(90, 160, 1), noise_image(150, 70, 2), noise_image(40, 40, 3)]
    boxes = [
        torch.tensor([[0.0, 0.0, 160.0, 90.0], [100.0, 40.0, 160.0, 90.0]]),
        torch.tensor([[0.0, 0.0, 70.0, 150.0], [10.0, 100.0, 70.0, 150.0]]),
        torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 20.0, 40.0, 40.0]]),
    ]
    pooler = make_detector(backend="given_boxes")
    for image, image_boxes, together in zip(images, boxes, pooler.detect(images, given_boxes=boxes)):
        (alone,) = pooler.detect([image], given_boxes=[image_boxes])
        tol = 1e-4 * alone.features.abs().max().item()
        torch.testing.assert_close(together.features, alone.features, rtol=0, atol=tol)
        torch.testing.assert_close(together.cls_prob, alone.cls_prob, rtol=0, atol=1e-5)

    det = make_detector(min_boxes=5, max_boxes=20)
    for image, together in zip(images, det.detect(images)):
        (alone,) = det.detect([image])
        iou, match = box_iou(together.boxes, alone.boxes).max(dim=1)
        matched = iou > 0.99
        assert matched.float().mean() >= 0.8, f"only {int(matched.sum())}/{len(together)} regions match"
        tol = 1e-4 * alone.features.abs().max().item()
        torch.testing.assert_close(together.features[matched], alone.features[match[matched]], rtol=0, atol=tol)

    loose = make_detector(backend="given_boxes", fixed_canvas=False)
    (together, _, _) = loose.detect(images, given_boxes=boxes)
    (alone,) = loose.detect(images[:1], given_boxes=boxes[:1])
    assert (together.features - alone.features).abs().max() > 1e-2 * alone.features.abs().max()


def test_bf16_backbone_keeps_the_network_and_feeds_the_heads_fp32():
    """detector.precision bf16: the same network (hash) with its backbone in channels-last
    layout, features near fp32's (bf16 keeps 8 bits of mantissa: measured per-region cosine
    0.998-0.9999 here), and feature maps handed to the RPN and box head in fp32, so box decoding
    and NMS compute in fp32. bf16 is emulated where the CPU lacks it: slower, the same numbers."""
    images = [noise_image(90, 160, 1), noise_image(150, 70, 2)]
    boxes = [torch.tensor([[0.0, 0.0, 160.0, 90.0], [100.0, 40.0, 160.0, 90.0]]),
             torch.tensor([[0.0, 0.0, 70.0, 150.0], [10.0, 100.0, 70.0, 150.0]])]
    fp32 = make_detector(backend="given_boxes")
    bf16 = make_detector(backend="given_boxes", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert bf16.extractor_sha256 == fp32.extractor_sha256
    conv = bf16.model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for a, b in zip(fp32.detect(images, given_boxes=boxes), bf16.detect(images, given_boxes=boxes)):
        assert b.features.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(a.features, b.features, dim=1)
        assert cosine.min() > 0.99 and not torch.equal(a.features, b.features), cosine
    (_, feature_maps, _), _ = bf16._prepare(images[:1], canvas=None)
    assert {m.dtype for m in feature_maps.values()} == {torch.float32}
    detector = make_detector(min_boxes=5, max_boxes=20, precision="bf16")
    (detected,) = detector.detect(images[:1])
    assert_valid_regions(detected, images[0], 5, 20, detector.feature_dim, detector.num_classes)


def test_precision_auto_is_bf16_only_where_the_device_computes_it(monkeypatch, caplog):
    from preprocess import launch_env
    from preprocess.detector import choose_backbone_precision

    cpu = torch.device("cpu")
    assert choose_backbone_precision("fp32", cpu) == "fp32" and choose_backbone_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(launch_env, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert choose_backbone_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(launch_env, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with caplog.at_level("INFO", logger="preprocess.detector"):
        assert choose_backbone_precision("auto", cpu) == "bf16"
    assert "detector backbone precision: bf16 (auto: a CPU with avx512_bf16)" in caplog.text


def test_canvas_depends_only_on_orientation():
    cfg = DetectorConfig(min_size=600, max_size=1000, device="cpu")
    assert canvas_for(480, 640, cfg) == canvas_for(600, 600, cfg) == (608, 1024)
    assert canvas_for(1000, 20, cfg) == (1024, 608)


@pytest.mark.parametrize("size", [(1, 1), (64, 64), (90, 160)], ids=["1x1", "uniform", "noise"])
def test_min_and_max_boxes_hold(size):
    h, w = size
    image = noise_image(h, w) if size == (90, 160) else torch.full((3, h, w), 128, dtype=torch.uint8)
    det = make_detector(min_boxes=10, max_boxes=15)
    (regions,) = det.detect([image])
    assert_valid_regions(regions, image, 10, 15, det.feature_dim, det.num_classes)


def test_conf_threshold_decides_between_min_and_max():
    image = noise_image(90, 160, seed=4)
    (everything,) = make_detector(min_boxes=3, max_boxes=12, conf_threshold=0.0).detect([image])
    (nothing,) = make_detector(min_boxes=3, max_boxes=12, conf_threshold=1.0).detect([image])
    assert len(everything) == 12 and len(nothing) == 3


def test_choose_boxes_falls_back_to_whole_image_and_grid_without_proposals():
    cfg = DetectorConfig(min_boxes=6, max_boxes=10, device="cpu")
    chosen = choose_boxes(torch.zeros(0, 5, 4), torch.zeros(0, 5), width=30, height=20, cfg=cfg)
    expected = torch.tensor([[0, 0, 30, 20], [0, 0, 15, 10], [15, 0, 30, 10], [0, 10, 15, 20], [15, 10, 30, 20], [0, 0, 10, 20 / 3]])
    torch.testing.assert_close(chosen, expected.float())
    # Degenerate (sub-pixel) detections are never chosen; the fallback fills in instead.
    thin = torch.tensor([[[5.0, 5.0, 5.5, 15.0]]]).expand(4, 1, 4)
    chosen = choose_boxes(thin, torch.full((4, 1), 0.9), width=30, height=20, cfg=cfg)
    torch.testing.assert_close(chosen, expected.float())
    assert (fallback_boxes(1, 1, 50)[:, 2:] > fallback_boxes(1, 1, 50)[:, :2]).all()


def test_choose_boxes_keeps_one_region_per_proposal_and_applies_nms():
    cfg = DetectorConfig(min_boxes=1, max_boxes=10, conf_threshold=0.5, nms_threshold=0.3, device="cpu")
    box_a, box_b = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]
    class_boxes = torch.tensor([[box_a, box_a], [[0.5, 0.0, 10.0, 10.0]] * 2, [box_b, box_b]])
    scores = torch.tensor([[0.9, 0.8], [0.7, 0.1], [0.1, 0.6]])
    chosen = choose_boxes(class_boxes, scores, width=40, height=40, cfg=cfg)
    # proposal 1 overlaps proposal 0 in class 0 (suppressed) -> two regions, best first.
    torch.testing.assert_close(chosen, torch.tensor([box_a, box_b]))


def test_given_labels_become_one_hot_with_class_names():
    det = make_detector(backend="given_boxes", class_names=("cat", "dog", "car"))
    assert det.num_classes == 3 and det.class_names == ["cat", "dog", "car"]
    image = noise_image(40, 50)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 5.0, 50.0, 40.0]])
    (regions,) = det.detect([image], given_boxes=[boxes], given_labels=[torch.tensor([2, 0])])
    torch.testing.assert_close(regions.cls_prob, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    ids, probs = regions.topk(1)
    assert ids.squeeze(1).tolist() == [2, 0]
    with pytest.raises(ValueError, match="label outside"):
        det.detect([image], given_boxes=[boxes], given_labels=[torch.tensor([3, 0])])


@pytest.mark.parametrize(
    "boxes, message",
    [
        (torch.zeros(0, 4), "zero given boxes"),
        (torch.tensor([[0.0, 0.0, 51.0, 10.0]]), "inside the image"),
        (torch.tensor([[5.0, 5.0, 5.0, 10.0]]), "x1<x2"),
        (torch.tensor([[0.0, 0.0, 1.0]]), r"\[K, 4\]"),
        (None, "no given boxes"),
    ],
)
def test_bad_given_boxes_raise_naming_the_image(boxes, message):
    det = make_detector(backend="given_boxes")
    with pytest.raises(ValueError, match=message) as err:
        det.detect([noise_image(40, 50)], given_boxes=[boxes])
    assert "image 0" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("backend=yolo", "detector.backend"),
        ("model=retinanet_resnet50_fpn", "detector.model"),
        ("weights=/no/such/file.pth", "detector.weights"),
        ("max_size=10", "detector.min_size/max_size"),
        ("min_boxes=0", "detector.min_boxes"),
        ("conf_threshold=1.5", "detector.conf_threshold"),
        ("nms_threshold=0", "detector.nms_threshold"),
        ("label_format=onehot", "detector.label_format"),
        ("topk=0", "detector.topk"),
        ("device=tpu9", "detector.device"),
        ("backend=detectron2", "detector.detectron2_config"),
        ("class_names=[a, b]", "detector.class_names"),
        ("batchnorm_calibration=imagenet", "detector.batchnorm_calibration"),
        ("calibration_images=0", "detector.calibration_images"),
        ("calibration_from=/no/such/extraction", "detector.calibration_from"),
        ("precision=fp16", "detector.precision"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DetectorConfig, overrides=[override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_the_faster_rcnn_list_is_torchvisions():
    """DetectorConfig checks detector.model against a constant (no torchvision import): it must be
    the installed torchvision's list of Faster R-CNN builders."""
    import torchvision

    builders = torchvision.models.list_models(module=torchvision.models.detection)
    assert sorted(TORCHVISION_FASTER_RCNN_MODELS) == sorted(m for m in builders if m.startswith("fasterrcnn_"))


def torch_accepts(device: str) -> bool:
    try:
        torch.device(device)
    except RuntimeError:
        return False
    return True


@pytest.mark.filterwarnings("ignore:'mkldnn' is no longer used")
def test_the_device_check_accepts_what_torch_device_accepts():
    """DetectorConfig checks detector.device with a pattern (no torch import): the same device types
    as torch.device (the list its error message gives), and the same verdict on every string here."""
    with pytest.raises(RuntimeError) as err:
        torch.device("nosuchdevice")  # a well-formed string of an unknown type
    listed = str(err.value).split("Expected one of ", 1)[1].split(" device type", 1)[0]
    assert set(TORCH_DEVICE_TYPES) == set(listed.split(", "))
    strings = [*TORCH_DEVICE_TYPES, *(f"{t}:0" for t in TORCH_DEVICE_TYPES), "cuda:1", "cuda:7", "cuda:10", "cuda:127",
               "gpu", "gpu:0", "tpu9", "npu", "CUDA", "Cpu", "cuda:", "cuda:01", "cuda:00", "cuda:-1", "cuda:+1", "cuda: 0",
               " cuda", "cuda ", "cuda:1:2", "cuda:1a", "cuda:0x1", "cuda:1_0", "cuda:\u0663", "cuda_1", "cu_da", "_cpu",
               "cpu,cuda", "", ":0", "auto"]
    for device in strings:
        assert bool(TORCH_DEVICE.fullmatch(device)) == torch_accepts(device), device


def test_random_mobilenet_features_still_tell_regions_apart():
    # Regression test: a random MobileNetV3 with uncalibrated batch norms gave every region
    # the same feature (relative spread 3e-7), which the quickstart would pretrain on.
    det = make_detector(backend="given_boxes", model="fasterrcnn_mobilenet_v3_large_320_fpn", max_size=192)
    image = torch.zeros(3, 128, 160, dtype=torch.uint8)
    image[0, 10:60, 10:60] = 255
    image[2, 70:120, 90:150] = 255
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [90.0, 70.0, 150.0, 120.0], [0.0, 0.0, 160.0, 128.0]])
    (regions,) = det.detect([image], given_boxes=[boxes])
    spread = regions.features.std(dim=0).mean() / regions.features.abs().mean()
    assert spread > 0.05


def test_input_calibration_makes_random_features_describe_colour_and_shape():
    """Batch norms calibrated on the input's images, not noise: a random ResNet-50 FPN's box
    features then tell the synth scenes' colours and shapes apart (nearest class mean on held-out
    objects). Noise calibration is the baseline measured in the same test."""
    from preprocess.synth_scenes import render, sample_scene

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, "train") for _ in range(48)]
    images = [torch.from_numpy(np.array(render(s).convert("RGB"))).permute(2, 0, 1).contiguous() for s in scenes]
    boxes = [torch.tensor([o.box for o in s.objects], dtype=torch.float32) for s in scenes]
    colours = [o.colour for s in scenes for o in s.objects]
    shapes = [o.shape for s in scenes for o in s.objects]
    split = sum(len(s.objects) for s in scenes[:32])

    def accuracy(features: torch.Tensor, names: list[str]) -> float:
        classes = sorted(set(names))
        labels = torch.tensor([classes.index(n) for n in names])
        features = (features - features[:split].mean(0)) / (features[:split].std(0) + 1e-6)
        # Ridge regression onto one-hot labels (closed form: no optimiser to tune).
        x, targets = features[:split], torch.nn.functional.one_hot(labels[:split]).float()
        weights = torch.linalg.solve(x @ x.T + 10.0 * torch.eye(split), targets)
        guess = (features[split:] @ x.T @ weights).argmax(1)
        return (guess == labels[split:]).float().mean().item()

    results = {}
    for calibration, precision in (("noise", "fp32"), ("input", "fp32"), ("input", "bf16")):
        torch.manual_seed(0)
        cfg = DetectorConfig(backend="given_boxes", model=MODEL, min_size=128, max_size=192, device="cpu",
                             min_boxes=1, max_boxes=4, batchnorm_calibration=calibration, calibration_images=16,
                             precision=precision)
        det = build_detector(cfg, lambda: (images[:16], "the test scenes"))
        features = torch.cat([r.features for r in det.detect(images, given_boxes=boxes)])
        results[calibration, precision] = (accuracy(features, colours), accuracy(features, shapes))
        assert det.weights == ("random" if calibration == "noise" else "random, batch norms calibrated on the test scenes")
    noise_colour, noise_shape = results["noise", "fp32"]
    # Measured: noise 0.23 / 0.29, input 0.84 / 0.52 (6 colours, 5 shapes, 31 held-out objects);
    # the bf16 backbone (detector.precision, the quickstart's on a CPU with bf16) 0.87 / 0.58.
    for colour, shape in (results["input", "fp32"], results["input", "bf16"]):
        assert colour >= 0.75 and colour > noise_colour + 0.3, results
        assert shape > noise_shape + 0.1, results


def test_input_calibration_without_images_is_a_clear_error():
    cfg = DetectorConfig(backend="given_boxes", model=MODEL, min_size=64, max_size=96, device="cpu",
                         min_boxes=1, max_boxes=4, batchnorm_calibration="input")
    with pytest.raises(ValueError, match="batchnorm_calibration: input needs the input's images"):
        build_detector(cfg)


def test_extractor_hash_is_the_networks_content(tmp_path):
    """A weights file holding the same tensors as a calibrated random network hashes the same
    (not the name of its weights); one running statistic one ulp off hashes differently."""
    cfg = dict(backend="given_boxes", model="fasterrcnn_mobilenet_v3_large_320_fpn", min_size=64, max_size=96,
               device="cpu", min_boxes=1, max_boxes=4)
    torch.manual_seed(0)
    random = build_detector(DetectorConfig(**cfg))
    assert random.calibration is not None and random.calibration.extractor_sha256 == random.extractor_sha256
    assert len(random.extractor_sha256) == 64 and random.extractor_sha256 == state_sha256(random.model)
    state = {k: v.clone() for k, v in random.model.state_dict().items()}
    torch.save(state, tmp_path / "same.pth")
    same = build_detector(DetectorConfig(**cfg, weights=str(tmp_path / "same.pth")))
    assert same.weights == str(tmp_path / "same.pth") and same.calibration is None
    assert same.extractor_sha256 == random.extractor_sha256
    name = next(k for k in state if k.endswith("running_var"))
    state[name][0] = torch.nextafter(state[name][0], torch.tensor(2.0))
    torch.save(state, tmp_path / "nudged.pth")
    nudged = build_detector(DetectorConfig(**cfg, weights=str(tmp_path / "nudged.pth")))
    assert nudged.extractor_sha256 != random.extractor_sha256


D2_FAST = ["MODEL.RPN.POST_NMS_TOPK_TEST", "100"]  # res5 on 1000 proposals is slow on a CPU


def make_detectron2_detector(config: str, **overrides) -> RegionDetector:
    pytest.importorskip("detectron2", reason="detectron2 is not installed (optional; see docs/detector.md)")
    return make_detector(backend="detectron2", detectron2_config=config, detectron2_overrides=tuple(D2_FAST), **overrides)


@pytest.mark.parametrize(
    "config, feature_dim",
    [("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", 1024), ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", 2048)],
    ids=["fpn-box-head", "c4-res5"],
)
def test_detectron2_adapter_detects_and_pools(config, feature_dim):
    det = make_detectron2_detector(config, min_boxes=5, max_boxes=12)
    assert (det.feature_dim, det.num_classes, det.class_names[0]) == (feature_dim, 80, "person")
    assert det.name == f"detectron2:{config}" and det.weights == "random"
    assert det.calibration is None and len(det.extractor_sha256) == 64 and det.extractor_sha256 == state_sha256(det.model)
    images = [noise_image(90, 160, seed=11), torch.full((3, 1, 1), 9, dtype=torch.uint8)]
    detected = det.detect(images)
    for image, regions in zip(images, detected):
        assert_valid_regions(regions, image, 5, 12, feature_dim, 80)
        assert (regions.scores[:-1] >= regions.scores[1:]).all()
    # Features are pooled at the returned boxes: pooling them again as given boxes agrees.
    (again,) = det.detect(images[:1], given_boxes=[detected[0].boxes])
    assert torch.equal(again.boxes, detected[0].boxes)
    torch.testing.assert_close(again.features, detected[0].features, rtol=1e-4, atol=1e-4 * detected[0].features.abs().max().item())


def test_detectron2_given_boxes_map_width_and_height_separately():
    # detectron2 rounds each resized side: 7x160 with min 64 / max 80 becomes 4x80, so the height
    # ratio (4/7) differs from the width ratio (1/2) and a swap would pool other pixels.
    det = make_detectron2_detector("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", min_size=64, max_size=80)
    image = noise_image(7, 160, seed=13)
    boxes = torch.tensor([[40.0, 0.0, 120.0, 7.0], [100.0, 2.0, 160.0, 5.0]])
    (regions,) = det.detect([image], given_boxes=[boxes])
    with torch.inference_mode():
        state, ((h2, w2),) = det._prepare([image], canvas=(64, 96))
        assert (h2, w2) == (4, 80)
        right, _, _ = det._heads(state, [boxes * torch.tensor([w2 / 160, h2 / 7] * 2)])
        swapped, _, _ = det._heads(state, [boxes * torch.tensor([h2 / 7, w2 / 160] * 2)])
    torch.testing.assert_close(regions.features, right, rtol=1e-5, atol=1e-5 * right.abs().max().item())
    assert (regions.features - swapped).abs().max() > 1e-3 * right.abs().max()


def test_detectron2_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # what an environment without it looks like
    cfg = DetectorConfig(backend="detectron2", detectron2_config="COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    with pytest.raises(ImportError, match="pip install") as err:
        build_detector(cfg)
    assert "\n" not in str(err.value)
