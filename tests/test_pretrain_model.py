"""ImageBERT model and masking: masking statistics, each objective learns, padding invariance, spec errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain_shards import feature_spec, make_feature_samples
from pretrain.data import PretrainCollate, SampleDecoder
from pretrain.data_config import DataConfig
from pretrain.evaluation import evaluate
from pretrain.evaluate_config import EvalConfig
from pretrain.masking import choose_modality, mask_regions, mask_text
from pretrain.masking_config import MaskingConfig
from pretrain.model import IGNORE_INDEX, ImageBertConfig, ImageBertForPretraining
from pretrain.model_config import ObjectiveWeights

FEATURE_DIM = 16


def tiny_model(tokenizer, seed=0, dropout=0.1, pooling="cls", cmg=None):
    torch.manual_seed(seed)
    config = ImageBertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=tokenizer.vocab_size, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        feature_dim=FEATURE_DIM, num_region_classes=feature_spec(FEATURE_DIM).num_classes, summary_pooling=pooling,
        cmg=cmg,
    )
    return ImageBertForPretraining(config).train()


def batches_of(tokenizer, num_samples, batch_size, seed=0, masking=None, data=None):
    data = data or DataConfig(batch_size=batch_size)
    decoder = SampleDecoder(tokenizer, feature_spec(FEATURE_DIM), data)
    samples = [decoder(s) for s in make_feature_samples(num_samples, FEATURE_DIM, seed=seed)]
    collate = PretrainCollate(tokenizer, data, masking or MaskingConfig(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return [collate(samples[i : i + batch_size], generator) for i in range(0, num_samples, batch_size)]


def test_text_masking_statistics():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4000, 40), generator=generator)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, 30:] = False  # [CLS] and padding
    config = MaskingConfig()
    masked, labels = mask_text(ids, maskable, config, mask_token_id=103, vocab_size=30522, generator=generator)
    chosen = labels != IGNORE_INDEX
    assert not chosen[~maskable].any()
    assert torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original tokens
    assert chosen[maskable].float().mean().item() == pytest.approx(0.15, abs=0.005)
    n = chosen.sum().item()
    to_mask = (masked[chosen] == 103).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert unchanged == pytest.approx(0.1, abs=0.01)  # a random token equals the original 1 time in 30522
    replaced = masked[chosen][(masked[chosen] != 103) & (masked[chosen] != ids[chosen])]
    assert replaced.numel() / n == pytest.approx(0.1, abs=0.01)
    assert ((replaced >= 0) & (replaced < 30522)).all()  # random tokens come from the vocabulary


def test_region_masking_statistics():
    generator = torch.Generator().manual_seed(1)
    region_mask = torch.ones(3000, 50, dtype=torch.long)
    region_mask[:, 40:] = 0
    blanked, chosen = mask_regions(region_mask, MaskingConfig(), generator)
    assert not chosen[:, 40:].any()
    assert chosen[:, :40].float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert not blanked[~chosen].any()  # only chosen regions are hidden...
    assert blanked[chosen].float().mean().item() == pytest.approx(0.9, abs=0.01)  # ...and 10 % of them are not


def test_conditional_masking_masks_one_modality(tokenizer):
    text_rows, region_rows = choose_modality(10_000, MaskingConfig(conditional=True), torch.Generator().manual_seed(2))
    assert not (text_rows & region_rows).any() and (text_rows | region_rows).all()
    assert text_rows.float().mean().item() == pytest.approx(0.5, abs=0.02)
    # And the collate honours it: no sample has both a masked token and a masked region.
    masking = MaskingConfig(conditional=True, text_rate=0.5, region_rate=0.5)
    for batch in batches_of(tokenizer, 48, 16, masking=masking):
        has_text = (batch["mlm_labels"] != IGNORE_INDEX).any(1)
        has_region = batch["region_masked"].any(1)
        assert not (has_text & has_region).any()
        assert has_text.any() and has_region.any()


def validation_losses(model, batches):
    model.eval()
    with torch.no_grad():
        outs = [model(batch).losses for batch in batches]
    model.train()
    return {name: sum(float(o[name]) for o in outs) / len(outs) for name in outs[0]}


@pytest.fixture
def one_thread():
    # The tiny model runs faster on one thread than on cores shared with other test processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_steps(model, batches, weights, steps, lr=3e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        out = model(batches[step % len(batches)], weights)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


def test_each_loss_falls(tokenizer, one_thread):
    """AdamW steps on a fixed small set lower every objective's loss on that set. ITM is the
    slowest to start: it sits at ln 2 until it leaves its plateau, here between steps 240 and 260
    (240 sufficed when the ITM pairs had an encoder call of their own: the same gradients, other
    rounding, measured equal to 1e-4 at the first step)."""
    batches = batches_of(tokenizer, 64, 16, seed=3)
    model = tiny_model(tokenizer, dropout=0.0)
    before = validation_losses(model, batches)
    train_steps(model, batches, ObjectiveWeights(), steps=320)
    after = validation_losses(model, batches)
    assert set(before) == {"mlm", "moc", "mrfr", "itm"}
    for name in before:
        assert after[name] < 0.8 * before[name], (name, before[name], after[name])


def test_moc_kl_loss_falls(tokenizer, one_thread):
    batches = batches_of(tokenizer, 32, 16, seed=3)
    model = tiny_model(tokenizer, dropout=0.0)
    weights = ObjectiveWeights(mlm=0.0, mrfr=0.0, itm=0.0, moc_kl=True)
    model.eval()
    with torch.no_grad():
        before = [float(model(b, weights).losses["moc"]) for b in batches]
    train_steps(model, batches, weights, steps=30)
    model.eval()
    with torch.no_grad():
        after = [float(model(b, weights).losses["moc"]) for b in batches]
    assert sum(after) < 0.5 * sum(before), (before, after)


def test_masked_losses_ignore_negative_pairs(tokenizer):
    """``data.itm_pairs: masked``: changing a negative pair's masked targets changes nothing, the
    masked losses count on matched pairs only."""
    batch = batches_of(tokenizer, 16, 16, seed=4, masking=MaskingConfig(text_rate=0.5, region_rate=0.5),
                       data=DataConfig(batch_size=16, itm_pairs="masked"))[0]
    negative = batch["itm_labels"] == 0
    assert negative.any()
    model = tiny_model(tokenizer).eval()
    with torch.no_grad():
        reference = model(batch).losses
        changed = dict(batch)
        changed["region_features"] = batch["region_features"].clone()
        changed["region_features"][negative] += 100.0
        changed["mlm_labels"] = batch["mlm_labels"].clone()
        changed["mlm_labels"][negative] = torch.where(
            batch["mlm_labels"][negative] == IGNORE_INDEX, IGNORE_INDEX, 2000
        )
        result = model(changed).losses
    for name in ("mlm", "mrfr"):
        assert float(result[name]) == pytest.approx(float(reference[name]), rel=1e-6)


def test_unmasked_itm_pairs_are_scored_as_they_are(tokenizer):
    """``data.itm_pairs: unmasked`` (the default): ITM scores the pairs as they are, as second
    sequences of the same encoder call as the masked inputs (``_encode``), so it is what
    ``itm_scores`` gives them alone; the masked losses count every row (each holds its own
    caption); and the ITM pairs do not touch the masked losses."""
    batch = batches_of(tokenizer, 16, 16, seed=4, masking=MaskingConfig(text_rate=0.5, region_rate=0.5))[0]
    # Masked inputs longer than the ITM pairs: the pairs are padded to their length in the call.
    pad = (0, 3)
    batch.update(input_ids=F.pad(batch["input_ids"], pad, value=tokenizer.pad_token_id),
                 attention_mask=F.pad(batch["attention_mask"], pad), mlm_labels=F.pad(batch["mlm_labels"], pad, value=IGNORE_INDEX))
    negative = batch["itm_labels"] == 0
    assert negative.any() and not negative.all()
    model = tiny_model(tokenizer).eval()
    torch.nn.init.normal_(model.itm_head.weight, std=1.0, generator=torch.Generator().manual_seed(0))  # scores that differ
    with torch.no_grad():
        out = model(batch)
        scores = model.itm_scores(batch["itm_input_ids"], batch["itm_attention_mask"], batch["region_features"],
                                  batch["region_geometry"], batch["region_mask"])
        expected = F.binary_cross_entropy_with_logits(scores, batch["itm_labels"].float())
        assert float(out.losses["itm"]) == pytest.approx(float(expected), rel=1e-5)
        # Every row's masked tokens are scored, negatives' included.
        assert int(out.counts["mlm"][1]) == int((batch["mlm_labels"] != IGNORE_INDEX).sum())
        assert int((batch["mlm_labels"][negative] != IGNORE_INDEX).sum()) > 0
        on_masked_inputs = model.itm_scores(batch["input_ids"], batch["attention_mask"], batch["region_features"],
                                            batch["region_geometry"], batch["region_mask"])
        assert (scores - on_masked_inputs).abs().max() > 1e-2  # so the match above says which pairs ITM read
        swapped = dict(batch, itm_input_ids=batch["itm_input_ids"].flip(0), itm_attention_mask=batch["itm_attention_mask"].flip(0))
        again = model(swapped).losses
    for name in ("mlm", "moc", "mrfr"):
        assert float(again[name]) == float(out.losses[name])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_invariance(tokenizer, pooling):
    """Extra padded tokens and regions leave a sample's outputs unchanged (with either summary)."""
    batch = batches_of(tokenizer, 4, 4, seed=5, masking=MaskingConfig(text_rate=0.0, region_rate=0.0))[0]
    model = tiny_model(tokenizer, pooling=pooling).eval()
    args = [batch[k] for k in ("input_ids", "attention_mask", "region_features", "region_geometry", "region_mask")]
    padded = [
        torch.nn.functional.pad(args[0], (0, 7), value=tokenizer.pad_token_id),
        torch.nn.functional.pad(args[1], (0, 7)),
        torch.nn.functional.pad(args[2], (0, 0, 0, 5), value=3.0),  # junk in padded regions must not leak
        torch.nn.functional.pad(args[3], (0, 0, 0, 5), value=0.5),
        torch.nn.functional.pad(args[4], (0, 5)),
    ]
    with torch.no_grad():
        plain = model.imagebert(*args)
        wide = model.imagebert(*padded)
        scores, wide_scores = model.itm_scores(*args), model.itm_scores(*padded)
    t, r = args[0].shape[1], args[2].shape[1]
    real_text = args[1].bool()
    assert torch.allclose(wide.last_hidden_state[:, :t][real_text], plain.last_hidden_state[:, :t][real_text], atol=1e-5)
    real_regions = args[4].bool()
    assert torch.allclose(wide.last_hidden_state[:, t + 7 : t + 7 + r][real_regions],
                          plain.last_hidden_state[:, t:][real_regions], atol=1e-5)
    assert torch.allclose(wide.pooler_output, plain.pooler_output, atol=1e-5)
    assert torch.allclose(wide_scores, scores, atol=1e-5)


