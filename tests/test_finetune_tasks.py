"""Every task x fusion strategy trains a few steps on its synthetic data and its task loss falls."""

import copy

import pytest
import torch

from finetune.config import DataConfig, TaskConfig
from finetune.data import TaskCollate, read_samples
from finetune.fusion import FUSION_STRATEGIES, FusionConfig
from finetune.heads import retrieval_loss
from finetune.synth_tasks import TASKS
from finetune.tasks import build_finetune_model, sample_negative_pairs
from pretrain.release import load_release
from tests.finetune_fixtures import symbolic_spec, task_config_dict, tiny_release, write_symbolic_task_shards

STEPS = 10
RETRIEVAL_STEPS = 60  # matching pairs from a random tiny encoder takes longer than a label
LR = 3e-3
RETRIEVAL_LR = 1e-3  # at 3e-3 some strategies collapse to one score for every pair


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: extra threads only add contention on a shared machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return load_release(tiny_release(tmp_path_factory.mktemp("release") / "release"))


@pytest.fixture(scope="module")
def task_batches(release, tmp_path_factory):
    """One fixed batch of 8 samples per task, through the real decoder and collate."""
    out = {}
    for task in TASKS:
        pattern = write_symbolic_task_shards(task, tmp_path_factory.mktemp(task), 8, seed=3)
        task_cfg = TaskConfig(**task_config_dict(task))
        data = DataConfig(train=pattern, max_text_length=24)
        samples = read_samples(pattern, release.tokenizer, symbolic_spec(), data, task_cfg)
        out[task] = (task_cfg, TaskCollate(release.tokenizer.pad_token_id, task_cfg)(samples))
    return out


def _task_loss(model, batch):
    """Eval-mode task loss; retrieval's averaged over the same four negative draws every time."""
    model.eval()
    losses = []
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(model(batch).task_loss.item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("strategy", FUSION_STRATEGIES)
@pytest.mark.parametrize("task", TASKS)
def test_task_loss_falls(task, strategy, release, task_batches):
    task_cfg, batch = task_batches[task]
    torch.manual_seed(0)
    # L_f = 1 of 3 layers: with the 2/3 default (layer 2) the bottleneck update after the last
    # layer would reach nobody, and retrieval could not learn at all.
    fusion = FusionConfig(name=strategy, mbt_fusion_layer=1)
    model = build_finetune_model(copy.deepcopy(release.model), task_cfg, fusion)
    before = _task_loss(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RETRIEVAL_LR if task == "retrieval" else LR)
    model.train()
    for _ in range(RETRIEVAL_STEPS if task == "retrieval" else STEPS):
        optimizer.zero_grad()
        out = model(batch)
        out.loss.backward()
        optimizer.step()
        if strategy == "muse":
            assert out.aux_loss is not None and out.aux_loss.item() > 0
    after = _task_loss(model, batch)
    assert after < 0.9 * before, f"{task}/{strategy}: task loss {before:.4f} -> {after:.4f}"


def test_predictions_have_the_task_shapes(release, task_batches):
    shapes = {}
    for task in TASKS:
        task_cfg, batch = task_batches[task]
        model = build_finetune_model(copy.deepcopy(release.model), task_cfg, FusionConfig(name="mbt")).eval()
        shapes[task] = model.predict(batch)
    n = len(task_batches["classification"][1]["labels"])
    assert shapes["classification"].shape == (n,) and shapes["classification"].max() < 5
    assert shapes["multilabel"].shape == (n, 5) and set(shapes["multilabel"].unique().tolist()) <= {0, 1}
    tags = shapes["ner"]
    word_mask = task_batches["ner"][1]["word_mask"]
    assert [len(t) for t in tags] == word_mask.sum(1).tolist()
    assert shapes["retrieval"].shape == (len(task_batches["retrieval"][1]["image_ids"]),)


def test_negative_pairs_never_pair_an_image_with_its_own_caption():
    image_ids = torch.tensor([0, 0, 1, 2, 3])  # samples 0 and 1 are two captions of one image
    image_of, caption_of = sample_negative_pairs(image_ids, 4, torch.Generator().manual_seed(0))
    n = len(image_ids)
    assert torch.equal(image_of[:n], torch.arange(n)) and torch.equal(caption_of[:n], torch.arange(n))
    assert (image_ids[image_of[n:]] != image_ids[caption_of[n:]]).all()
    assert len(image_of) == n * (1 + 2 * 4)


def test_retrieval_losses_by_hand():
    pos = torch.tensor([2.0, 0.0])
    neg = torch.tensor([[1.0, -1.0], [0.5, 0.1]])
    # triplet: hardest negatives 1.0 and 0.5; margin 0.2 -> max(0, 0.2-2+1)=0, max(0, 0.2-0+0.5)=0.7
    assert retrieval_loss(pos, neg, "triplet", 0.2).item() == pytest.approx(0.35)
    expected = -torch.log_softmax(torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.5, 0.1]]), 1)[:, 0].mean()
    assert retrieval_loss(pos, neg, "multiclass", 0.2).item() == pytest.approx(expected.item())
    scores = torch.tensor([2.0, 0.0, 1.0, -1.0, 0.5, 0.1])
    labels = torch.tensor([1.0, 1, 0, 0, 0, 0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels)
    assert retrieval_loss(pos, neg, "binary", 0.2).item() == pytest.approx(bce.item())


@pytest.mark.parametrize("strategy", FUSION_STRATEGIES)
def test_a_fine_tuned_model_saves_and_loads_back_exactly(strategy, release, task_batches, tmp_path):
    """save_pretrained / load_model (what finetune.export and finetune.evaluate use) round-trip every
    strategy's parameters, with MuSE's caption decoder still sharing the word embeddings."""
    from finetune.tasks import FinetuneModel
    from pretrain.weights import load_model

    task_cfg, batch = task_batches["classification"]
    fusion = FusionConfig(name=strategy, mbt_fusion_layer=1)
    torch.manual_seed(0)
    model = build_finetune_model(copy.deepcopy(release.model), task_cfg, fusion).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(FinetuneModel, tmp_path, task_cfg, fusion)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    if strategy == "muse":
        assert loaded.fusion.caption_decoder.vocab_weight is loaded.fusion.encoder.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded.predict(batch), model.predict(batch))


