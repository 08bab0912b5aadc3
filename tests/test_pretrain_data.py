"""The pretraining data pipeline and validation metrics, on real webdataset feature shards built here."""

from __future__ import annotations

import io
import itertools
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pretrain_shards import make_feature_samples, write_feature_shards
from pretrain.data import (
    PretrainCollate,
    SampleDecoder,
    build_eval_batches,
    build_train_loader,
    check_spec_matches_model,
    feature_spec_of,
    read_eval_samples,
    split_by_rank,
)
from pretrain.data_config import DataConfig
from pretrain.evaluation import evaluate
from pretrain.evaluate_config import EvalConfig
from pretrain.masking_config import MaskingConfig
from pretrain.model import IGNORE_INDEX, ImageBertConfig, ImageBertForPretraining

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    return write_feature_shards(directory, num_shards=4, per_shard=30, feature_dim=FEATURE_DIM)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def decode_text(tokenizer, ids, attention_mask):
    return tokenizer.decode(ids[attention_mask.bool()], skip_special_tokens=True)


def original_samples(pattern, tokenizer, spec):
    return {s["key"]: s for s in read_eval_samples(pattern, tokenizer, spec, DataConfig(), 10_000)}


def test_batch_contract(shards, tokenizer):
    pattern, spec = shards
    data = DataConfig(batch_size=6, num_workers=0, shuffle_buffer=20)
    batch = take(build_train_loader(pattern, tokenizer, spec, data, MaskingConfig(), 0, 0, 1), 1)[0]
    b, t = batch["input_ids"].shape
    r = batch["region_features"].shape[1]
    assert b == 6 and 3 <= t <= data.max_text_length and 1 <= r <= 4
    expected = {
        "input_ids": ((b, t), torch.long), "attention_mask": ((b, t), torch.long), "mlm_labels": ((b, t), torch.long),
        "region_features": ((b, r, FEATURE_DIM), torch.float16),  # as stored: the model widens them
        "region_geometry": ((b, r, 5), torch.float32), "region_mask": ((b, r), torch.long),
        "region_blanked": ((b, r), torch.bool), "region_masked": ((b, r), torch.bool), "region_cls_prob": ((b, r, spec.num_classes), torch.float16),
        "itm_labels": ((b,), torch.long),
        "itm_input_ids": ((b, batch["itm_input_ids"].shape[1]), torch.long),
        "itm_attention_mask": ((b, batch["itm_input_ids"].shape[1]), torch.long),
    }
    assert 3 <= batch["itm_input_ids"].shape[1] <= data.max_text_length
    for name, (shape, dtype) in expected.items():
        assert tuple(batch[name].shape) == shape, name
        assert batch[name].dtype == dtype, name
    assert len(batch["keys"]) == b
    # Padding: pad tokens outside the attention mask, never chosen for MLM; padded regions zero.
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert (batch["mlm_labels"][pad] == IGNORE_INDEX).all()
    assert (batch["mlm_labels"][:, 0] == IGNORE_INDEX).all()  # [CLS] is never masked
    no_region = batch["region_mask"] == 0
    assert (batch["region_features"][no_region] == 0).all()
    assert not (batch["region_masked"] | batch["region_blanked"])[no_region].any()
    assert not (batch["region_blanked"] & ~batch["region_masked"]).any()  # only chosen regions are hidden
    # The features are the shard's, masked or not: masking travels as the flags, MRFR regresses these.
    originals = original_samples(pattern, tokenizer, spec)
    for i, key in enumerate(batch["keys"]):
        n = len(originals[key]["features"])
        assert int(batch["region_mask"][i].sum()) == n
        assert torch.equal(batch["region_features"][i, :n], torch.from_numpy(originals[key]["features"]))


