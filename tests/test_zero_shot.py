"""Karpathy-split captions into shards (``python -m preprocess from-captions``), the image id through
extraction, and zero-shot evaluation of a release (``python -m pretrain.evaluate``) grouping each
image's captions, on data the tests write."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from extract_helpers import DETECT, picture
from finetune_fixtures import per_image_layout, symbolic_spec, tiny_release, write_symbolic_task_shards

from preprocess import extract_cli
from preprocess.from_captions import cli as from_captions
from preprocess.raw_image import RejectedSample
from preprocess.raw_input import SampleRules, make_raw_sample
from pretrain.data import PretrainCollate, eval_sample_stream
from pretrain.data_config import DataConfig
from pretrain.evaluate_config import EvalConfig
from pretrain.evaluate import main as evaluate_command
from pretrain.evaluation import evaluate, retrieval_gallery
from pretrain.masking_config import MaskingConfig
from pretrain.release import load_release
from pretrain.retrieval import recall_at_k


def write_karpathy(root: Path, dataset: str) -> dict:
    """Images and a Karpathy-split JSON: 5 test images (5 captions each; one more for imgid 3, as some
    COCO images have), one of them missing and one not an image, plus val, train and restval ones."""
    coco = dataset == "coco"
    images = []
    layout = [("test", 7), ("test", 8), ("val", 9), ("test", 3), ("train", 11), ("restval", 12), ("test", 4),
              ("test", 5), ("test", 6)]
    for position, (split, imgid) in enumerate(layout):
        folder = ("val2014" if split in ("test", "val", "restval") else "train2014") if coco else ""
        filename = f"COCO_{folder}_{imgid:012d}.jpg" if coco else f"{1000 + imgid}.jpg"
        count = 6 if imgid == 3 else 5
        sentences = [{"raw": f"image {imgid} caption {c} ", "tokens": ["image", str(imgid)], "imgid": imgid,
                      "sentid": imgid * 10 + c} for c in range(count)]
        entry = {"filename": filename, "split": split, "sentences": sentences, "imgid": imgid,
                 "sentids": [s["sentid"] for s in sentences]}
        if coco:
            entry |= {"filepath": folder, "cocoid": 500000 + imgid}
        images.append(entry)
        path = root / "images" / folder / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if imgid == 5:
            continue  # listed, but not in the folder
        if imgid == 6:
            path.write_bytes(b"GIF89a not what from-captions takes")
            continue
        image, _ = picture(40 + imgid, 32, seed=imgid)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if imgid == 8 else "JPEG")
        path.write_bytes(buffer.getvalue())
    annotations = root / f"dataset_{dataset}.json"
    annotations.write_text(json.dumps({"images": images, "dataset": dataset}))
    return {"annotations": annotations, "images": root / "images", "entries": images}


def raw_samples(out: Path) -> list[dict]:
    return list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_from_captions_writes_each_image_once_with_all_its_captions(tmp_path, dataset):
    given = write_karpathy(tmp_path, dataset)
    out = tmp_path / "raw"
    args = ["--annotations", str(given["annotations"]), "--images", str(given["images"]), "--split", "test", "--out", str(out)]
    assert from_captions(args) == 0
    samples = raw_samples(out)
    # The test images in file order, less the missing one and the one that is not an image.
    assert [s["__key__"] for s in samples] == ["000000007", "000000008", "000000003", "000000004"]
    by_id = {e["imgid"]: e for e in given["entries"]}
    for sample in samples:
        meta = json.loads(sample["json"])
        entry = by_id[meta["image_id"]]
        folder = entry.get("filepath", "")
        assert sample["png" if meta["image_id"] == 8 else "jpg"] == (given["images"] / folder / entry["filename"]).read_bytes()
        assert meta["captions"] == [s["raw"].strip() for s in entry["sentences"]]
        assert sample["txt"].decode() == meta["captions"][0]
        assert (meta["filename"], meta["split"], meta["dataset"], meta["sentids"]) == (
            entry["filename"], "test", dataset, entry["sentids"])
        assert meta.get("cocoid") == entry.get("cocoid") and meta.get("filepath") == entry.get("filepath")
    assert len(json.loads(samples[2]["json"])["captions"]) == 6
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert [(r["key"], r["source_index"], r["reason"]) for r in skipped] == [
        ("000000005", 7, "missing_image"), ("000000006", 8, "unsupported_image")]
    assert all(r["source_shard"] == str(given["annotations"]) for r in skipped)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["captions"], summary["skipped"]) == (4, 21, 2)
    # A rerun with the same arguments keeps the shards; other arguments into the same folder are refused.
    before = (out / "00000.tar").stat().st_mtime_ns
    assert from_captions(args) == 0 and (out / "00000.tar").stat().st_mtime_ns == before
    assert from_captions([*args[:5], "val", *args[6:]]) == 2


def test_from_captions_restval_counts_as_train_only_when_asked(tmp_path, capsys):
    given = write_karpathy(tmp_path, "coco")
    base = ["--annotations", str(given["annotations"]), "--images", str(given["images"]), "--split", "train"]
    assert from_captions([*base, "--out", str(tmp_path / "train")]) == 0
    assert [s["__key__"] for s in raw_samples(tmp_path / "train")] == ["000000011"]
    assert from_captions([*base, "--include-restval", "--out", str(tmp_path / "train+restval")]) == 0
    samples = raw_samples(tmp_path / "train+restval")
    assert [(s["__key__"], json.loads(s["json"])["split"]) for s in samples] == [("000000011", "train"), ("000000012", "restval")]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][3].pop("sentences"), "images[3]: 'sentences' is missing"),
    (lambda d: d["images"][1].update(split="dev"), "images[1]: split 'dev'"),
    (lambda d: d["images"][2].update(imgid=7), "images[2]: imgid 7 already used by images[0]"),
    (lambda d: d.pop("images"), "an 'images' list"),
])
def test_from_captions_names_the_bad_entry(tmp_path, capsys, change, message):
    given = write_karpathy(tmp_path, "flickr30k")
    data = json.loads(given["annotations"].read_text())
    change(data)
    given["annotations"].write_text(json.dumps(data))
    args = ["--annotations", str(given["annotations"]), "--images", str(given["images"]), "--split", "test",
            "--out", str(tmp_path / "raw")]
    assert from_captions(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(given["annotations"]) in err[0], err
    assert not (tmp_path / "raw").exists()


def test_extraction_rejects_an_unreadable_image_id_or_captions():
    image, _ = picture(40, 32, seed=0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    for meta, detail in (({"image_id": "7"}, "image_id '7' is not an integer"), ({"captions": ["a", 3]}, "captions")):
        group = {"__key__": "k", "jpg": buffer.getvalue(), "txt": b"a", "json": json.dumps(meta).encode()}
        with pytest.raises(RejectedSample) as caught:
            make_raw_sample(group, 0, SampleRules(10**8, 64, 96, True, 1, 1000, False))
        assert caught.value.reason == "bad_metadata_json" and detail in str(caught.value)


def test_itm_negatives_never_come_from_the_same_image(tokenizer):
    """One sample per caption sharing ``image_id``: another caption of the image is no negative."""
    samples = [{"key": f"k{i}", "caption": f"caption {i}", "image_id": i // 3} for i in range(6)]
    collate = PretrainCollate(tokenizer, DataConfig(itm_negative_rate=0.99), MaskingConfig(), seed=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        caption_of, labels = collate.draw_negatives(samples, generator)
        for i, j in enumerate(caption_of):
            assert (labels[i] == 1) == (i == j) and (i == j or i // 3 != j // 3)
        assert labels.sum() < 6


def test_a_caption_of_the_right_image_is_a_hit(tmp_path, tokenizer):
    """On a 5-captions-per-image synthetic test split, the gallery holds each image once with its 5
    captions, and ranking any one of them first is a hit for that image."""
    pattern = write_symbolic_task_shards("retrieval", tmp_path / "test", 8, seed=3, captions_per_image=5)
    gallery = retrieval_gallery(eval_sample_stream(pattern, tokenizer, symbolic_spec(), DataConfig()), tokenizer, 40, 0)
    assert len(gallery.images) == 8 and len(gallery.captions) == 40
    assert gallery.caption_image.tolist() == [i // 5 for i in range(40)]
    assert [s["image_id"] for s in gallery.images] == list(range(8))

    def third_caption_only(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        # Image i's third caption scores highest, every other pair alike: the first four
        # captions in the gallery's order are not the one found.
        right = gallery.caption_image[captions] == images
        return (right & (captions % 5 == 2)).float()

    metrics = recall_at_k(third_caption_only, gallery.caption_image, 8, batch_size=7)
    assert metrics["i2t_r1"] == 100.0  # a hit through another caption than the first
    assert metrics["t2i_r1"] == pytest.approx((8 * 100.0 + 32 * 100 / 8) / 40)  # the third captions, the rest chance
    # Chance of an image ranking one of its 5 captions first among 40: 5/40.
    assert metrics["i2t_r1_chance"] == pytest.approx(12.5)
    # Only 2 of 8 images: reading stops at the third image's first sample.
    two = retrieval_gallery(eval_sample_stream(pattern, tokenizer, symbolic_spec(), DataConfig()), tokenizer, 40, 2)
    assert (len(two.images), len(two.captions)) == (2, 10)


def test_both_layouts_and_the_command_give_the_same_retrieval(tmp_path, tokenizer, capsys):
    """One sample per caption (finetune's layout) and one per image with its captions give the same
    ranking; ``python -m pretrain.evaluate`` prints and writes what ``evaluate`` returns."""
    release = tiny_release(tmp_path / "release")
    per_caption = write_symbolic_task_shards("retrieval", tmp_path / "per-caption", 12, seed=2, captions_per_image=5)
    per_image = per_image_layout(tmp_path / "per-caption", tmp_path / "per-image")
    model = load_release(release)
    eval_cfg = EvalConfig(max_samples=12, retrieval_candidates=10, batch_size=16)

    def run(pattern):
        return evaluate(model.model, pattern, model.tokenizer, model.feature_spec, DataConfig(batch_size=16),
                        MaskingConfig(), eval_cfg, "cpu")

    a, b = run(per_caption), run(per_image)
    recall = [k for k in a if k.startswith(("i2t", "t2i", "rsum", "num_images", "num_captions"))]
    assert {k: a[k] for k in recall} == pytest.approx({k: b[k] for k in recall}, abs=1e-9)
    assert (b["num_images"], b["num_captions"]) == (10, 50)
    assert b["i2t_r1_chance"] == pytest.approx(100 * 5 / 50) and b["t2i_r1_chance"] == pytest.approx(10.0)

    out = tmp_path / "results" / "zero_shot.json"
    assert evaluate_command(["--release", str(release), "--data", per_image, "--out", str(out), "--max-images", "10",
                             "--itm-samples", "12", "--batch-size", "16"]) == 0
    stdout = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["metrics"] == pytest.approx(b, abs=1e-9)
    assert record["retrieval_pairs"] == 10 * 50 + 50 and record["pairs_per_s"] > 0
    assert record["settings"]["max_images"] == 10 and record["release"] == str(release)
    assert "10 images x 50 captions (5.00 per image)" in stdout
    line = next(x for x in stdout.splitlines() if x.startswith("image->text R@1 "))
    assert line.split()[-2:] == [f"{b['i2t_r1']:.2f}", "10.00"]  # the figure and its chance


@pytest.mark.slow
def test_karpathy_captions_through_extraction_into_evaluation(tmp_path, tokenizer):
    """from-captions -> real extraction (image_id in the manifest, captions in the JSON) -> the command."""
    given = write_karpathy(tmp_path, "coco")
    raw, features = tmp_path / "raw", tmp_path / "features"
    assert from_captions(["--annotations", str(given["annotations"]), "--images", str(given["images"]),
                          "--split", "test", "--out", str(raw)]) == 0
    assert extract_cli.cli(["--input", str(raw / "00000.tar"), "--output", str(features), *DETECT]) == 0
    manifest = pq.read_table(features / "manifest.parquet").to_pylist()
    assert [(r["key"], r["image_id"]) for r in manifest] == [("000000007", 7), ("000000008", 8), ("000000003", 3), ("000000004", 4)]
    for sample in wds.WebDataset(str(features / "00000.tar"), shardshuffle=False):
        assert json.loads(sample["json"])["captions"] == [f"image {int(sample['__key__'])} caption {c}"
                                                          for c in range(6 if sample["__key__"].endswith("3") else 5)]

    from preprocess.feature_format import FeatureSpec

    release = tiny_release(tmp_path / "release", spec=FeatureSpec.load(features))
    out = tmp_path / "zero_shot.json"
    assert evaluate_command(["--release", str(release), "--data", str(features / "00000.tar"), "--out", str(out),
                             "--max-images", "0"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert (metrics["num_images"], metrics["num_captions"], metrics["num_eval_samples"]) == (4, 21, 4)
    # Image 3 has 6 of the 21 captions: its chance of one among the first is higher than the others'.
    assert metrics["i2t_r1_chance"] == pytest.approx(100 * np.mean([5 / 21, 5 / 21, 6 / 21, 5 / 21]))
    assert metrics["t2i_r1_chance"] == pytest.approx(25.0)
