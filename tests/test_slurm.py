"""The ``slurm/`` job scripts, submitted to a real two-node SLURM cluster that the tests start.

The cluster (``tests/slurm_cluster.py``) runs when the tests run as root on a machine with
apt; elsewhere every test here is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

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


@pytest.fixture
def job_env(slurm_cluster):
    """What a user would export before submitting: how to activate the env, where the repo is."""
    if not VENV_ACTIVATE.exists():
        pytest.skip(f"jobs activate the project's virtual environment, and {VENV_ACTIVATE} is missing")
    return slurm_cluster.env(
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
