"""The training engine: what pretraining and fine-tuning share, from DeepSpeed to the run directory.

A job (``pretrain.trainer``, ``finetune.trainer``) builds its model and its data, then hands
``Trainer.run`` one *phase* at a time (a pretraining stage, or a whole fine-tuning run) with two
functions of its own: ``step(engine, batch) -> losses`` (the batch-to-loss forward; ``losses``
holds ``"loss"``, what backward runs on, and any parts to log) and ``evaluate() -> metrics``
(called on every rank). The engine does the rest: the DeepSpeed engine from the ``deepspeed:``
section and a schedule (``build_engine``), the step loop (gradient accumulation, logging,
evaluation cadence, preemption, checkpoint cadence), ``metrics.jsonl`` and TensorBoard.

Run directory, the same for both jobs (``RunPaths``)::

    config.yaml        the resolved job config (rewritten on each start)
    feature_spec.json  the spec of the shards the model reads
    model/             the model config and the tokenizer: what rebuilds the model without the job
    metrics.jsonl      one JSON object per evaluation
    tb/                TensorBoard events
    checkpoints/       DeepSpeed checkpoints (``pretrain.checkpoint``)
    done.json          {"global_step": N}, written once the job's last step is done
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from preprocess import atomic
from preprocess.config import dump_yaml, merge, to_dict
from preprocess.feature_format import FeatureSpec
from preprocess.launch_env import LaunchEnv, native_bf16
from pretrain import checkpoint
from pretrain.data import to_device
from pretrain.engine_config import (
    CheckpointConfig, DeepSpeedConfig, LoggingConfig, NonFiniteLossConfig, ScheduleConfig,
)
from pretrain.gradient_sync import OverlappedGradientAverage

log = logging.getLogger("pretrain.engine")

StepFn = Callable[[Any, dict[str, Any]], dict[str, torch.Tensor]]
EvalFn = Callable[[], dict[str, float]]


class RunPaths:
    """Where everything of a run lives (module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.model = self.root / "model"
        self.metrics = self.root / "metrics.jsonl"
        self.tensorboard = self.root / "tb"
        self.checkpoints = self.root / "checkpoints"
        self.done = self.root / "done.json"

    def resume_point(self, resume: bool) -> checkpoint.TrainerState | None:
        """The checkpoint to continue from (None: start fresh); refuses a fresh start over checkpoints."""
        if not resume:
            if (self.checkpoints / checkpoint.LATEST_FILE).is_file():
                raise SystemExit(f"{self.root} already has checkpoints: pass --resume to continue it, or use a new --run-dir")
            return None
        return checkpoint.latest_state(self.checkpoints)

    def finished_at(self, total_steps: int) -> int | None:
        """The final global step when ``done.json`` says the run reached ``total_steps``, else None.

        A ``done.json`` below ``total_steps`` is from before the config grew: the run goes on, and
        ``write_run_files`` removes it (schedulers read its presence as "finished").
        """
        if not self.done.is_file():
            return None
        step = json.loads(self.done.read_text(encoding="utf-8"))["global_step"]
        return step if step >= total_steps else None

    def write_done(self, global_step: int) -> None:
        atomic.write_json(self.done, {"global_step": global_step})

    def write_run_files(self, cfg: Any, spec: FeatureSpec, model_config, tokenizer, resumed_at: int) -> None:
        """Rank 0, before training from global step ``resumed_at`` (0: a fresh start): the resolved
        config, the feature spec, the model config and tokenizer; ``metrics.jsonl`` cut back to
        ``resumed_at``."""
        for directory in (self.root, self.checkpoints, self.tensorboard, self.model):
            directory.mkdir(parents=True, exist_ok=True)
        self.done.unlink(missing_ok=True)  # a run that trains is not done (see finished_at)
        self.keep_metrics_up_to(resumed_at)
        if self.config.is_file():
            changed = _changed_keys(yaml.safe_load(self.config.read_text(encoding="utf-8")), to_dict(cfg))
            if changed:
                log.warning("resuming with a changed config; keys: %s", ", ".join(changed))
        dump_yaml(cfg, self.config)
        spec.save(self.root)
        model_config.save_pretrained(self.model)
        tokenizer.save_pretrained(self.model)

    def keep_metrics_up_to(self, global_step: int) -> None:
        """Drop the ``metrics.jsonl`` records after ``global_step``, and a line a kill cut short.

        A run killed after an evaluation but before its next checkpoint goes on from the older
        checkpoint and evaluates those steps again: without this, they would be in the file twice.
        """
        if not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= global_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill during the append
        if len(kept) != len(lines):
            log.info("metrics.jsonl: dropped %d record(s) after step %d, where this run resumes", len(lines) - len(kept), global_step)
            atomic.write_text(self.metrics, "".join(line + "\n" for line in kept))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s %(levelname)s: %(message)s",
        force=True,
    )
    # DeepSpeed logs every engine detail at INFO on every rank.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# ---------------------------------------------------------------- DeepSpeed


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_overrides: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and LayerNorm gains are left alone (BERT's recipe).

    ``lr_overrides`` maps parameter-name prefixes to their own learning rate (e.g. a fine-tuned
    CRF's): those parameters get their own two groups with an ``lr``; the rest take the
    optimizer's. Frozen parameters (``requires_grad`` off) are in no group.
    """
    overrides = dict(lr_overrides or {})
    groups: dict[str | None, tuple[list, list]] = {None: ([], [])}
    groups.update({prefix: ([], []) for prefix in overrides})
    for name, param in model.named_parameters():  # yields a tied matrix once
        if param.requires_grad:
            prefix = next((p for p in overrides if name.startswith(p)), None)
            groups[prefix][0 if param.ndim >= 2 else 1].append(param)
    result = []
    for prefix, (decay, no_decay) in groups.items():
        lr = {} if prefix is None else {"lr": overrides[prefix]}
        result += [{"params": decay, "weight_decay": weight_decay, **lr}, {"params": no_decay, "weight_decay": 0.0, **lr}]
    # An override that matches nothing adds no empty group (ZeRO flattens every group).
    return [group for group in result if group["params"] or "lr" not in group]


def choose_precision(requested: str, device: torch.device) -> str:
    """``requested`` itself, or for ``auto`` bf16 where every rank computes it natively, else fp32.
    The ranks agree (one all-reduce) so that a job across unlike nodes cannot mix precisions."""
    if requested != "auto":
        return requested
    native = native_bf16(device)
    everywhere = torch.tensor([1 if native else 0], device=device)
    if dist.is_initialized():
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    if everywhere.item():
        log.info("precision: bf16 (auto: %s%s)", native, " on every rank" if dist.is_initialized() and dist.get_world_size() > 1 else "")
        return "bf16"
    log.info("precision: fp32 (auto: %s)", "no native bf16 here" if native is None else "a rank has no native bf16")
    return "fp32"


def offloads(ds: DeepSpeedConfig) -> bool:
    """Whether ``deepspeed.extra`` moves optimizer state or parameters to the host (ZeRO-Offload),
    which needs ZeRO."""
    zero = ds.extra.get("zero_optimization", {})
    return any(zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))


def choose_zero_stage(ds: DeepSpeedConfig, world_size: int, resume: checkpoint.TrainerState | None) -> int:
    """The ZeRO stage to train at: ``deepspeed.zero_stage`` itself, or for ``auto`` the stage of the
    checkpoint resumed from, else ZeRO-0 on one rank and ZeRO-2 on several or with offloading.

    On one rank partitioning saves no memory, and ZeRO's per-parameter hooks, bucket copies and
    norms cost step time: on one H200 at BERT-base ZeRO-0 trains 1.36x as fast as ZeRO-2
    (docs/benchmarks.md, "One GPU"). A checkpoint keeps its stage because unpartitioned optimizer
    state (ZeRO-0) and partitioned state (ZeRO 1-3) do not load into each other: DeepSpeed's
    universal checkpoints convert between world sizes and between ZeRO 1-3 only.
    """
    if ds.zero_stage == "auto":
        if resume is not None:
            stage = resume.zero_stage
        else:
            stage = 2 if world_size > 1 or offloads(ds) else 0
    else:
        stage = ds.zero_stage
    if resume is not None and (resume.zero_stage == 0) != (stage == 0):
        raise SystemExit(
            f"checkpoint {resume.tag} was written at ZeRO-{resume.zero_stage} and cannot be loaded at ZeRO-{stage}: "
            "DeepSpeed converts optimizer state between ZeRO stages 1-3 only; set deepspeed.zero_stage to "
            f"{resume.zero_stage} (or auto, which keeps the checkpoint's stage)"
        )
    return stage


def steps_torch_optimizer(ds: DeepSpeedConfig) -> bool:
    """Whether DeepSpeed steps a plain torch optimizer, whose gradients the engine then averages
    (``OverlappedGradientAverage``) and clips (``clip_before_each_step``) itself: without ZeRO, in
    fp32 or bf16 (autocast); in fp16 DeepSpeed's loss-scaling optimizer wraps it and does both."""
    return ds.zero_stage == 0 and ds.precision != "fp16"


def clips_with_torch(ds: DeepSpeedConfig) -> bool:
    """Whether the engine clips gradients itself (``clip_before_each_step``) rather than DeepSpeed."""
    return steps_torch_optimizer(ds) and ds.gradient_clipping > 0


def zero_buckets(num_params: int) -> dict[str, int]:
    """ZeRO's sizes in elements for a model of ``num_params``: 1/16 of it, within [1e6, 5e8].

    Buckets: DeepSpeed allocates a reduce bucket of ``reduce_bucket_size`` elements whatever the
    model; its default, 5e8, is more than a whole BERT-base gradient (1.9 GiB in fp32), which
    ZeRO-2/3 would then hold on top of what they save.

    ZeRO-3's caps: it gathers each module's parameters before it runs and releases them after,
    except those it will use again within ``stage3_max_reuse_distance`` elements of parameters
    (its trace of the previous step says which), and prefetches up to
    ``stage3_max_live_parameters``. Both default to 1e9, more than a BERT-base's parameters used
    twice in a step: from the second step on it then released nothing in the forward, and the
    whole model, gathered, stayed live through the forward's end with the activations (208 MiB of
    bf16 per rank at BERT-base, where a rank's own partition is 109 MiB). Capped at the bucket, a
    module's parameters stay gathered only when they are used again within about one encoder
    layer's worth of parameters (where the forward turns into the backward); the rest are
    gathered again in the backward. docs/benchmarks.md, "ZeRO memory", has the figures.
    """
    size = int(min(5e8, max(1e6, num_params // 16)))
    return {
        "reduce_bucket_size": size, "allgather_bucket_size": size, "stage3_prefetch_bucket_size": size,
        "stage3_max_live_parameters": size, "stage3_max_reuse_distance": size,
    }


def deepspeed_config(
    ds: DeepSpeedConfig, schedule: ScheduleConfig, micro_batch_size: int, load_universal: bool = False,
    num_params: int | None = None, group_lrs: list[float] | None = None,
) -> dict[str, Any]:
    """DeepSpeed's config for training ``schedule`` with the ``deepspeed:`` section ``ds`` (its
    precision decided: ``choose_precision``); ZeRO's buckets sized to a model of ``num_params``.
    ``group_lrs``: each parameter group's peak learning rate, where groups differ (``param_groups``'
    overrides); the cosine schedule scales each group's own ``lr``, the linear one needs the list."""
    if ds.precision == "auto" or ds.zero_stage == "auto":
        raise ValueError("deepspeed_config needs a decided precision and ZeRO stage: pass choose_precision's "
                         "and choose_zero_stage's answers")
    buckets = {} if num_params is None else zero_buckets(num_params)
    # DeepSpeed's schedulers refuse 0, and warm up over at least 2 steps: a stage's first steps run at lr 0.
    warmup = max(1, schedule.warmup_steps)
    if schedule.schedule == "linear":
        scheduler = {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": group_lrs or schedule.lr, "warmup_num_steps": warmup,
                "total_num_steps": schedule.steps, "warmup_type": "linear",
            },
        }
    else:
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "warmup_min_ratio": 0.0, "warmup_num_steps": warmup, "total_num_steps": schedule.steps,
                "cos_min_ratio": schedule.min_lr_ratio, "warmup_type": "linear",
            },
        }
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        # Without ZeRO the engine clips with torch's foreach kernels instead (clips_with_torch).
        "gradient_clipping": 0.0 if clips_with_torch(ds) else ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage, **buckets},
        # bf16 has fp32's range: the overflow check (two passes over every gradient per step, a few
        # percent of a CPU step) could only catch a model already diverged, which its loss shows.
        "bf16": {"enabled": ds.precision == "bf16" and ds.zero_stage > 0, "check_grad_overflow": False},
        # At ZeRO-0, bf16 is torch's autocast over fp32 weights (the usual mixed precision): without
        # ZeRO, DeepSpeed's bf16 mode wraps the optimizer in its own per-parameter bf16 optimizer,
        # which on one H200 at BERT-base trained at 0.67x autocast's rate (docs/benchmarks.md).
        "torch_autocast": {"enabled": ds.precision == "bf16" and ds.zero_stage == 0, "dtype": "bfloat16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": schedule.lr, "betas": list(ds.betas), "eps": ds.eps, "weight_decay": ds.weight_decay,
                # torch's fused AdamW, on GPUs and CPUs alike: one kernel over each (flat, under
                # ZeRO) tensor, 7x faster than the unfused one on a CPU, and on a GPU it
                # needs no JIT build of DeepSpeed's fused Adam at start.
                "torch_adam": True, "fused": True,
            },
        },
        # Under ZeRO-Offload the same torch AdamW runs on the host (fused kernels exist for CPUs
        # too) instead of DeepSpeed's CPU Adam, which would be compiled at start.
        "zero_force_ds_cpu_optimizer": False,
        "scheduler": scheduler,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,  # the engine logs itself
        "wall_clock_breakdown": False,
    }
    return merge(config, ds.extra)