@pytest.mark.parametrize("itm_pairs", ["unmasked", "masked"])
def test_itm_negatives_have_other_captions(shards, tokenizer, itm_pairs):
    """The ITM pairs hold another sample's caption exactly where the label says 0. Unmasked
    (the default): they come apart from the masked inputs, which hold every sample's own caption
    and are masked; masked: the masked inputs are the pairs."""
    pattern, spec = shards
    data = DataConfig(batch_size=8, num_workers=0, shuffle_buffer=20, itm_pairs=itm_pairs)
    originals = original_samples(pattern, tokenizer, spec)
    labels = []
    text_rate = 0.5 if itm_pairs == "unmasked" else 0.0
    for batch in take(build_train_loader(pattern, tokenizer, spec, data, MaskingConfig(text_rate=text_rate), 3, 0, 1), 25):
        pairs = ("itm_input_ids", "itm_attention_mask") if itm_pairs == "unmasked" else ("input_ids", "attention_mask")
        for i, key in enumerate(batch["keys"]):
            text = decode_text(tokenizer, batch[pairs[0]][i], batch[pairs[1]][i])
            own = tokenizer.decode(originals[key]["input_ids"], skip_special_tokens=True)
            assert (text == own) == bool(batch["itm_labels"][i]), (key, text, own)
            if itm_pairs == "unmasked":  # the masked inputs: the own caption, with [MASK]s
                ids = torch.where(batch["mlm_labels"][i] == IGNORE_INDEX, batch["input_ids"][i], batch["mlm_labels"][i])
                assert decode_text(tokenizer, ids, batch["attention_mask"][i]) == own
        if itm_pairs == "unmasked":
            assert (batch["input_ids"] == tokenizer.mask_token_id).any()
            assert not (batch["itm_input_ids"] == tokenizer.mask_token_id).any()
        else:
            assert "itm_input_ids" not in batch
        labels.append(batch["itm_labels"])
    share = torch.cat(labels).float().mean().item()
    assert 0.4 < share < 0.6  # 200 pairs at itm_negative_rate 0.5


def test_no_negative_without_a_different_caption(tokenizer, shards):
    _, spec = shards
    decoder = SampleDecoder(tokenizer, spec, DataConfig())
    raw = make_feature_samples(4, FEATURE_DIM, seed=5)
    for sample in raw:
        sample["txt"] = b"a red circle"  # every caption the same text
    samples = [decoder(s) for s in raw]
    samples[1]["key"] = samples[0]["key"]
    collate = PretrainCollate(tokenizer, DataConfig(batch_size=4, itm_negative_rate=0.9), MaskingConfig(), seed=0)
    batch = collate(samples, torch.Generator().manual_seed(0))
    assert batch["itm_labels"].tolist() == [1, 1, 1, 1]


def test_reproducible_per_seed_and_rank(shards, tokenizer):
    pattern, spec = shards
    data = DataConfig(batch_size=4, num_workers=2, shuffle_buffer=10)

    def run(seed, rank):
        return take(build_train_loader(pattern, tokenizer, spec, data, MaskingConfig(), seed, rank, 2), 6)

    first, again = run(7, 0), run(7, 0)
    for a, b in zip(first, again):
        assert a["keys"] == b["keys"]
        for name, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[name]), name
    keys = lambda batches: [k for batch in batches for k in batch["keys"]]  # noqa: E731
    assert keys(run(8, 0)) != keys(first)
    assert keys(run(7, 1)) != keys(first)
    # Two workers read different shard draws and mask with different generators.
    assert first[0]["keys"] != first[1]["keys"]


def test_split_by_rank_partitions_one_stream():
    stream = list(range(20))
    parts = [list(split_by_rank(rank, 3)(iter(stream))) for rank in range(3)]
    assert sorted(itertools.chain(*parts)) == stream
    assert parts[1] == [1, 4, 7, 10, 13, 16, 19]


def test_truncation_to_config_limits(shards, tokenizer):
    pattern, spec = shards
    data = DataConfig(batch_size=4, max_text_length=6, max_regions=2)
    batches = build_eval_batches(pattern, tokenizer, spec, data, MaskingConfig(), seed=0, max_samples=40)
    assert max(b["input_ids"].shape[1] for b in batches) == 6
    assert max(b["region_features"].shape[1] for b in batches) == 2
    # Regions kept are the first (most confident) ones of the shard.
    originals = original_samples(pattern, tokenizer, spec)
    batch = batches[0]
    for i, key in enumerate(batch["keys"]):
        n = int(batch["region_mask"][i].sum())
        assert n == min(2, len(originals[key]["features"]))
        kept = torch.from_numpy(originals[key]["features"][:n])
        assert torch.equal(batch["region_features"][i, :n], kept)


def test_eval_batches_deterministic_and_topk_labels(tmp_path, tokenizer):
    pattern, spec = write_feature_shards(tmp_path, 2, 10, FEATURE_DIM, label_format="topk")
    data = DataConfig(batch_size=4)
    one = build_eval_batches(pattern, tokenizer, spec, data, MaskingConfig(), seed=1, max_samples=18)
    two = build_eval_batches(pattern, tokenizer, spec, data, MaskingConfig(), seed=1, max_samples=18)
    assert [b["keys"] for b in one] == [b["keys"] for b in two]
    assert sum(len(b["keys"]) for b in one) == 18
    for a, b in zip(one, two):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    # top-k labels become distributions over all classes, zero outside the top 2.
    prob = one[0]["region_cls_prob"][one[0]["region_mask"].bool()]
    assert torch.allclose(prob.float().sum(-1), torch.ones(len(prob)), atol=1e-2)
    assert ((prob > 0).sum(-1) == 2).all()


