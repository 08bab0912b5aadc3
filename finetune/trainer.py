"""The fine-tuning job: a release's encoder + fusion strategy + task head on DeepSpeed.

Launchers, process group, DeepSpeed config, checkpoints (atomic ``latest``, pruning, universal
conversion on a new world size) and SIGTERM/SIGUSR1 handling are pretraining's own
(``pretrain.trainer``, ``pretrain.checkpoint``); this module adds the task model, its data and
its evaluation. ``train`` is the whole training step, top to bottom.

Run directory::

    config.yaml  feature_spec.json  init.json (the release it started from)
    model/ (BERT config with the region fields + tokenizer: evaluate rebuilds the model from it)
    checkpoints/  tb/  metrics.jsonl  results.json (validation at the end)  done.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from finetune.config import FinetuneConfig
from finetune.data import build_train_loader, read_samples, to_device
from finetune.evaluate import HEADLINE, RESULTS_FILE, evaluate_samples, format_results, results_record, write_results
from finetune.tasks import FinetuneModel, build_finetune_model
from preprocess.config import dump_yaml
from preprocess.feature_format import FeatureSpec
from preprocess.launch_env import LaunchEnv, read_launch_env
from pretrain import checkpoint
from pretrain.data import feature_spec_of
from pretrain.release import load_release
from pretrain.trainer import PRECISION_DTYPES, append_metrics, deepspeed_config, init_distributed, param_groups, setup_logging

log = logging.getLogger("finetune")

DONE_FILE = "done.json"
INIT_FILE = "init.json"


class RunPaths:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tb"
        self.model = self.root / "model"
        self.metrics = self.root / "metrics.jsonl"
        self.results = self.root / RESULTS_FILE


def check_inputs(cfg: FinetuneConfig, init: str | Path) -> FeatureSpec:
    """The release's feature spec, after checking the task shards were extracted the same way."""
    release_spec = FeatureSpec.load(init)
    for pattern in (cfg.data.train, cfg.data.val):
        if pattern:
            shards = cfg.shard_path(pattern)
            release_spec.check_compatible(feature_spec_of(shards), f"release {init}", f"task shards {shards}")
    return release_spec


def prepare_run_dir(cfg: FinetuneConfig, paths: RunPaths, init: str | Path, release) -> None:
    """Rank 0: resolved config, feature spec, model config and tokenizer (all evaluate needs besides weights)."""
    for directory in (paths.root, paths.checkpoints, paths.tensorboard, paths.model):
        directory.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, paths.root / "config.yaml")
    release.feature_spec.save(paths.root)
    release.model.config.save_pretrained(paths.model)
    release.tokenizer.save_pretrained(paths.model)
    checkpoint.write_atomic(paths.root / INIT_FILE, json.dumps({"release": str(Path(init).resolve())}) + "\n")


def run(cfg: FinetuneConfig, init: str | Path, run_dir: str | Path, resume: bool) -> int:
    """Fine-tune (or continue with ``resume``); returns the final step."""
    # Everything that can be wrong with the inputs is checked before the process group and the model.
    try:
        spec = check_inputs(cfg, init)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    env = read_launch_env()
    device = init_distributed(env)
    setup_logging(env.rank)
    paths = RunPaths(run_dir)
    resume_from = checkpoint.latest_state(paths.checkpoints) if resume else None
    if not resume and (paths.checkpoints / checkpoint.LATEST_FILE).is_file():
        raise SystemExit(f"{paths.root} already has checkpoints: pass --resume to continue it, or use a new --run-dir")
    done_file = paths.root / DONE_FILE
    if resume and done_file.is_file():
        done_step = json.loads(done_file.read_text(encoding="utf-8"))["global_step"]
        if done_step >= cfg.train.steps:
            log.info("%s: already finished at step %d (%s)", paths.root, done_step, DONE_FILE)
            return done_step
        if env.rank == 0:
            done_file.unlink()  # train.steps grew: the run goes on

    release = load_release(init)
    torch.manual_seed(cfg.seed)  # new heads and plug-ins identical on every rank
    model = build_finetune_model(release.model, cfg.task, cfg.fusion)
    checkpoint.mark_universal(model)
    if env.rank == 0:
        prepare_run_dir(cfg, paths, init, release)
    dist.barrier()

    universal = resume_from is not None and checkpoint.needs_universal(paths.checkpoints, resume_from, env.world_size)
    load_tag = checkpoint.convert_to_universal(paths.checkpoints, resume_from.tag) if universal else None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.deepspeed.weight_decay),
        config=deepspeed_config(cfg, cfg.train, load_universal=universal),
    )
    start_step = 0
    if resume_from is not None:
        load_path, _ = engine.load_checkpoint(str(paths.checkpoints), tag=load_tag or resume_from.tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {resume_from.tag} from {paths.checkpoints}")
        start_step = resume_from.global_step
        log.info("resumed from %s", resume_from.tag)

    val_samples = None
    if cfg.data.val:
        val_samples = read_samples(
            cfg.shard_path(cfg.data.val), release.tokenizer, spec, cfg.data, cfg.task, cfg.eval.max_samples
        )
    writer = None
    if env.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(paths.tensorboard))
    preemption = checkpoint.PreemptionFlag()
    try:
        step, preempted, last_eval = train(
            cfg, paths, engine, start_step, release.tokenizer, spec, val_samples, device, env, writer, preemption
        )
    finally:
        preemption.restore()
        if writer is not None:
            writer.close()
    if preempted:
        log.info("stopped by %s after a checkpoint at step %d; rerun with --resume", preemption.received, step)
    elif env.rank == 0:
        if last_eval is not None:
            record = results_record(cfg, last_eval, cfg.shard_path(cfg.data.val), len(val_samples), None, step=step)
            write_results(paths.results, record)
            print(format_results(record), flush=True)
        checkpoint.write_atomic(paths.root / DONE_FILE, json.dumps({"global_step": step}) + "\n")
    dist.barrier()
    return step


