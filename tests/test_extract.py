"""End-to-end tests of ``python -m preprocess extract`` on tiny shards built here (real
webdataset tars, real torchvision Faster R-CNN with seeded random weights, real DataLoader workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from extract_helpers import DETECT, GIVEN_BOXES, good_sample, good_shards, read_features, tables, write_shard
from preprocess import extract, extract_cli, launch_env
from preprocess.feature_format import FeatureSpec, decode_feature_sample

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> int:
    return extract_cli.cli(args)


def assert_same_features(a: Path, b: Path) -> None:
    fa, fb = read_features(a), read_features(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        for member in ("features.npy", "boxes.npy", "geometry.npy"):
            np.testing.assert_array_equal(fa[key][member], fb[key][member], err_msg=f"{key} {member}")


def test_detect_mode_round_trips_through_plain_webdataset(tmp_path):
    spec = good_shards(tmp_path / "raw", num_shards=2, per_shard=3)
    out = tmp_path / "features"
    assert run(["--input", spec, "--output", str(out), *DETECT]) == 0

    fs = FeatureSpec.load(out)
    assert fs.detector == "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    assert (fs.feature_dim, fs.num_classes, fs.min_boxes, fs.max_boxes) == (1024, 90, 2, 6)
    manifest, skipped = tables(out)
    assert skipped == []
    assert [r["key"] for r in manifest] == [f"{s:03d}{i:04d}" for s in range(2) for i in range(3)]
    assert [r["shard"] for r in manifest] == ["00000.tar"] * 3 + ["00001.tar"] * 3
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]

    samples = read_features(out)
    for row in manifest:
        s = samples[row["key"]]
        n = row["num_boxes"]
        assert 2 <= n <= 6
        assert s["features.npy"].dtype == np.float16 and s["features.npy"].shape == (n, 1024)
        assert s["boxes.npy"].dtype == np.float32 and s["boxes.npy"].shape == (n, 4)
        assert s["geometry.npy"].dtype == np.float32 and s["geometry.npy"].shape == (n, 5)
        assert s["cls_prob.npy"].dtype == np.float16 and s["cls_prob.npy"].shape == (n, 90)
        np.testing.assert_allclose(s["cls_prob.npy"].astype(np.float32).sum(1), 1.0, atol=1e-2)
        assert s["info.json"] == {"image_width": 80, "image_height": 64, "num_boxes": n}
        assert (row["image_width"], row["image_height"]) == (80, 64)
        boxes = s["boxes.npy"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 64).all()
        np.testing.assert_allclose(s["geometry.npy"][:, 2], boxes[:, 2] / 80, rtol=1e-6)
        assert s["txt"] == f"picture {row['key']} with a rectangle"
        assert s["json"]["url"] == f"http://x/{row['key']}"

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["written"], summary["skipped"], summary["shards"]) == (6, 0, 2)
    assert (out / "extract_config.yaml").is_file()


def test_given_boxes_written_exactly_and_topk_labels(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    # 300x200 is larger than the 96-pixel detector input: the worker shrinks it, boxes must not move.
    samples = [good_sample(f"k{i}", seed=i, width=300, height=200, fmt=fmt) for i, fmt in enumerate(["JPEG", "PNG", "WEBP"])]
    write_shard(raw / "00000.tar", samples)
    out = tmp_path / "features"
    assert run(["--input", str(raw / "00000.tar"), "--output", str(out), *GIVEN_BOXES,
                "detector.label_format=topk", "detector.topk=2"]) == 0
    fs = FeatureSpec.load(out)
    assert fs.detector.startswith("given_boxes:") and fs.class_names == ["circle", "square", "triangle"]
    assert (fs.num_classes, fs.label_format, fs.topk, fs.min_boxes) == (3, "topk", 2, 1)
    features = read_features(out)
    for i, raw_sample in enumerate(samples):
        meta = json.loads(raw_sample["json"])
        got = features[f"k{i}"]
        np.testing.assert_array_equal(got["boxes.npy"], np.asarray(meta["boxes"], dtype=np.float32))
        assert got["info.json"]["image_width"] == 300 and got["info.json"]["image_height"] == 200
        # Labels are one-hot: the top label is the given one ("circle" is id 0) with score 1.
        assert got["labels.npy"].dtype == np.int32 and got["labels.npy"].shape == (2, 2)
        assert got["labels.npy"][:, 0].tolist() == [i % 3, 0]
        np.testing.assert_array_equal(got["label_scores.npy"][:, 0], np.ones(2, np.float16))
        decoded = decode_feature_sample(_raw_members(out, f"k{i}"), fs.num_classes)
        assert decoded.cls_prob.argmax(1).tolist() == [i % 3, 0]


def _raw_members(out: Path, key: str) -> dict:
    import webdataset as wds

    for sample in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False):
        if sample["__key__"] == key:
            return sample
    raise KeyError(key)


def test_kill_mid_run_then_rerun_matches_clean_run(tmp_path):
    spec = good_shards(tmp_path / "raw", num_shards=6, per_shard=6)
    args = [*GIVEN_BOXES, "batch_size=2", "num_workers=0"]
    clean = tmp_path / "clean"
    assert run(["--input", spec, "--output", str(clean), *args]) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "preprocess", "extract", "--input", spec, "--output", str(out), *args],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / ".parts"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(parts.glob("*.manifest.parquet")):
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make the job longer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.manifest.parquet")))
    assert 1 <= done < 6, "kill must land mid-job"
    assert not (out / "manifest.parquet").exists()

    assert run(["--input", spec, "--output", str(out), *args]) == 0
    assert not list(out.glob(".*.incomplete")), "a partial shard was left behind"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in clean.glob("*.tar"))
    assert tables(out) == tables(clean)
    assert_same_features(out, clean)
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs[-1]["shards_already_complete"] == done


@pytest.mark.parametrize("calibration", ["noise", "input"])
def test_two_ranks_give_the_same_tables_as_one_run(tmp_path, monkeypatch, calibration):
    """Also with batch norms calibrated on the input: rank 1 never processes 00000.tar but
    calibrates on its first images too, so it builds the same network as rank 0."""
    spec = good_shards(tmp_path / "raw", num_shards=3, per_shard=2)
    args = [*GIVEN_BOXES, f"detector.batchnorm_calibration={calibration}", "detector.calibration_images=3"]
    single = tmp_path / "single"
    assert run(["--input", spec, "--output", str(single), *args]) == 0

    shared = tmp_path / "shared"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(["--input", spec, "--output", str(shared), *args]) == 0
    assert sorted(p.name for p in shared.glob("*.tar")) == ["00001.tar"]
    assert not (shared / "manifest.parquet").exists(), "tables must wait for the other rank"
    monkeypatch.setenv("RANK", "0")
    assert run(["--input", spec, "--output", str(shared), *args]) == 0
    monkeypatch.delenv("RANK")  # plain webdataset refuses to read shards under a multi-rank env
    monkeypatch.delenv("WORLD_SIZE")
    assert tables(shared) == tables(single)
    assert_same_features(shared, single)
    weights = FeatureSpec.load(single).weights
    # 3 asked for, but the first shard holds 2: it calibrates on what there is.
    expected = "random, batch norms calibrated on the first 2 images of input shard 00000.tar"
    assert weights == ("random" if calibration == "noise" else expected)


def test_pipe_and_fsspec_inputs(tmp_path):
    spec = good_shards(tmp_path / "raw", num_shards=2, per_shard=2)
    local = tmp_path / "local"
    assert run(["--input", spec, "--output", str(local), *GIVEN_BOXES]) == 0

    piped = tmp_path / "piped"
    pipe_spec = f"pipe:cat {tmp_path / 'raw'}/{{00000..00001}}.tar"
    assert run(["--input", pipe_spec, "--output", str(piped), *GIVEN_BOXES]) == 0
    manifest, _ = tables(piped)
    assert [r["source_shard"] for r in manifest][::2] == [f"pipe:cat {tmp_path / 'raw'}/0000{i}.tar" for i in range(2)]
    assert [r["key"] for r in manifest] == [r["key"] for r in tables(local)[0]]
    assert_same_features(piped, local)

    memory = fsspec.filesystem("memory")
    for i in range(2):
        memory.pipe(f"/extract-test/0000{i}.tar", (tmp_path / "raw" / f"0000{i}.tar").read_bytes())
    remote = tmp_path / "remote"
    # num_workers=0: the in-memory filesystem lives in this process only.
    assert run(["--input", "memory://extract-test/{00000..00001}.tar", "--output", str(remote), *GIVEN_BOXES,
                "num_workers=0"]) == 0
    assert [r["key"] for r in tables(remote)[0]] == [r["key"] for r in tables(local)[0]]
    assert_same_features(remote, local)


def test_rerun_after_completion_loads_no_model_and_keeps_tables(tmp_path, monkeypatch):
    spec = good_shards(tmp_path / "raw", num_shards=1, per_shard=2)
    out = tmp_path / "features"
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES]) == 0
    before = tables(out)
    (out / "manifest.parquet").unlink()  # e.g. lost, or never assembled by a crashed last worker

    def no_model(cfg):
        raise AssertionError("a rerun with nothing to do must not load the detector")

    monkeypatch.setattr(extract, "build_detector", no_model)
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES]) == 0
    assert tables(out) == before


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing input", [], "does not exist"),
        ("unwritable output", [], "not writable"),
        ("bad value", ["batch_size=0"], "batch_size must be >= 1"),
        ("bad detector value", ["detector.max_boxes=1", "detector.min_boxes=3"], "min_boxes"),
        ("unknown key", ["detector.max_boxez=3"], "unknown key"),
        ("no output name", [], "cannot derive an output shard name"),
        ("bad calibration path", ["detector.calibration_from=/no/such/extraction"], "detector.calibration_from"),
    ],
)
def test_errors_are_one_line_and_come_before_the_model(tmp_path, monkeypatch, capsys, case, extra, message):
    spec = good_shards(tmp_path / "raw", num_shards=1, per_shard=1)
    output = tmp_path / "out"
    if case == "missing input":
        spec = str(tmp_path / "raw" / "{00000..00001}.tar")
    elif case == "unwritable output":
        (tmp_path / "a-file").write_text("x")
        output = tmp_path / "a-file" / "out"
    elif case == "no output name":
        spec = "pipe:true"

    def no_model(cfg):
        raise AssertionError("the detector must not be loaded before validation passes")

    monkeypatch.setattr(extract, "build_detector", no_model)
    started = time.time()
    assert run(["--input", spec, "--output", str(output), *GIVEN_BOXES, *extra]) == 2
    assert time.time() - started < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("extract: error:") and message in err[0], err


def test_rerun_with_a_different_detector_is_refused(tmp_path, capsys, monkeypatch):
    spec = good_shards(tmp_path / "raw", num_shards=1, per_shard=1)
    out = tmp_path / "features"
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES]) == 0
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES, "detector.max_boxes=7"]) == 2
    assert "detector.max_boxes=8" in capsys.readouterr().err
    # Speed-only settings may change between runs.
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES, "num_workers=0", "batch_size=1"]) == 0
    # A feature_spec.json from some other detector (same config file) is refused too.
    spec_file = out / "feature_spec.json"
    data = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**data, "feature_dim": 7}))
    (out / ".parts" / "00000.tar.manifest.parquet").unlink()
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES]) == 2
    assert "feature_dim: 7 vs 1024" in capsys.readouterr().err
    # What the backbone computed in is part of what was written: continuing in bf16 is refused
    # with the way out, while a key that decides the same is not (auto, on a CPU without bf16).
    spec_file.write_text(json.dumps(data))
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES, "detector.precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert "backbone_precision: 'fp32' vs 'bf16'" in err and "set detector.precision=fp32 to continue it" in err
    monkeypatch.setattr(launch_env, "cpu_flags", lambda: {"avx2"})
    assert run(["--input", spec, "--output", str(out), *GIVEN_BOXES, "detector.precision=auto"]) == 0


def test_given_boxes_missing_from_every_sample_names_the_field_and_the_key(tmp_path, capsys):
    """Calibrating on the input over samples whose JSON has no boxes: the message says that, names
    the JSON field and the config key, and does not blame the images."""
    samples = [good_sample(f"{i:04d}", seed=i) for i in range(3)]
    for sample in samples:
        sample["json"] = json.dumps({"url": "http://x"}).encode()
    (tmp_path / "raw").mkdir()
    write_shard(tmp_path / "raw" / "00000.tar", samples)
    code = run(["--input", str(tmp_path / "raw" / "00000.tar"), "--output", str(tmp_path / "out"), *GIVEN_BOXES,
                "detector.batchnorm_calibration=input"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "3 skipped as no_given_boxes" in err[0] and "boxes_field='boxes'" in err[0], err[0]
    assert "no usable image" not in err[0]


def test_a_full_disk_stops_with_one_line_and_keeps_the_finished_shards(tmp_path, monkeypatch, capsys):
    """The second shard's write fails as on a full disk: the first shard stays complete, nothing
    partial is visible, the error is one line, and a rerun finishes the job as a clean run would."""
    import errno

    from preprocess.storage import Location

    spec = good_shards(tmp_path / "raw", num_shards=3, per_shard=2)
    args = [*GIVEN_BOXES, "num_workers=0"]
    clean = tmp_path / "clean"
    assert run(["--input", spec, "--output", str(clean), *args]) == 0
    out = tmp_path / "out"
    real_put, calls = Location.put, []

    def put_until_the_disk_fills(self, local_file, name):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(local_file))
        return real_put(self, local_file, name)

    monkeypatch.setattr(Location, "put", put_until_the_disk_fills)
    assert run(["--input", spec, "--output", str(out), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "rerun" in err[0], err
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    assert [p.name for p in (out / ".parts").glob("*.manifest.parquet")] == ["00000.tar.manifest.parquet"]
    assert not list(out.glob(".*.incomplete")) and not (out / "manifest.parquet").exists()

    monkeypatch.setattr(Location, "put", real_put)
    assert run(["--input", spec, "--output", str(out), *args]) == 0
    assert tables(out) == tables(clean)
    assert_same_features(out, clean)
