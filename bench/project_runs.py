"""How the benches start the project's own commands, and name the code a result was measured with.

Shared by ``bench/fusion_accuracy.py``, ``bench/cmg_transfer.py`` and ``bench/two_stage.py``,
which run ``python -m pretrain|finetune|preprocess`` many times, often side by side on a small
CPU, and cache results; and the data and small releases the first two build the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free local port: single-rank runs side by side would collide on torch's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_env() -> dict[str, str]:
    """The environment of one run: one intra-op thread unless set (runs share the cores), offline,
    DeepSpeed on the CPU unless set, a free ``MASTER_PORT``, and this interpreter's tools first
    on PATH, as the Makefile does (another `ninja` would rebuild DeepSpeed's CPU op)."""
    return os.environ | {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(free_port()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def code_version(paths: tuple[str, ...]) -> str:
    """A hash of the code a result was measured with: the tracked files matching ``paths`` (git
    pathspecs), names and contents as they are in the working tree. A result is reused only for
    the same code; a commit that changes nothing there (docs, or committing what was measured)
    keeps it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=REPO, capture_output=True, check=True).stdout
    digest = hashlib.sha256()
    for name in sorted(n for n in listed.decode().split("\0") if n):
        path = REPO / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<deleted>") + b"\0")
    return digest.hexdigest()[:16]


def python_m(*args: str, log: Path | None = None) -> None:
    """``python -m ARGS`` in the repository (``command_env``); output appended to ``log``."""
    with open(log, "a") if log else open(os.devnull, "w") as out:
        result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=command_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"python -m {' '.join(args)} failed ({result.returncode}); see {log}")


def finetune_run(run_dir: Path, *args: str) -> tuple[dict, float]:
    """``python -m finetune ARGS`` into ``run_dir`` (resumed when killed; its log beside it as
    ``RUN.log``): the ``results.json`` record of its final validation, and the seconds it took."""
    from finetune.evaluate import RESULTS_FILE

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    python_m("finetune", *args, "--run-dir", str(run_dir), "--resume", log=run_dir.with_suffix(".log"))
    return json.loads((run_dir / RESULTS_FILE).read_text()), round(time.perf_counter() - start, 1)


EXTRACT_CONFIG = REPO / "configs" / "preprocess" / "quickstart.yaml"
PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "bench-small.yaml"


def pretraining_features(root: Path, log: Path) -> Path:
    """``ROOT/features``: 1,200 synthetic scenes (``python -m preprocess synth``) extracted with
    ``configs/preprocess/quickstart.yaml``, as ``make quickstart`` builds them; skipped when done."""
    features = root / "features"
    if not (features / "summary.json").is_file():  # written once every shard is complete
        root.mkdir(parents=True, exist_ok=True)
        python_m("preprocess", "synth", "--out", str(root / "raw"), "--num-samples", "1200", "--seed", "0",
                 "--samples-per-shard", "200", log=log)
        python_m("preprocess", "extract", "--input", str(root / "raw" / "{00000..00005}.tar"), "--output",
                 str(features), "--config", str(EXTRACT_CONFIG), "progress=false", log=log)
    return features


def pretrained(features: Path, run: Path, release: Path, overrides: list[str], log: Path,
               config: Path = PRETRAIN_CONFIG) -> Path:
    """``release``: ``config`` (default ``configs/pretrain/bench-small.yaml``) with ``overrides``
    pretrained on ``features`` in ``run`` (resumed when killed) and exported; skipped when the
    release exists."""
    if (release / "model.safetensors").is_file():
        return release
    run.parent.mkdir(parents=True, exist_ok=True)
    python_m("pretrain", "--config", str(config), "--run-dir", str(run), "--resume",
             f"shards_root={features}", "logging.progress_bar=false", *overrides, log=log)
    python_m("pretrain.export", "--run", str(run), "--out", str(release), log=log)
    return release


def prepare_task(task: str, work: Path, train: int, test: int, calibration: Path) -> Path:
    """Raw shards and extracted features of synthetic task ``task`` (``finetune.synth_tasks``) under
    ``WORK/tasks/TASK``, through the extraction network of the features at ``calibration`` (so they
    match what a release pretrained on those learned); skipped when there."""
    from finetune.synth_tasks import SynthTaskConfig, write_task_shards

    root = work / "tasks" / task
    for split, count, seed in (("train", train, 0), ("test", test, 1)):
        raw, features = root / "raw" / split, root / split
        per_image = 5 if task == "retrieval" and split == "test" else 1  # COCO-like: 5 captions per test image
        config = SynthTaskConfig(task, count // per_image, seed=seed, samples_per_shard=10**6, captions_per_image=per_image)
        write_task_shards(config, raw, progress=False)
        if not (features / "summary.json").is_file():
            python_m("preprocess", "extract", "--input", str(raw / "00000.tar"), "--output", str(features),
                     "--config", str(EXTRACT_CONFIG), f"detector.calibration_from={calibration}", "progress=false",
                     "torch_threads=1",  # benches run processes side by side
                     log=root / "extract.log")
    return root
