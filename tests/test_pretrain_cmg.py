"""CMG's objectives wired into pretraining (``cmg:`` section, ``ImageBertForPretraining.cmg``).

Off by default and then nothing moves: the default model has no CMG parameter and gives the
losses main's code gave before the wiring (values stored from that code). On: the losses and
codebook statistics come out of the forward, the weights apply, a release round-trips the
codebook, a BERT initialisation leaves the modules at their initial state, the codebook stays
float32 under bf16 casts and autocast. A stage's ``objectives`` decide what is computed and
trained; a release that does not fit ``model.release`` is refused before any rank starts; and a
real ``python -m pretrain`` run from a release (two ranks, bf16, a stage with every objective at
ZeRO-2, then a ``cmg`` stage on the frozen encoder) resumed from its stage boundary ends with
exactly the weights and codebook of the uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

import pytest
import torch
import yaml

from preprocess.config import load_config
from preprocess.feature_format import FeatureSpec
from pretrain.cmg import SharedCodebook
from pretrain.config import PretrainConfig
from pretrain.data_config import DataConfig
from pretrain.evaluation import masked_modelling_metrics
from pretrain.model import ImageBertForPretraining, masked_rows
from pretrain.model_config import CMG_LOSSES, CMGConfig, ObjectiveWeights
from pretrain_runs import TINY, pretrain_cmd, read_metrics, run_logged, stage, write_config
from test_pretrain_model import FEATURE_DIM, batches_of, tiny_model

CMG = {"num_codes": 16, "code_dim": 8, "decay": 0.9, "dead_after": 2}
CODEBOOK_BUFFERS = ("embedding", "ema_count", "ema_weight", "unused_steps", "updates")

# main's code before the wiring (commit bde9d26), tiny_model(seed=0, dropout=0) on
# batches_of(8, 8, seed=3)[0]: the total and each loss, the parameter count, the state_dict size.
BEFORE_CMG = {"loss": 14.646056175231934, "mlm": 10.359143257141113, "moc": 1.6245331764221191,
              "mrfr": 1.9712222814559937, "itm": 0.6911574602127075}
BEFORE_CMG_PARAMETERS, BEFORE_CMG_STATE_KEYS = 1046897, 69


def test_cmg_is_off_by_default_and_the_losses_do_not_move(tokenizer):
    assert load_config(PretrainConfig, TINY, ["shards_root=/x"]).cmg.module_fields() is None
    model = tiny_model(tokenizer, seed=0, dropout=0.0)
    assert model.cmg is None and model.config.cmg is None
    assert not [name for name, _ in model.named_parameters() if "cmg" in name]
    assert sum(p.numel() for p in model.parameters()) == BEFORE_CMG_PARAMETERS
    assert len(model.state_dict()) == BEFORE_CMG_STATE_KEYS
    out = model(batches_of(tokenizer, 8, 8, seed=3)[0])
    assert out.stats == {}
    got = {"loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()}}
    assert got == pytest.approx(BEFORE_CMG, rel=1e-6, abs=0)


def test_cmg_losses_statistics_and_weights(tokenizer):
    model = tiny_model(tokenizer, seed=0, dropout=0.0, cmg=CMG)
    batch = batches_of(tokenizer, 8, 8, seed=3)[0]
    codebook = model.cmg.codebook
    before = {name: getattr(codebook, name).clone() for name in CODEBOOK_BUFFERS}
    out = model(batch)
    assert set(out.losses) == {"mlm", "moc", "mrfr", "itm", *(f"cmg_{n}" for n in CMG_LOSSES)}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert {"cmg_perplexity", "cmg_codes_used", "cmg_codes_reset", "cmg_cross_cpc_accuracy"} <= set(out.stats)
    assert 1.0 <= out.stats["cmg_perplexity"] <= CMG["num_codes"]
    assert int(codebook.updates) == 1 and not torch.equal(codebook.embedding, before["embedding"])
    # The weighted sum: the masked-modelling losses at weight 1, each CMG loss at its cmg: weight.
    weights = CMGConfig(reconstruction=2.0, commitment=0.5, club=0.0, club_approximation=1.0, cross_cpc=3.0)
    model.eval()  # no EMA step, so the two forwards below see the same codebook
    a, b = model(batch, cmg_weights=weights), model(batch, cmg_weights=CMGConfig(**{n: 0.0 for n in CMG_LOSSES}))
    assert int(codebook.updates) == 1
    expected = sum(weights.loss_weights()[n] * a.losses[f"cmg_{n}"] for n in CMG_LOSSES)
    assert (a.loss - b.loss).item() == pytest.approx(expected.item(), rel=1e-5)
    # Every CMG parameter is trained by some loss (DeepSpeed needs each rank's backward to reach them all),
    # still reached at weight 0, with a zero gradient: the ablations without CLUB and without Cross-CPC.
    model.train()
    switched_off = [p for part in (model.cmg.text_club, model.cmg.region_club, model.cmg.cross_cpc)
                    for p in part.parameters()]
    for ablation in (CMGConfig(), CMGConfig(club=0.0, club_approximation=0.0, cross_cpc=0.0)):
        model.zero_grad()
        model(batch, cmg_weights=ablation).loss.backward()
        assert not [n for n, p in model.named_parameters() if p.grad is None]
        assert any(p.grad.abs().sum() > 0 for p in switched_off) == (ablation == CMGConfig())


@pytest.mark.parametrize("encoder_gradients", [False, True])
def test_cmg_losses_reach_the_encoder_only_when_asked(tokenizer, encoder_gradients):
    """``cmg.encoder_gradients`` false (the default): CMG's losses train CMG's modules and leave
    the encoder's gradient exactly that of the masked objectives; true: they add to it."""
    batch = batches_of(tokenizer, 8, 8, seed=3)[0]
    only_cmg = CMGConfig(encoder_gradients=encoder_gradients)
    masked_only = {name: 0.0 for name in ("mlm", "moc", "mrfr", "itm")}

    def gradients(objectives, cmg_config):
        model = tiny_model(tokenizer, seed=0, dropout=0.0, cmg=CMG)
        model(batch, ObjectiveWeights(**objectives), cmg_config).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if n.startswith("imagebert.")}, model

    cmg_only, model = gradients(masked_only, only_cmg)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.cmg.text.parameters())
    reached = [n for n, g in cmg_only.items() if g is not None and g.abs().sum() > 0]
    assert bool(reached) == encoder_gradients, reached[:3]


