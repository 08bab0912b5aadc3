"""bench/gpu.sh --cpu-smoke: every step of the GPU benchmark script at tiny sizes on the CPU, so the
script is known to work before a GPU machine is lent. Each step's figures are checked, not only
that it ran: the extraction and training rates, the loader's worker sizing, and that ZeRO-3 holds
less model state per rank than ZeRO-0 (a real 2-rank torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_cpu_smoke_measures_every_step(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench/gpu.sh"), "--cpu-smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert set(report["steps"]) == {"extract", "train_ref", "loader", "zero"}  # train_base: train_ref's script
    assert all(step["exit"] == 0 for step in report["steps"].values())

    (entry,) = report["extract"]["results"]
    assert entry["detector"] == "torchvision:fasterrcnn_resnet50_fpn" and entry["feature_dim"] == 1024
    assert entry["precision"] == "fp32" and entry["weights"] == "random" and entry["device"].startswith("cpu")
    assert entry["timed_images"] == entry["batch_size"] == 2 and entry["seconds"] > 0
    assert abs(entry["images_per_s"] - entry["timed_images"] / entry["seconds"]) <= 0.01 * entry["images_per_s"]

    train = report["train_ref"]
    rates = train["samples_per_s"]
    assert rates["trainer"] > 0 and rates["bare"] > 0
    assert abs(train["a_trainer_over_bare"] - rates["trainer"] / rates["bare"]) < 1e-9
    assert train["c_step_flops"] > 0 and 0 < train["c_utilisation"] < 1.5

    loader = report["loader"]
    assert loader["regions"] == 4 and loader["per_worker_samples_per_s"] > 0
    assert loader["workers_needed"] >= 1 and loader["target_samples_per_s"] == 100

    zero = report["zero"]
    ranks = zero["ranks"]
    params = ranks["zero0"][0]["params"]
    for r0, r3 in zip(ranks["zero0"], ranks["zero3"], strict=True):
        # ZeRO-0 holds everything on every rank: fp32 weights, gradients and two Adam moments.
        assert r0["model_states"] >= 16 * params
        # ZeRO-3 partitions all three over the 2 ranks (the tiny model's small tensors stay whole:
        # DeepSpeed keeps parameters under 1e5 elements on every rank).
        assert r3["model_states"] < 0.9 * r0["model_states"]
        assert r3["state_bytes"]["optimizer"] < 0.8 * r0["state_bytes"]["optimizer"]
    rows = {row["config"]: row for row in zero["rows"]}
    assert rows["zero3"]["analytic_bytes_per_param"] == 8  # (4 + 4 + 8) / 2

    table = (out / "gpu.md").read_text()
    assert "| ... (a) trainer / bare |" in table and "ZeRO memory, zero3" in table and "anchor" in table