def build_engine(
    model: torch.nn.Module, ds: DeepSpeedConfig, schedule: ScheduleConfig, micro_batch_size: int,
    checkpoints: Path, resume: checkpoint.TrainerState | None = None, load_schedule: bool = True,
    lr_overrides: dict[str, float] | None = None,
):
    """The DeepSpeed engine over ``model``; with ``resume``, its weights, optimizer state and (with
    ``load_schedule``) learning-rate schedule loaded from that checkpoint, through a universal
    checkpoint when it was written by another number of ranks. ``lr_overrides``: parameter-name
    prefixes trained at their own peak learning rate (``param_groups``)."""
    import deepspeed

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ds = replace(
        ds, precision=choose_precision(ds.precision, device),
        zero_stage=choose_zero_stage(ds, dist.get_world_size(), resume),
    )
    universal = resume is not None and checkpoint.needs_universal(checkpoints, resume, dist.get_world_size())
    load_tag = checkpoint.convert_to_universal(checkpoints, resume.tag) if universal else None
    groups = param_groups(model, ds.weight_decay, lr_overrides)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=deepspeed_config(
            ds, schedule, micro_batch_size, load_universal=universal,
            num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            group_lrs=[group.get("lr", schedule.lr) for group in groups] if lr_overrides else None,
        ),
    )
    if ds.zero_stage == 0 and dist.get_world_size() == 1:
        # DeepSpeed would still "average" the gradients over the one rank: a flat copy of all of
        # them, an all-reduce and a copy back, every step.
        engine.enable_backward_allreduce = False
    elif steps_torch_optimizer(ds):
        # Averaged during the backward, as DDP does, instead of in one pass after it.
        engine.enable_backward_allreduce = False
        OverlappedGradientAverage(engine.module, engine.optimizer, engine.is_gradient_accumulation_boundary)
    if clips_with_torch(ds):
        clip_before_each_step(engine.optimizer, ds.gradient_clipping)
    if resume is not None:
        load_path, _ = engine.load_checkpoint(
            str(checkpoints), tag=load_tag or resume.tag, load_optimizer_states=True,
            load_lr_scheduler_states=load_schedule,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {resume.tag} from {checkpoints}")
    return engine


def clip_before_each_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the global gradient norm to ``max_norm`` before each step of ``optimizer`` (the torch
    AdamW that DeepSpeed steps without ZeRO, on gradients already averaged over the ranks).

    DeepSpeed's own clipping there computes a norm and launches a multiply per parameter and
    all-reduces the result, hundreds of small kernels a step; torch's foreach clipping does the
    same arithmetic in a few. The norm goes where DeepSpeed's engine looks for it
    (``optimizer._global_grad_norm``), so ``engine.get_global_grad_norm()`` reports it.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected DeepSpeed to step a torch optimizer without ZeRO, got {type(optimizer).__name__}")
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip(optimizer, args, kwargs) -> None:
        optimizer._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    optimizer.register_step_pre_hook(clip)


# ---------------------------------------------------------------- the step loop


@dataclass
class Phase:
    """A stretch of training with one engine and one schedule."""

    index: int  # pretraining stage (0 for fine-tuning); recorded in each checkpoint
    name: str
    steps: int  # optimizer steps in the phase
    done: int = 0  # steps already done (a resumed phase)
    first_global_step: int = 0  # global step before the phase's first step
    record: dict[str, Any] = field(default_factory=dict)  # added to every metrics.jsonl line
    log_keys: tuple[str, ...] = ()  # evaluation values the log line shows


@dataclass
class PhaseResult:
    state: checkpoint.TrainerState | None  # the last checkpoint written (None: none was)
    stopped_by: str | None  # the signal that ended the phase early, or None
    last_eval: dict[str, Any] | None  # the last metrics.jsonl record


class IntervalSums:
    """What a logging interval adds up, kept on the device so the step never waits for it:
    each loss, micro-steps, samples, real tokens plus regions, and bad samples the loader skipped."""

    COUNTS = ("micro_steps", "samples", "tokens", "skipped_samples")

    def __init__(self, device: torch.device):
        self.losses: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(len(self.COUNTS), dtype=torch.float64, device=device)

    def add(self, losses: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        for name, value in losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value.detach().double()
        self.counts[0] += 1
        self.counts[1] += batch["input_ids"].shape[0]
        self.counts[2] += batch["attention_mask"].sum() + batch["region_mask"].sum()

    def add_skipped_samples(self, count: int) -> None:
        if count:
            self.counts[3] += count

    def all_reduced(self) -> dict[str, float]:
        """The sums over every rank (one all-reduce), then zeroed for the next interval."""
        names = sorted(self.losses)
        sums = torch.stack([self.losses[n] for n in names] + list(self.counts))
        dist.all_reduce(sums)
        values = dict(zip(names + list(self.COUNTS), sums.tolist()))
        self.losses, self.counts = {}, torch.zeros_like(self.counts)
        return values


class NonFiniteLossError(RuntimeError):
    """Too many batches in a row had a non-finite loss; the message names the step, the losses and
    the checkpoint to go back to."""


@dataclass
class MicroStep:
    """What the ranks agreed on after a micro-step's forward."""

    nonfinite: list[str]  # the losses that were NaN or infinite on some rank (then nothing was updated)
    stop: str | None  # the stop signal some rank received, or None
    losses: dict[str, torch.Tensor]


def train_micro_step(
    engine, step: StepFn, batch: dict[str, Any], sums: IntervalSums, preemption: checkpoint.PreemptionFlag
) -> MicroStep:
    """Forward; then one all-reduce in which the ranks agree whether any loss is non-finite and
    whether a stop signal came; then, unless a loss is non-finite, backward and DeepSpeed's step
    (which updates only at the accumulation boundary).

    The check must come before backward and be agreed: a rank that skipped its backward alone
    would leave the others waiting in ZeRO's gradient reduction. Folding the preemption flag into
    the same all-reduce keeps it at one host sync per micro-step, as before the check existed.
    """
    losses = step(engine, batch)
    names = sorted(losses)
    flags = torch.stack([~torch.isfinite(losses[n].detach()).all() for n in names]).to(torch.int32)
    flags = torch.cat([flags, torch.tensor([preemption.received], dtype=torch.int32, device=flags.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    *nonfinite_flags, received = flags.tolist()
    nonfinite = [name for name, flag in zip(names, nonfinite_flags) if flag]
    stop = signal.Signals(received).name if received else None
    if not nonfinite:
        engine.backward(losses["loss"])
        engine.step()
        sums.add(losses, batch)
    return MicroStep(nonfinite, stop, losses)


def evaluation_precision(engine):
    """The autocast the engine trains under (bf16 at ZeRO-0), for evaluations that call the module
    directly; a no-op where the weights themselves are in the training precision."""
    return torch.autocast(
        engine.device.type, dtype=engine.torch_autocast_dtype(), enabled=engine.torch_autocast_enabled()
    )


class SkipCounts:
    """Batches skipped for a non-finite loss and samples the loader skipped per shard, since the
    last ``metrics.jsonl`` record; and the current run of non-finite batches."""

    FIELDS = ("nonfinite_batches", "skipped_samples")  # what they add to each record

    def __init__(self) -> None:
        self.nonfinite_in_a_row = 0
        self.nonfinite_batches = 0  # the same on every rank (agreed)
        self.nonfinite_since_log = 0
        self.samples: Counter[str] = Counter()  # this rank's, by shard

    def record_fields(self) -> dict[str, Any]:
        """The counts for a metrics record (every rank calls this: one all-gather), then zeroed."""
        per_rank: list[Counter[str]] = [Counter()] * dist.get_world_size()
        dist.all_gather_object(per_rank, self.samples)
        samples = sum(per_rank, Counter())
        fields = dict(zip(self.FIELDS, (self.nonfinite_batches, dict(sorted(samples.items())))))
        self.nonfinite_batches, self.samples = 0, Counter()
        return fields


class Trainer:
    """Runs phases: the step loop, its logging, evaluations and checkpoints (module docstring)."""

    def __init__(
        self, paths: RunPaths, env: LaunchEnv, device: torch.device, logging_cfg: LoggingConfig,
        checkpoint_cfg: CheckpointConfig, nonfinite_cfg: NonFiniteLossConfig, eval_every: int,
    ):
        self.paths, self.env, self.device = paths, env, device
        self.logging_cfg, self.checkpoint_cfg, self.nonfinite_cfg = logging_cfg, checkpoint_cfg, nonfinite_cfg
        self.eval_every = eval_every
        self.writer = None
        if env.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(paths.tensorboard))
        self.preemption = checkpoint.PreemptionFlag()
        self.skipped = SkipCounts()

    def close(self) -> None:
        self.preemption.restore()
        if self.writer is not None:
            self.writer.close()

    def run(
        self, engine, phase: Phase, batches: Iterator[dict[str, Any]], step: StepFn, evaluate: EvalFn | None
    ) -> PhaseResult:
        """Train ``phase`` from ``phase.done`` to ``phase.steps``; stops early, after a checkpoint,
        when any rank received SIGTERM, SIGUSR1 or SIGINT."""
        accumulation = engine.gradient_accumulation_steps()
        bar = tqdm(
            total=phase.steps, initial=phase.done, desc=phase.name, dynamic_ncols=True,
            disable=self.env.rank != 0 or not self.logging_cfg.progress_bar,
        )
        sums = IntervalSums(self.device)
        interval_start = time.perf_counter()
        result = PhaseResult(None, None, None)
        engine.train()

        for step_in_phase in range(phase.done + 1, phase.steps + 1):
            global_step = phase.first_global_step + step_in_phase
            last = step_in_phase == phase.steps
            stop = None
            updates = 0
            while updates < accumulation:  # a batch skipped for a non-finite loss is replaced by the next
                batch = to_device(next(batches), self.device)
                self._count_skipped_samples(batch, sums)
                outcome = train_micro_step(engine, step, batch, sums, self.preemption)
                stop = stop or outcome.stop
                if outcome.nonfinite:
                    self._skip_nonfinite(outcome, global_step)
                else:
                    self.skipped.nonfinite_in_a_row = 0
                    updates += 1
            bar.update(1)

            if global_step % self.logging_cfg.every_steps == 0 or last:
                self._log(engine, phase, global_step, sums.all_reduced(), time.perf_counter() - interval_start, bar)
                interval_start = time.perf_counter()
            if evaluate is not None and (global_step % self.eval_every == 0 or last):
                with evaluation_precision(engine):
                    result.last_eval = self._evaluate(evaluate, phase, global_step)
                engine.train()
                interval_start = time.perf_counter()  # evaluation time is not training throughput
            if stop or global_step % self.checkpoint_cfg.every_steps == 0 or last:
                result.state = checkpoint.TrainerState(
                    global_step=global_step, stage=phase.index, step_in_stage=step_in_phase,
                    world_size=self.env.world_size, zero_stage=engine.zero_optimization_stage(),
                )
                checkpoint.save(engine, self.paths.checkpoints, result.state, self.checkpoint_cfg.keep)
                interval_start = time.perf_counter()
            if stop:
                result.stopped_by = stop
                break
        bar.close()
        return result

    def _count_skipped_samples(self, batch: dict[str, Any], sums: IntervalSums) -> None:
        """The loader's count of bad samples it skipped, by shard, since its previous batch
        (``pretrain.data.report_skipped``)."""
        skipped = batch.get("skipped_samples") or {}
        self.skipped.samples.update(skipped)
        sums.add_skipped_samples(sum(skipped.values()))

    def _skip_nonfinite(self, outcome: MicroStep, global_step: int) -> None:
        self.skipped.nonfinite_batches += 1
        self.skipped.nonfinite_since_log += 1
        self.skipped.nonfinite_in_a_row += 1
        in_a_row = self.skipped.nonfinite_in_a_row
        values = ", ".join(f"{name}={outcome.losses[name].item():.4g}" for name in outcome.nonfinite)
        if in_a_row >= self.nonfinite_cfg.max_consecutive:
            latest = checkpoint.latest_state(self.paths.checkpoints)
            back_to = (f"the last good checkpoint is {self.paths.checkpoints / latest.tag} (step {latest.global_step}; "
                       "--resume continues from it)" if latest else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"step {global_step}: {in_a_row} batches in a row had a non-finite loss ({', '.join(outcome.nonfinite)}; "
                f"on rank {self.env.rank}: {values}), so the run stops; {back_to}. Lower the learning rate, "
                "or raise nonfinite_loss.max_consecutive if the data has such batches"
            )
        if self.env.rank == 0:
            log.warning("step %d: skipped a batch whose loss is not finite (%s; on rank 0: %s), %d in a row; no update from it",
                        global_step, ", ".join(outcome.nonfinite), values, in_a_row)

    def _log(self, engine, phase: Phase, global_step: int, values: dict[str, float], seconds: float, bar) -> None:
        names = [n for n in values if n not in IntervalSums.COUNTS]
        scalars = {f"train/{n}": values[n] / max(values["micro_steps"], 1) for n in names}
        scalars["train/lr"] = engine.get_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        scalars["train/skipped_samples"] = values["skipped_samples"]  # summed over ranks and the interval
        scalars["train/nonfinite_batches"] = self.skipped.nonfinite_since_log
        self.skipped.nonfinite_since_log = 0
        scalars["perf/samples_per_s"] = values["samples"] / seconds
        scalars["perf/tokens_per_s"] = values["tokens"] / seconds
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step)
            self.writer.add_scalar("train/stage", phase.index, global_step)
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{scalars['train/lr']:.2e}")
        if not self.logging_cfg.progress_bar:  # e.g. batch jobs: the log is the only record besides TensorBoard
            log.info("step %d: %s", global_step, ", ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in scalars.items()))

    def _evaluate(self, evaluate: EvalFn, phase: Phase, global_step: int) -> dict[str, Any]:
        metrics = evaluate()  # every rank: evaluation shares its forwards out over them
        record = {"step": global_step, **phase.record, **metrics, **self.skipped.record_fields()}
        if self.env.rank == 0:
            append_metrics(self.paths.metrics, record)
            for name, value in metrics.items():
                self.writer.add_scalar(f"eval/{name}", value, global_step)
            shown = ", ".join(f"{k}={metrics[k]:.2f}" for k in phase.log_keys if k in metrics)
            log.info("eval at step %d: %s", global_step, shown)
            if record["skipped_samples"]:
                log.warning("since the previous evaluation the loader skipped bad samples: %s",
                            ", ".join(f"{shard} ({n})" for shard, n in record["skipped_samples"].items()))
        return record


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per evaluation, flushed and fsynced so a killed job keeps what it measured."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
