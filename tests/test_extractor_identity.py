"""The feature spec identifies the extractor network exactly (``extractor_sha256``), and an extraction
can reuse another's batch-norm calibration (``detector.calibration_from``) to get the same network.

Random-init detectors calibrate their batch norms on the first images of their own input, so two
extractions of different image sets build different networks unless the second loads the first's
statistics. Tiny raw shards, MobileNet at a 96-pixel canvas, given boxes: about a second each.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import GIVEN_BOXES, good_sample, read_features, write_shard

from preprocess import extract_cli
from preprocess.feature_format import (
    CALIBRATION_FILE,
    FEATURE_SPEC_FILE,
    BatchnormCalibration,
    FeatureSpec,
)
from preprocess.storage import Location

CALIBRATED = [*GIVEN_BOXES, "detector.batchnorm_calibration=input", "detector.calibration_images=3", "num_workers=0"]
SHARED = "shared"  # the one image both raw sets hold


def raw_set(directory: Path, prefix: str, shared_at: int) -> str:
    """One raw shard of four images: three of its own and the shared one at ``shared_at``."""
    seed = {"a": 100, "b": 200}[prefix]
    samples = [good_sample(f"{prefix}{i}", seed=seed + i) for i in range(3)]
    samples.insert(shared_at, good_sample(SHARED, seed=999))
    directory.mkdir(parents=True)
    write_shard(directory / "00000.tar", samples)
    return str(directory / "00000.tar")


def extract_to(raw: str, out: Path, *extra: str) -> FeatureSpec:
    assert extract_cli.cli(["--input", raw, "--output", str(out), *CALIBRATED, *extra]) == 0
    return FeatureSpec.load(out)


@pytest.fixture(scope="module")
def extractions(tmp_path_factory):
    """a: set A calibrated on itself; b_reused: set B with A's calibration; b_own: set B calibrated on itself.
    B's first three images (its calibration images) include the shared one, A's do not."""
    root = tmp_path_factory.mktemp("identity")
    raw_a, raw_b = raw_set(root / "raw-a", "a", shared_at=3), raw_set(root / "raw-b", "b", shared_at=1)
    out = {"raw_a": raw_a, "a": root / "a", "b_reused": root / "b-reused", "b_own": root / "b-own"}
    extract_to(raw_a, out["a"])
    extract_to(raw_b, out["b_reused"], f"detector.calibration_from={out['a']}")
    extract_to(raw_b, out["b_own"])
    return out


def test_reused_calibration_gives_the_same_network_and_features(extractions):
    a, b = FeatureSpec.load(extractions["a"]), FeatureSpec.load(extractions["b_reused"])
    assert len(a.extractor_sha256) == 64 and int(a.extractor_sha256, 16) >= 0
    assert b.extractor_sha256 == a.extractor_sha256
    # Its weights say what the network was calibrated on: A's images, not B's.
    assert b.weights == a.weights == "random, batch norms calibrated on the first 3 images of input shard 00000.tar"
    shared_a = read_features(extractions["a"])[SHARED]
    shared_b = read_features(extractions["b_reused"])[SHARED]
    for member in ("features.npy", "boxes.npy", "cls_prob.npy"):
        np.testing.assert_array_equal(shared_b[member], shared_a[member], err_msg=member)
    # B's output carries the same calibration, byte for byte, for the next extraction to reuse.
    a_file, b_file = (extractions[k] / CALIBRATION_FILE for k in ("a", "b_reused"))
    assert b_file.read_bytes() == a_file.read_bytes()
    saved = BatchnormCalibration.load(a_file)
    assert saved.extractor_sha256 == a.extractor_sha256 and saved.calibrated_on == "the first 3 images of input shard 00000.tar"
    assert any(name.endswith(".running_var") for name in saved.stats)
    a.check_compatible(b, f"release {extractions['a']}", f"task shards {extractions['b_reused']}")


def test_own_calibration_is_another_extractor_and_refused(extractions):
    a, own = FeatureSpec.load(extractions["a"]), FeatureSpec.load(extractions["b_own"])
    assert own.extractor_sha256 != a.extractor_sha256
    assert own.detector == a.detector and own.feature_dim == a.feature_dim  # all the old check compared
    shared_a, shared_own = (read_features(extractions[k])[SHARED]["features.npy"] for k in ("a", "b_own"))
    assert not np.array_equal(shared_a, shared_own)
    release, task = f"release {extractions['a']}", f"task shards {extractions['b_own']}"
    with pytest.raises(ValueError) as err:
        a.check_compatible(own, release, task)
    message = str(err.value)
    assert "\n" not in message
    for part in (release, task, a.extractor_sha256, own.extractor_sha256, "detector.calibration_from"):
        assert part in message, part


def test_hash_is_stable_across_a_rerun_and_thread_counts(extractions, tmp_path):
    a = FeatureSpec.load(extractions["a"])
    assert extract_to(extractions["raw_a"], tmp_path / "again").extractor_sha256 == a.extractor_sha256
    # A rerun into the same directory with another thread count (calibrating again would differ in
    # the last bits) loads the directory's own calibration and is accepted.
    out = tmp_path / "again"
    (out / ".parts" / "00000.tar.manifest.parquet").unlink()
    assert extract_to(extractions["raw_a"], out, "torch_threads=2").extractor_sha256 == a.extractor_sha256


def test_a_spec_written_before_the_hash_loads_and_compares_with_one_warning(extractions, tmp_path, caplog):
    new = FeatureSpec.load(extractions["a"])
    data = json.loads((extractions["a"] / FEATURE_SPEC_FILE).read_text())
    del data["extractor_sha256"]
    (tmp_path / FEATURE_SPEC_FILE).write_text(json.dumps(data))
    old = FeatureSpec.load(tmp_path)
    assert old.extractor_sha256 == "" and old.format_version == 1
    with caplog.at_level(logging.WARNING, logger="preprocess.feature_format"):
        for _ in range(2):
            new.check_compatible(old, "release R", f"shards {tmp_path}")
    warnings = [r.getMessage() for r in caplog.records if "extractor_sha256" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0], warnings
    # The other fields are still checked.
    old.feature_dim = 7
    with pytest.raises(ValueError, match="feature_dim: 1024 vs 7"):
        new.check_compatible(old, "release R", f"shards {tmp_path}")


@pytest.mark.parametrize("case", ["not a calibration file", "another model's statistics"])
def test_a_bad_calibration_is_one_line(extractions, tmp_path, capsys, case):
    source = tmp_path / "calibration"
    source.mkdir()
    if case == "not a calibration file":
        (source / CALIBRATION_FILE).write_bytes(b"not safetensors")
        message = "not a batch-norm calibration file"
    else:
        BatchnormCalibration({"backbone.body.bn9.running_mean": np.zeros(3, np.float32)}, "noise").save(
            Location(source)
        )
        message = "batch-norm statistics of another model"
    code = extract_cli.cli(["--input", extractions["raw_a"], "--output", str(tmp_path / "out"), *CALIBRATED,
                        f"detector.calibration_from={source}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and str(source) in err[0], err
    assert not (tmp_path / "out" / FEATURE_SPEC_FILE).exists()
