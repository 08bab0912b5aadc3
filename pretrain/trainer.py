"""The pretraining job: the model, the stages in order, each trained by the engine.

``run`` joins the process group, checks every input, builds ImageBERT, and trains the stages
in order; each stage is one phase of ``pretrain.engine`` with a fresh DeepSpeed engine (its
learning-rate schedule differs), started from the previous stage's checkpoint. What this module
adds to the engine is pretraining's own: the model (``build_model``), the stage transitions
(``start_stage``), the step (``pretraining_step``) and the evaluation (``pretrain.evaluation``).
The run directory is the engine's (``pretrain.engine.RunPaths``); ``docs/pretrain.md`` has the details.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from preprocess.feature_format import FeatureSpec
from preprocess.launch_env import read_launch_env
from pretrain import checkpoint
from pretrain.config import PretrainConfig, StageConfig, resolve_model_path
from pretrain.data import build_train_loader, check_spec_matches_model, feature_spec_of
from pretrain.distributed import init_distributed
from pretrain.engine import Phase, RunPaths, Trainer, build_engine, offloads, setup_logging
from pretrain.engine_config import DeepSpeedConfig
from pretrain.evaluation import evaluate, metrics_table
from pretrain.model import ImageBertConfig, ImageBertForPretraining
from pretrain.model_config import CMGConfig, ObjectiveWeights, complete_module_fields
from pretrain.release import load_release, read_release_config
from pretrain.weights import load_model

log = logging.getLogger("pretrain")

# The evaluation values the log line shows.
LOG_KEYS = ("itm_acc", "mlm_acc", "moc_acc", "mrfr_loss", "i2t_r1", "t2i_r1")


def check_feature_specs(cfg: PretrainConfig) -> FeatureSpec:
    """The spec of the first stage's shards, after checking that every stage's train and eval shards
    exist and agree (each pattern listed once)."""
    first: tuple[str, FeatureSpec] | None = None
    for stage in cfg.stages:
        for key in ("shards", "eval_shards"):
            path = cfg.shard_path(getattr(stage, key))
            spec = feature_spec_of(path, f"stages[{stage.name}].{key}")
            if first is None:
                first = (path, spec)
            first[1].check_compatible(spec, first[0], path)
    return first[1]


def build_model(cfg: PretrainConfig, spec: FeatureSpec, vocab_size: int) -> ImageBertForPretraining:
    """ImageBERT with its text side from the pretrained BERT, randomly initialised from
    ``bert_config``, or a release's whole model (``model.release``)."""
    # Same seed on every rank: ZeRO-3 partitions each rank's own copy, so they must agree.
    torch.manual_seed(cfg.seed)
    pooling = cfg.model.pooling or "cls"
    if cfg.model.release is not None:
        model = model_of_release(cfg.model.release, cfg.cmg.module_fields())
    elif cfg.model.bert is not None:
        model = ImageBertForPretraining.from_bert(
            resolve_model_path(cfg.model.bert), spec.feature_dim, spec.num_classes, pooling,
            cfg.model.num_layers, cmg=cfg.cmg.module_fields(),
        )
    else:
        config = ImageBertConfig(
            **{"vocab_size": vocab_size, **cfg.model.bert_config}, feature_dim=spec.feature_dim,
            num_region_classes=spec.num_classes, summary_pooling=pooling, cmg=cfg.cmg.module_fields(),
        )
        model = ImageBertForPretraining(config)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} < tokenizer's {vocab_size}: model.bert_config.vocab_size")
    return model


def check_release(cfg: PretrainConfig, spec: FeatureSpec) -> None:
    """With ``model.release``: that it is a release whose pooling and CMG's modules fit the
    config and whose features are the shards' (``spec``), before any rank starts
    (``ValueError`` or ``FileNotFoundError``, one line)."""
    if cfg.model.release is None:
        return
    path = cfg.model.release
    fields = read_release_config(resolve_model_path(path))
    check_spec_matches_model(spec, SimpleNamespace(**fields), cfg.shard_path(cfg.stages[0].shards))
    pooling = fields.get("summary_pooling", "cls")
    if cfg.model.pooling is not None and cfg.model.pooling != pooling:
        raise ValueError(f"model.pooling is {cfg.model.pooling} but release {path} was pretrained with {pooling}; "
                         "leave model.pooling unset to keep the release's")
    has, wants = fields.get("cmg"), cfg.cmg.module_fields()
    if has and wants is None:
        raise ValueError(f"release {path} has CMG's modules: set cmg.enabled=true (and its codebook's shape: {has})")
    shape = ("num_codes", "code_dim")
    if has and wants and any(has[key] != wants[key] for key in shape):
        raise ValueError(f"release {path} has a codebook of {has['num_codes']} codes of width {has['code_dim']}; "
                         f"cmg.num_codes and cmg.code_dim are {wants['num_codes']} and {wants['code_dim']}")


