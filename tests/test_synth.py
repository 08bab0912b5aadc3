"""The synthetic scenes and shard generator (preprocess.synth, preprocess.synth_scenes): determinism, layout, exact boxes, captions, held-out split, CLI errors."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from preprocess.synth import cli, make_sample, write_raw_shards
from preprocess.synth_scenes import (
    COLOUR_WORDS,
    COLOURS,
    HELDOUT_PAIRS,
    SHAPE_WORDS,
    SIZE_FRACTIONS,
    SIZE_WORDS,
    SYNTH_CLASS_NAMES,
    Background,
    Scene,
    SceneObject,
    describe,
    render,
    sample_scene,
)


def _run(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    assert cli(["--out", str(out), *args]) == 0
    return out


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(count)]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    args = ["--num-samples", "12", "--samples-per-shard", "5", "--formats", "jpg,png,webp"]
    first = _run(tmp_path, "a", "--seed", "3", *args)
    again = _run(tmp_path, "b", "--seed", "3", *args)
    other = _run(tmp_path, "c", "--seed", "4", *args)
    names = sorted(p.name for p in first.glob("*.tar"))
    assert names == ["00000.tar", "00001.tar", "00002.tar"]
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes()
        assert (first / name).read_bytes() != (other / name).read_bytes()


def test_shard_and_sample_counts_and_unique_keys(tmp_path):
    out = _run(tmp_path, "raw", "--num-samples", "23", "--samples-per-shard", "10", "--seed", "0")
    per_shard = []
    keys = []
    for tar_path in sorted(out.glob("*.tar")):
        members = [name for name, _ in _members(tar_path)]
        shard_keys = sorted({name.split(".")[0] for name in members})
        assert sorted(members) == sorted(f"{k}.{ext}" for k in shard_keys for ext in ("jpg", "txt", "json"))
        per_shard.append(len(shard_keys))
        keys += shard_keys
    assert per_shard == [10, 10, 3]
    assert keys == [f"{i:09d}" for i in range(23)]


def test_plain_webdataset_reads_every_format(tmp_path):
    out = _run(
        tmp_path,
        "raw",
        "--num-samples",
        "40",
        "--samples-per-shard",
        "20",
        "--formats",
        "jpg,png,rgba,gray,webp",
    )
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        image = next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)
        assert image.size == (meta["width"], meta["height"])
        assert isinstance(sample["txt"], str) and sample["txt"]
        count += 1
    assert count == 40
    # webdataset's "pil" decoder converts to RGB; the stored encodings keep their own modes
    modes = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        ext = next(e for e in ("jpg", "png", "webp") if e in sample)
        modes[json.loads(sample["json"])["image_format"]] = (ext, Image.open(io.BytesIO(sample[ext])).mode)
    assert modes == {
        "jpg": ("jpg", "RGB"),
        "png": ("png", "RGB"),
        "rgba": ("png", "RGBA"),
        "gray": ("jpg", "L"),
        "webp": ("webp", "RGB"),
    }


def test_boxes_are_the_exact_extent_of_each_drawn_shape():
    for scene in _scenes("train", 60):
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            low, high = SIZE_FRACTIONS[obj.size]
            assert low - 0.02 <= (x2 - x1) / min(scene.width, scene.height) <= high + 0.02, obj
            # Alone on a solid background (which never has an object colour), the object's
            # pixels span exactly its box.
            alone = replace(scene, objects=(obj,), background=Background("solid", ((128, 128, 128),)))
            mask = np.all(np.asarray(render(alone)) == COLOURS[obj.colour], axis=-1)
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box, (
                obj,
                scene.width,
                scene.height,
            )


def test_box_centres_show_the_object_colour_in_the_encoded_shards(tmp_path):
    out = _run(
        tmp_path, "raw", "--num-samples", "30", "--samples-per-shard", "30", "--formats", "jpg,png,webp"
    )
    checked = 0
    for sample in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode("rgb8"):
        image = next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)
        meta = sample["json"]
        assert meta["labels"] == [SYNTH_CLASS_NAMES.index(n) for n in meta["label_names"]]
        for (x1, y1, x2, y2), obj in zip(meta["boxes"], meta["objects"]):
            pixel = image[(y1 + y2) // 2, (x1 + x2) // 2].astype(int)
            # lossy JPEG/WebP shift colours a little; the nearest palette colour must still be right
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - pixel).sum())
            assert nearest == obj["colour"], (sample["__key__"], obj, pixel)
            checked += 1
    assert checked >= 30


def test_backgrounds_stay_far_from_every_object_colour():
    palette = np.array(list(COLOURS.values()), dtype=float)
    kinds = set()
    for scene in _scenes("train", 60, seed=1):
        pixels = np.asarray(render(replace(scene, objects=())), dtype=float).reshape(-1, 1, 3)
        distance = np.abs(pixels - palette[None]).sum(-1)  # L1 over RGB
        assert distance.min() > 75, scene.background
        kinds.add(scene.background.kind)
    assert kinds == {"solid", "gradient", "noise"}


def _mentions(caption: str, words: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", caption) for w in words)


def test_caption_names_every_objects_colour_and_shape():
    for index in range(80):
        _, _, caption, meta = make_sample(seed=5, split="train", index=index)
        for obj in meta["objects"]:
            assert _mentions(caption, COLOUR_WORDS[obj["colour"]]), (caption, obj)
            assert _mentions(caption, SHAPE_WORDS[obj["shape"]]), (caption, obj)


def test_caption_wording_varies():
    captions = [make_sample(seed=0, split="train", index=i)[2] for i in range(60)]
    openings = {" ".join(c.split()[:2]) for c in captions}
    assert len(set(captions)) == 60
    assert len(openings) >= 10


def test_single_object_captions_name_the_right_size_and_place():
    sized = 0
    for size, box, place in [
        ("large", (4, 4, 60, 60), "top left"),
        ("small", (120, 70, 140, 90), "bottom right"),
    ]:
        scene = Scene(
            160, 100, Background("solid", ((128, 128, 128),)), (SceneObject("star", "green", size, box),)
        )
        wrong_size = [w for s, words in SIZE_WORDS.items() if s != size for w in words]
        for seed in range(40):
            caption = describe(scene, np.random.default_rng(seed))
            assert not _mentions(caption, tuple(wrong_size)), caption
            sized += _mentions(caption, SIZE_WORDS[size])
            if "corner" in caption or re.search(r"\bat the (top|bottom) (left|right)\b", caption):
                assert place in caption, caption
    assert sized >= 50  # size is named in most captions (80%)


def test_caption_relations_match_the_layout():
    left = SceneObject("circle", "red", "medium", (5, 40, 35, 70))
    right = SceneObject("square", "blue", "medium", (100, 30, 130, 60))
    scene = Scene(160, 100, Background("solid", ((128, 128, 128),)), (left, right))
    relations = 0
    for seed in range(60):
        caption = describe(scene, np.random.default_rng(seed))
        assert not re.search(r"\b(above|over|below|under|beneath)\b", caption), caption
        match = re.search(r"\b(left|right) of\b", caption)
        if match:
            relations += 1
            shapes_before = re.findall(r"\b(circle|disc|square)\b", caption[: match.start()])
            subject_is_left = shapes_before[-1] in ("circle", "disc")
            assert (match.group(1) == "left") == subject_is_left, caption
    assert relations >= 10


# sha256 over the captions and JSON of samples 0-49 (seed 0, train) as the generator wrote them
# before caption noise existed: the noise must not move a single draw of a clean sample.
_CLEAN_CAPTIONS_SHA256 = "2ffa5a375ae74d7f9468b87400d905d0fb2cb3f96c83effd825bc588f75bc849"


def test_no_caption_noise_gives_todays_samples_and_shards(tmp_path):
    digest = hashlib.sha256()
    for index in range(50):
        _, _, caption, meta = make_sample(0, "train", index, caption_mismatch=0.0, caption_corrupt=0.0)
        digest.update(caption.encode())
        digest.update(json.dumps(meta, sort_keys=True).encode())
    assert digest.hexdigest() == _CLEAN_CAPTIONS_SHA256
    args = ["--num-samples", "6", "--samples-per-shard", "3", "--seed", "2"]
    plain = _run(tmp_path, "plain", *args)
    zero = _run(tmp_path, "zero", *args, "--caption-mismatch", "0", "--caption-corrupt", "0")
    for name in ("00000.tar", "00001.tar"):
        assert (plain / name).read_bytes() == (zero / name).read_bytes()


def _names_every_object(caption: str, meta: dict) -> bool:
    return all(
        _mentions(caption, COLOUR_WORDS[o["colour"]]) and _mentions(caption, SHAPE_WORDS[o["shape"]])
        for o in meta["objects"]
    )


def _colours_named(caption: str) -> list[str]:
    colour_of = {word: colour for colour, words in COLOUR_WORDS.items() for word in words}
    return [colour_of[w] for w in re.findall(r"[a-z-]+", caption) if w in colour_of]


def test_caption_noise_shares_and_kinds(tmp_path):
    count, mismatch, corrupt = 400, 0.3, 0.2
    kinds = {"mismatched": 0, "corrupted": 0, None: 0}
    for index in range(count):
        key, image, caption, meta = make_sample(7, "train", index, caption_mismatch=mismatch, caption_corrupt=corrupt)
        clean_key, clean_image, clean_caption, clean_meta = make_sample(7, "train", index)
        # only the caption (and the JSON's record of the noise) changes
        assert (key, image) == (clean_key, clean_image)
        assert {k: v for k, v in meta.items() if k != "caption_noise"} == clean_meta
        kind = meta["caption_noise"]
        kinds[kind] += 1
        if kind is None:
            assert caption == clean_caption
        elif kind == "corrupted":
            # every colour word is swapped for another colour, the other words are kept or dropped
            wrong, right = _colours_named(caption), _colours_named(clean_caption)
            assert len(wrong) == len(right) and all(w != r for w, r in zip(wrong, right)), caption
            assert len(caption.split()) <= len(clean_caption.split())
        else:
            kinds.setdefault("misdescribes", 0)
            kinds["misdescribes"] += not _names_every_object(caption, meta)
    # binomial standard deviation at n=400 is 0.02-0.023: allow 3 of them
    assert abs(kinds["mismatched"] / count - mismatch) < 0.07, kinds
    assert abs(kinds["corrupted"] / count - corrupt) < 0.07, kinds
    # another scene's caption only rarely happens to name all of this scene's objects
    assert kinds["misdescribes"] >= 0.9 * kinds["mismatched"], kinds
    # the same arguments give the same noisy shard bytes
    args = ["--num-samples", "20", "--samples-per-shard", "20", "--caption-mismatch", "0.5"]
    first, again = _run(tmp_path, "a", *args), _run(tmp_path, "b", *args)
    assert (first / "00000.tar").read_bytes() == (again / "00000.tar").read_bytes()


def test_heldout_pairs_only_in_heldout_split(tmp_path):
    for scene in _scenes("train", 400, seed=2):
        assert not {(o.colour, o.shape) for o in scene.objects} & HELDOUT_PAIRS
    for scene in _scenes("heldout", 200, seed=2):
        assert {(o.colour, o.shape) for o in scene.objects} & HELDOUT_PAIRS
    out = _run(tmp_path, "held", "--num-samples", "10", "--split", "heldout")
    for name, data in _members(out / "00000.tar"):
        if name.endswith(".json"):
            meta = json.loads(data)
            assert meta["split"] == "heldout"
            assert {(o["colour"], o["shape"]) for o in meta["objects"]} & HELDOUT_PAIRS


def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    args = ["--num-samples", "15", "--samples-per-shard", "5", "--seed", "9"]
    out = _run(tmp_path, "raw", *args)
    expected = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "00001.tar").unlink()
    (out / ".00002.tar.tmp-4242-1").write_bytes(b"half-written")  # what a kill mid-shard leaves
    (out / "00002.tar").unlink()
    assert cli(["--out", str(out), *args]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == expected
    assert not list(out.glob(".*.tmp-*"))


def test_library_writer_accepts_images_and_bytes(tmp_path):
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    png = io.BytesIO()
    image.save(png, format="PNG")
    samples = [
        ("000000000", image, "a green image", {"i": 0}),
        ("000000001", png.getvalue(), "png", {"i": 1}),
    ]
    paths = write_raw_shards(tmp_path / "lib", iter(samples * 1), samples_per_shard=1)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar"]
    assert [n for n, _ in _members(paths[0])] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert [n for n, _ in _members(paths[1])][0] == "000000001.json"
    assert "000000001.png" in [n for n, _ in _members(paths[1])]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--num-samples", "0"], "--num-samples"),
        (["--num-samples", "5", "--samples-per-shard", "0"], "--samples-per-shard"),
        (["--num-samples", "5", "--split", "test"], "--split"),
        (["--num-samples", "5", "--image-size", "200", "100"], "--image-size"),
        (["--num-samples", "5", "--formats", "jpg,bmp"], "--formats"),
        (["--num-samples", "five"], "--num-samples"),
        (["--num-samples", "5", "--caption-mismatch", "1.5"], "--caption-mismatch"),
        (["--num-samples", "5", "--caption-corrupt", "-0.1"], "--caption-corrupt"),
        (["--num-samples", "5", "--caption-mismatch", "0.6", "--caption-corrupt", "0.6"], "--caption-corrupt"),
    ],
)
def test_bad_arguments_give_one_line_error(tmp_path, capsys, args, needle):
    out = tmp_path / "raw"
    assert cli(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not list(out.glob("*.tar")) if out.exists() else True


def test_unwritable_or_foreign_out_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli(["--out", str(blocker / "raw"), "--num-samples", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and str(blocker) in err, err

    out = _run(tmp_path, "raw", "--num-samples", "3", "--seed", "1")
    before = (out / "00000.tar").read_bytes()
    assert cli(["--out", str(out), "--num-samples", "3", "--seed", "2"]) == 2
    assert "different synth run" in capsys.readouterr().err
    assert (out / "00000.tar").read_bytes() == before
