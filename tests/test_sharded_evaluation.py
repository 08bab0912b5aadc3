"""Evaluation shared out over two ranks (gloo) gives what one process gives, with as many forwards per rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finetune.config import DataConfig as TaskDataConfig
from finetune.config import EvalConfig as TaskEvalConfig
from finetune.config import FinetuneConfig, TaskConfig
from finetune.data import read_samples
from finetune.evaluation import evaluate_samples
from finetune.fusion import FusionConfig
from finetune.tasks import build_finetune_model
from pretrain.data_config import DataConfig
from pretrain.distributed import shard
from pretrain.evaluation import evaluate
from pretrain.evaluate_config import EvalConfig
from pretrain.masking_config import MaskingConfig
from pretrain.model import ImageBertConfig, ImageBertForPretraining
from pretrain.release import load_release
from pretrain_shards import write_feature_shards
from pretrain_runs import free_port
from tests.finetune_fixtures import minilm_tokenizer, symbolic_spec, task_config_dict, tiny_release, write_symbolic_task_shards


def test_one_process_takes_every_item():
    assert shard(5) == [0, 1, 2, 3, 4]  # one process: everything, no padding


def pretraining_metrics(pattern: str, spec) -> tuple[dict, int]:
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    model = ImageBertForPretraining(ImageBertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=tokenizer.vocab_size, feature_dim=spec.feature_dim, num_region_classes=spec.num_classes,
    ))
    forwards = []
    model.imagebert.register_forward_hook(lambda *_: forwards.append(1))
    metrics = evaluate(model, pattern, tokenizer, spec, DataConfig(batch_size=8), MaskingConfig(),
                       EvalConfig(max_samples=36, retrieval_candidates=9, batch_size=10), "cpu")
    return metrics, len(forwards)


def finetuning_metrics(release_dir, patterns: dict) -> dict:
    release = load_release(release_dir)
    out = {}
    for task, pattern in patterns.items():
        task_cfg = TaskConfig(**task_config_dict(task))
        cfg = FinetuneConfig(task=task_cfg, data=TaskDataConfig(train=pattern, max_text_length=24),
                             eval=TaskEvalConfig(batch_size=3, retrieval_image_chunk=4, retrieval_caption_chunk=5))
        torch.manual_seed(0)
        model = build_finetune_model(release.model, task_cfg, FusionConfig(name="mbt", mbt_fusion_layer=1))
        samples = read_samples(pattern, release.tokenizer, symbolic_spec(), cfg.data, task_cfg)
        out[task] = evaluate_samples(model, samples, cfg, release.tokenizer.pad_token_id, torch.device("cpu"))
    return out


def _rank(rank: int, port: int, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results[rank] = (pretraining_metrics(*args[0]), finetuning_metrics(*args[1]))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    pattern, spec = write_feature_shards(root / "features", num_shards=2, per_shard=20, feature_dim=16)
    patterns = {task: write_symbolic_task_shards(task, root / task, 10, seed=4, captions_per_image=2 if task == "retrieval" else 1)
                for task in ("classification", "ner", "multilabel", "retrieval")}
    return (pattern, spec), (tiny_release(root / "release"), patterns)


def test_two_ranks_evaluate_like_one_process(inputs):
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, inputs, results), nprocs=2)
    (pre0, fine0), (pre1, fine1) = results[0], results[1]
    single_pre, single_forwards = pretraining_metrics(*inputs[0])
    single_fine = finetuning_metrics(*inputs[1])

    assert pre0[0] == pre1[0]  # every rank returns the reduced metrics
    assert pre0[0] == pytest.approx(single_pre, rel=1e-9)
    assert single_pre["num_eval_samples"] == 36 and single_pre["num_images"] == 9
    # 36 samples in batches of eval.batch_size 10 = 4 batches of one forward (masked modelling and
    # ITM on the unmasked pairs in one encoder call), and the 9 + 81 retrieval pairs in batches of
    # 10 = 1 + 9: 14 in one process; each of two ranks runs 2 + 1 + 5 (rank 1 pads the positives'
    # batch and the last block batch).
    assert single_forwards == 14 and pre0[1] == pre1[1] == 8
    for task in single_fine:
        assert fine0[task] == fine1[task] == pytest.approx(single_fine[task]), task
    assert single_fine["retrieval"]["num_captions"] == 20
