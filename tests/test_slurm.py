"""The ``slurm/`` job scripts, submitted to a real two-node SLURM cluster that the tests start.

The cluster (``tests/slurm_cluster.py``) runs when the tests run as root on a machine with
apt; elsewhere every test here is skipped with the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from slurm_cluster import TERMINAL_STATES, SlurmCluster, install_packages, unavailable_reason

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
VENV_ACTIVATE = Path(sys.prefix) / "bin" / "activate"


# One cluster per machine at a time: it names its nodes in /etc/hosts (node1 and node2 on fixed
# loopback addresses) and stop() removes them, so a second cluster would collide with it. Keep every
# test that uses it in this file: `make test` runs each file on one worker (--dist loadfile).
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


def test_machines_that_cannot_host_the_cluster_get_a_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in unavailable_reason()


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
# The quickstart's extraction config (given boxes from the synth JSON, random ResNet-50 FPN with
# batch norms calibrated on the first input shard), as `make quickstart` runs it.
EXTRACT_ARGS = ["--config", str(REPO / "configs" / "preprocess" / "quickstart.yaml"), "progress=false"]


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
        REPO / "slurm" / "preprocess.sbatch", "--input", spec, "--output", str(out), *EXTRACT_ARGS,
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
    spec = json.loads((out / "feature_spec.json").read_text())
    assert (spec["max_boxes"], spec["class_names"]) == (4, ["circle", "square", "triangle", "cross", "star"])


def test_preprocess_array_writes_into_a_bucket(slurm_cluster, s3_server, features, tmp_path_factory):
    """The same array script, unchanged, with ``--output s3://...`` (the tests' S3 server on
    127.0.0.1, credentials in the job's environment): the objects equal the files written to the
    shared filesystem."""
    work = tmp_path_factory.mktemp("slurm-bucket")
    out = s3_server.make_bucket("slurm-features") + "/features"
    env = {**features["env"], **s3_server.env()}
    job_id = slurm_cluster.sbatch(
        REPO / "slurm" / "preprocess.sbatch", "--input", features["spec"], "--output", out, *EXTRACT_ARGS,
        options=["--array=0-1", f"--chdir={work}"], env=env,
    )
    tasks = slurm_cluster.wait_for_array(job_id, timeout_s=300, log_dir=work)
    logs = "\n".join(p.read_text() for p in work.glob("vlp-preprocess-*.log"))
    assert sorted(t["JobState"] for t in tasks) == ["COMPLETED", "COMPLETED"], logs
    objects = s3_server.objects(out)
    local = features["out"]
    tars = sorted(k for k in objects if k.endswith(".tar"))
    assert tars == [f"{i:05d}.tar" for i in range(NUM_SAMPLES // PER_SHARD)]
    for name in tars:
        assert objects[name] == (local / name).read_bytes(), name
    manifest = pq.read_table(io.BytesIO(objects["manifest.parquet"])).to_pylist()
    assert [r["key"] for r in manifest] == [r["key"] for r in pq.read_table(local / "manifest.parquet").to_pylist()]
    assert s3_server.secret not in logs and s3_server.secret.encode() not in objects["summary.json"]


def test_resubmitted_array_task_redoes_only_its_unfinished_shard(slurm_cluster, features):
    """Task 1 of 2 owns shards 1, 3, 5: lose shard 3 and resubmit task 1 alone."""
    work, out, env = features["work"], features["out"], features["env"]
    script = REPO / "slurm" / "preprocess.sbatch"
    args = ["--input", features["spec"], "--output", str(out), *EXTRACT_ARGS]

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


# ---------------------------------------------------------------------------- pretraining

TINY_PRETRAIN = REPO / "configs" / "pretrain" / "tiny-test.yaml"


def _pretrain_config(path: Path, features_dir: Path, web_steps: int, indomain_steps: int) -> Path:
    """The tiny test model on the array job's feature shards: shards 0-3, then 4; 5 held out."""
    config = yaml.safe_load(TINY_PRETRAIN.read_text())
    config["shards_root"] = str(features_dir)
    config["stages"] = [
        {"name": "web", "shards": "{00000..00003}.tar", "eval_shards": "00005.tar", "steps": web_steps,
         "lr": 1.0e-3, "warmup_steps": 2},
        {"name": "indomain", "shards": "00004.tar", "eval_shards": "00005.tar", "steps": indomain_steps,
         "lr": 5.0e-4, "reset_optimizer": False},
    ]
    config["eval"] = {**config["eval"], "every_steps": 2}
    config["checkpoint"] = {**config["checkpoint"], "every_steps": 2, "keep": 2}
    path.write_text(yaml.safe_dump(config))
    return path