def train(
    cfg: FinetuneConfig, paths: RunPaths, engine, start_step: int, tokenizer, spec: FeatureSpec,
    val_samples: list[dict] | None, device: torch.device, env: LaunchEnv, writer, preemption,
) -> tuple[int, bool, dict | None]:
    """The training loop: forward, backward, step, logging, validation, checkpoint. Returns (step, preempted, last eval)."""
    dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
    accumulation = cfg.deepspeed.gradient_accumulation_steps
    # Seeded from (seed, step): a resumed run does not replay the batches it already trained on.
    loader = build_train_loader(
        cfg.shard_path(cfg.data.train), tokenizer, spec, cfg.data, cfg.task,
        seed=cfg.seed + start_step, rank=env.rank, world_size=env.world_size,
    )
    batches = iter(loader)
    module: FinetuneModel = engine.module
    bar = tqdm(
        total=cfg.train.steps, initial=start_step, desc=f"finetune {cfg.task.name}/{cfg.fusion.name}",
        dynamic_ncols=True, disable=env.rank != 0 or not cfg.logging.progress_bar,
    )
    names = ("loss", "task_loss", "aux_loss", "micro_steps", "samples")
    interval = torch.zeros(len(names), dtype=torch.float64, device=device)
    interval_start = time.perf_counter()
    last_eval = None
    step = start_step
    engine.train()

    for step in range(start_step + 1, cfg.train.steps + 1):
        for _ in range(accumulation):
            batch = to_device(next(batches), device, dtype)
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps optimizer and schedule at the accumulation boundary
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
            interval[:3] += torch.stack([out.loss.detach(), out.task_loss.detach(), aux.detach()]).double()
            interval[3] += 1
            interval[4] += batch["input_ids"].shape[0]
        bar.update(1)

        if step % cfg.logging.every_steps == 0 or step == cfg.train.steps:
            dist.all_reduce(interval)
            sums = dict(zip(names, interval.tolist()))
            scalars = {f"train/{n}": sums[n] / max(sums["micro_steps"], 1) for n in names[:3]}
            scalars["train/lr"] = engine.get_lr()[0]
            scalars["perf/samples_per_s"] = sums["samples"] / (time.perf_counter() - interval_start)
            if writer is not None:
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, step)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}")
            interval.zero_()
            interval_start = time.perf_counter()

        if val_samples is not None and (step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
            # Every rank evaluates (ZeRO-3 needs them all in each forward); rank 0 records.
            metrics = evaluate_samples(module, val_samples, cfg, tokenizer.pad_token_id, device, dtype)
            last_eval = metrics
            if env.rank == 0:
                append_metrics(paths.metrics, {"step": step, **metrics})
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{name}", value, step)
                headline = HEADLINE[cfg.task.name]
                log.info("eval at step %d: %s=%.2f", step, headline, metrics[headline])
            interval_start = time.perf_counter()

        stop = preemption.agreed(device)
        if stop or step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
            state = checkpoint.TrainerState(
                global_step=step, stage=0, step_in_stage=step, world_size=env.world_size,
                zero_stage=cfg.deepspeed.zero_stage,
            )
            checkpoint.save(engine, paths.checkpoints, state, cfg.checkpoint.keep)
            interval_start = time.perf_counter()
        if stop:
            bar.close()
            return step, True, last_eval
    bar.close()
    if val_samples is not None and last_eval is None:  # resumed after the last step's checkpoint
        last_eval = evaluate_samples(module, val_samples, cfg, tokenizer.pad_token_id, device, dtype)
    return step, False, last_eval
