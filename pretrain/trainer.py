"""The pretraining job: DeepSpeed engine per stage, the training loop, evaluation, checkpoints.

``run`` sets up the process group and the run directory, then trains the stages in order.
Each stage gets a fresh engine (its learning-rate schedule differs), started from the
previous stage's checkpoint; ``train_stage`` is the whole training step, top to bottom.

Run directory (``docs/pretrain.md`` has the details)::

    config.yaml  feature_spec.json  model/ (BERT config + tokenizer)  metrics.jsonl  tb/
    checkpoints/ (see pretrain.checkpoint)  done.json (only when every stage finished)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm
from transformers import AutoTokenizer, BertConfig

from preprocess.config import dump_yaml, merge, to_dict
from preprocess.feature_format import FeatureSpec
from preprocess.launch_env import LaunchEnv, read_launch_env
from pretrain import checkpoint
from pretrain.config import PretrainConfig, StageConfig, resolve_model_path
from pretrain.data import build_train_loader, check_spec_matches_model, feature_spec_of, to_device
from pretrain.evaluate import evaluate
from pretrain.model import ImageBertForPretraining, ImageBertModel, imagebert_config

log = logging.getLogger("pretrain")

METRICS_FILE = "metrics.jsonl"
DONE_FILE = "done.json"
MODEL_DIR = "model"  # BERT config (with the region fields) and tokenizer: what export needs
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR


# ---------------------------------------------------------------- setup


def init_distributed(env: LaunchEnv) -> torch.device:
    """Process group from the launcher's variables: NCCL on GPUs, gloo on the CPU."""
    # DeepSpeed and torch.distributed read these; under srun they were not set by a launcher.
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return device


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s %(levelname)s: %(message)s",
        force=True,
    )
    # DeepSpeed logs every engine detail at INFO on every rank.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def check_feature_specs(cfg: PretrainConfig) -> FeatureSpec:
    """The spec of the first stage's shards, after checking every stage's train and eval shards agree."""
    first_name = cfg.shard_path(cfg.stages[0].shards)
    spec = feature_spec_of(first_name)
    for stage in cfg.stages:
        for pattern in (stage.shards, stage.eval_shards):
            path = cfg.shard_path(pattern)
            spec.check_compatible(feature_spec_of(path), first_name, path)
    return spec


def build_model(cfg: PretrainConfig, spec: FeatureSpec, vocab_size: int) -> ImageBertForPretraining:
    """ImageBERT with its text side from the pretrained BERT, or randomly initialised from ``bert_config``."""
    # Same seed on every rank: ZeRO-3 partitions each rank's own copy, so they must agree.
    torch.manual_seed(cfg.seed)
    if cfg.model.bert is not None:
        encoder = ImageBertModel.from_pretrained_bert(
            resolve_model_path(cfg.model.bert), spec.feature_dim, spec.num_classes, cfg.model.pooling
        )
        layers = encoder.bert.encoder.layer
        if cfg.model.num_layers is not None:
            if cfg.model.num_layers > len(layers):
                raise ValueError(f"model.num_layers={cfg.model.num_layers} but {cfg.model.bert} has {len(layers)} layers")
            encoder.bert.encoder.layer = layers[: cfg.model.num_layers]
            encoder.config.num_hidden_layers = cfg.model.num_layers
        model = ImageBertForPretraining(encoder.config, encoder=encoder)
    else:
        bert_kwargs = {"vocab_size": vocab_size, **cfg.model.bert_config}
        config = imagebert_config(BertConfig(**bert_kwargs), spec.feature_dim, spec.num_classes, cfg.model.pooling)
        model = ImageBertForPretraining(config)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} < tokenizer's {vocab_size}: model.bert_config.vocab_size")
    if cfg.model.activation_checkpointing:
        model.imagebert.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint.mark_universal(model)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and LayerNorm gains are left alone (BERT's recipe)."""
    decay, no_decay = [], []
    for param in model.parameters():  # yields the tied word-embedding matrix once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: PretrainConfig, stage: StageConfig, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of one stage, built from the typed job config."""
    ds = cfg.deepspeed
    warmup = max(1, stage.warmup_steps)  # DeepSpeed's schedulers refuse 0; one step of warm-up is no warm-up
    if stage.schedule == "linear":
        scheduler = {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": stage.lr, "warmup_num_steps": warmup,
                "total_num_steps": stage.steps, "warmup_type": "linear",
            },
        }
    else:
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "warmup_min_ratio": 0.0, "warmup_num_steps": warmup, "total_num_steps": stage.steps,
                "cos_min_ratio": stage.min_lr_ratio, "warmup_type": "linear",
            },
        }
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": stage.lr, "betas": list(ds.betas), "eps": ds.eps, "weight_decay": ds.weight_decay,
                # DeepSpeed's fused Adam needs CUDA; on the CPU the torch implementation does the same maths.
                "torch_adam": not torch.cuda.is_available(),
            },
        },
        "scheduler": scheduler,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return merge(config, ds.extra)