@pytest.mark.parametrize("itm_pairs", ["masked", "unmasked"])
def test_cmg_sees_only_matched_pairs_and_the_unmasked_sample(tokenizer, itm_pairs):
    """With ITM read off the masked inputs (``data.itm_pairs: masked``) a negative row pairs a
    caption with another image's regions: changing those regions changes nothing. With unmasked
    ITM pairs every masked row is its own sample's pair, and they count. Undoing the masking
    changes nothing either way."""
    model = tiny_model(tokenizer, seed=0, dropout=0.0, cmg=CMG).eval()
    batch = batches_of(tokenizer, 8, 8, seed=3, data=DataConfig(batch_size=8, itm_pairs=itm_pairs))[0]
    negatives = ~batch["itm_labels"].bool()
    assert negatives.any() and (~negatives).any()
    unmasked = dict(batch)
    unmasked["region_blanked"] = torch.zeros_like(batch["region_blanked"])
    unmasked["input_ids"] = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], batch["input_ids"])
    negatives_changed = dict(batch)
    negatives_changed["region_features"] = torch.where(
        negatives[:, None, None], batch["region_features"] + 1, batch["region_features"])
    first = model.cmg_losses(batch)[0]
    for name, value in model.cmg_losses(unmasked)[0].items():
        assert torch.equal(value, first[name]), name
    changed = model.cmg_losses(negatives_changed)[0]
    if itm_pairs == "masked":
        assert all(torch.equal(changed[name], first[name]) for name in CMG_LOSSES)
    else:
        assert not torch.equal(changed["reconstruction"], first["reconstruction"])


def test_a_batch_without_pairs_still_steps_every_collective(tokenizer):
    """Only negatives (``itm_pairs: masked``): zero CMG losses that still reach every CMG
    parameter, and an EMA step with nothing of this rank's, reporting what a normal step reports
    (ranks must run the same backward, the same all-reduces and log the same names)."""
    model = tiny_model(tokenizer, seed=0, dropout=0.0, cmg=CMG)
    batches = batches_of(tokenizer, 8, 8, seed=3, data=DataConfig(batch_size=8, itm_pairs="masked"))
    normal = model(batches[0])
    negatives = dict(batches[0], itm_labels=torch.zeros_like(batches[0]["itm_labels"]))
    model.zero_grad()
    out = model(negatives)
    out.loss.backward()
    assert all(out.losses[f"cmg_{n}"].item() == 0.0 for n in CMG_LOSSES)
    assert not [n for n, p in model.cmg.named_parameters() if p.grad is None]
    assert set(out.stats) == set(normal.stats)
    assert int(model.cmg.codebook.updates) == 2 and int(out.stats["cmg_codes_used"]) == 0


