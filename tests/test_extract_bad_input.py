"""Bad raw input never loses good data: every bad sample is skipped with its reason (or handled if
valid), the good samples around it are written, every input key lands in exactly one table."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from extract_helpers import GIVEN_BOXES, encode, good_sample, read_features, tables, write_shard
from preprocess import extract_cli
from preprocess.raw_image import RejectedSample, decode_image


def with_image(key: str, image_bytes: bytes, suffix: str, width: int, height: int) -> dict:
    meta = {"boxes": [[0, 0, width, height]], "labels": [1]}
    return {"__key__": key, suffix: image_bytes, "txt": f"caption of {key}".encode(), "json": json.dumps(meta).encode()}


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (PIL reads only the header to size it)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def bad_and_odd_samples() -> tuple[list[dict], dict[str, str | None]]:
    """Samples for one shard and, per key, the expected skip reason (None: written)."""
    jpeg = good_sample("x", seed=1)["jpg"]
    big = Image.new("L", (10000, 10000), 128)
    ImageDraw.Draw(big).rectangle([1000, 1000, 6000, 6000], fill=30)
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    palette = Image.new("P", (30, 20), 1)
    palette.info["transparency"] = 1
    grey16 = Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    cmyk = Image.new("CMYK", (50, 40), (0, 255, 255, 0))
    samples = [
        (good_sample("good-first", seed=2), None),
        (with_image("corrupt", b"this is not an image", "jpg", 10, 10), "corrupt_image"),
        (with_image("truncated-jpeg", jpeg[: len(jpeg) // 2], "jpg", 80, 64), "truncated_image"),
        (with_image("empty-image", b"", "jpg", 10, 10), "empty_image"),
        ({k: v for k, v in good_sample("missing-caption", seed=3).items() if k != "txt"}, "missing_caption"),
        ({**good_sample("empty-caption", seed=4), "txt": b"  \n "}, "empty_caption"),
        ({**good_sample("latin1-caption", seed=5), "txt": "caf\xe9".encode("latin-1")}, "caption_not_utf8"),
        ({k: v for k, v in good_sample("no-image", seed=6).items() if k != "jpg"}, "no_image"),
        ({**good_sample("bad-json", seed=7), "json": b"{not json"}, "bad_metadata_json"),
        (with_image("one-pixel", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "png", 1, 1), None),
        (with_image("ten-thousand", encode(big, "JPEG", quality=50), "jpg", 10000, 10000), None),
        (with_image("over-max-pixels", png_declaring(20000, 20000), "png", 20000, 20000), "image_too_large"),
        (with_image("cmyk", encode(cmyk, "JPEG"), "jpg", 50, 40), None),
        (with_image("rgba", encode(rgba, "PNG"), "png", 40, 30), None),
        (with_image("palette-alpha", encode(palette, "PNG"), "png", 30, 20), None),
        (with_image("grey16", encode(grey16, "PNG"), "png", 30, 20), None),
        (with_image("webp", encode(Image.new("RGB", (30, 20), (0, 90, 0)), "WEBP"), "webp", 30, 20), None),
        ({**good_sample("no-boxes", seed=8), "json": b'{"labels": []}'}, "no_given_boxes"),
        ({**good_sample("ragged-boxes", seed=9), "json": b'{"boxes": [[1, 2, 3]], "labels": [0]}'}, "bad_given_boxes"),
        ({**good_sample("box-outside", seed=10), "json": b'{"boxes": [[500, 500, 600, 600]], "labels": [0]}'}, "bad_given_boxes"),
        ({**good_sample("many-boxes", seed=11), "json": json.dumps({"boxes": [[0, 0, 5, 5]] * 9, "labels": [0] * 9}).encode()}, "too_many_given_boxes"),
        ({**good_sample("unknown-label", seed=12), "json": b'{"boxes": [[0, 0, 5, 5]], "labels": ["hexagon"]}'}, "bad_given_labels"),
        (good_sample("good-first", seed=13), "duplicate_key"),
        (good_sample("good-last", seed=14), None),
    ]
    return [s for s, _ in samples], {s["__key__"] + ("#2" if i == 22 else ""): r for i, (s, r) in enumerate(samples)}


def test_every_bad_sample_is_skipped_with_its_reason_and_the_good_ones_are_written(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    samples, expected = bad_and_odd_samples()
    write_shard(raw / "00000.tar", samples)

    # Truncated inside the 4th sample's second member: three written, the 4th recorded as the
    # break by key (its image member was read, so its key is known).
    write_shard(raw / "00001.tar", [good_sample(f"cut-mid-{i}", seed=20 + i) for i in range(4)])
    data = (raw / "00001.tar").read_bytes()
    (raw / "00001.tar").write_bytes(data[: data.find(b"cut-mid-3.json") + 512 + 5])
    # Truncated inside the 2nd sample's first member: nothing of it was read, the key is unknown.
    write_shard(raw / "00004.tar", [good_sample(f"cut-early-{i}", seed=40 + i) for i in range(2)])
    data = (raw / "00004.tar").read_bytes()
    (raw / "00004.tar").write_bytes(data[: data.find(b"cut-early-1.jpg") + 512 + 100])
    # Truncated exactly between samples 2 and 3: Python's tarfile sees a clean end there.
    cut_between = [good_sample(f"cut-between-{i}", seed=30 + i) for i in range(3)]
    offsets = write_shard(raw / "00002.tar", cut_between)
    (raw / "00002.tar").write_bytes((raw / "00002.tar").read_bytes()[: offsets[1]])
    (raw / "00003.tar").write_bytes(b"")  # a zero-byte download

    out = tmp_path / "features"
    assert extract_cli.cli(["--input", str(raw / "{00000..00004}.tar"), "--output", str(out), *GIVEN_BOXES]) == 0
    manifest, skipped = tables(out)
    written_keys = [r["key"] for r in manifest]
    skipped_reasons = {(r["source_shard"].rsplit("/", 1)[1], r["key"]): r["reason"] for r in skipped}

    shard0 = [r for r in skipped if r["source_shard"].endswith("00000.tar")]
    got = {r["key"] + ("#2" if r["reason"] == "duplicate_key" else ""): r["reason"] for r in shard0}
    got.update({k: None for k in written_keys if not k.startswith("cut-")})
    assert got == expected
    assert all(r["detail"] for r in shard0), "every skip says why"
    assert [r["source_index"] for r in shard0] == sorted(r["source_index"] for r in shard0)

    assert [k for k in written_keys if k.startswith("cut-mid")] == ["cut-mid-0", "cut-mid-1", "cut-mid-2"]
    assert skipped_reasons[("00001.tar", "cut-mid-3")] == "truncated_tar"
    assert [k for k in written_keys if k.startswith("cut-between")] == ["cut-between-0", "cut-between-1"]
    assert skipped_reasons[("00002.tar", "")] == "truncated_tar"
    assert skipped_reasons[("00003.tar", "")] == "truncated_tar"
    assert [k for k in written_keys if k.startswith("cut-early")] == ["cut-early-0"]
    assert skipped_reasons[("00004.tar", "")] == "truncated_tar"
    assert len(written_keys) == len(set(written_keys))

    features = read_features(out)
    sizes = {k: (features[k]["info.json"]["image_width"], features[k]["info.json"]["image_height"]) for k in written_keys}
    assert sizes["one-pixel"] == (1, 1) and sizes["ten-thousand"] == (10000, 10000)
    np.testing.assert_array_equal(features["ten-thousand"]["boxes.npy"], [[0, 0, 10000, 10000]])
    assert features["one-pixel"]["features.npy"].shape == (1, 1024)
    assert np.isfinite(features["ten-thousand"]["features.npy"].astype(np.float32)).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == len(manifest) and summary["skipped"] == len(skipped)
    assert summary["skipped_by_reason"]["truncated_tar"] == 4


def test_a_shard_that_cannot_be_read_stays_incomplete_and_a_rerun_retries_it(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_shard(raw / "00000.tar", [good_sample("a", seed=1)])
    spec = f"pipe:cat {raw}/{{00000..00001}}.tar"  # 00001.tar does not exist yet: cat exits 1
    out = tmp_path / "features"
    assert extract_cli.cli(["--input", spec, "--output", str(out), *GIVEN_BOXES]) == 1
    assert "could not be read" in capsys.readouterr().err
    assert (out / "00000.tar").is_file() and not (out / "00001.tar").exists()
    assert not (out / "manifest.parquet").exists()

    write_shard(raw / "00001.tar", [good_sample("b", seed=2)])
    assert extract_cli.cli(["--input", spec, "--output", str(out), *GIVEN_BOXES]) == 0
    assert [r["key"] for r in tables(out)[0]] == ["a", "b"]


def test_decode_converts_every_mode_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    pixels = decode_image(encode(rgba, "PNG"), 10**8, 800, 1333).pixels
    assert pixels[:, 0, 0].tolist() == [255, 0, 0] and pixels[:, 1, 1].tolist() == [255, 255, 255], "alpha on white"
    grey16 = Image.fromarray(np.full((3, 5), 0x8040, dtype=np.uint16))
    assert decode_image(encode(grey16, "PNG"), 10**8, 800, 1333).pixels[:, 0, 0].tolist() == [0x80] * 3
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), 10**8, 800, 1333).pixels
    assert cmyk.shape == (3, 8, 8) and cmyk.min() > 240, "CMYK white stays white"


def test_decode_shrinks_large_images_to_the_detector_size_and_keeps_the_original_size():
    image = Image.new("RGB", (1200, 600), (10, 20, 30))
    for fmt in ("JPEG", "PNG"):
        decoded = decode_image(encode(image, fmt), 10**8, 64, 96)
        assert (decoded.width, decoded.height) == (1200, 600)
        assert tuple(decoded.pixels.shape) == (3, 48, 96)  # long side capped at max_size
        assert decoded.scale_xy == (12.5, 12.5)
    small = decode_image(encode(Image.new("RGB", (30, 20)), "PNG"), 10**8, 64, 96)
    assert tuple(small.pixels.shape) == (3, 20, 30), "never upscaled here (the detector does that)"


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty_image"), (b"GIF89a-broken", "corrupt_image"), (png_declaring(30000, 30000), "image_too_large")],
    ids=["empty", "corrupt", "too-large"],
)
def test_decode_rejections_name_the_reason(data, reason):
    with pytest.raises(RejectedSample) as info:
        decode_image(data, 10**8, 64, 96)
    assert info.value.reason == reason