def prepare_run_dir(cfg: PretrainConfig, paths: RunPaths, spec: FeatureSpec, tokenizer, model_config: BertConfig) -> None:
    """Rank 0: resolved config, feature spec, model config and tokenizer (all export needs)."""
    for directory in (paths.root, paths.checkpoints, paths.tensorboard, paths.model):
        directory.mkdir(parents=True, exist_ok=True)
    config_file = paths.root / "config.yaml"
    if config_file.is_file():
        previous = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        changed = _changed_keys(previous, to_dict(cfg))
        if changed:
            log.warning("resuming with a changed config; keys: %s", ", ".join(changed))
    dump_yaml(cfg, config_file)
    spec.save(paths.root)
    model_config.save_pretrained(paths.model)
    tokenizer.save_pretrained(paths.model)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


# ---------------------------------------------------------------- the job


def run(cfg: PretrainConfig, run_dir: str | Path, resume: bool) -> int:
    """Train every stage (or what is left of them with ``resume``); returns the final global step."""
    env = read_launch_env()
    device = init_distributed(env)
    setup_logging(env.rank)
    paths = RunPaths(Path(run_dir))

    # Everything that can be wrong with the inputs is checked before the model is built.
    spec = check_feature_specs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path())
    resume_from = checkpoint.latest_state(paths.checkpoints) if resume else None
    if not resume and (paths.checkpoints / checkpoint.LATEST_FILE).is_file():
        raise SystemExit(f"{paths.root} already has checkpoints: pass --resume to continue it, or use a new --run-dir")
    if resume_from is not None and resume_from.stage >= len(cfg.stages):
        raise SystemExit(f"checkpoint {resume_from.tag} is in stage {resume_from.stage}; the config has {len(cfg.stages)}")
    if (paths.root / DONE_FILE).is_file() and resume:
        log.info("%s: all stages already done (%s)", paths.root, DONE_FILE)
        if env.rank == 0 and paths.metrics.is_file():
            lines = paths.metrics.read_text(encoding="utf-8").splitlines()
            print_summary(json.loads(lines[-1]) if lines else None)
        return json.loads((paths.root / DONE_FILE).read_text())["global_step"]

    model = build_model(cfg, spec, len(tokenizer))
    check_spec_matches_model(spec, model.config, cfg.shard_path(cfg.stages[0].shards))
    if env.rank == 0:
        prepare_run_dir(cfg, paths, spec, tokenizer, model.config)
    dist.barrier()
    writer = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(paths.tensorboard))
    preemption = checkpoint.PreemptionFlag()

    source = resume_from  # the checkpoint the next stage starts from (None: from the initial weights)
    if source is not None:
        log.info("resuming from %s (stage %d, step %d in stage)", source.tag, source.stage, source.step_in_stage)
    first_stage = 0
    if source is not None:
        finished = source.step_in_stage >= cfg.stages[source.stage].steps
        first_stage = source.stage + 1 if finished else source.stage
    last_eval: dict[str, Any] | None = None
    for stage_index in range(first_stage, len(cfg.stages)):
        if stage_index > first_stage or model is None:
            model = build_model(cfg, spec, len(tokenizer))
        engine, start_step = start_stage(cfg, paths, model, stage_index, source, env.world_size)
        model = None  # the engine owns (and under ZeRO-3 partitions) it now
        source, preempted, last_eval = train_stage(
            cfg, paths, engine, stage_index, start_step, source.global_step if source else 0,
            tokenizer, spec, device, env, writer, preemption, last_eval,
        )
        del engine
        if preempted:
            log.info("stopped by %s after a checkpoint at step %d; rerun with --resume", preempted, source.global_step)
            break
    else:
        if env.rank == 0:
            checkpoint.write_atomic(paths.root / DONE_FILE, json.dumps({"global_step": source.global_step}) + "\n")
            print_summary(last_eval)
    if writer is not None:
        writer.close()
    preemption.restore()
    dist.barrier()
    return source.global_step if source else 0