def test_bad_samples_are_skipped_and_logged(tmp_path, tokenizer, caplog):
    good = make_feature_samples(6, FEATURE_DIM, seed=1, key_prefix="good")
    broken = make_feature_samples(3, FEATURE_DIM, seed=2, key_prefix="bad")
    del broken[0]["features.npy"]  # missing member
    broken[1]["txt"] = b"   "  # empty caption
    broken[2]["features.npy"] = make_feature_samples(1, FEATURE_DIM + 1, seed=3)[0]["features.npy"]  # wrong dim
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for sample in [good[0], broken[0], good[1], broken[1], good[2], broken[2], *good[3:]]:
            sink.write(sample)
    # A second shard cut off in the middle of a member.
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for sample in make_feature_samples(3, FEATURE_DIM, seed=4, key_prefix="cut"):
            sink.write(sample)
    (tmp_path / "00001.tar").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _, spec = write_feature_shards(tmp_path / "spec_only", 1, 1, FEATURE_DIM)
    pattern = str(tmp_path / "{00000..00001}.tar")
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        samples = read_eval_samples(pattern, tokenizer, spec, DataConfig(), 100)
    keys = [s["key"] for s in samples]
    assert keys[:6] == [f"good{i:06d}" for i in range(6)]
    assert not any(k.startswith("bad") for k in keys)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "missing member features.npy" in messages and "empty caption" in messages
    assert f"spec feature_dim {FEATURE_DIM}" in messages and "#4" in messages  # the truncated tar counted too
    # The training loader keeps going past the bad samples as well, and its batches carry the
    # counts by shard from the worker process to the trainer (its metrics).
    train = take(build_train_loader(pattern, tokenizer, spec, DataConfig(batch_size=4, num_workers=1, shuffle_buffer=4),
                                    MaskingConfig(), 0, 0, 1), 8)
    assert all(not k.startswith("bad") for b in train for k in b["keys"])
    skipped = Counter()
    for batch in train:
        skipped.update(batch["skipped_samples"])
    first, cut = str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")
    assert set(skipped) == {first, cut}, skipped
    # Each read of the first shard skips its 3 bad samples; each read of the second, its cut.
    assert skipped[first] % 3 == 0 and skipped[first] >= 3 and skipped[cut] >= 1, skipped


def test_config_and_spec_errors(shards):
    with pytest.raises(ValueError, match="data.itm_negative_rate"):
        DataConfig(itm_negative_rate=1.0)
    with pytest.raises(ValueError, match=r"data.itm_pairs must be one of \['unmasked', 'masked'\], got 'raw'"):
        DataConfig(itm_pairs="raw")
    with pytest.raises(ValueError, match="data.batch_size"):
        DataConfig(batch_size=1)
    with pytest.raises(ValueError, match="eval.retrieval_candidates"):
        EvalConfig(retrieval_candidates=1)
    pattern, spec = shards
    assert feature_spec_of(pattern) == spec
    config = ImageBertConfig(hidden_size=32, feature_dim=FEATURE_DIM + 4, num_region_classes=spec.num_classes)
    with pytest.raises(ValueError, match=r"feature_dim 16 vs model 20"):
        check_spec_matches_model(spec, config, pattern)


def tiny_model(tokenizer, spec):
    torch.manual_seed(0)
    config = ImageBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             vocab_size=tokenizer.vocab_size, feature_dim=spec.feature_dim,
                             num_region_classes=spec.num_classes)
    return ImageBertForPretraining(config)


