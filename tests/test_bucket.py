"""Shard buckets end to end, against a real S3-compatible server on 127.0.0.1 (``tests/s3_server.py``,
moto's server mode with authentication on) reached through s3fs and the standard AWS environment:
extraction from and to a bucket (killed and rerun), pretraining and fine-tuning reading their shards
from it, one-line errors for a server that is down, a wrong key or a missing object, and credentials
that never reach a log, a table or a saved config.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from extract_helpers import GIVEN_BOXES, good_shards
from finetune_fixtures import tiny_release, write_symbolic_task_shards
from pretrain_shards import write_feature_shards
from pretrain_runs import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain" / "tiny-test.yaml"
FINETUNE_CONFIG = REPO / "configs" / "finetune" / "classification.yaml"


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path, monkeypatch):
    """A temporary directory of this test's own, for it and the runs it starts (TMPDIR): extraction
    into a bucket spools each shard there, and a test checks that none is left behind. In the
    machine's shared one, a shard that another process (a parallel test worker, a SLURM job) was
    spooling at that moment would fail the check."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the directory it chose
    return temp


def _env(server, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env(), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], result.stderr[-3000:]
    return lines[0]


def _assert_no_credentials(server, texts: list[str], dirs: list[Path], objects: dict[str, bytes]) -> None:
    secrets = (server.key_id, server.secret)
    for text in texts:
        assert not any(s in text for s in secrets), "a credential reached the output"
    for directory in dirs:
        for path in directory.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), f"a credential reached {path}"
    for name, data in objects.items():
        assert not any(s.encode() in data for s in secrets), f"a credential reached object {name}"


# ---------------------------------------------------------------- extraction


