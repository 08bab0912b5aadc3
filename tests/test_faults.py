"""Faults during training, as a cluster delivers them: a stop signal to every process of the job at
once (what ``scancel``, a time limit or Ctrl-C do), SIGKILLs at random moments, some inside a
checkpoint write, and a disk that fills during a checkpoint; and untrusted inputs (shards, releases,
exports) that must run no code. Real runs: ``torchrun`` with 2 ranks and DataLoader workers,
DeepSpeed ZeRO-2 on gloo, the tiny test model; a tmpfs the test mounts for the full disk.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.checkpoint import LATEST_FILE, latest_state
from pretrain_runs import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain" / "tiny-test.yaml"


@pytest.fixture
def shards(pretraining_shards) -> Path:
    return pretraining_shards


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    # A free port for a one-rank run's process group (torchrun gets its own with --master_port):
    # the default, 29500, may be held by any other run on the machine.
    env["MASTER_PORT"] = str(free_port())
    return env


def _config(path: Path, shards: Path, steps: int, checkpoint_every: int, eval_every: int, workers: int) -> Path:
    config = yaml.safe_load(TINY.read_text())
    config["shards_root"] = str(shards)
    config["stages"] = [{"name": "web", "shards": "train/{00000..00001}.tar", "eval_shards": "val/00000.tar",
                         "steps": steps, "lr": 1e-3, "warmup_steps": 2}]
    config["data"] = {**config["data"], "num_workers": workers}
    config["eval"] = {**config["eval"], "every_steps": eval_every, "max_samples": 16, "retrieval_candidates": 8}
    config["checkpoint"] = {"every_steps": checkpoint_every, "keep": 2}
    config["logging"] = {**config["logging"], "every_steps": 1}
    path.write_text(yaml.safe_dump(config))
    return path


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def finetuning_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny release and classification shards: (release directory, shards root)."""
    from finetune_fixtures import tiny_release, write_symbolic_task_shards

    root = tmp_path_factory.mktemp("finetune")
    write_symbolic_task_shards("classification", root / "data" / "train", 64, seed=1)
    write_symbolic_task_shards("classification", root / "data" / "val", 16, seed=2)
    return tiny_release(root / "release"), root / "data"


def _job_args(job: str, tmp_path: Path, shards: Path, finetuning_inputs, steps: int) -> list[str]:
    """``-m pretrain|finetune`` arguments for a run of ``steps`` steps: an evaluation every 2 steps,
    checkpoints only at the end (or at a signal), 2 DataLoader workers."""
    if job == "pretrain":
        config = _config(tmp_path / f"c{steps}.yaml", shards, steps=steps, checkpoint_every=1000, eval_every=2, workers=2)
        return ["-m", "pretrain", "--config", str(config)]
    release, data = finetuning_inputs
    return ["-m", "finetune", "--config", str(REPO / "configs" / "finetune" / "classification.yaml"), "--init",
            str(release), f"shards_root={data}", "data.train=train/00000.tar", "data.val=val/00000.tar",
            f"train.steps={steps}", "train.warmup_steps=0", "data.batch_size=8", "data.num_workers=2",
            "data.max_text_length=24", "eval.every_steps=2", "checkpoint.every_steps=1000", "logging.every_steps=1",
            "logging.progress_bar=false", "fusion.name=mbt", "fusion.mbt_fusion_layer=1"]


def _launch(ranks: int, args: list[str], run_dir: Path, *extra: str) -> list[str]:
    args = [*args[:2], "--run-dir", str(run_dir), *extra, *args[2:]]
    if ranks == 1:
        return [sys.executable, *args]
    # As slurm/common.sh starts it: torchrun passes SIGUSR1 on instead of dying of it.
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1", *args]


@pytest.mark.slow
# SIGTERM to every process of a pretraining run (a plain scancel) is tests/test_slurm.py's, on both launchers.
@pytest.mark.parametrize("job,sig", [("pretrain", signal.SIGINT), ("finetune", signal.SIGUSR1)],
                         ids=lambda v: getattr(v, "name", v))
