"""How the benches start the project's own commands, and name the code a result was measured with.

Shared by ``bench/fusion_accuracy.py`` and ``bench/two_stage.py``, which run ``python -m
pretrain|finetune|preprocess`` many times, often side by side on a small CPU, and cache results.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
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
    """The last commit that changed ``paths`` (git pathspecs), plus a hash of their uncommitted
    changes: a result is reused only for the same code, and a docs-only commit keeps it."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args, "--", *paths], cwd=REPO, capture_output=True, check=True).stdout

    commit = git("log", "-1", "--format=%H").decode().strip()
    diff = git("diff", "HEAD")
    return commit + (f"+dirty-{hashlib.sha256(diff).hexdigest()[:10]}" if diff.strip() else "")