def test_extract_into_a_bucket_killed_and_rerun_equals_a_local_run(s3_server, tmp_path):
    raw = tmp_path / "raw"
    local_spec = good_shards(raw, num_shards=6, per_shard=6)
    bucket = s3_server.make_bucket("extract-kill")
    s3_server.upload(raw, f"{bucket}/raw")
    args = [*GIVEN_BOXES, "batch_size=2", "num_workers=1"]
    env = _env(s3_server)

    local = tmp_path / "local"
    _ok(_run(["-m", "preprocess", "extract", "--input", local_spec, "--output", str(local), *args], env))

    out = f"{bucket}/features"
    cmd = [sys.executable, "-m", "preprocess", "extract", "--input", f"{bucket}/raw/{{00000..00005}}.tar",
           "--output", out, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = s3_server.client()

    def parts_done() -> int:
        listed = client.list_objects_v2(Bucket="extract-kill", Prefix="features/.parts/").get("Contents", [])
        return sum(item["Key"].endswith(".manifest.parquet") for item in listed)

    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and parts_done() == 0:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make the job longer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = parts_done()
    assert 1 <= done < 6, "the kill must land mid-job"
    assert "manifest.parquet" not in s3_server.objects(out)

    logs = _ok(_run(cmd[1:], env))
    objects = s3_server.objects(out)
    tars = sorted(k for k in objects if k.endswith(".tar"))
    assert tars == sorted(p.name for p in local.glob("*.tar"))
    for name in tars:  # byte for byte what the local run wrote, including the redone shard
        assert objects[name] == (local / name).read_bytes(), name
    assert not [k for k in objects if ".tmp-" in k or k.endswith(".incomplete")], "a partial object is visible"
    for table in ("manifest.parquet", "skipped.parquet"):
        ours = pq.read_table(io.BytesIO(objects[table])).to_pylist()
        theirs = pq.read_table(local / table).to_pylist()
        assert [{**r, "source_shard": Path(r["source_shard"]).name} for r in ours] == \
               [{**r, "source_shard": Path(r["source_shard"]).name} for r in theirs]
    assert objects["feature_spec.json"] == (local / "feature_spec.json").read_bytes()
    # The rerun loaded the calibration the killed run had saved in the bucket: the same network.
    assert objects["batchnorm_calibration.safetensors"] == (local / "batchnorm_calibration.safetensors").read_bytes()
    summary = json.loads(objects["summary.json"])
    assert summary["written"] == 36 and summary["runs"][-1]["shards_already_complete"] == done
    assert not list(Path(tempfile.gettempdir()).glob("vlpretrain-spool-*")), "a spooled shard was left behind"
    _assert_no_credentials(s3_server, [logs], [local], objects)


@pytest.mark.parametrize(
    "case",
    ["server down", "wrong secret", "no such bucket", "missing input object", "credentials in the URL"],
)
def test_extract_bucket_errors_are_one_line(s3_server, tmp_path, case):
    raw = tmp_path / "raw"
    good_shards(raw, num_shards=1, per_shard=1)
    bucket = s3_server.make_bucket(f"errors-{abs(hash(case)) % 10**8}")
    s3_server.upload(raw, f"{bucket}/raw")
    env = _env(s3_server)
    source, out = f"{bucket}/raw/00000.tar", f"{bucket}/features"
    expect = out
    if case == "server down":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        source = str(raw / "00000.tar")
        expect = "Could not connect"
    elif case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        expect = "signature"
    elif case == "no such bucket":
        source, out = str(raw / "00000.tar"), "s3://no-such-bucket/features"
        expect = "no-such-bucket"
    elif case == "missing input object":
        source = f"{bucket}/raw/00007.tar"
        expect = f"{bucket}/raw/00007.tar does not exist"
    else:
        out = f"s3://{s3_server.key_id}:{s3_server.secret}@{bucket.removeprefix('s3://')}/features"
        expect = "credentials must not be written into URLs"
    started = time.time()
    result = _run(["-m", "preprocess", "extract", "--input", source, "--output", out, *GIVEN_BOXES], env, timeout=120)
    line = _one_line_error(result)
    assert expect.lower() in line.lower(), line
    assert s3_server.secret not in result.stdout + result.stderr
    assert time.time() - started < 60


# ---------------------------------------------------------------- pretraining and fine-tuning


def _pretrain_config(path: Path, root: str, **data) -> Path:
    config = yaml.safe_load(TINY.read_text())
    config["shards_root"] = root
    # One training shard for 2 ranks x 2 workers: shards are drawn with replacement, so fewer
    # shards than consumers still feeds every one of them.
    config["stages"] = [{"name": "web", "shards": "train/00000.tar", "eval_shards": "val/00000.tar", "steps": 4,
                         "lr": 1e-3, "warmup_steps": 1}]
    config["data"] = {**config["data"], "num_workers": 2, **data}
    config["eval"] = {**config["eval"], "every_steps": 4}
    config["checkpoint"] = {"every_steps": 4, "keep": 2}
    config["logging"] = {**config["logging"], "every_steps": 1}
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(ranks: int, *args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def _pretraining_shards(server, tmp_path: Path, bucket_name: str, train: int, val: int) -> tuple[Path, str]:
    """One training and one validation shard on disk and the same in a new bucket: (directory, URL)."""
    features = tmp_path / "features"
    write_feature_shards(features / "train", num_shards=1, per_shard=train, seed=0)
    write_feature_shards(features / "val", num_shards=1, per_shard=val, seed=1)
    bucket = server.make_bucket(bucket_name)
    for split in ("train", "val"):
        server.upload(features / split, f"{bucket}/features/{split}")
    return features, f"{bucket}/features"


@pytest.mark.slow
def test_pretraining_reads_its_shards_from_a_bucket_as_from_disk(s3_server, tmp_path):
    features, in_bucket = _pretraining_shards(s3_server, tmp_path, "pretrain", train=48, val=24)
    env = _env(s3_server)

    runs = {}
    for name, root in (("local", str(features)), ("bucket", in_bucket)):
        config = _pretrain_config(tmp_path / f"{name}.yaml", root)
        run_dir = tmp_path / f"run-{name}"
        logs = _ok(_run(_torchrun(2, "-m", "pretrain", "--config", str(config), "--run-dir", str(run_dir)), env))
        runs[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if name == "bucket":
            _assert_no_credentials(s3_server, [logs], [run_dir], {})
            assert "1 shard(s) for 2 ranks x 2 workers: every worker is fed" in logs
    # metrics.jsonl holds the evaluations: after 4 steps on the same batches they are the same numbers.
    assert [(r["step"], r["num_eval_samples"]) for r in runs["bucket"]] == [(4, 24)]
    assert runs["bucket"] == runs["local"], "reading from the bucket changed the batches"


@pytest.mark.parametrize("case", ["missing shard", "wrong secret"])
def test_pretraining_bucket_errors_are_one_line_before_training(s3_server, tmp_path, case):
    name = f"pretrain-{'missing' if case == 'missing shard' else 'secret'}"
    _, in_bucket = _pretraining_shards(s3_server, tmp_path, name, train=8, val=8)
    env = _env(s3_server)
    config = _pretrain_config(tmp_path / "c.yaml", in_bucket)
    if case == "missing shard":
        text = yaml.safe_load(config.read_text())
        text["stages"][0]["shards"] = "train/{00000..00002}.tar"
        config.write_text(yaml.safe_dump(text))
        expect = f"{in_bucket}/train/00001.tar does not exist (and 1 more)"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        expect = "signature"
    result = _run(["-m", "pretrain", "--config", str(config), "--run-dir", str(tmp_path / "run")], env)
    line = _one_line_error(result)
    assert expect.lower() in line.lower(), line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_finetuning_and_evaluation_read_task_shards_from_a_bucket(s3_server, tmp_path):
    data = tmp_path / "data"
    release = tiny_release(tmp_path / "release")
    write_symbolic_task_shards("classification", data / "train", 48, seed=1)
    write_symbolic_task_shards("classification", data / "val", 16, seed=2)
    bucket = s3_server.make_bucket("finetune")
    for split in ("train", "val"):
        s3_server.upload(data / split, f"{bucket}/data/{split}")
    env = _env(s3_server)

    results = {}
    for name, root in (("local", str(data)), ("bucket", f"{bucket}/data")):
        run_dir = tmp_path / f"run-{name}"
        _ok(_run(["-m", "finetune", "--config", str(FINETUNE_CONFIG), "--init", str(release), "--run-dir", str(run_dir),
                  f"shards_root={root}", "data.train=train/00000.tar", "data.val=val/00000.tar", "train.steps=4",
                  "train.warmup_steps=0", "data.batch_size=8", "data.num_workers=1", "data.max_text_length=24",
                  "eval.every_steps=4", "checkpoint.every_steps=4", "logging.every_steps=1",
                  "logging.progress_bar=false", "fusion.name=mbt", "fusion.mbt_fusion_layer=1"], env))
        results[name] = json.loads((run_dir / "results.json").read_text())["metrics"]
        evaluated = tmp_path / f"eval-{name}.json"
        logs = _ok(_run(["-m", "finetune.evaluate", "--checkpoint", str(run_dir), "--data",
                         f"{root}/val/00000.tar", "--out", str(evaluated)], env))
        assert json.loads(evaluated.read_text())["metrics"] == pytest.approx(results[name])
        if name == "bucket":
            _assert_no_credentials(s3_server, [logs], [run_dir], {})
    assert results["bucket"] == pytest.approx(results["local"])
