"""The ``slurm/`` job scripts, submitted to a real two-node SLURM cluster that the tests start.

The cluster (``tests/slurm_cluster.py``) runs when the tests run as root on a machine with
apt; elsewhere every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from slurm_cluster import SlurmCluster, install_packages, unavailable_reason

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
VENV_ACTIVATE = Path(sys.prefix) / "bin" / "activate"


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = unavailable_reason() or install_packages()
    if reason:
        pytest.skip(reason)
    # Not pytest's tmp_path: its parents are private to root and munged runs as another user.
    root = Path(tempfile.mkdtemp(prefix="vlp-slurm-"))
    cluster = SlurmCluster(root)
    with cluster:
        yield cluster
    if not os.environ.get("VLP_KEEP_SLURM_DIR"):
        shutil.rmtree(root, ignore_errors=True)


def _job_env(cluster: SlurmCluster) -> dict[str, str]:
    """What a user would export before submitting: how to activate the env, where the repo is."""
    if not VENV_ACTIVATE.exists():
        pytest.skip(f"jobs activate the project's virtual environment, and {VENV_ACTIVATE} is missing")
    return cluster.env(
        {
            "VLP_ACTIVATE": f"source {VENV_ACTIVATE}",
            "VLP_REPO": str(REPO),
            "DS_ACCELERATOR": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )


def test_two_nodes_run_one_task_each(slurm_cluster, tmp_path):
    """The harness itself: a 2-node batch job whose srun step lands one task on each node."""
    script = tmp_path / "hello.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "srun bash -c 'echo task=$SLURM_PROCID node=$SLURMD_NODENAME of=$SLURM_JOB_NODELIST'\n"
    )
    log = tmp_path / "hello.log"
    job_id = slurm_cluster.sbatch(script, options=["-N", "2", "--ntasks-per-node=1", f"--output={log}"])
    fields = slurm_cluster.wait_for_end(job_id, timeout_s=60, log_path=log)
    assert fields["JobState"] == "COMPLETED", log.read_text()
    lines = sorted(line for line in log.read_text().splitlines() if line.startswith("task="))
    assert lines == ["task=0 node=node1 of=node[1-2]", "task=1 node=node2 of=node[1-2]"]


# ---------------------------------------------------------------------------- preprocessing

NUM_SAMPLES, PER_SHARD = 120, 20  # six raw shards, like the quickstart's (smaller)
# The fastest real detector setting (see tests/extract_helpers.py): the smallest torchvision
# Faster R-CNN on a 96-pixel canvas, one thread per task.
FAST_EXTRACT = [
    "detector.backend=torchvision",
    "detector.model=fasterrcnn_mobilenet_v3_large_320_fpn",
    "detector.min_size=64",
    "detector.max_size=96",
    "detector.min_boxes=2",
    "detector.max_boxes=6",
    "batch_size=4",
    "num_workers=1",
    "progress=false",
    "torch_threads=1",
]


def _run(cmd: list[str], env: dict, cwd: Path) -> None:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-raw") / "raw"
    _run(
        [sys.executable, "-m", "preprocess", "synth", "--out", str(out), "--num-samples", str(NUM_SAMPLES),
         "--seed", "0", "--samples-per-shard", str(PER_SHARD)],
        env=dict(os.environ), cwd=REPO,
    )
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == NUM_SAMPLES // PER_SHARD
    return out


def _raw_keys(raw: Path) -> list[str]:
    keys = set()
    for shard in sorted(raw.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys.update(name.split(".")[0] for name in tar.getnames())
    return sorted(keys)


@pytest.fixture(scope="module")
def features(slurm_cluster, raw_shards, tmp_path_factory):
    """Feature shards made by the preprocessing array job (2 array tasks = 2 workers)."""
    work = tmp_path_factory.mktemp("slurm-preprocess")
    out = work / "features"
    env = _job_env(slurm_cluster)
    spec = f"{raw_shards}/{{00000..0000{NUM_SAMPLES // PER_SHARD - 1}}}.tar"
    job_id = slurm_cluster.sbatch(
        REPO / "slurm" / "preprocess.sbatch", "--input", spec, "--output", str(out), *FAST_EXTRACT,
        options=["--array=0-1", f"--chdir={work}"], env=env,
    )
    tasks = slurm_cluster.wait_for_array(job_id, timeout_s=300, log_dir=work)
    return {"job_id": job_id, "tasks": tasks, "work": work, "out": out, "spec": spec, "env": env}


def test_preprocess_array_extracts_every_sample_once(features, raw_shards):
    work, out, job_id = features["work"], features["out"], features["job_id"]
    logs = {p.name: p.read_text() for p in work.glob("vlp-preprocess-*.log")}
    assert sorted(logs) == [f"vlp-preprocess-{job_id}_0.log", f"vlp-preprocess-{job_id}_1.log"], logs
    states = sorted((t["ArrayTaskId"], t["JobState"], t["ExitCode"]) for t in features["tasks"])
    assert states == [("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")], "\n".join(logs.values())
    assert "extracting share 0 of 2" in logs[f"vlp-preprocess-{job_id}_0.log"]
    assert "extracting share 1 of 2" in logs[f"vlp-preprocess-{job_id}_1.log"]

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    keys = [row["key"] for row in manifest]
    assert len(keys) == NUM_SAMPLES and sorted(keys) == _raw_keys(raw_shards)
    assert pq.read_table(out / "skipped.parquet").num_rows == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:05d}.tar" for i in range(NUM_SAMPLES // PER_SHARD)]
    assert json.loads((out / "feature_spec.json").read_text())["max_boxes"] == 6


def test_resubmitted_array_task_redoes_only_its_unfinished_shard(slurm_cluster, features):
    """Task 1 of 2 owns shards 1, 3, 5: lose shard 3 and resubmit task 1 alone."""
    work, out, env = features["work"], features["out"], features["env"]
    script = REPO / "slurm" / "preprocess.sbatch"
    args = ["--input", features["spec"], "--output", str(out), *FAST_EXTRACT]

    # Alone, `--array=1` cannot know the original array had 2 tasks: refused before any work.
    refused = slurm_cluster.sbatch(script, *args, options=["--array=1", f"--chdir={work}"], env=env)
    (task,) = slurm_cluster.wait_for_array(refused, timeout_s=60, log_dir=work)
    log = (work / f"vlp-preprocess-{refused}_1.log").read_text()
    assert task["JobState"] == "FAILED" and task["ExitCode"] == "2:0", log
    assert "pass --workers N" in log

    (out / "00003.tar").unlink()
    (out / ".parts" / "00003.tar.manifest.parquet").unlink()
    (out / "manifest.parquet").unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in ("00001.tar", "00005.tar", "00000.tar")}

    job_id = slurm_cluster.sbatch(script, "--workers", "2", *args, options=["--array=1", f"--chdir={work}"], env=env)
    (task,) = slurm_cluster.wait_for_array(job_id, timeout_s=180, log_dir=work)
    log = (work / f"vlp-preprocess-{job_id}_1.log").read_text()
    assert task["JobState"] == "COMPLETED", log
    assert "extracting share 1 of 2" in log
    assert (out / "00003.tar").is_file()
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not redone
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == NUM_SAMPLES
    assert sum(row["shard"] == "00003.tar" for row in manifest) == PER_SHARD
