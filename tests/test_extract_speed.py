"""bench/extract_speed.py --quick on the CPU: the smoke run of the GPU throughput bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_mode_measures_the_torchvision_detector(tmp_path):
    out = tmp_path / "speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/extract_speed.py"), "--quick", "--device", "cpu",
         "--detector", "torchvision:fasterrcnn_resnet50_fpn", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    (entry,) = result["results"]
    assert entry["detector"] == "torchvision:fasterrcnn_resnet50_fpn"
    assert entry["precision"] == "fp32" and entry["weights"] == "random" and entry["feature_dim"] == 1024
    assert entry["device"].startswith("cpu")
    assert entry["timed_batches"] == 1 and entry["timed_images"] == entry["batch_size"] == 2
    assert entry["seconds"] > 0 and entry["images_per_s"] > 0
    assert abs(entry["images_per_s"] - entry["timed_images"] / entry["seconds"]) <= 0.01 * entry["images_per_s"]
    assert "images/s" in proc.stdout  # the one-line summary per detector and precision