def test_a_stop_signal_to_every_process_checkpoints_and_the_run_goes_on(shards, finetuning_inputs, tmp_path, job, sig):
    """Like ``scancel`` (SIGTERM), preemption with ``--signal=USR1 --full`` or Ctrl-C: the signal
    reaches torchrun, both ranks and their DataLoader workers at once. The workers must survive
    it (fine-tuning starts them before the trainer's handlers exist), the ranks save a checkpoint
    at the next step and exit 0, and a resume continues with the next step: none lost, none
    repeated."""
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_launch(2, _job_args(job, tmp_path, shards, finetuning_inputs, 1000), run_dir),
                                cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: len(_metric_steps(run_dir)) >= 1, proc, log, 240, "first evaluation")
        os.killpg(proc.pid, sig)  # every process of the session, as a scheduler signals a job step
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    # No DataLoader worker died; the one traceback allowed is torchrun's own (it exits non-zero
    # after a signal, once its workers have ended).
    assert "killed by signal" not in text and "DataLoader worker" not in text, text[-3000:]
    assert text.count("Traceback") == text.count("multiprocessing.api.SignalException: Process"), text[-3000:]
    stopped = latest_state(run_dir / "checkpoints")
    assert stopped is not None, text[-3000:]
    assert f"stopped by {sig.name} after a checkpoint at step {stopped.global_step}" in text
    assert 2 <= stopped.global_step < 1000

    n = stopped.global_step
    done = subprocess.run(_launch(1, _job_args(job, tmp_path, shards, finetuning_inputs, n + 2), run_dir, "--resume"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = f"resuming from global_step{n} (stage 0, step {n} in stage)" if job == "pretrain" else f"resumed from global_step{n}"
    assert resumed in done.stdout + done.stderr
    assert latest_state(run_dir / "checkpoints").global_step == n + 2
    steps = _metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == n + 2, steps


def _latest_step(run_dir: Path) -> int:
    state = latest_state(run_dir / "checkpoints")
    return state.global_step if state else 0


def _newest_tag_dir(run_dir: Path) -> int:
    ckpt = run_dir / "checkpoints"
    names = os.listdir(ckpt) if ckpt.is_dir() else []
    return max((int(n[len("global_step"):]) for n in names if n.startswith("global_step") and n[11:].isdigit()), default=0)


@pytest.mark.slow
def test_sigkills_at_random_moments_lose_no_checkpoint_and_repeat_no_step(shards, tmp_path):
    """Ten seeded SIGKILLs of a run that checkpoints every step: every other one the moment the
    next checkpoint's directory appears (inside the write, before ``latest`` names it), the others
    a random time after a checkpoint. Every --resume starts from the newest complete checkpoint,
    the run ends at its configured step, and metrics.jsonl holds each evaluated step once."""
    steps = 40  # the kills land in the first 10-30 steps; the last run trains the rest
    run_dir = tmp_path / "run"
    config = _config(tmp_path / "c.yaml", shards, steps=steps, checkpoint_every=1, eval_every=1, workers=1)
    rng = random.Random(0)
    kills, inside_a_write = 0, 0
    for trial in range(30):
        before = _latest_step(run_dir)
        log = tmp_path / f"run{trial}.log"
        with open(log, "w") as out:
            # A fresh port each time (_env): a killed trainer's DataLoader worker holds its store's port
            # until it notices (within 5 s) that its parent is gone.
            proc = subprocess.Popen(_launch(1, ["-m", "pretrain", "--config", str(config)], run_dir, "--resume"), cwd=REPO,
                                    env=_env(), stdout=out, stderr=subprocess.STDOUT)
        if kills == 10:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        # Training is under way once this run has written a checkpoint (which also prunes what an
        # earlier kill left half-written above `latest`).
        _wait_for(lambda: _latest_step(run_dir) > before, proc, log, 240, "a new checkpoint")
        if trial % 2:
            current = _latest_step(run_dir)
            deadline = time.time() + 60
            while _newest_tag_dir(run_dir) <= current and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.kill()
            kills += 1
            inside_a_write += _newest_tag_dir(run_dir) > _latest_step(run_dir)
        proc.wait()
        if before:
            text = log.read_text()
            assert f"resuming from global_step{before} " in text, text[-2000:]
    assert kills == 10, f"only {kills} kills landed before the run finished"
    assert inside_a_write >= 3, f"only {inside_a_write} kills landed inside a checkpoint write"
    assert json.loads((run_dir / "done.json").read_text()) == {"global_step": steps}
    assert (run_dir / "checkpoints" / LATEST_FILE).read_text().strip() == f"global_step{steps}"
    assert _metric_steps(run_dir) == list(range(1, steps + 1))


# ---------------------------------------------------------------- untrusted inputs run no code


class _RunsCodeWhenUnpickled:
    """Unpickling this creates ``marker``: what a malicious pickle in a shard or a model file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_shard_member_that_needs_pickle_is_a_bad_sample_and_runs_nothing(tmp_path, tokenizer):
    import io

    import numpy as np
    import webdataset as wds

    from pretrain.data import read_eval_samples
    from pretrain.data_config import DataConfig
    from pretrain_shards import feature_spec, make_feature_samples

    marker = tmp_path / "code-ran"
    samples = make_feature_samples(4, feature_dim=16, seed=3)
    payload = io.BytesIO()
    np.save(payload, np.array([_RunsCodeWhenUnpickled(marker)], dtype=object), allow_pickle=True)
    samples[1]["features.npy"] = payload.getvalue()
    with wds.TarWriter(str(tmp_path / "00000.tar"), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    spec = feature_spec(16)
    read = read_eval_samples(str(tmp_path / "00000.tar"), tokenizer, spec, DataConfig(batch_size=2), max_samples=10)
    assert [s["key"] for s in read] == [samples[i]["__key__"] for i in (0, 2, 3)]
    assert not marker.exists()


def test_releases_and_finetuned_exports_load_without_unpickling(tmp_path, monkeypatch):
    import pickle

    import torch

    from finetune.config import FinetuneConfig
    from finetune.export import Finetuned, load_finetuned, save_export
    from finetune.tasks import build_finetune_model
    from finetune_fixtures import tiny_release
    from preprocess.config import load_config
    from pretrain.release import load_release

    release_dir = tiny_release(tmp_path / "release")
    release = load_release(release_dir)
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "classification.yaml",
                      ["fusion.name=mbt", "fusion.mbt_fusion_layer=1", "data.train=train/00000.tar"])
    model = build_finetune_model(release.model, cfg.task, cfg.fusion).eval()
    save_export(Finetuned(model, cfg, release.tokenizer, release.feature_spec, release_dir, release_dir), tmp_path / "export")

    def refuse(*args, **kwargs):
        raise AssertionError("loading a release or an export unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    again = load_release(release_dir)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), release.model.state_dict().values()))
    loaded = load_finetuned(tmp_path / "export")
    assert loaded.cfg.fusion.name == "mbt"
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))


# ---------------------------------------------------------------- a full disk


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_stops_with_one_line_and_keeps_the_previous(shards, tmp_path):
    """A run directory on a filesystem the test makes with room for one checkpoint and a half:
    the first checkpoint is written, the second meets a full disk. The run stops with one line
    naming the cause and the checkpoint that stays newest, and that checkpoint is whole."""
    from pretrain.checkpoint import consolidated_weights

    probe = tmp_path / "probe"
    config = _config(tmp_path / "probe.yaml", shards, steps=2, checkpoint_every=2, eval_every=1000, workers=0)
    measured = subprocess.run(_launch(1, ["-m", "pretrain", "--config", str(config)], probe), cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=300)
    assert measured.returncode == 0, measured.stderr[-3000:]
    checkpoint_bytes = _size(probe / "checkpoints")
    other_bytes = _size(probe) - checkpoint_bytes

    small = tmp_path / "small"
    small.mkdir()
    size_kib = (other_bytes + int(1.5 * checkpoint_bytes)) // 1024 + 64
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        run_dir = small / "run"
        config = _config(tmp_path / "c.yaml", shards, steps=5, checkpoint_every=1, eval_every=1000, workers=0)
        result = subprocess.run(_launch(1, ["-m", "pretrain", "--config", str(config)], run_dir), cwd=REPO,
                                env=_env(), capture_output=True, text=True, timeout=300)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1, result.stderr[-3000:]
        assert last.startswith("error: checkpoint ") and "global_step2 could not be written" in last, last
        assert "the newest complete checkpoint is global_step1" in last, last
        assert latest_state(run_dir / "checkpoints").global_step == 1
        weights = consolidated_weights(run_dir / "checkpoints", "global_step1")
        assert weights and all(bool(v.isfinite().all()) for v in weights.values() if v.is_floating_point())
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def _damaged_shard(path: Path, seed: int, nan_keys: set[int], garbage_keys: set[int], cut: bool) -> None:
    """A feature shard of 16 samples: those in ``nan_keys`` with NaN features (a loss that goes
    NaN), those in ``garbage_keys`` with a features member that is not a .npy (a bad sample), and
    with ``cut`` the file cut short in its last sample (a truncated copy)."""
    import io

    import numpy as np
    import webdataset as wds
    from pretrain_shards import make_feature_samples

    samples = make_feature_samples(16, seed=seed, key_prefix=f"s{seed}-")
    for index in nan_keys:
        features = np.load(io.BytesIO(samples[index]["features.npy"]))
        buf = io.BytesIO()
        np.save(buf, np.full_like(features, np.nan))
        samples[index]["features.npy"] = buf.getvalue()
    for index in garbage_keys:
        samples[index]["features.npy"] = b"this is not a .npy member"
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for sample in samples:
            sink.write(sample)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) - 1500] if cut else data)


@pytest.mark.slow
def test_bad_samples_and_nonfinite_losses_are_skipped_and_counted_and_a_diverged_run_stops(shards, tmp_path):
    """Training reads a good shard and a damaged one (a NaN sample, a sample with a garbage member,
    cut short at the end). Every batch holding the NaN sample is skipped (no update: the weights stay
    finite, which they would not under ZeRO-0 in fp32 if its NaN gradients reached AdamW), the bad
    samples are skipped, and metrics.jsonl counts both, naming the damaged shard. Then a stage of
    nothing but NaN samples stops the run after nonfinite_loss.max_consecutive batches in a row,
    with one line naming the step, the losses and the last good checkpoint."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shards / "val", root / "val")
    for name in ("train", "nan"):
        (root / name).mkdir()
        shutil.copy(shards / "train" / "feature_spec.json", root / name)
    shutil.copy(shards / "train" / "00000.tar", root / "train")
    damaged = root / "train" / "00001.tar"
    _damaged_shard(damaged, seed=7, nan_keys={3}, garbage_keys={9}, cut=True)
    _damaged_shard(root / "nan" / "00000.tar", seed=8, nan_keys=set(range(16)), garbage_keys=set(), cut=False)

    config = yaml.safe_load(TINY.read_text())
    config.update(shards_root=str(root), checkpoint={"every_steps": 1000, "keep": 2}, nonfinite_loss={"max_consecutive": 3})
    config["stages"] = [{"name": "web", "shards": "train/{00000..00001}.tar", "eval_shards": "val/00000.tar",
                         "steps": 12, "lr": 1e-3, "warmup_steps": 2}]
    config["deepspeed"] = {"zero_stage": 0, "precision": "fp32", "gradient_clipping": 1.0}
    config["eval"] = {**config["eval"], "every_steps": 6, "max_samples": 16, "retrieval_candidates": 8}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    first = subprocess.run(_launch(1, ["-m", "pretrain", "--config", str(path)], run_dir), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 12]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float)), records
    assert sum(r["nonfinite_batches"] for r in records) >= 1, records
    skipped = {}
    for record in records:
        for shard, count in record["skipped_samples"].items():
            skipped[shard] = skipped.get(shard, 0) + count
    assert set(skipped) == {str(damaged)} and skipped[str(damaged)] >= 2, skipped  # the garbage member and the cut
    # Which parts go NaN depends on where the NaN sample's tokens and regions were masked; the total always does.
    assert re.search(r"skipped a batch whose loss is not finite \((\w+, )*loss(, \w+)*; on rank 0: .*loss=nan", first.stderr)

    config["stages"].append({"name": "diverged", "shards": "nan/00000.tar", "eval_shards": "val/00000.tar", "steps": 10})
    path.write_text(yaml.safe_dump(config))
    second = subprocess.run(_launch(1, ["-m", "pretrain", "--config", str(path)], run_dir, "--resume"), cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert re.match(r"error: step 13: 3 batches in a row had a non-finite loss \((\w+, )*loss(, \w+)*; on rank 0: ", last), last
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'global_step12'} (step 12;" in last, last
    assert "Traceback" not in second.stderr


def test_a_process_whose_step_fails_ends_instead_of_waiting_for_its_loader_workers(tmp_path):
    """DataLoader workers ignore SIGTERM (they must survive a job's stop signal until the
    checkpoint), and multiprocessing ends its children at exit with SIGTERM and then waits. A
    process leaving on an exception while its loader iterator was alive (the traceback holds it)
    waited for its workers forever: a failed pretraining step left the job hanging (seen in a
    quickstart run, and with ``ignore_stop_signals`` alone this script never ends).
    ``stop_safe_worker_init`` ends them; the real error is the last thing on stderr."""
    script = tmp_path / "failing_step.py"
    script.write_text(
        "from torch.utils.data import DataLoader\n"
        "from preprocess.launch_env import stop_safe_worker_init\n"
        "batches = iter(DataLoader(range(100), batch_size=2, num_workers=2, worker_init_fn=stop_safe_worker_init()))\n"
        "next(batches)\n"
        "raise RuntimeError('the step failed')\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 30
    assert proc.stderr.strip().splitlines()[-1] == "RuntimeError: the step failed", proc.stderr[-2000:]
