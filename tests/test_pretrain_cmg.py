"""CMG's objectives wired into pretraining (``cmg:`` section, ``ImageBertForPretraining.cmg``).

Off by default and then nothing moves: the default model has no CMG parameter and gives the
losses main's code gave before the wiring (values stored from that code). On: the losses and
codebook statistics come out of the forward, the weights apply, a release round-trips the
codebook, a BERT initialisation leaves the modules at their initial state, the codebook stays
float32 under bf16 casts and autocast, and a real ``python -m pretrain`` run (two ranks, ZeRO-2,
bf16) resumed from a mid-run checkpoint ends with exactly the codebook of the uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

from preprocess.config import load_config
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


def test_resumed_run_ends_with_the_codebook_of_the_uninterrupted_run(pretraining_shards, tmp_path):
    """Two ranks, ZeRO-2, bf16 (DeepSpeed casts the module), CMG on: an uninterrupted two-stage run
    of 2 + 2 steps, and a run resumed from its step-2 checkpoint, end with the same codebook
    buffers, float32 in the checkpoint. The checkpoint is the stage boundary because a resume
    re-seeds the data loader from (seed, stage, step): inside a stage a resumed run trains on
    other batches by design (docs/pretrain.md), at a boundary both runs see the same ones."""
    from pretrain.checkpoint import LATEST_FILE, MODEL_STATES_FILE, latest_state, tag_for

    config = write_config(
        tmp_path / "cmg.yaml", pretraining_shards,
        [stage("web", 2, warmup_steps=1), stage("indomain", 2, reset_optimizer=False)],
        cmg={"enabled": True, **CMG}, deepspeed={"zero_stage": 2, "precision": "bf16"},
        checkpoint={"every_steps": 2, "keep": 2}, eval={"every_steps": 10000}, logging={"every_steps": 1},
    )
    whole = tmp_path / "whole"
    run_logged(pretrain_cmd(2, config, whole), tmp_path / "whole.log")
    log = (tmp_path / "whole.log").read_text()
    assert "cmg_perplexity=" in log and "cmg_codes_reset=" in log and "cmg_cross_cpc=" in log
    records = read_metrics(whole)
    assert [r["step"] for r in records] == [2, 4]
    assert all(math.isfinite(r[f"cmg_{n}_loss"]) for r in records for n in CMG_LOSSES)

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / tag_for(4))
    (resumed / "checkpoints" / LATEST_FILE).write_text(tag_for(2))
    (resumed / "done.json").unlink()
    run_logged(pretrain_cmd(2, config, resumed, "--resume"), tmp_path / "resumed.log")
    assert f"resuming from {tag_for(2)}" in (tmp_path / "resumed.log").read_text()
    for run_dir in (whole, resumed):  # both really ran on two ranks, partitioned
        state = latest_state(run_dir / "checkpoints")
        assert (state.global_step, state.world_size, state.zero_stage) == (4, 2, 2), run_dir

    def codebook(run_dir):
        states = torch.load(run_dir / "checkpoints" / tag_for(4) / MODEL_STATES_FILE, map_location="cpu", weights_only=False)
        return {n: states["module"][f"cmg.codebook.{n}"] for n in CODEBOOK_BUFFERS}

    expected, got = codebook(whole), codebook(resumed)
    assert int(expected["updates"]) == 4
    assert expected["embedding"].dtype == expected["ema_weight"].dtype == torch.float32
    for name in CODEBOOK_BUFFERS:
        assert torch.equal(got[name], expected[name]), name