def start_stage(
    cfg: PretrainConfig, paths: RunPaths, model: ImageBertForPretraining, stage_index: int,
    source: checkpoint.TrainerState | None, world_size: int,
) -> tuple[Any, int]:
    """The stage's engine, loaded from ``source``; returns (engine, optimizer steps already done in the stage).

    ``source`` is in this stage: resume it whole (weights, optimizer, schedule). ``source`` ended
    the previous stage: take its weights, and its optimizer moments unless ``reset_optimizer``.
    """
    stage = cfg.stages[stage_index]
    mid_stage = source is not None and source.stage == stage_index
    keep_optimizer = source is not None and (mid_stage or not stage.reset_optimizer)
    if source is not None and not keep_optimizer:
        # Weights only: consolidate the fp32 master weights (any ZeRO stage, any world size).
        weights = checkpoint.consolidated_weights(paths.checkpoints, source.tag)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k != "mlm_head.decoder.weight"]  # tied to the word embeddings
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {source.tag}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    universal = keep_optimizer and checkpoint.needs_universal(paths.checkpoints, source, world_size)
    load_tag = checkpoint.convert_to_universal(paths.checkpoints, source.tag) if universal else None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.deepspeed.weight_decay),
        config=deepspeed_config(cfg, stage, load_universal=universal),
    )
    if keep_optimizer:
        load_path, _ = engine.load_checkpoint(
            str(paths.checkpoints), tag=load_tag or source.tag,
            load_optimizer_states=True, load_lr_scheduler_states=mid_stage,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {source.tag} from {paths.checkpoints}")
    start_step = source.step_in_stage if mid_stage else 0
    log.info(
        "stage %d (%s): %d/%d steps done, %s, ZeRO-%d, %s", stage_index, stage.name, start_step, stage.steps,
        "resumed" if mid_stage else ("from previous stage" if source else "from initial weights"),
        cfg.deepspeed.zero_stage, cfg.deepspeed.precision,
    )
    return engine, start_step


def train_stage(
    cfg: PretrainConfig, paths: RunPaths, engine, stage_index: int, start_step: int, global_step: int,
    tokenizer, spec: FeatureSpec, device: torch.device, env: LaunchEnv, writer, preemption, last_eval,
) -> tuple[checkpoint.TrainerState, str | None, dict | None]:
    """Train one stage from ``start_step``: the whole step (forward, backward, optimizer step,
    logging, evaluation, checkpoint) in one loop.

    Returns (state of the last checkpoint, the signal that stopped it or None, last evaluation).
    """
    stage = cfg.stages[stage_index]
    dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
    accumulation = cfg.deepspeed.gradient_accumulation_steps
    # Seeded from (seed, stage, step): a resumed run is reproducible and does not replay the
    # exact batches it trained on before the interruption.
    loader = build_train_loader(
        cfg.shard_path(stage.shards), tokenizer, spec, cfg.data, cfg.masking,
        seed=cfg.seed + 1000 * stage_index + start_step, rank=env.rank, world_size=env.world_size,
    )
    batches = iter(loader)
    bar = tqdm(
        total=stage.steps, initial=start_step, desc=f"stage {stage_index} ({stage.name})", dynamic_ncols=True,
        disable=env.rank != 0 or not cfg.logging.progress_bar,
    )
    # Sums over the logging interval, all-reduced when logged: per-objective losses, real tokens, samples.
    interval = torch.zeros(8, dtype=torch.float64, device=device)
    names = ("loss", "mlm", "moc", "mrfr", "itm", "micro_steps", "tokens", "samples")
    interval_start = time.perf_counter()
    state = None
    engine.train()

    for step_in_stage in range(start_step + 1, stage.steps + 1):
        for _ in range(accumulation):
            batch = to_device(next(batches), device, dtype)
            out = engine(batch, cfg.objectives)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer and the LR schedule at the accumulation boundary
            losses = [out.loss] + [out.losses.get(n, torch.zeros((), device=device)) for n in names[1:5]]
            interval[:5] += torch.stack([l.detach().double() for l in losses])
            interval[5] += 1
            interval[6] += batch["attention_mask"].sum() + batch["region_mask"].sum()
            interval[7] += batch["input_ids"].shape[0]
        global_step += 1
        bar.update(1)

        if global_step % cfg.logging.every_steps == 0 or step_in_stage == stage.steps:
            dist.all_reduce(interval)  # sums over ranks; the means below divide by all micro-steps
            seconds = time.perf_counter() - interval_start
            sums = dict(zip(names, interval.tolist()))
            scalars = {f"train/{n}": sums[n] / max(sums["micro_steps"], 1) for n in names[:5]}
            scalars["train/lr"] = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                scalars["train/grad_norm"] = float(grad_norm)
            scalars["perf/samples_per_s"] = sums["samples"] / seconds
            scalars["perf/tokens_per_s"] = sums["tokens"] / seconds
            if writer is not None:
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, global_step)
                writer.add_scalar("train/stage", stage_index, global_step)
            bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{scalars['train/lr']:.2e}")
            if not cfg.logging.progress_bar:  # e.g. batch jobs: the log is the only record besides TensorBoard
                log.info("step %d: %s", global_step, ", ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in scalars.items()))
            interval.zero_()
            interval_start = time.perf_counter()

        if global_step % cfg.eval.every_steps == 0 or step_in_stage == stage.steps:
            metrics = evaluate(
                engine.module, cfg.shard_path(stage.eval_shards), tokenizer, spec, cfg.data, cfg.masking,
                cfg.eval, device, dtype, objectives=cfg.objectives,
            )
            engine.train()
            last_eval = {"step": global_step, "stage": stage_index, "stage_name": stage.name, **metrics}
            if env.rank == 0:
                append_metrics(paths.metrics, last_eval)
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{name}", value, global_step)
                log.info("eval at step %d: %s", global_step, _format_eval(last_eval))
            interval_start = time.perf_counter()  # evaluation time is not training throughput

        stop = preemption.agreed(device)
        if stop or global_step % cfg.checkpoint.every_steps == 0 or step_in_stage == stage.steps:
            state = checkpoint.TrainerState(
                global_step=global_step, stage=stage_index, step_in_stage=step_in_stage,
                world_size=env.world_size, zero_stage=cfg.deepspeed.zero_stage,
            )
            checkpoint.save(engine, paths.checkpoints, state, cfg.checkpoint.keep)
            interval_start = time.perf_counter()
        if stop:
            bar.close()
            return state, stop, last_eval
    bar.close()
    return state, None, last_eval


# ---------------------------------------------------------------- reporting


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per evaluation, flushed and fsynced so a killed job keeps what it measured."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _format_eval(record: dict[str, Any]) -> str:
    keys = ("itm_acc", "mlm_acc", "moc_acc", "mrfr_loss", "i2t_r1", "t2i_r1")
    return ", ".join(f"{k}={record[k]:.3f}" for k in keys if k in record)


def print_summary(record: dict[str, Any] | None) -> None:
    """The last evaluation beside chance, printed at the end of a finished run."""
    if record is None:
        return
    n = record.get("num_candidates", 0)
    rows = [
        ("ITM accuracy", record.get("itm_acc"), record.get("itm_chance", 0.5)),
        ("MLM accuracy", record.get("mlm_acc"), None),
        ("MOC accuracy", record.get("moc_acc"), None),
        ("MRFR loss", record.get("mrfr_loss"), None),
    ]
    for k in (1, 5, 10):
        chance = record.get(f"r{k}_chance", min(k, n) / n if n else math.nan)
        rows.append((f"image->text R@{k}", record.get(f"i2t_r{k}"), chance))
        rows.append((f"text->image R@{k}", record.get(f"t2i_r{k}"), chance))
    lines = [
        f"held-out evaluation at step {record['step']} (stage {record['stage_name']}, {n} retrieval candidates)",
        f"{'metric':<20}{'value':>10}{'chance':>10}",
    ]
    for name, value, chance in rows:
        if value is None:
            continue
        lines.append(f"{name:<20}{value:>10.3f}{'' if chance is None else f'{chance:>10.3f}'}")
    print("\n".join(lines), flush=True)
