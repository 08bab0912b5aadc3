"""Pretraining benchmark: (a) trainer vs a bare PyTorch loop, (b) vs VisualBERT, (c) FLOP/s over the
matmul peak, on one rank (GPU if there is one, else CPU with gloo) or, under torchrun, on several.

    python bench/pretrain.py --out bench-pretrain.json              # the sizes below, fp32
    python bench/pretrain.py --precision auto --hidden 128 --layers 2 # quick look, bf16 where native
    torchrun --nproc_per_node 2 bench/pretrain.py --batch 16          # 2 ranks, the same global batch

With several ranks ``--batch`` is per rank, the bare loops are wrapped in
``DistributedDataParallel`` (what the trainer must not be slower than there) and samples/s count
all ranks.

(a) samples/s of the trainer's step (``pretrain.engine.train_micro_step`` on the DeepSpeed engine
    ``pretrain.engine.build_engine`` makes from a job config, with its one all-reduce per step for
    non-finite losses and stop signals) against a bare PyTorch loop on the same model, batch and precision: ``loss.backward()``,
    grad clipping, ``torch.optim.AdamW(fused=True)`` (the trainer's optimizer), LR schedule. In
    bf16/fp16 the bare loop is mixed precision as the trainer's is: fp32 weights and optimizer,
    the forward under ``torch.autocast``. A third loop, "bare_pure", keeps the weights themselves
    in bf16/fp16 with no fp32 copy (a different, less accurate algorithm: the floor of what a step
    can cost, reported for reference). Loops are timed in alternating rounds so a noisy machine
    hits all of them.
(b) our bare loop against ``transformers``' ``VisualBertForPreTraining`` (MLM + image-text
    matching) at the same hidden size, layers, heads, text and region lengths and precision.
(c) FLOPs of one training step (``torch.utils.flop_counter``: forward + backward) divided by its
    time in the bare loop, over the best matmul FLOP/s measured in the same run at the same dtype.

Memory per ZeRO stage is ``bench/zero_memory.py``; data loading is not part of these numbers (the
batch is fixed and already on the device): ``bench/pretrain_data.py`` measures the loader.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import BertConfig, VisualBertConfig, VisualBertForPreTraining  # noqa: E402

from pretrain.model import IGNORE_INDEX, ImageBertConfig, ImageBertForPretraining  # noqa: E402
from pretrain.model_config import ObjectiveWeights  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--feature-dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--text", type=int, default=32, help="text tokens per sample")
    p.add_argument("--regions", type=int, default=10, help="regions per sample")
    p.add_argument("--precision", choices=["auto", *DTYPES], default="fp32",
                   help="auto: bf16 where the device computes it natively (the trainer's default), else fp32")
    p.add_argument("--zero", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="ZeRO stage of the trainer in (a): auto (the default of the config: 0 on one rank, 2 on several), 0-3")
    p.add_argument("--steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--itm-pairs", choices=["masked", "unmasked"], default="masked",
                   help="the batch of data.itm_pairs: masked (one forward, the figures below) or unmasked "
                        "(the pretraining default: ITM in a second forward over the unmasked pairs)")
    p.add_argument("--skip-visualbert", action="store_true", help="leave out (b)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bert_config(args) -> BertConfig:
    return BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
    )


def imagebert(args) -> ImageBertForPretraining:
    torch.manual_seed(0)
    config = ImageBertConfig.from_bert(bert_config(args), feature_dim=args.feature_dim, num_region_classes=args.classes)
    return ImageBertForPretraining(config)


def make_batch(args, dev: torch.device, itm_pairs: str = "masked") -> dict:
    """A masked batch like pretrain.data's: 15% of tokens and regions masked, half the pairs negatives
    (with ``itm_pairs="unmasked"``, apart from the masked inputs as ``itm_input_ids``).
    On the device in float32, as the trainer hands it over (the model casts its inputs)."""
    g = torch.Generator().manual_seed(0)
    b, t, r = args.batch, args.text, args.regions
    input_ids = torch.randint(min(1000, args.vocab // 2), args.vocab, (b, t), generator=g)
    chosen = torch.rand(b, t, generator=g) < 0.15
    mlm_labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    features = torch.randn(b, r, args.feature_dim, generator=g).abs()
    region_masked = torch.rand(b, r, generator=g) < 0.15
    region_blanked = region_masked & (torch.rand(b, r, generator=g) < 0.9)
    cls_prob = torch.softmax(torch.randn(b, r, args.classes, generator=g), -1)
    batch = {
        "input_ids": input_ids, "attention_mask": torch.ones(b, t, dtype=torch.long), "mlm_labels": mlm_labels,
        "region_features": features, "region_blanked": region_blanked,
        "region_geometry": torch.rand(b, r, 5, generator=g), "region_mask": torch.ones(b, r, dtype=torch.long),
        "region_masked": region_masked, "region_cls_prob": cls_prob,
        "itm_labels": (torch.rand(b, generator=g) < 0.5).long(),
    }
    if itm_pairs == "unmasked":
        batch["itm_input_ids"] = torch.randint(min(1000, args.vocab // 2), args.vocab, (b, t), generator=g)
        batch["itm_attention_mask"] = torch.ones(b, t, dtype=torch.long)
    return {k: v.to(dev) for k, v in batch.items()}


# ---------------------------------------------------------------- the loops


class BareLoop:
    """Plain PyTorch: forward, backward, clip, AdamW, schedule (what the trainer must not be slower than).
    ``autocast``: fp32 weights, the forward in ``dtype`` (mixed precision); else weights in ``dtype``."""

    def __init__(self, model: torch.nn.Module, forward, dtype: torch.dtype, autocast: bool = False):
        self.autocast = autocast and dtype != torch.float32
        self.dtype = dtype
        self.model = model.to(device(), torch.float32 if self.autocast else dtype)
        self.model.train()
        self.module = self.model  # unwrapped, for its config
        if dist.get_world_size() > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.forward = forward
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 10))

    def loss(self) -> torch.Tensor:
        with torch.autocast(device().type, dtype=self.dtype, enabled=self.autocast):
            return self.forward(self.model)

    def step(self) -> None:
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class TrainerLoop:
    """The trainer's step: the engine's micro-step (``pretrain.engine.train_micro_step``: forward, the
    ranks' agreement on non-finite losses and stop signals, backward, step) on the DeepSpeed engine
    ``pretrain.engine.build_engine`` makes from a job config."""

    def __init__(self, args, batch: dict):
        from preprocess.config import from_dict
        from pretrain import checkpoint
        from pretrain.config import PretrainConfig
        from pretrain.engine import IntervalSums, build_engine
        from pretrain.trainer import pretraining_step

        cfg = from_dict(PretrainConfig, {
            "model": {"bert_config": {}, "tokenizer": "unused"},
            "data": {"batch_size": args.batch},
            "stages": [{"name": "bench", "shards": "x.tar", "eval_shards": "y.tar", "steps": 10**6, "warmup_steps": 10}],
            "deepspeed": {"zero_stage": args.zero, "precision": args.precision, "gradient_clipping": 1.0},
        })
        self.engine = build_engine(imagebert(args), cfg.deepspeed, cfg.stages[0], args.batch, Path("unused"))
        self.batch = batch
        self.step_fn = pretraining_step(cfg.objectives)
        self.sums = IntervalSums(device())
        self.preemption = checkpoint.PreemptionFlag()

    def step(self) -> None:
        from pretrain.engine import train_micro_step

        train_micro_step(self.engine, self.step_fn, self.batch, self.sums, self.preemption)


def visualbert_loop(args, dtype: torch.dtype) -> BareLoop:
    config = VisualBertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, visual_embedding_dim=args.feature_dim,
    )
    torch.manual_seed(0)
    model = VisualBertForPreTraining(config)
    dev = device()
    g = torch.Generator().manual_seed(0)
    b, t, r = args.batch, args.text, args.regions
    input_ids = torch.randint(min(1000, args.vocab // 2), args.vocab, (b, t), generator=g)
    labels = torch.full((b, t + r), IGNORE_INDEX, dtype=torch.long)
    chosen = torch.rand(b, t, generator=g) < 0.15
    labels[:, :t] = torch.where(chosen, input_ids, labels[:, :t])
    inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones(b, t, dtype=torch.long),
        "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "visual_embeds": torch.randn(b, r, args.feature_dim, generator=g),
        "visual_attention_mask": torch.ones(b, r, dtype=torch.long),
        "visual_token_type_ids": torch.ones(b, r, dtype=torch.long),
        "labels": labels, "sentence_image_labels": (torch.rand(b, generator=g) < 0.5).long(),
    }
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    return BareLoop(model, lambda m: m(**inputs).loss, dtype, autocast=True)


def time_rounds(loops: dict, args) -> dict[str, float]:
    """Median samples/s of each loop over ``rounds`` alternating rounds of ``steps`` steps."""
    for loop in loops.values():
        for _ in range(args.warmup):
            loop.step()
    rates = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                loop.step()
            synchronize()
            rates[name].append(args.steps * args.batch * dist.get_world_size() / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def step_flops(loop: BareLoop) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = loop.loss()
        loss.backward()
    loop.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, dev: torch.device) -> float:
    """Best FLOP/s of square matmuls in ``dtype`` (the ceiling the model's matmuls are held to)."""
    best = 0.0
    for n in (512, 1024, 2048):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        a @ b
        reps = 3 if dev.type == "cpu" else 50
        synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def init_ranks() -> None:
    """The process group: torchrun's, or one rank of this process alone."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = device()
    init_ranks()
    if args.precision == "auto":
        from pretrain.engine import choose_precision

        args.precision = choose_precision("auto", dev)
    dtype = DTYPES[args.precision]
    batch = make_batch(args, dev, args.itm_pairs)
    weights = ObjectiveWeights()
    ours = BareLoop(imagebert(args), lambda m: m(batch, weights).loss, dtype, autocast=True)
    params = sum(p.numel() for p in ours.model.parameters())
    loops = {"trainer": TrainerLoop(args, batch), "bare": ours}
    if dtype != torch.float32:
        loops["bare_pure"] = BareLoop(imagebert(args), lambda m: m(batch, weights).loss, dtype)
    if not args.skip_visualbert:
        loops["visualbert"] = visualbert_loop(args, dtype)
    rates = time_rounds(loops, args)

    flops = step_flops(ours)
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        ours.step()
    synchronize()
    step_seconds = (time.perf_counter() - start) / args.steps
    peak = matmul_peak(dtype, dev)
    result = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "params": params,
                  "feature_dim": args.feature_dim},
        "ranks": dist.get_world_size(), "batch": args.batch, "text": args.text, "regions": args.regions,
        "precision": args.precision,
        "trainer_zero_stage": loops["trainer"].engine.zero_optimization_stage(),
        "samples_per_s": rates,
        "a_trainer_over_bare": rates["trainer"] / rates["bare"],
        "c_step_flops": flops, "c_step_seconds": step_seconds, "c_achieved_flops_per_s": flops / step_seconds,
        "c_matmul_peak_flops_per_s": peak, "c_utilisation": flops / step_seconds / peak,
    }
    if "bare_pure" in rates:
        result["a_trainer_over_bare_pure"] = rates["trainer"] / rates["bare_pure"]
    if "visualbert" in rates:
        result["b_ours_over_visualbert"] = rates["bare"] / rates["visualbert"]
        result["visualbert_attention"] = loops["visualbert"].module.config._attn_implementation
    if dist.get_rank() != 0:
        return 0
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
