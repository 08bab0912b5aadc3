"""The process group, and evaluation shared out over its ranks.

Every job starts one process per rank (``torchrun``, the ``deepspeed`` launcher or ``srun``);
``init_distributed`` joins them: NCCL on GPUs, gloo on the CPU. Without a process group (a
single-process evaluation) every helper here acts as a group of one.

Evaluation splits its forwards over the ranks and sums the results. Under ZeRO-3 each forward
gathers the parameters from every rank, so every rank must run the same NUMBER of forwards, not
the same batches: ``shard`` pads a rank's share with ``None``, for which the caller runs any
forward and discards it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from preprocess.launch_env import LaunchEnv


def init_distributed(env: LaunchEnv) -> torch.device:
    """Join the process group described by ``env``; returns this rank's device."""
    import deepspeed

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


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(num_items: int) -> list[int | None]:
    """This rank's items (``rank, rank + world, ...``), padded with ``None`` to the same length on every rank."""
    world = world_size()
    mine: list[int | None] = list(range(rank(), num_items, world))
    return mine + [None] * (-(-num_items // world) - len(mine))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (it must be on the rank's device); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