def model_of_release(path: str, cmg: dict | None) -> ImageBertForPretraining:
    """The whole model of the release at ``path`` (its pooling too: its heads were trained on that
    summary), with CMG's modules of shape ``cmg`` (``CMGConfig.module_fields``): those the release
    holds are loaded, those it lacks freshly initialised. ``check_release`` has vetted the pair."""
    model = load_release(resolve_model_path(path)).model
    if cmg is None or model.config.cmg == complete_module_fields(cmg):
        return model
    config = ImageBertConfig.from_dict({**model.config.to_dict(), "cmg": cmg})
    return load_model(ImageBertForPretraining, None, config=config, state_dict=model.state_dict(),
                      may_be_missing=[] if model.cmg is not None else [r"^cmg\."], what=f"release {path}")


def ready_for_training(model: ImageBertForPretraining, cfg: PretrainConfig, objectives: str) -> ImageBertForPretraining:
    """``model`` set up to train a stage with ``objectives`` (``stages[].objectives``)."""
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint.mark_universal(model)
    model.set_trainable(objectives)
    return model.train()


def pretraining_step(objectives: ObjectiveWeights, cmg: CMGConfig | None = None, stage_objectives: str = "all"):
    """The engine's step: the weighted loss to train on, and each objective's loss to log, with
    CMG's codebook usage (``cmg_perplexity``, ``cmg_codes_used``, ``cmg_codes_reset``, ...)
    where the model has CMG's modules: the engine logs each as its mean over the interval.
    ``stage_objectives``: the stage's ``objectives`` (``STAGE_OBJECTIVES``)."""

    def step(engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = engine(batch, objectives, cmg, stage_objectives)
        return {"loss": out.loss, **out.losses, **out.stats}

    return step


def run(cfg: PretrainConfig, run_dir: str | Path, resume: bool, spec: FeatureSpec) -> int:
    """Train every stage (or what is left of them with ``resume``) on shards whose spec the caller
    has checked (``check_feature_specs``, before any rank starts); returns the final global step."""
    env = read_launch_env()
    device = init_distributed(env)
    setup_logging(env.rank)
    paths = RunPaths(run_dir)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path())
    source = paths.resume_point(resume)  # the checkpoint the next stage starts from (None: initial weights)
    if source is not None and source.stage >= len(cfg.stages):
        raise SystemExit(f"checkpoint {source.tag} is in stage {source.stage}; the config has {len(cfg.stages)}")
    finished = paths.finished_at(cfg.total_steps())
    if finished is not None:
        log.info("%s: all stages already done (%s)", paths.root, paths.done)
        if env.rank == 0 and paths.metrics.is_file():
            lines = paths.metrics.read_text(encoding="utf-8").splitlines()
            print_summary(json.loads(lines[-1]) if lines else None)
        return finished
    dist.barrier()  # every rank has read done.json before rank 0 may remove it (write_run_files)

    model = build_model(cfg, spec, len(tokenizer))
    config = model.config
    check_spec_matches_model(spec, config, cfg.shard_path(cfg.stages[0].shards))
    if env.rank == 0:
        paths.write_run_files(cfg, spec, config, tokenizer, resumed_at=source.global_step if source else 0)
    dist.barrier()

    first_stage = 0
    if source is not None:
        log.info("resuming from %s (stage %d, step %d in stage)", source.tag, source.stage, source.step_in_stage)
        stage_finished = source.step_in_stage >= cfg.stages[source.stage].steps
        first_stage = source.stage + 1 if stage_finished else source.stage
    trainer = Trainer(
        paths, env, device, cfg.logging, cfg.checkpoint, cfg.nonfinite_loss, cfg.eval.every_steps
    )
    last_eval = None
    try:
        for index in range(first_stage, len(cfg.stages)):
            stage = cfg.stages[index]
            engine, phase = start_stage(cfg, paths, config, index, source, initial=model)
            model = None  # the engine owns (and under ZeRO-3 partitions) it now
            # Seeded from (seed, stage, step): a resumed run is reproducible and does not replay the
            # exact batches it trained on before the interruption.
            batches = iter(build_train_loader(
                cfg.shard_path(stage.shards), tokenizer, spec, cfg.data, cfg.masking,
                seed=cfg.seed + 1000 * index + phase.done, rank=env.rank, world_size=env.world_size,
            ))

            def evaluate_stage(engine=engine, stage=stage) -> dict[str, float]:
                return evaluate(
                    engine.module, cfg.shard_path(stage.eval_shards), tokenizer, spec, cfg.data, cfg.masking,
                    cfg.eval, device, objectives=cfg.objectives,
                )

            result = trainer.run(engine, phase, batches, pretraining_step(cfg.objectives, cfg.cmg, stage.objectives), evaluate_stage)
            source, last_eval = result.state or source, result.last_eval or last_eval
            del engine  # the next stage starts from the checkpoint, not from this engine's copy
            if result.stopped_by:
                log.info("stopped by %s after a checkpoint at step %d; rerun with --resume", result.stopped_by, source.global_step)
                break
        else:
            if env.rank == 0:
                paths.write_done(source.global_step)
                print_summary(last_eval)
    finally:
        trainer.close()
    dist.barrier()
    return source.global_step if source else 0


