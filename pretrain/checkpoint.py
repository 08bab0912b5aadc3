"""Training checkpoints: DeepSpeed save/load, the trainer's own state, pruning, world-size changes, signals.

Layout under ``RUN_DIR/checkpoints`` (DeepSpeed's, plus one JSON per tag)::

    latest                          tag of the newest complete checkpoint, replaced last
    global_step<N>/                 DeepSpeed files (model states, ZeRO shards)
    global_step<N>/trainer_state.json   global step, stage, step within stage, world size, ZeRO stage
    global_step<N>_universal/       made on demand when resuming on a different number of ranks

A checkpoint counts only once ``latest`` names it: a save killed halfway leaves ``latest`` on the
previous tag, which pruning never deletes (at least two are kept).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from preprocess import atomic

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
TAG_PREFIX = "global_step"
UNIVERSAL_SUFFIX = "_universal"
CLIENT_STATE_KEY = "vlpretrain"
_TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")


@dataclass
class TrainerState:
    """Where training stood when a checkpoint was written."""

    global_step: int  # optimizer steps over all stages
    stage: int  # index into the config's stages
    step_in_stage: int  # optimizer steps done in that stage (== its steps when the stage finished)
    world_size: int  # ranks that wrote the checkpoint
    zero_stage: int

    @property
    def tag(self) -> str:
        return tag_for(self.global_step)


def tag_for(global_step: int) -> str:
    return f"{TAG_PREFIX}{global_step}"


def latest_state(ckpt_dir: str | Path) -> TrainerState | None:
    """The state of the checkpoint ``latest`` points to, or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST_FILE
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    state_file = ckpt_dir / tag / TRAINER_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{latest} names {tag!r} but {state_file} is missing (checkpoint damaged?)")
    return TrainerState(**json.loads(state_file.read_text(encoding="utf-8")))


def mark_universal(module: torch.nn.Module) -> None:
    """Tell DeepSpeed to record what ``ds_to_universal`` needs (a plain data-parallel model: no TP patterns)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); ``latest`` still names the previous one."""


def save(engine, ckpt_dir: str | Path, state: TrainerState, keep: int) -> None:
    """Save on every rank; rank 0 then writes the state file, moves ``latest`` and prunes.

    A write that fails raises ``CheckpointWriteError`` naming the cause and the checkpoint that
    stays the newest. (torch.save reports a full disk as a RuntimeError from its zip writer.) A
    rank that fails while the others wait inside DeepSpeed's collectives cannot tell them; on a
    shared file system every rank meets the same full disk.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=state.tag, client_state={CLIENT_STATE_KEY: asdict(state)}, save_latest=False
        )
        # Every rank's shard must be on disk before `latest` may name the tag.
        dist.barrier()
        if dist.get_rank() == 0:
            atomic.write_json(ckpt_dir / state.tag / TRAINER_STATE_FILE, asdict(state))
            atomic.write_text(ckpt_dir / LATEST_FILE, state.tag + "\n")
            prune(ckpt_dir, keep, state.global_step)
    except (OSError, RuntimeError) as err:
        previous = latest_state(ckpt_dir)
        cause = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise CheckpointWriteError(
            f"checkpoint {ckpt_dir / state.tag} could not be written ({cause}); "
            + (f"the newest complete checkpoint is {previous.tag}, which --resume continues from"
               if previous else "there is no earlier checkpoint")
        ) from err
    dist.barrier()


def prune(ckpt_dir: Path, keep: int, latest_step: int) -> list[Path]:
    """Delete all but the newest ``keep`` tags up to ``latest_step`` (and their universal copies).

    Tags above ``latest_step`` are leftovers of a save cut short before a restart from an
    older checkpoint; they are stale and go too.
    """
    steps = []
    for path in ckpt_dir.iterdir():
        match = _TAG_RE.match(path.name)
        if match and path.is_dir():
            steps.append(int(match.group(1)))
    kept = sorted(s for s in steps if s <= latest_step)[-keep:]
    removed = []
    for step in steps:
        if step in kept:
            continue
        for path in (ckpt_dir / tag_for(step), ckpt_dir / (tag_for(step) + UNIVERSAL_SUFFIX)):
            if path.exists():
                shutil.rmtree(path)
                removed.append(path)
    return removed


def has_zero_shards(tag_dir: Path) -> bool:
    """True when optimizer state is partitioned over ranks (ZeRO 1-3, or DeepSpeed's bf16 optimizer)."""
    return any(tag_dir.glob("*_optim_states.pt"))


def needs_universal(ckpt_dir: str | Path, state: TrainerState, world_size: int) -> bool:
    """Partitioned state saved by a different number of ranks must go through a universal checkpoint."""
    return state.world_size != world_size and has_zero_shards(Path(ckpt_dir) / state.tag)


def convert_to_universal(ckpt_dir: str | Path, tag: str) -> str:
    """Convert ``tag`` to DeepSpeed's universal format (rank 0 works, the others wait); returns the new tag.

    Same as running by hand::

        python -m deepspeed.checkpoint.ds_to_universal \\
            --input_folder RUN_DIR/checkpoints/global_stepN --output_folder RUN_DIR/checkpoints/global_stepN_universal
    """
    ckpt_dir = Path(ckpt_dir)
    universal_tag = tag + UNIVERSAL_SUFFIX
    out = ckpt_dir / universal_tag
    if dist.get_rank() == 0 and not out.is_dir():
        tmp = ckpt_dir / (universal_tag + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        log.info("converting %s to a universal checkpoint for a new world size", tag)
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
            "--num_merge_workers", "1",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {ckpt_dir / tag}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        os.replace(tmp, out)
    dist.barrier()
    return universal_tag


MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's, without ZeRO-3


def consolidated_weights(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, whatever its ZeRO stage and number of ranks."""
    tag_dir = Path(ckpt_dir) / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
    if has_zero_shards(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        # ZeRO-1 leaves frozen parameters (requires_grad off: MI2P's foreign extractor) out of its
        # shards; they are only in the model-states file's module weights. (ZeRO-2/3 shard them
        # too, and ZeRO-3 names its model-states files per rank.)
        if (tag_dir / MODEL_STATES_FILE).is_file():
            for name, value in _module_weights(tag_dir).items():
                if name not in weights and value.numel():
                    weights[name] = value
        return weights
    # Without ZeRO the module's full weights sit in the model-states file.
    return _module_weights(tag_dir)


def _module_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The module's weights as rank 0's model-states file holds them, floats as fp32. It is a
    pickle that DeepSpeed wrote for this run (it holds the DeepSpeed config), hence weights_only=False."""
    states = torch.load(tag_dir / MODEL_STATES_FILE, map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


class PreemptionFlag:
    """SIGTERM (``scancel``, a time limit, torchrun passing one on), SIGUSR1 (the SLURM scripts'
    warning before the limit) and SIGINT (Ctrl-C) ask for a checkpoint and a clean exit.

    The handler only sets a flag; the ranks agree on it in every micro-step
    (``pretrain.engine.train_micro_step``: the max over ranks), because the signal may reach the
    ranks at different times and all of them must take part in the save. The DataLoader workers ignore these signals
    (``preprocess.launch_env.ignore_stop_signals``) so that the step and the save can still run.
    A second Ctrl-C interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int = 0  # signal number, 0 for none
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.received = self.received or signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
