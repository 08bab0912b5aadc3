"""Builders shared by the extract tests: tiny raw shards written with webdataset, and a fast config."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageDraw

CLASS_NAMES = ["circle", "square", "triangle"]
# given_boxes mode on the smallest torchvision Faster R-CNN at a 96-pixel canvas: the fastest real
# configuration (a random-init detector's NMS over ~1000 proposals x 90 classes is slow on CPU).
GIVEN_BOXES = [
    "detector.backend=given_boxes",
    "detector.model=fasterrcnn_mobilenet_v3_large_320_fpn",
    "detector.min_size=64",
    "detector.max_size=96",
    "detector.min_boxes=1",
    "detector.max_boxes=8",
    f"detector.class_names=[{','.join(CLASS_NAMES)}]",
    "batch_size=4",
    "num_workers=1",
    "progress=false",
    "torch_threads=1",  # 2 threads on a busy 2-core machine are several times slower than 1
]
DETECT = [
    "detector.backend=torchvision",
    "detector.model=fasterrcnn_mobilenet_v3_large_320_fpn",
    "detector.min_size=64",
    "detector.max_size=96",
    "detector.min_boxes=2",
    "detector.max_boxes=6",
    "batch_size=4",
    "num_workers=1",
    "progress=false",
    "torch_threads=1",  # 2 threads on a busy 2-core machine are several times slower than 1
]


def picture(width: int, height: int, seed: int) -> tuple[Image.Image, list[float]]:
    """A flat background with one rectangle; returns the image and the rectangle's box."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
    x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    x2, y2 = x1 + max(2, width // 3), y1 + max(2, height // 3)
    ImageDraw.Draw(image).rectangle([x1, y1, x2 - 1, y2 - 1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image, [float(x1), float(y1), float(x2), float(y2)]


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_sample(key: str, seed: int, width: int = 80, height: int = 64, fmt: str = "JPEG") -> dict:
    image, box = picture(width, height, seed)
    suffix = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    meta = {"boxes": [box, [0.0, 0.0, width / 2, height / 2]], "labels": [seed % 3, "circle"], "url": f"http://x/{key}"}
    return {"__key__": key, suffix: encode(image, fmt), "txt": f"picture {key} with a rectangle".encode(), "json": json.dumps(meta).encode()}


def write_shard(path: Path, samples: list[dict]) -> list[int]:
    """Write samples with webdataset; returns the tar offset after each sample (for cutting)."""
    offsets = []
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        for sample in samples:
            writer.write(sample)
            offsets.append(writer.tarstream.offset)
        writer.close()
    return offsets


def good_shards(directory: Path, num_shards: int, per_shard: int, fmt: str = "JPEG") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        write_shard(directory / f"{s:05d}.tar", [good_sample(f"{s:03d}{i:04d}", seed=s * 100 + i, fmt=fmt) for i in range(per_shard)])
    return str(directory / f"{{00000..{num_shards - 1:05d}}}.tar")


def tables(output: Path) -> tuple[list[dict], list[dict]]:
    return pq.read_table(output / "manifest.parquet").to_pylist(), pq.read_table(output / "skipped.parquet").to_pylist()


def read_features(output: Path) -> dict[str, dict]:
    """Every output sample through plain webdataset (no project code), keyed by __key__."""
    urls = sorted(str(p) for p in output.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
