"""Where this process sits in a job: read from torchrun, the deepspeed launcher or SLURM; what
the machine's CPU is (``cpu_info``) and whether a device computes bf16 natively (``native_bf16``);
and how DataLoader workers treat a job's stop signals
(``ignore_stop_signals``, ``stop_safe_worker_init``).

This is the one place that reads launcher environment variables. Everything else takes a
``LaunchEnv`` (distributed training) or a ``WorkShare`` (embarrassingly parallel work such as
feature extraction) as an argument.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping


@dataclass(frozen=True)
class LaunchEnv:
    """A rank of a distributed job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class WorkShare:
    """This worker's share of an embarrassingly parallel job: items ``index::count``."""

    index: int
    count: int
    source: str  # "RANK", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID" or "single"

    def take(self, items: list) -> list:
        """Round-robin share of ``items`` (stable for a given order)."""
        return items[self.index :: self.count]


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[03-05,07],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank and rendezvous of this process.

    torchrun / the deepspeed launcher set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    ``MASTER_ADDR``/``MASTER_PORT``; under ``srun`` with one task per GPU we read
    ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of
    ``SLURM_JOB_NODELIST`` instead. The master port defaults to 29500, or
    ``MASTER_PORT`` when set.
    """
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=port,
            source="slurm",
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=port, source="single")


def read_work_share(env: Mapping[str, str] | None = None) -> WorkShare:
    """This worker's share of the input shards.

    Precedence: ``RANK``/``WORLD_SIZE`` (torchrun or set by hand), then a SLURM job array
    (``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``; the array must be 0-based and
    contiguous), then SLURM tasks (``SLURM_PROCID``/``SLURM_NTASKS``), else the whole job.
    """
    env = os.environ if env is None else env
    pairs = [
        ("RANK", "WORLD_SIZE"),
        ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ]
    for index_var, count_var in pairs:
        if index_var in env and count_var in env:
            index, count = _int(env, index_var), _int(env, count_var)
            if count < 1 or not 0 <= index < count:
                raise ValueError(f"{index_var}={index} is outside 0..{count_var}-1 (={count - 1})")
            return WorkShare(index=index, count=count, source=index_var)
    return WorkShare(index=0, count=1, source="single")


def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); empty where
    it cannot be read (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in itertools.takewhile(str.strip, lines):  # a blank line ends the first processor
        name, _, value = line.partition(":")
        info[name.strip()] = value.strip()
    return info


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where unknown)."""
    return set(cpu_info().get("flags", "").split())


def native_bf16(device) -> str | None:
    """What computes bf16 natively on ``device`` (a ``torch.device``; said in the log), or None
    where bf16 would be emulated and slower than fp32. Decides ``precision: auto`` of training
    and of extraction alike."""
    if device.type == "cuda":
        import torch  # here, not at the top: launch checks import this module before torch

        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.cuda.get_device_name(device) if supported else None
    found = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in cpu_flags()]
    return "a CPU with " + " and ".join(found) if found else None


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM, SIGINT and SIGUSR1.

    ``scancel`` (also ``--signal=USR1 --full``), a time limit and a terminal's Ctrl-C signal every
    process of a job at once, and torchrun's agent passes the signal on to each rank. The main
    process turns these into "save a checkpoint at the next step, then exit", which needs its
    workers alive for that step; torch's own worker handler re-raises any SIGTERM not sent by the
    parent, and SIGUSR1's default action ends a process, either killing the worker and with it the
    run. Workers still end when the main process does (torch's watchdog in each worker), and
    when it exits, by ``stop_safe_worker_init``'s exit handler.
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


_kill_registered = False


def stop_safe_worker_init() -> Callable[[int], None]:
    """The ``worker_init_fn`` for a DataLoader (``ignore_stop_signals``), called in the main
    process as the loader is built; it also makes sure the workers end when this process exits.

    At exit, multiprocessing stops its daemonic children (DataLoader workers) with SIGTERM, which
    these workers ignore, then waits for them. A process leaving while a loader iterator is still
    alive (an exception in a step keeps it alive in the traceback) waited forever, and a job whose
    step failed hung until its time limit instead of failing. An exit handler registered after
    multiprocessing's runs before it and kills those children outright: at exit nothing they
    hold is needed."""
    global _kill_registered
    if not _kill_registered:
        atexit.register(_kill_daemonic_children)
        _kill_registered = True
    return ignore_stop_signals


def _kill_daemonic_children() -> None:
    import multiprocessing

    # torch's SIGCHLD handler would report each killed worker as a failure, after the real error.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