def test_release_round_trips_the_codebook_and_bert_init_leaves_it_initial(tokenizer, tmp_path):
    from transformers import BertConfig, BertModel

    from pretrain.weights import load_model

    model = tiny_model(tokenizer, seed=0, cmg=CMG)
    model(batches_of(tokenizer, 8, 8, seed=3)[0])  # one EMA step: the buffers leave their initial state
    model.save_pretrained(tmp_path / "release")
    loaded = load_model(ImageBertForPretraining, tmp_path / "release")
    assert loaded.config.cmg == {**CMG, "multimodal_ema": True, "code_reset": True}
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)

    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    from_bert = ImageBertForPretraining.from_bert(tmp_path / "bert", FEATURE_DIM, 5, cmg=CMG)
    codebook = from_bert.cmg.codebook
    for name, value in codebook.initial_state().items():
        assert torch.equal(getattr(codebook, name), value), name
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in from_bert.cmg.parameters())
    with pytest.raises(ValueError, match="missing"):  # without the allowance the loader still refuses them
        load_model(ImageBertForPretraining, None, config=model.config,
                   state_dict={k: v for k, v in saved.items() if not k.startswith("cmg.")})


def test_codebook_stays_float32_under_bf16():
    """DeepSpeed's bf16 mode casts the module (buffers too); ZeRO-0's bf16 is an autocast. The EMA
    step must come out as in float32 either way."""
    generator = torch.Generator().manual_seed(0)
    text, regions = torch.randn(4, 6, 8, generator=generator), torch.randn(4, 5, 8, generator=generator)
    text_mask, region_mask = torch.rand(4, 6, generator=generator) > 0.2, torch.rand(4, 5, generator=generator) > 0.2
    reference = SharedCodebook(16, 8, decay=0.99, dead_after=2)
    cast = copy.deepcopy(reference).bfloat16()
    assert {getattr(cast, n).dtype for n in ("embedding", "ema_count", "ema_weight")} == {torch.float32}
    autocast = copy.deepcopy(reference)
    for _ in range(3):
        reference.update(text, text_mask, regions, region_mask)
        cast.update(text.bfloat16(), text_mask, regions.bfloat16(), region_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast.update(text, text_mask, regions, region_mask)
    for name in CODEBOOK_BUFFERS:
        assert torch.equal(getattr(autocast, name), getattr(reference, name)), name
        assert getattr(cast, name).dtype == getattr(reference, name).dtype, name
    # The bf16 module saw bf16 inputs, so its codes differ a little, but its EMA kept float32 steps.
    assert (cast.embedding - reference.embedding).abs().max() < 0.05


def test_held_out_metrics_report_the_cmg_losses(tokenizer):
    from pretrain.model_config import ObjectiveWeights

    model = tiny_model(tokenizer, seed=0, cmg=CMG).eval()
    # ITM off the masked inputs: the negative rows, which CMG skips, make the weights uneven.
    batches = batches_of(tokenizer, 16, 8, seed=5, data=DataConfig(batch_size=8, itm_pairs="masked"))
    metrics = masked_modelling_metrics(model, batches, torch.device("cpu"), ObjectiveWeights())
    assert int(model.cmg.codebook.updates) == 0  # evaluation moves no code
    # Each batch weighs by the pairs it scores.
    rows = [int(masked_rows(b).sum()) for b in batches]
    for name in CMG_LOSSES:
        with torch.no_grad():
            per_batch = [model(b).losses[f"cmg_{name}"].item() for b in batches]
        expected = sum(r * v for r, v in zip(rows, per_batch)) / sum(rows)
        assert metrics[f"cmg_{name}_loss"] == pytest.approx(expected, rel=1e-6, abs=1e-9), name


def test_a_stage_trains_what_its_objectives_name(tokenizer):
    """``objectives`` (a stage's): "masked" computes and trains what a model without CMG does and
    leaves the codebook where it is; "cmg" computes CMG's losses alone, no multimodal pass, and
    ``set_trainable`` leaves only CMG's modules to the optimizer."""
    batch = batches_of(tokenizer, 8, 8, seed=3)[0]
    model = tiny_model(tokenizer, seed=0, dropout=0.0, cmg=CMG)
    without = tiny_model(tokenizer, seed=0, dropout=0.0)
    assert not model.load_state_dict(without.state_dict(), strict=False).unexpected_keys
    updates = int(model.cmg.codebook.updates)
    masked = model(batch, objectives="masked")
    assert set(masked.losses) == {"mlm", "moc", "mrfr", "itm"} and masked.stats == {}
    assert int(model.cmg.codebook.updates) == updates
    expected = without(batch)
    assert masked.loss.item() == expected.loss.item()
    assert all(torch.equal(masked.losses[name], expected.losses[name]) for name in expected.losses)

    calls = []
    model.imagebert.bert.register_forward_hook(lambda *args: calls.append("multimodal"))  # encode_alone bypasses it
    only_cmg = model(batch, objectives="cmg")
    assert set(only_cmg.losses) == {f"cmg_{n}" for n in CMG_LOSSES} and calls == []
    assert int(model.cmg.codebook.updates) == updates + 1
    model.set_trainable("cmg")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if n.startswith("cmg.")}
    only_cmg.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("cmg."))
    model.set_trainable("masked")
    assert not any(p.requires_grad for p in model.cmg.parameters()) and all(p.requires_grad for p in model.imagebert.parameters())
    model.set_trainable("all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="objectives must be one of"):
        model(batch, objectives="mlm")
    with pytest.raises(ValueError, match="needs a model with CMG's modules"):
        tiny_model(tokenizer)(batch, objectives="cmg")


@pytest.mark.parametrize("encoder_gradients", [False, True])
def test_frozen_unimodal_passes_run_without_dropout(tokenizer, encoder_gradients):
    """Without encoder gradients CMG's modules read the features a frozen encoder gives: no
    dropout, whatever the model's mode (two different dropout draws give the same losses); the
    model is back in training mode afterwards. With encoder gradients the passes train, dropout on."""
    model = tiny_model(tokenizer, seed=0, dropout=0.5, cmg=CMG)
    batch = batches_of(tokenizer, 8, 8, seed=3)[0]
    first = copy.deepcopy(model)
    losses = []
    for seed, each in ((1, first), (2, copy.deepcopy(model))):
        torch.manual_seed(seed)
        losses.append(each.cmg_losses(batch, train_encoder=encoder_gradients)[0]["reconstruction"])
    assert torch.equal(losses[0], losses[1]) != encoder_gradients
    assert all(m.training for m in first.modules())


def test_cmg_on_a_release_resumes_exactly(pretraining_shards, tokenizer, tmp_path):
    """A finished release (``model.release``) gains CMG's modules and trains on, two ranks, bf16,
    ``zero_stage: auto``: a stage with every objective (``all``, ZeRO-2: DeepSpeed casts the
    module) moves the encoder and CMG's modules; a ``cmg`` stage (ZeRO-0, ``auto``'s choice for
    it: bf16 as an autocast over fp32 weights) then trains CMG's modules alone and leaves every
    other weight exactly as the first stage ended it. A run resumed from the stage boundary ends
    with exactly the weights and the codebook buffers (float32 in the checkpoint) of the
    uninterrupted run. The checkpoint is the stage boundary because a resume re-seeds the data
    loader from (seed, stage, step): inside a stage a resumed run trains on other batches by
    design (docs/pretrain.md)."""
    from pretrain.checkpoint import LATEST_FILE, MODEL_STATES_FILE, TRAINER_STATE_FILE, consolidated_weights, tag_for
    from pretrain.release import save_release
    from pretrain.trainer import model_of_release

    release = save_release(tiny_model(tokenizer, seed=5), tokenizer, FeatureSpec.load(pretraining_shards / "train"),
                           tmp_path / "release")
    config = write_config(
        tmp_path / "cmg.yaml", pretraining_shards,
        # 3 steps each: DeepSpeed's schedules run a stage's first two steps at lr 0 and 1/2 of it.
        [stage("all", 3, objectives="all"), stage("cmg", 3, objectives="cmg")],
        cmg={"enabled": True, **CMG}, deepspeed={"zero_stage": "auto", "precision": "bf16"},
        checkpoint={"every_steps": 3, "keep": 2}, eval={"every_steps": 10000}, logging={"every_steps": 1},
    )
    written = yaml.safe_load(config.read_text())
    written["model"] = {"release": str(release)}
    config.write_text(yaml.safe_dump(written))
    whole = tmp_path / "whole"
    run_logged(pretrain_cmd(2, config, whole), tmp_path / "whole.log")
    log = (tmp_path / "whole.log").read_text()
    assert all(f" {name}=" in log for name in ("mlm", "cmg_perplexity", "cmg_codes_reset", "cmg_cross_cpc"))
    records = read_metrics(whole)
    assert [r["step"] for r in records] == [3, 6]
    assert all(math.isfinite(r[f"cmg_{n}_loss"]) for r in records for n in CMG_LOSSES)

    torch.manual_seed(0)  # the run's seed: CMG's modules as the run initialised them
    initial = model_of_release(str(release), {**CMG, "multimodal_ema": True, "code_reset": True}).state_dict()
    after_all, after_cmg = (consolidated_weights(whole / "checkpoints", tag_for(step)) for step in (3, 6))
    trained = [n for n, v in initial.items() if v.is_floating_point() and not n.startswith("cmg.codebook.")]
    assert [n for n in trained if torch.equal(after_all[n], initial[n])] == []  # "all" trained everything
    cmg_modules = [n for n in trained if n.startswith("cmg.")]
    assert [n for n in cmg_modules if torch.equal(after_cmg[n], after_all[n])] == []  # "cmg" trained CMG's ...
    frozen = [n for n in trained if not n.startswith("cmg.")]
    assert [n for n in frozen if not torch.equal(after_cmg[n], after_all[n])] == []  # ... alone
    assert int(after_all["cmg.codebook.updates"]) == 3 and int(after_cmg["cmg.codebook.updates"]) == 6

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / tag_for(6))
    (resumed / "checkpoints" / LATEST_FILE).write_text(tag_for(3))
    (resumed / "done.json").unlink()
    run_logged(pretrain_cmd(2, config, resumed, "--resume"), tmp_path / "resumed.log")
    assert f"resuming from {tag_for(3)}" in (tmp_path / "resumed.log").read_text()
    for run_dir in (whole, resumed):  # both ran on two ranks: the first stage partitioned, the cmg stage not
        states = [json.loads((run_dir / "checkpoints" / tag_for(step) / TRAINER_STATE_FILE).read_text()) for step in (3, 6)]
        assert [(s["global_step"], s["world_size"], s["zero_stage"]) for s in states] == [(3, 2, 2), (6, 2, 0)], run_dir
    again = consolidated_weights(resumed / "checkpoints", tag_for(6))
    assert again.keys() == after_cmg.keys()
    assert [n for n in after_cmg if not torch.equal(again[n], after_cmg[n])] == []
    states = torch.load(resumed / "checkpoints" / tag_for(6) / MODEL_STATES_FILE, map_location="cpu", weights_only=False)
    codebook = {n: states["module"][f"cmg.codebook.{n}"] for n in CODEBOOK_BUFFERS}
    assert codebook["embedding"].dtype == codebook["ema_weight"].dtype == torch.float32
    for name in CODEBOOK_BUFFERS:
        assert torch.equal(codebook[name], after_cmg[f"cmg.codebook.{name}"].to(codebook[name].dtype)), name


