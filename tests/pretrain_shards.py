"""Tiny learnable feature shards for pretraining tests, written with the real feature-shard format.

Each image holds 1-4 objects with a colour and a shape; the caption names them
("a red circle and a blue star"). A region's feature is the sum of a colour prototype and
a shape prototype plus noise, and its detector distribution peaks at its shape. So every
objective has something to learn: MLM can read colours and shapes from the regions, MOC and
MRFR can read a masked region from the caption, ITM can check the caption against the regions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from preprocess.feature_format import FeatureSpec, encode_feature_sample

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross")


def make_feature_samples(
    num_samples: int, feature_dim: int = 16, seed: int = 0, key_prefix: str = "", label_format: str = "distribution"
) -> list[dict]:
    """Encoded feature samples (member name -> bytes), ready for ``webdataset.TarWriter``."""
    rng = np.random.default_rng(seed)
    # Prototypes depend on the feature dim only, so train and validation shards share them.
    proto_rng = np.random.default_rng(feature_dim)
    colour_proto = proto_rng.normal(size=(len(COLOURS), feature_dim))
    shape_proto = proto_rng.normal(size=(len(SHAPES), feature_dim))
    samples = []
    for index in range(num_samples):
        num_objects = int(rng.integers(1, 5))
        colours = rng.integers(len(COLOURS), size=num_objects)
        shapes = rng.integers(len(SHAPES), size=num_objects)
        features = colour_proto[colours] + shape_proto[shapes] + 0.1 * rng.normal(size=(num_objects, feature_dim))
        width, height = 64, 48
        x1 = rng.uniform(0, width - 12, size=num_objects)
        y1 = rng.uniform(0, height - 12, size=num_objects)
        boxes = np.stack([x1, y1, x1 + rng.uniform(4, 12, num_objects), y1 + rng.uniform(4, 12, num_objects)], axis=1)
        cls_prob = np.full((num_objects, len(SHAPES)), 0.05)
        cls_prob[np.arange(num_objects), shapes] = 0.8
        cls_prob /= cls_prob.sum(axis=1, keepdims=True)
        if label_format == "distribution":
            labels = {"cls_prob": cls_prob}
        else:
            order = np.argsort(-cls_prob, axis=1)[:, :2]
            labels = {"labels": order, "label_scores": np.take_along_axis(cls_prob, order, axis=1)}
        caption = " and ".join(f"a {COLOURS[c]} {SHAPES[s]}" for c, s in zip(colours, shapes))
        key = f"{key_prefix}{index:06d}"
        metadata = json.dumps({"key": key}).encode()
        samples.append(
            encode_feature_sample(key, caption, metadata, width, height, features, boxes.astype(np.float32), labels)
        )
    return samples


def feature_spec(feature_dim: int = 16, label_format: str = "distribution") -> FeatureSpec:
    return FeatureSpec(
        detector="test:prototypes",
        weights="random",
        feature_dim=feature_dim,
        num_classes=len(SHAPES),
        label_format=label_format,
        topk=2 if label_format == "topk" else 0,
        min_boxes=1,
        max_boxes=4,
        class_names=list(SHAPES),
    )


def write_feature_shards(
    out_dir: Path, num_shards: int, per_shard: int, feature_dim: int = 16, seed: int = 0,
    label_format: str = "distribution",
) -> tuple[str, FeatureSpec]:
    """Write ``num_shards`` tars plus ``feature_spec.json``; return (brace pattern, spec)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        samples = make_feature_samples(per_shard, feature_dim, seed * 1000 + shard, f"{shard:05d}", label_format)
        with wds.TarWriter(str(out_dir / f"{shard:05d}.tar"), mtime=0) as sink:
            for sample in samples:
                sink.write(sample)
    spec = feature_spec(feature_dim, label_format)
    spec.save(out_dir)
    last = num_shards - 1
    return str(out_dir / (f"{{00000..{last:05d}}}.tar" if num_shards > 1 else "00000.tar")), spec
