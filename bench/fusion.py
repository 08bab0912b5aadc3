"""FLOPs and throughput of each fusion strategy at growing region and token counts.

    python bench/fusion.py [--regions 10 36 100] [--tokens 16 64 128] [--batch 8] [--out FILE.md]

Builds a MiniLM-sized ImageBERT (hidden 384, 6 layers, 12 heads; random weights: cost does not
depend on the values) and, per strategy and (tokens, regions) pair, reports:

- forward GFLOPs per sample, counted by ``torch.utils.flop_counter.FlopCounterMode``;
- attention GFLOPs (QK^T and AV) inside the fusion layers ``L_f..L-1`` (the MBT split, default
  4 of 6), read from the per-module breakdown: the cost MBT's claim is about, since below
  ``L_f`` MBT, MuSE and late fusion all run the same unimodal streams;
- MI2P's plug-in attention GFLOPs (its cross-modal attention lives outside the layers);
- forward samples/s (median of a few timed batches, inference mode, this machine).

FLOPs are counted under SDPA's math backend: the fused CPU kernel is not in the counter's
table, the math backend decomposes into the matmuls that are. Timing uses the default kernel.
The markdown table goes to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import BertConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.fusion import FusionConfig, build_fusion  # noqa: E402
from pretrain.model import ImageBertModel, imagebert_config  # noqa: E402

FEATURE_DIM = 2048  # Faster R-CNN ResNet pooled ROI feature
VARIANTS = [
    ("single_stream", FusionConfig(name="single_stream")),
    ("mbt B=4", FusionConfig(name="mbt", mbt_bottlenecks=4)),
    ("mbt B=32", FusionConfig(name="mbt", mbt_bottlenecks=32)),
    ("mbt B=4 L_f=0", FusionConfig(name="mbt", mbt_bottlenecks=4, mbt_fusion_layer=0)),
    ("late", FusionConfig(name="late")),
    ("muse", FusionConfig(name="muse")),
    ("mi2p", FusionConfig(name="mi2p")),
]


def minilm_sized_encoder() -> ImageBertModel:
    torch.manual_seed(0)
    bert = BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522
    )
    return ImageBertModel(imagebert_config(bert, FEATURE_DIM, 1601)).eval()


def make_batch(batch: int, tokens: int, regions: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(1000, 30000, (batch, tokens))
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    xy = torch.rand(batch, regions, 2) * 0.5
    wh = torch.rand(batch, regions, 2) * 0.5
    geometry = torch.cat([xy, xy + wh, (wh[..., :1] * wh[..., 1:])], -1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "region_features": torch.rand(batch, regions, FEATURE_DIM),
        "region_geometry": geometry,
        "region_mask": torch.ones(batch, regions, dtype=torch.long),
    }


def count_flops(fusion, batch: dict[str, torch.Tensor], fusion_layer: int) -> tuple[int, int, int]:
    """(total, attention in layers >= fusion_layer, cross-modal plug-in attention) forward FLOPs."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fusion(**batch)
    per_module = counter.get_flop_counts()
    fusion_attention = 0
    for index in range(fusion_layer, len(fusion.layers)):
        ops = per_module.get(f"{type(fusion).__name__}.encoder.bert.encoder.layer.{index}.attention.self", {})
        fusion_attention += sum(count for op, count in ops.items() if "bmm" in str(op))
    plugins = 0
    for name, ops in per_module.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[1] in ("image_into_text", "text_into_image"):
            plugins += sum(count for op, count in ops.items() if "bmm" in str(op))
    return counter.get_total_flops(), fusion_attention, plugins


def samples_per_second(fusion, batch: dict[str, torch.Tensor], repeats: int) -> float:
    size = batch["input_ids"].shape[0]
    with torch.inference_mode():
        fusion(**batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fusion(**batch)
            times.append(time.perf_counter() - start)
    return size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--regions", type=int, nargs="+", default=[10, 36, 100])
    parser.add_argument("--batch", type=int, default=8, help="batch size for the throughput runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per cell; 0 skips timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    encoder = minilm_sized_encoder()
    fusions = {label: build_fusion(cfg, encoder).eval() for label, cfg in VARIANTS}
    fusion_layer = FusionConfig().resolved(encoder.config.num_hidden_layers).mbt_fusion_layer
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    lines = [
        f"Forward pass, hidden 384 x 6 layers x 12 heads, fusion layers {fusion_layer}..5 (L_f = {fusion_layer}); "
        f"GFLOPs per sample; samples/s at batch {args.batch} on {device} with {torch.get_num_threads()} threads.",
        "",
        "| tokens | regions | strategy | GFLOPs total | attention GFLOPs, layers >= L_f | MI2P plug-in attention GFLOPs "
        "| vs single_stream (total / fusion-layer attention) | samples/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for tokens in args.tokens:
        for regions in args.regions:
            one = make_batch(1, tokens, regions)
            many = make_batch(args.batch, tokens, regions) if args.repeats else None
            reference = None
            for label, fusion in fusions.items():
                total, attention, plugins = count_flops(fusion, one, fusion_layer)
                reference = reference or (total, attention)
                speed = samples_per_second(fusion, many, args.repeats) if args.repeats else float("nan")
                lines.append(
                    f"| {tokens} | {regions} | {label} | {total / 1e9:.3f} | {attention / 1e9:.4f} | "
                    f"{plugins / 1e9:.4f} | {total / reference[0]:.2f} / {attention / reference[1]:.2f} | "
                    f"{speed:.1f} |"
                )
                print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    print()
    print(table)


if __name__ == "__main__":
    main()