def test_feature_dim_mismatch_is_a_clear_error(tokenizer, tmp_path):
    batch = batches_of(tokenizer, 4, 4, seed=6)[0]
    model = tiny_model(tokenizer)
    wrong = dict(batch)
    wrong["region_features"] = torch.zeros(*batch["region_features"].shape[:2], FEATURE_DIM + 1)
    with pytest.raises(ValueError, match=f"dim {FEATURE_DIM + 1} but the model expects {FEATURE_DIM}"):
        model(wrong)
    # Evaluation refuses shards whose spec does not fit the model before reading them.
    spec = feature_spec(FEATURE_DIM + 1)
    spec.save(tmp_path)
    with pytest.raises(ValueError, match=f"feature_dim {FEATURE_DIM + 1} vs model {FEATURE_DIM}"):
        evaluate(model, str(tmp_path / "missing-{00000..00001}.tar"), tokenizer, spec, DataConfig(), MaskingConfig(),
                 EvalConfig(), "cpu")


def test_blanked_regions_are_hidden_and_do_not_blow_up_gradients(tokenizer):
    """Blanked regions (the masking's flag) get the learned blank embedding: the model never sees
    their features, and no parameter's gradient explodes.

    Masking by zeroing the feature instead gives LayerNorm(Linear(0)), which normalises the
    zero-init bias: its gradient came out ~1e5x the others', and global clipping then shrank
    every other gradient below Adam's epsilon.
    """
    batch = batches_of(tokenizer, 16, 16, seed=7, masking=MaskingConfig(text_rate=0.15, region_rate=0.5))[0]
    blanked = batch["region_blanked"] & batch["region_mask"].bool()
    assert blanked.any() and not (blanked & ~batch["region_masked"]).any()  # 90 % of the chosen regions
    model = tiny_model(tokenizer, dropout=0.0)
    model(batch).loss.backward()
    norms = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    assert max(norms.values()) < 100.0, max(norms.items(), key=lambda kv: kv[1])
    assert norms["imagebert.region_embeddings.blank_feature"] > 0.0
    # A blanked region's feature term is exactly the blank vector: only its geometry tells regions apart...
    embeddings = model.imagebert.region_embeddings
    with torch.no_grad():
        embeddings.blank_feature.fill_(0.25)
        out = embeddings(batch["region_features"], batch["region_geometry"], batch["region_blanked"])
        geometry = embeddings.geometry_norm(embeddings.geometry_proj(batch["region_geometry"]))
    assert torch.allclose(out[blanked], geometry[blanked] + 0.25, atol=1e-6)
    # ...so whatever its feature holds, the model's outputs do not change; an unblanked change does.
    model.eval()
    args = [batch[k] for k in ("input_ids", "attention_mask", "region_features", "region_geometry", "region_mask", "region_blanked")]
    with torch.no_grad():
        reference = model.imagebert(*args).last_hidden_state
        hidden = args[2].clone()
        hidden[blanked] = torch.randn_like(hidden[blanked]) * 5
        assert torch.equal(model.imagebert(*args[:2], hidden, *args[3:]).last_hidden_state, reference)
        seen = args[2].clone()
        seen[~blanked & batch["region_mask"].bool()] += 1.0
        assert not torch.allclose(model.imagebert(*args[:2], seen, *args[3:]).last_hidden_state, reference)