def start_stage(
    cfg: PretrainConfig, paths: RunPaths, config: ImageBertConfig, index: int,
    source: checkpoint.TrainerState | None, initial: ImageBertForPretraining | None,
) -> tuple[Any, Phase]:
    """The stage's engine, loaded from ``source``, and the stage as the engine's phase.

    No ``source``: train the ``initial`` model. ``source`` is in this stage: resume it whole
    (weights, optimizer, schedule). ``source`` ended the previous stage: take its weights, and
    its optimizer moments unless ``reset_optimizer``.
    """
    stage = cfg.stages[index]
    mid_stage = source is not None and source.stage == index
    keep_optimizer = source is not None and (mid_stage or not stage.reset_optimizer)
    if source is None:
        model = initial
    elif keep_optimizer:  # DeepSpeed loads the weights with the optimizer state
        torch.manual_seed(cfg.seed)
        model = ImageBertForPretraining(config)
    else:  # weights only: the fp32 master weights, consolidated whatever the ZeRO stage and world size
        model = load_model(
            ImageBertForPretraining, None, config=config,
            state_dict=checkpoint.consolidated_weights(paths.checkpoints, source.tag),
            what=f"checkpoint {paths.checkpoints / source.tag}",
        )
    model = ready_for_training(model, cfg, stage.objectives)
    engine = build_engine(
        model, stage_deepspeed(cfg, stage), stage, cfg.data.batch_size, paths.checkpoints,
        resume=source if keep_optimizer else None, load_schedule=mid_stage,
    )
    done = source.step_in_stage if mid_stage else 0
    log.info(
        "stage %d (%s): %d/%d steps done, %s, ZeRO-%d", index, stage.name, done, stage.steps,
        "resumed" if mid_stage else ("from previous stage" if source else "from initial weights"),
        engine.zero_optimization_stage(),
    )
    first_global_step = source.global_step - done if source is not None else 0
    phase = Phase(
        index=index, name=f"stage {index} ({stage.name})", steps=stage.steps, done=done,
        first_global_step=first_global_step, record={"stage": index, "stage_name": stage.name}, log_keys=LOG_KEYS,
    )
    return engine, phase


def stage_deepspeed(cfg: PretrainConfig, stage: StageConfig) -> DeepSpeedConfig:
    """The ``deepspeed:`` section ``stage`` trains with: the config's, except that ``zero_stage:
    auto`` is ZeRO-0 for a ``cmg`` stage (without offloading). It trains CMG's modules alone, a
    small part of the model, so partitioning saves little; and under ZeRO 1-2 a 16-bit run holds
    the frozen encoder in 16 bits only (DeepSpeed keeps fp32 copies of trained parameters), so
    the release would come out rounded. At ZeRO-0, bf16 is an autocast over fp32 weights."""
    ds = cfg.deepspeed
    if stage.objectives == "cmg" and ds.zero_stage == "auto" and not offloads(ds):
        return replace(ds, zero_stage=0)
    return ds


# ---------------------------------------------------------------- reporting


def print_summary(record: dict[str, Any] | None) -> None:
    """The last evaluation beside chance (all in percent but the MRFR loss), printed when a run finishes."""
    if record is None:
        return
    lines = [
        f"held-out evaluation at step {record['step']} (stage {record['stage_name']}, "
        f"{record.get('num_images', 0):.0f} images x {record.get('num_captions', 0):.0f} captions)",
        *metrics_table(record),
    ]
    print("\n".join(lines), flush=True)