def test_evaluate_reports_every_metric(shards, tokenizer):
    pattern, spec = shards
    model = tiny_model(tokenizer, spec)
    model.train()
    eval_cfg = EvalConfig(max_samples=24, retrieval_candidates=12, batch_size=16)
    data = DataConfig(batch_size=8)
    metrics = evaluate(model, pattern, tokenizer, spec, data, MaskingConfig(), eval_cfg, "cpu")
    assert model.training  # restored
    assert metrics["num_images"] == metrics["num_captions"] == 12 and metrics["num_eval_samples"] == 24
    for name in ("mlm_acc", "moc_acc", "itm_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= metrics[name] <= 100.0, name  # percent
    for name in ("mlm_loss", "moc_loss", "mrfr_loss", "itm_loss"):
        assert metrics[name] > 0, name
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
    assert metrics["t2i_r1_chance"] == pytest.approx(100 / 12) and metrics["i2t_r10_chance"] == pytest.approx(1000 / 12)
    # An untrained MLM head over a 30k vocabulary cannot be right by luck on many tokens.
    assert metrics["mlm_acc"] < 20
    again = evaluate(model, pattern, tokenizer, spec, data, MaskingConfig(), eval_cfg, "cpu")
    assert again == metrics


def test_evaluate_retrieval_matches_direct_scoring(shards, tokenizer):
    """The batched N x N scoring agrees with scoring each (image, caption) pair on its own."""
    pattern, spec = shards
    model = tiny_model(tokenizer, spec).eval()
    eval_cfg = EvalConfig(max_samples=4, retrieval_candidates=5, batch_size=7)
    metrics = evaluate(model, pattern, tokenizer, spec, DataConfig(batch_size=4), MaskingConfig(), eval_cfg, "cpu")
    samples = read_eval_samples(pattern, tokenizer, spec, DataConfig(), 5)
    direct = torch.zeros(5, 5)
    with torch.no_grad():
        for i, j in itertools.product(range(5), range(5)):
            ids = torch.from_numpy(samples[j]["input_ids"])[None]
            feats = torch.from_numpy(samples[i]["features"].astype(np.float32))[None]
            direct[i, j] = model.itm_scores(ids, torch.ones_like(ids), feats,
                                            torch.from_numpy(samples[i]["geometry"])[None],
                                            torch.ones(feats.shape[:2], dtype=torch.long))
    # Sample i's caption is column i; with distinct scores a hit is a plain rank check.
    assert len(direct.unique()) == 25
    own = direct.diagonal()
    i2t_rank = (direct > own[:, None]).sum(1)  # captions above image i's own
    t2i_rank = (direct > own[None, :]).sum(0)  # images above caption j's own
    assert metrics["i2t_r1"] == pytest.approx(100 * (i2t_rank < 1).float().mean().item(), abs=1e-6)
    assert metrics["t2i_r1"] == pytest.approx(100 * (t2i_rank < 1).float().mean().item(), abs=1e-6)
    assert metrics["i2t_r5"] == pytest.approx(100.0)


@pytest.mark.slow
def test_real_synth_and_extract_output_feeds_the_loader(tmp_path, tokenizer):
    """The feature shards `preprocess synth` + `preprocess extract` write go through the loader and evaluation."""
    repo = Path(__file__).resolve().parent.parent
    raw, features = tmp_path / "raw", tmp_path / "features"
    run = lambda *args: subprocess.run([sys.executable, "-m", "preprocess", *args], check=True,  # noqa: E731
                                       capture_output=True, text=True, timeout=300, cwd=repo)
    run("synth", "--out", str(raw), "--num-samples", "24", "--seed", "0", "--samples-per-shard", "12")
    run("extract", "--input", str(raw / "{00000..00001}.tar"), "--output", str(features),
        "--config", str(repo / "configs/preprocess/quickstart.yaml"), "progress=false")
    pattern = str(features / "{00000..00001}.tar")
    spec = feature_spec_of(pattern)
    truth = {s["__key__"]: (s["txt"].decode(), json.loads(s["json"]))
             for s in wds.WebDataset(str(raw / "{00000..00001}.tar"), shardshuffle=False)}

    samples = read_eval_samples(pattern, tokenizer, spec, DataConfig(), 100)
    assert sorted(s["key"] for s in samples) == sorted(truth)
    for sample in samples:
        caption, metadata = truth[sample["key"]]
        assert sample["caption"] == caption.strip()
        assert sample["features"].shape == (len(metadata["boxes"]), spec.feature_dim)
        # Given-boxes mode: the MOC target of each region is the synth label of its object.
        assert sample["cls_prob"].astype(np.float32).argmax(1).tolist() == metadata["labels"]

    data = DataConfig(batch_size=8, num_workers=1, shuffle_buffer=16)
    batch = take(build_train_loader(pattern, tokenizer, spec, data, MaskingConfig(), 0, 0, 1), 2)[1]
    assert batch["region_features"].shape[2] == spec.feature_dim == 1024
    assert 1 <= batch["region_features"].shape[1] <= spec.max_boxes
    model = tiny_model(tokenizer, spec)
    metrics = evaluate(model, pattern, tokenizer, spec, DataConfig(batch_size=8), MaskingConfig(),
                       EvalConfig(max_samples=16, retrieval_candidates=8, batch_size=32), "cpu")
    assert metrics["num_images"] == 8 and metrics["num_eval_samples"] == 16