def test_mean_pooling_summarises_every_real_position(tokenizer):
    """pooling=mean: the pooler reads the mean of the real token and region states; cls: token 0 only."""
    batch = batches_of(tokenizer, 4, 4, seed=8, masking=MaskingConfig(text_rate=0.0, region_rate=0.0))[0]
    args = [batch[k] for k in ("input_ids", "attention_mask", "region_features", "region_geometry", "region_mask")]
    for pooling in ("cls", "mean"):
        encoder = tiny_model(tokenizer, pooling=pooling).imagebert.eval()
        with torch.no_grad():
            out = encoder(*args)
            real = torch.cat([args[1], args[4]], 1).bool()
            means = torch.stack([states[mask].mean(0) for states, mask in zip(out.last_hidden_state, real)])
            summary = means if pooling == "mean" else out.last_hidden_state[:, 0]
            expected = torch.tanh(encoder.bert.pooler.dense(summary))
        assert torch.allclose(out.pooler_output, expected, atol=1e-6), pooling
        assert encoder.config.summary_pooling == pooling


def test_release_keeps_the_pooling(tokenizer, tmp_path):
    """A release pretrained with pooling=mean summarises by the mean after loading, too."""
    from pretrain.release import load_release, save_release

    batch = batches_of(tokenizer, 4, 4, seed=9, masking=MaskingConfig(text_rate=0.0, region_rate=0.0))[0]
    args = [batch[k] for k in ("input_ids", "attention_mask", "region_features", "region_geometry", "region_mask")]
    model = tiny_model(tokenizer, pooling="mean").eval()
    save_release(model, tokenizer, feature_spec(FEATURE_DIM), tmp_path / "release")
    loaded = load_release(tmp_path / "release").model.eval()
    assert loaded.config.summary_pooling == "mean"
    with torch.no_grad():
        assert torch.equal(loaded.imagebert(*args).pooler_output, model.imagebert(*args).pooler_output)


