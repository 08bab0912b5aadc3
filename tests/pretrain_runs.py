"""Running ``python -m pretrain`` from tests: the tiny test config with its stages and sections
replaced, the command for one rank or several (torchrun), a run whose output goes to a log that
a failure shows, and a run's metrics.jsonl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain" / "tiny-test.yaml"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_cmd(ranks: int, config: Path, run_dir: Path, *extra: str) -> list[str]:
    args = ["-m", "pretrain", "--config", str(config), "--run-dir", str(run_dir), *extra]
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def run_logged(cmd: list[str], log: Path, timeout: int = 300) -> None:
    with open(log, "w") as out:
        result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}"


def write_config(path: Path, shards_root: Path, stages: list[dict], **sections) -> Path:
    """The tiny test config with its stages and sections replaced."""
    config = yaml.safe_load(TINY.read_text())
    config["shards_root"] = str(shards_root)
    config["stages"] = stages
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stage(name: str, steps: int, **kw) -> dict:
    return {"name": name, "shards": "train/{00000..00001}.tar", "eval_shards": "val/00000.tar", "steps": steps,
            "lr": 1e-3, **kw}