def test_a_release_that_does_not_fit_is_refused_before_any_rank_starts(pretraining_shards, tokenizer, tmp_path):
    """``check_release`` (``python -m pretrain`` runs it with the shard checks, before any rank
    starts): not a release, another pooling, CMG's modules the config does not enable or of
    another shape, features of another width. A release that fits passes."""
    from pretrain.release import save_release
    from pretrain.trainer import check_release

    spec = FeatureSpec.load(pretraining_shards / "train")
    plain = save_release(tiny_model(tokenizer), tokenizer, spec, tmp_path / "plain")
    with_cmg = save_release(tiny_model(tokenizer, cmg=CMG), tokenizer, spec, tmp_path / "with-cmg")
    other_features = save_release(tiny_model(tokenizer), tokenizer, spec, tmp_path / "other")
    config = json.loads((other_features / "config.json").read_text())
    (other_features / "config.json").write_text(json.dumps({**config, "feature_dim": FEATURE_DIM + 1}))
    cmg_on = ["cmg.enabled=true", *(f"cmg.{k}={v}" for k, v in CMG.items())]

    def check(release, *overrides):
        cfg = load_config(PretrainConfig, TINY, [f"shards_root={pretraining_shards}", "model.bert_config=null",
                                                 "model.tokenizer=null", f"model.release={release}", *overrides])
        check_release(cfg, spec)

    check(plain)
    check(plain, *cmg_on)
    check(with_cmg, *cmg_on)
    for release, overrides, message in [
        (tmp_path, [], "is not a release directory: config.json is missing"),
        (plain, ["model.pooling=mean"], "model.pooling is mean but release"),
        (with_cmg, [], "has CMG's modules: set cmg.enabled=true"),
        (with_cmg, [*cmg_on, "cmg.num_codes=32"], "has a codebook of 16 codes of width 8; cmg.num_codes and cmg.code_dim are 32 and 8"),
        (other_features, [], f"feature_dim {FEATURE_DIM} vs model {FEATURE_DIM + 1}"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            check(release, *overrides)