def test_targets_keep_their_precision_and_the_step_waits_for_nothing(tokenizer):
    """The batch reaches the device as it is (the model casts its inputs): features and class
    distributions stay float16 as the shards store them, a bf16 model regresses them widened to
    float32, and the counts evaluation reads stay tensors (no host sync in the step)."""
    from pretrain.data import to_device

    batch = to_device(batches_of(tokenizer, 16, 16, seed=10)[0], torch.device("cpu"))
    assert batch["region_features"].dtype == batch["region_cls_prob"].dtype == torch.float16
    model = tiny_model(tokenizer, dropout=0.0).to(torch.bfloat16)
    out = model(batch)
    assert all(torch.isfinite(loss) for loss in out.losses.values())
    assert all(isinstance(correct, torch.Tensor) and isinstance(seen, int) for correct, seen in out.counts.values())
    out.loss.backward()
    assert model.imagebert.region_embeddings.feature_proj.weight.grad.dtype == torch.bfloat16
    # ZeRO-0's bf16: autocast over fp32 weights, the ITM pairs in the masked inputs' call.
    assert "itm_input_ids" in batch
    model = tiny_model(tokenizer, dropout=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert all(torch.isfinite(loss) for loss in out.losses.values())
    out.loss.backward()
    assert model.itm_head.weight.grad.dtype == torch.float32 and model.itm_head.weight.grad.abs().sum() > 0