def _trainer_state(run_dir: Path, tag: str) -> dict:
    return json.loads((run_dir / "checkpoints" / tag / "trainer_state.json").read_text())


def _metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def pretrain_ready(features):
    if not (REPO / "pretrain" / "trainer.py").is_file():
        pytest.skip("pretrain/trainer.py is not in this checkout")
    assert (features["out"] / "manifest.parquet").is_file()
    return features["out"]


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_preempted_then_cancelled_pretrain_continues_at_the_next_step(slurm_cluster, pretrain_ready, tmp_path, launcher):
    """One run on two nodes (one torchrun agent, or one srun task, per node), interrupted twice as
    a cluster does it: USR1 to every process of the job, the batch shell, the launchers, the ranks
    and their DataLoader workers (``scancel --signal=USR1 --full``, as preemption with a grace
    time), after which the job requeues itself; then a plain ``scancel`` of the requeued job (TERM
    to every process, KILL after KillWait) and a resubmission. Each time the trainer checkpoints at
    the next step and the next run resumes from exactly there: every evaluation (each 2 steps) is
    in metrics.jsonl once and the run ends at its last step, with both stages done."""
    total = 36 + 4
    config = _pretrain_config(tmp_path / "pretrain.yaml", pretrain_ready, web_steps=36, indomain_steps=4)
    run_dir = tmp_path / "run"
    options = ["-N", "2", f"--chdir={tmp_path}"] + (["--ntasks-per-node=1"] if launcher == "srun" else [])
    args = (REPO / "slurm" / "pretrain.sbatch", "--launcher", launcher, "--config", str(config), "--run-dir", str(run_dir))
    job_id = slurm_cluster.sbatch(*args, options=options, env=_job_env(slurm_cluster))
    log = tmp_path / f"vlp-pretrain-{job_id}.log"
    latest = run_dir / "checkpoints" / "latest"

    def newest_step() -> int:
        return int(latest.read_text().strip()[len("global_step"):]) if latest.is_file() else 0

    def checkpoint_after(step: int, restarts: str):
        return lambda f: (f["Restarts"] == restarts and newest_step() > step) or f["JobState"] in TERMINAL_STATES

    slurm_cluster.wait_until(job_id, checkpoint_after(0, "0"), timeout_s=480, what="the first checkpoint", log_path=log)
    slurm_cluster.run("scancel", "--signal=USR1", "--full", str(job_id))
    slurm_cluster.wait_until(job_id, lambda f: f["Restarts"] == "1" or f["JobState"] in TERMINAL_STATES,
                             timeout_s=120, what="the requeue", log_path=log)
    preempted_at = newest_step()
    # The requeued run checkpoints (every 2 steps) once it has resumed: cancel it there.
    fields = slurm_cluster.wait_until(job_id, checkpoint_after(preempted_at, "1"), timeout_s=480,
                                      what="a checkpoint after the requeue", log_path=log)
    assert fields["JobState"] == "RUNNING", log.read_text()[-4000:]
    slurm_cluster.run("scancel", str(job_id))
    fields = slurm_cluster.wait_for_end(job_id, timeout_s=120, log_path=log)
    text = log.read_text()
    assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "1"), text[-4000:]
    assert f"launcher={launcher}, rendezvous node1" in text and "restart 1" in text
    assert "received SIGUSR1" in text and "requeueing to resume" in text
    stops = [int(m) for m in re.findall(r"stopped by SIG\w+ after a checkpoint at step (\d+)", text)]
    resumed = [int(m) for m in re.findall(r"resuming from global_step(\d+)", text)]
    cancelled_at = newest_step()
    assert stops == [preempted_at, cancelled_at] and resumed == [preempted_at], text[-4000:]
    assert 2 <= preempted_at < cancelled_at < total
    assert "killed by signal" not in text and "DataLoader worker" not in text, text[-4000:]

    job_id = slurm_cluster.sbatch(*args, options=options, env=_job_env(slurm_cluster))
    log = tmp_path / f"vlp-pretrain-{job_id}.log"
    fields = slurm_cluster.wait_for_end(job_id, timeout_s=480, log_path=log)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    assert re.findall(r"resuming from global_step(\d+)", text) == [str(cancelled_at)], text[-4000:]
    assert _metric_steps(run_dir) == list(range(2, total + 1, 2))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0] * 18 + [1] * 2
    assert json.loads((run_dir / "done.json").read_text()) == {"global_step": total}
    state = _trainer_state(run_dir, latest.read_text().strip())
    assert (state["global_step"], state["stage"], state["step_in_stage"], state["world_size"]) == (total, 1, 4, 2)


