"""FLOPs and throughput of each fusion strategy at growing region and token counts.

    python bench/fusion.py [--regions 10 36 100] [--tokens 16 64 128] [--batch 8] [--repeats 3]
                           [--where-to-fuse TOKENS REGIONS ...] [--out FILE.md]

Builds a MiniLM-sized ImageBERT (hidden 384, 6 layers, 12 heads; random weights: cost does not
depend on the values) and, per strategy and (tokens, regions) pair, reports:

- forward GFLOPs per sample, counted by ``torch.utils.flop_counter.FlopCounterMode``;
- attention GFLOPs (QK^T and AV) inside the fusion layers ``L_f..L-1`` (the MBT split, default
  4 of 6), read from the per-module breakdown: the cost MBT's claim is about, since below
  ``L_f`` MBT, MuSE and late fusion all run the same unimodal streams;
- MI2P's plug-in attention GFLOPs (its cross-modal attention lives outside the layers);
- forward samples/s (best of a few batches, strategies timed round-robin, inference mode);
- then MBT's "where to fuse" comparison: total GFLOPs against L_f = 0..6 for full cross-modal
  attention from L_f on (a benchmark-only routing, ``FullAttentionMidFusion``) and for B=4
  bottlenecks from L_f on.

FLOPs are counted under SDPA's math backend: the fused CPU kernel is not in the counter's
table, the math backend decomposes into the matmuls that are. Timing uses the default kernel.
The markdown table goes to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.fusion import FusionConfig  # noqa: E402
from finetune.fusion.build import build_fusion  # noqa: E402
from finetune.fusion.routing import FusedOutput, FusionEncoder, FusionInputs, Stream, run_layer  # noqa: E402
from pretrain.model import ImageBertConfig, ImageBertModel  # noqa: E402

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


class FullAttentionMidFusion(FusionEncoder):
    """MBT's comparison point, for this benchmark only: streams apart below L_f, then one joint
    stream with full cross-modal attention (the paper's "vanilla cross-attention" mid fusion)."""

    def __init__(self, encoder: ImageBertModel, fusion_layer: int):
        super().__init__(encoder, pooled_dims=[encoder.config.hidden_size])
        self.fusion_layer = fusion_layer

    def route(self, text: Stream, image: Stream, inputs: FusionInputs) -> FusedOutput:
        for index, layer in enumerate(self.layers):
            if index == self.fusion_layer:
                text = Stream(torch.cat([text.states, image.states], 1), torch.cat([text.mask, image.mask], 1))
            if index < self.fusion_layer:
                text, image = run_layer(layer, text), run_layer(layer, image)
            else:
                text = run_layer(layer, text)
        return FusedOutput(text.states, text.states, [self.pool(text)])


def minilm_sized_encoder() -> ImageBertModel:
    torch.manual_seed(0)
    config = ImageBertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522,
        feature_dim=FEATURE_DIM, num_region_classes=1601,
    )
    return ImageBertModel(config).eval()


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
        fusion(FusionInputs(**batch))
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


def samples_per_second(fusions: dict, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Forward samples/s per strategy: best of ``repeats`` batches, strategies timed round-robin so
    that load from other processes falls on all of them alike (the minimum is the least disturbed run)."""
    size = batch["input_ids"].shape[0]
    best = {label: float("inf") for label in fusions}
    with torch.inference_mode():
        for fusion in fusions.values():
            fusion(FusionInputs(**batch))  # warm-up
        for _ in range(repeats):
            for label, fusion in fusions.items():
                start = time.perf_counter()
                fusion(FusionInputs(**batch))
                best[label] = min(best[label], time.perf_counter() - start)
    return {label: size / seconds for label, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--regions", type=int, nargs="+", default=[10, 36, 100])
    parser.add_argument("--batch", type=int, default=8, help="batch size for the throughput runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per cell; 0 skips timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--where-to-fuse",
        type=int,
        nargs=2,
        action="append",
        metavar=("TOKENS", "REGIONS"),
        help="sizes for the FLOPs-against-L_f table (repeatable; default: 128 100 and 512 1024)",
    )
    parser.add_argument("--no-where-to-fuse", action="store_true", help="skip the FLOPs-against-L_f table")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    args.where_to_fuse = [] if args.no_where_to_fuse else args.where_to_fuse or [(128, 100), (512, 1024)]
    if args.threads:
        torch.set_num_threads(args.threads)

    encoder = minilm_sized_encoder()
    fusions = {label: build_fusion(cfg, encoder).eval() for label, cfg in VARIANTS}
    depth = encoder.config.num_hidden_layers
    fusion_layer = FusionConfig().resolved(depth).mbt_fusion_layer
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    lines = [
        f"Forward pass, hidden 384 x 6 layers x 12 heads, fusion layers {fusion_layer}..{depth - 1} (L_f = {fusion_layer}); "
        f"GFLOPs per sample; samples/s: best of {args.repeats} batches of {args.batch} on {device} "
        f"with {torch.get_num_threads()} threads.",
        "",
        f"| tokens | regions | strategy | GFLOPs total | attention GFLOPs, layers {fusion_layer}-{depth - 1} "
        "| MI2P plug-in attention GFLOPs "
        "| vs single_stream (total / fusion-layer attention) | samples/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for tokens in args.tokens:
        for regions in args.regions:
            one = make_batch(1, tokens, regions)
            many = make_batch(args.batch, tokens, regions) if args.repeats else None
            reference = None
            speeds = samples_per_second(fusions, many, args.repeats) if args.repeats else {}
            for label, fusion in fusions.items():
                total, attention, plugins = count_flops(fusion, one, fusion_layer)
                reference = reference or (total, attention)
                speed = speeds.get(label, float("nan"))
                lines.append(
                    f"| {tokens} | {regions} | {label} | {total / 1e9:.3f} | {attention / 1e9:.4f} | "
                    f"{plugins / 1e9:.4f} | {total / reference[0]:.2f} / {attention / reference[1]:.2f} | "
                    f"{speed:.1f} |"
                )
                print(lines[-1], flush=True)
    if args.where_to_fuse:
        lines += [
            "",
            f"Where to fuse (MBT's figure): forward GFLOPs per sample against the first fusion layer L_f, "
            f"full cross-modal attention from L_f on vs B=4 bottlenecks from L_f on (L_f = {depth}: no fusion layer).",
            "",
            "| tokens | regions | fusion | " + " | ".join(f"L_f={i}" for i in range(depth + 1)) + " |",
            "|---:|---:|---|" + "---:|" * (depth + 1),
        ]
        for tokens, regions in args.where_to_fuse:
            one = make_batch(1, tokens, regions)
            for label, build in (
                ("full attention", lambda lf: FullAttentionMidFusion(encoder, lf)),
                ("bottlenecks B=4", lambda lf: build_fusion(FusionConfig(name="mbt", mbt_fusion_layer=lf), encoder)),
            ):
                cells = [count_flops(build(lf).eval(), one, lf)[0] / 1e9 for lf in range(depth + 1)]
                lines.append(f"| {tokens} | {regions} | {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
                print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    print()
    print(table)


if __name__ == "__main__":
    main()