def test_training_batches_report_the_samples_skipped_in_each_shard(release, tmp_path):
    """A shard cut short is skipped and named with the batches, for the trainer's metrics."""
    from collections import Counter

    from finetune.data import build_train_loader

    pattern = write_symbolic_task_shards("classification", tmp_path, 24, seed=5, per_shard=12)
    cut = tmp_path / "00001.tar"
    cut.write_bytes(cut.read_bytes()[:-2000])
    task_cfg = TaskConfig(**task_config_dict("classification"))
    data = DataConfig(train=pattern, max_text_length=24, batch_size=4, num_workers=0, shuffle_buffer=4)
    loader = iter(build_train_loader(pattern, release.tokenizer, symbolic_spec(), data, task_cfg, 0, 0, 1))
    skipped = Counter()
    for _ in range(12):
        skipped.update(next(loader)["skipped_samples"])
    assert set(skipped) == {str(cut)} and skipped[str(cut)] >= 1, skipped


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ner_tagger_trains_at_its_own_learning_rate_and_dropout(schedule, release):
    """task.crf_lr: the tagger (emission layers and CRF, MuSE's reference group) in parameter groups of
    their own, which DeepSpeed's schedulers (built from the engine's config) keep at that peak."""
    from deepspeed.runtime import lr_schedules

    from finetune.config import TrainConfig
    from pretrain.engine import deepspeed_config, param_groups
    from pretrain.engine_config import DeepSpeedConfig

    task = TaskConfig(**{**task_config_dict("ner"), "crf_lr": 1e-3})
    model = build_finetune_model(copy.deepcopy(release.model), task, FusionConfig(name="muse"))
    assert model.tagger.dropout.p == 0.5  # task.crf_dropout's default, the reference's
    groups = param_groups(model, 0.01, model.lr_overrides())
    tagger = {id(p) for p in model.tagger.parameters()}
    assert {id(p) for g in groups if g.get("lr") == 1e-3 for p in g["params"]} == tagger
    assert not any(id(p) in tagger for g in groups if "lr" not in g for p in g["params"])
    train = TrainConfig(lr=5e-5, steps=10, warmup_steps=2, schedule=schedule)
    group_lrs = [g.get("lr", train.lr) for g in groups]
    config = deepspeed_config(DeepSpeedConfig(zero_stage=1, precision="fp32"), train, 2, group_lrs=group_lrs)
    own = ["lr" in g for g in groups]  # before the optimizer fills in every group's lr
    optimizer = torch.optim.AdamW(groups, lr=train.lr)
    scheduler = getattr(lr_schedules, config["scheduler"]["type"])(optimizer, **config["scheduler"]["params"])
    peaks = []
    for step in range(8):
        scheduler.step()
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert all(lr == pytest.approx(lrs[0] * (20 if o else 1), abs=1e-12) for lr, o in zip(lrs, own)), step
        peaks.append(lrs[0])
    assert 0.9 * 5e-5 < max(peaks) <= 5e-5 * (1 + 1e-9) and peaks[-1] < max(peaks)  # warm-up to ~train.lr, decay