# ---------------------------------------------------------------------------- fine-tuning


def test_finetune_on_two_nodes_with_torchrun(slurm_cluster, tmp_path):
    """A tiny release fine-tuned on a synthetic classification task, one torchrun per node."""
    if not (REPO / "finetune" / "trainer.py").is_file():
        pytest.skip("finetune/trainer.py is not in this checkout")
    from finetune_fixtures import task_config_dict, tiny_release, write_symbolic_task_shards

    release = tiny_release(tmp_path / "release")
    data = tmp_path / "data"
    write_symbolic_task_shards("classification", data / "train", num_samples=64, seed=0)
    write_symbolic_task_shards("classification", data / "val", num_samples=16, seed=1)
    config = yaml.safe_load((REPO / "configs" / "finetune" / "classification.yaml").read_text())
    config.update(shards_root=str(data), task=task_config_dict("classification"))
    config["data"].update(train="train/00000.tar", val="val/00000.tar", batch_size=8, shuffle_buffer=16)
    config["train"].update(steps=4, warmup_steps=1, lr=1.0e-3)
    config["eval"].update(every_steps=2, batch_size=16)
    config["checkpoint"].update(every_steps=2)
    config["logging"].update(every_steps=2, progress_bar=False)
    config_path = tmp_path / "classification.yaml"
    config_path.write_text(yaml.safe_dump(config))

    run_dir = tmp_path / "run"
    job_id = slurm_cluster.sbatch(
        REPO / "slurm" / "finetune.sbatch", "--config", str(config_path), "--init", str(release), "--run-dir", str(run_dir),
        options=["-N", "2", f"--chdir={tmp_path}"], env=_job_env(slurm_cluster),
    )
    log = tmp_path / f"vlp-finetune-{job_id}.log"
    fields = slurm_cluster.wait_for_end(job_id, timeout_s=480, log_path=log)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-4000:]
    assert "finetune on 2 node(s), launcher=torchrun, rendezvous node1" in text
    assert json.loads((run_dir / "done.json").read_text())["global_step"] == 4
    state = _trainer_state(run_dir, (run_dir / "checkpoints" / "latest").read_text().strip())
    assert (state["global_step"], state["world_size"]) == (4, 2)
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["task"], results["step"], results["num_samples"]) == ("classification", 4, 16)
    assert 0.0 <= results["metrics"]["accuracy"] <= 100.0
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4]
