"""The fine-tuning job: a release's encoder + fusion strategy + task head, trained by the engine.

The whole run is one phase of ``pretrain.engine`` (process group, DeepSpeed, the step loop,
checkpoints, preemption and the run directory are the engine's); this module adds the task
model (``finetune.tasks``), its data (``finetune.data``), its step and its evaluation. Run
directory: the engine's (``pretrain.engine.RunPaths``) plus::

    init.json     the release the run started from
    results.json  validation at the end of training (``finetune.evaluate`` writes here too by default)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finetune.config import FinetuneConfig
from finetune.data import build_train_loader, read_samples
from finetune.evaluate import RESULTS_FILE
from finetune.evaluation import HEADLINE, evaluate_samples, format_results, results_record, write_results
from finetune.tasks import build_finetune_model
from preprocess import atomic
from preprocess.feature_format import FeatureSpec
from preprocess.launch_env import read_launch_env
from pretrain import checkpoint
from pretrain.data import feature_spec_of
from pretrain.distributed import init_distributed
from pretrain.engine import (
    Phase, RunPaths, SkipCounts, Trainer, build_engine, evaluation_precision, setup_logging,
)
from pretrain.release import load_release

log = logging.getLogger("finetune")

INIT_FILE = "init.json"


def check_inputs(cfg: FinetuneConfig, init: str | Path) -> FeatureSpec:
    """The release's feature spec, after checking the task shards were extracted the same way."""
    release_spec = FeatureSpec.load(init)
    for key in ("train", "val"):
        if getattr(cfg.data, key):
            shards = cfg.shard_path(getattr(cfg.data, key))
            spec = feature_spec_of(shards, f"data.{key}")
            release_spec.check_compatible(spec, f"release {init}", f"task shards {shards}")
    return release_spec


def finetuning_step(engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The engine's step: task loss plus the strategy's auxiliary loss, and both parts to log."""
    out = engine(batch)
    losses = {"loss": out.loss, "task_loss": out.task_loss}
    if out.aux_loss is not None:
        losses["aux_loss"] = out.aux_loss
    return losses


def run(cfg: FinetuneConfig, init: str | Path, run_dir: str | Path, resume: bool, spec: FeatureSpec) -> int:
    """Fine-tune (or continue with ``resume``) on shards whose spec the caller has checked
    (``check_inputs``, before any rank starts); returns the final step."""
    env = read_launch_env()
    device = init_distributed(env)
    setup_logging(env.rank)
    paths = RunPaths(run_dir)
    resume_from = paths.resume_point(resume)
    finished = paths.finished_at(cfg.train.steps)
    if finished is not None:
        log.info("%s: already finished at step %d (%s)", paths.root, finished, paths.done)
        return finished
    dist.barrier()  # every rank has read done.json before rank 0 may remove it (write_run_files)

    release = load_release(init)
    torch.manual_seed(cfg.seed)  # new heads and plug-ins identical on every rank
    model = build_finetune_model(release.model, cfg.task, cfg.fusion)
    checkpoint.mark_universal(model)
    if env.rank == 0:
        paths.write_run_files(cfg, spec, release.model.config, release.tokenizer,
                              resumed_at=resume_from.global_step if resume_from else 0)
        atomic.write_json(paths.root / INIT_FILE, {"release": str(Path(init).resolve())})
    dist.barrier()

    engine = build_engine(
        model.train(), cfg.deepspeed, cfg.train, cfg.data.batch_size, paths.checkpoints, resume=resume_from,
        lr_overrides=model.lr_overrides(),
    )
    done = resume_from.global_step if resume_from is not None else 0
    if resume_from is not None:
        log.info("resumed from %s", resume_from.tag)
    val_samples = None
    if cfg.data.val:
        val_samples = read_samples(
            cfg.shard_path(cfg.data.val), release.tokenizer, spec, cfg.data, cfg.task, cfg.eval.max_samples
        )

    def evaluate() -> dict[str, float]:
        return evaluate_samples(engine.module, val_samples, cfg, release.tokenizer.pad_token_id, device)

    # Seeded from (seed, step): a resumed run does not replay the batches it already trained on.
    batches = iter(build_train_loader(
        cfg.shard_path(cfg.data.train), release.tokenizer, spec, cfg.data, cfg.task,
        seed=cfg.seed + done, rank=env.rank, world_size=env.world_size,
    ))
    phase = Phase(
        index=0, name=f"finetune {cfg.task.name}/{cfg.fusion.name}", steps=cfg.train.steps, done=done,
        log_keys=(HEADLINE[cfg.task.name],),
    )
    trainer = Trainer(
        paths, env, device, cfg.logging, cfg.checkpoint, cfg.nonfinite_loss, cfg.eval.every_steps
    )
    try:
        result = trainer.run(engine, phase, batches, finetuning_step, evaluate if val_samples is not None else None)
    finally:
        trainer.close()
    step = result.state.global_step if result.state is not None else done
    if result.stopped_by:
        log.info("stopped by %s after a checkpoint at step %d; rerun with --resume", result.stopped_by, step)
    else:
        last_eval = result.last_eval
        if val_samples is not None and last_eval is None:  # resumed after the last step's checkpoint
            with evaluation_precision(engine):
                last_eval = {"step": step, **evaluate()}
        if env.rank == 0:
            if last_eval is not None:
                metrics = {k: v for k, v in last_eval.items() if k != "step" and k not in SkipCounts.FIELDS}
                record = results_record(cfg, metrics, cfg.shard_path(cfg.data.val), len(val_samples), None, step=step)
                write_results(paths.root / RESULTS_FILE, record)
                print(format_results(record), flush=True)
            paths.write_done(step)
    dist.barrier()
    return step
