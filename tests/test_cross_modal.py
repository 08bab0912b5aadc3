"""CMG's cross-modal generalisation protocol (``fusion.name: cross_modal``, finetune/fusion/cross_modal.py).

The head reads exactly one modality (training's, or evaluation's), through the release's own
unimodal path: the pooled codes equal the mean of the codebook vectors nearest to CMG's semantic
vectors of the encoder's caption-alone (regions-alone) states, computed here the way pretraining
computes them. Everything from the release stays frozen through a real ``python -m finetune``
run; retrieval starts from the codes' cosine; a release without CMG offers only ``hidden``.
"""

from __future__ import annotations

import json

import pytest
import torch

from finetune.config import TaskConfig
from finetune.fusion import FusionConfig
from finetune.synth_tasks import make_task_sample, task_statistics
from finetune.tasks import build_finetune_model
from preprocess.synth_scenes import SHAPE_WORDS, SYNTH_CLASS_NAMES
from pretrain.model import ImageBertConfig, ImageBertForPretraining, masked_mean
from pretrain.release import load_release
from tests.finetune_fixtures import minilm_tokenizer, tiny_release, write_symbolic_task_shards
from tests.test_finetune_cli import REPO, _run

CMG = {"num_codes": 16, "code_dim": 8, "decay": 0.9, "dead_after": 2}
SHAPES = list(SYNTH_CLASS_NAMES)


def _release_model(cmg: dict | None = CMG, seed: int = 0) -> ImageBertForPretraining:
    torch.manual_seed(seed)
    config = ImageBertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=minilm_tokenizer().vocab_size, max_position_embeddings=64, feature_dim=16, num_region_classes=5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, cmg=cmg,
    )
    model = ImageBertForPretraining(config).eval()
    if cmg:  # codes drawn from semantic vectors of both modalities, as a trained codebook's lie among them
        batch, encoder = _batch(99, size=8), model.imagebert
        with torch.no_grad():
            text = encoder.encode_alone(encoder.embed_tokens(batch["input_ids"], segment=0), batch["attention_mask"])
            regions = encoder.encode_alone(encoder.embed_regions(batch["region_features"], batch["region_geometry"]),
                                           batch["region_mask"])
            vectors = torch.cat([model.cmg.text(text)[0].flatten(0, 1), model.cmg.regions(regions)[0].flatten(0, 1)])
            chosen = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[: cmg["num_codes"]]
            model.cmg.codebook.embedding.copy_(vectors[chosen])
    return model


def _batch(seed: int, size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(size, 7, dtype=torch.long)
    mask[0, 5:] = 0
    regions = torch.ones(size, 5, dtype=torch.long)
    regions[1, 3:] = 0
    return {
        "input_ids": torch.randint(1000, 5000, (size, 7), generator=g), "attention_mask": mask,
        "region_features": torch.randn(size, 5, 16, generator=g), "region_geometry": torch.rand(size, 5, 5, generator=g),
        "region_mask": regions, "region_blanked": torch.zeros(size, 5, dtype=torch.bool),
        "labels": torch.arange(size) % 5, "image_ids": torch.arange(size),
    }


def _classifier(pretrained, **fusion):
    task = TaskConfig(name="classification", label_names=SHAPES, dropout=0.0)
    return build_finetune_model(pretrained, task, FusionConfig(name="cross_modal", **fusion))


def _pooled(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(batch).pooled[0]


@pytest.mark.parametrize("train, evaluate", [("text", None), ("image", None), ("text", "text")])
def test_the_head_reads_one_modality_training_and_the_other_in_evaluation(train, evaluate):
    model = _classifier(_release_model(), cross_modal_train=train, cross_modal_eval=evaluate)
    batch, other_text, other_image = _batch(1), _batch(2), _batch(3)
    other_text = batch | {k: other_text[k] for k in ("input_ids", "attention_mask")}
    other_image = batch | {k: other_image[k] for k in ("region_features", "region_geometry", "region_mask")}
    for mode, reads in (("train", train), ("eval", evaluate or {"text": "image", "image": "text"}[train])):
        getattr(model, mode)()
        same, changed = (other_image, other_text) if reads == "text" else (other_text, other_image)
        assert torch.equal(_pooled(model, same), _pooled(model, batch)), (mode, reads)
        assert not torch.allclose(_pooled(model, changed), _pooled(model, batch)), (mode, reads)


def test_pooled_codes_are_the_mean_of_the_codes_pretraining_assigns():
    """The codes CMG's pretraining would quantise each position to (its own path: ``encode_alone``
    over ``embed_tokens`` / ``embed_regions``, the modality's autoencoder, the codebook), mean over
    the real positions; and ``semantic`` / ``hidden`` the unquantised vectors and the states."""
    pretrained = _release_model().eval()
    encoder, cmg = pretrained.imagebert, pretrained.cmg
    batch = _batch(4)
    with torch.no_grad():
        text = encoder.encode_alone(encoder.embed_tokens(batch["input_ids"], segment=0), batch["attention_mask"])
        regions = encoder.encode_alone(encoder.embed_regions(batch["region_features"], batch["region_geometry"]),
                                       batch["region_mask"])
        expected = {}
        for modality, states, mask, auto in (("text", text, batch["attention_mask"], cmg.text),
                                             ("image", regions, batch["region_mask"], cmg.regions)):
            semantic, _ = auto(states)
            distances = torch.cdist(semantic.reshape(-1, CMG["code_dim"]), cmg.codebook.embedding)
            codes = cmg.codebook.embedding[distances.argmin(1)].reshape(semantic.shape)
            expected[modality] = {"codes": masked_mean(codes, mask), "semantic": masked_mean(semantic, mask),
                                  "hidden": masked_mean(states, mask)}
    assert len(torch.unique(codes.reshape(-1, CMG["code_dim"]), dim=0)) > 2  # the check is not vacuous
    for representation in ("codes", "semantic", "hidden"):
        model = _classifier(pretrained, cross_modal_train="text", cross_modal_representation=representation)
        model.train()
        torch.testing.assert_close(_pooled(model, batch), expected["text"][representation], rtol=1e-5, atol=1e-5)
        model.eval()
        torch.testing.assert_close(_pooled(model, batch), expected["image"][representation], rtol=1e-5, atol=1e-5)


def test_a_release_without_cmg_offers_only_its_hidden_states():
    plain = _release_model(cmg=None)
    with pytest.raises(ValueError, match=r"cross_modal_representation is 'codes' but the release was pretrained "
                                         r"without CMG's objectives .*use 'hidden'"):
        _classifier(plain)
    model = _classifier(plain, cross_modal_representation="hidden")
    assert model.head.heads[0].in_features == 32
    with pytest.raises(ValueError, match="cross_modal_eval is 'audio'"):
        FusionConfig(name="cross_modal", cross_modal_eval="audio")
    with pytest.raises(ValueError, match="no per-word states for task 'ner'"):
        build_finetune_model(plain, TaskConfig(name="ner", label_names=["O", "B-OBJ", "I-OBJ"]),
                             FusionConfig(name="cross_modal", cross_modal_representation="hidden"))


def test_retrieval_starts_from_the_cosine_of_the_pooled_codes():
    pretrained = _release_model()
    model = build_finetune_model(pretrained, TaskConfig(name="retrieval"), FusionConfig(name="cross_modal")).eval()
    batch = _batch(5)
    with torch.no_grad():
        scores, _ = model.score_pairs(batch)
    text = _classifier(pretrained, cross_modal_train="text").train()
    image = _classifier(pretrained, cross_modal_train="image").train()
    cosine = torch.nn.functional.cosine_similarity(_pooled(text, batch), _pooled(image, batch), dim=-1)
    torch.testing.assert_close(scores, 10.0 * cosine, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fusion.projection.weight", "head.heads.0.weight", "head.heads.0.bias"}


def test_shape_task_is_decided_by_either_modality():
    for index in range(40):
        (sample,) = make_task_sample("shape", 0, index, (48, 64))
        shapes = {o["shape"] for o in sample.meta["objects"]}
        assert shapes == {SHAPES[sample.meta["label"]]}
        words = sample.caption.split()
        assert any(set(w.split()) <= set(words) for w in SHAPE_WORDS[SHAPES[sample.meta["label"]]]), sample.caption
    metas = [make_task_sample("shape", 0, i, (48, 64))[0].meta for i in range(200)]
    stats = task_statistics("shape", metas)
    assert stats["text_only_ceiling"] == stats["image_only_ceiling"] == 100.0
    assert 20.0 <= stats["chance"] < 40.0  # five shapes, roughly balanced


def test_a_real_run_trains_only_the_head_and_evaluates_the_other_modality(tmp_path):
    """``python -m finetune`` with the shipped text-to-image config, in bf16: the export holds the
    release's encoder and CMG modules as the release has them (rounded to bf16 once, when
    DeepSpeed casts the model; the codebook stays float32) and frozen, the head moved, and
    results.json holds the accuracy that evaluating the exported model gives."""
    from finetune.config import DataConfig
    from finetune.data import read_samples
    from finetune.evaluation import evaluate_samples
    from finetune.export import export, load_finetuned

    release = tiny_release(tmp_path / "release", cmg=CMG)
    write_symbolic_task_shards("shape", tmp_path / "data" / "train", 48, seed=1)
    val = write_symbolic_task_shards("shape", tmp_path / "data" / "val", 16, seed=2)
    run_dir = tmp_path / "run"
    config = REPO / "configs" / "finetune" / "cross-modal-text-to-image.yaml"
    done = _run(["-m", "finetune", "--config", str(config), "--init", str(release), "--run-dir", str(run_dir),
                 f"shards_root={tmp_path / 'data'}", "data.val=val/00000.tar", "train.steps=4", "train.warmup_steps=0", "data.batch_size=8",
                 "data.num_workers=0", "data.max_text_length=24", "eval.every_steps=4", "checkpoint.every_steps=4",
                 "logging.progress_bar=false", "deepspeed.precision=bf16"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finetuned = load_finetuned(export(run_dir, tmp_path / "exported"))
    pretrained = load_release(release).model.state_dict()
    weights = finetuned.model.state_dict()
    frozen = {"fusion.encoder.": "imagebert.", "fusion.semantic.text.": "cmg.text.", "fusion.semantic.image.": "cmg.regions.",
              "fusion.codebook.": "cmg.codebook."}
    compared = 0
    for name, value in weights.items():
        prefix = next((p for p in frozen if name.startswith(p)), None)
        if prefix is not None:
            released = pretrained[frozen[prefix] + name.removeprefix(prefix)]
            if released.is_floating_point() and prefix != "fusion.codebook.":
                released = released.to(torch.bfloat16)
            assert torch.equal(value, released.to(value.dtype)), name
            compared += 1
    assert compared > 40 and any(n.startswith("fusion.codebook.") for n in weights)
    assert not any(p.requires_grad for n, p in finetuned.model.named_parameters() if not n.startswith("head."))
    initial = build_finetune_model(load_release(release).model, finetuned.cfg.task, finetuned.cfg.fusion)
    assert not torch.equal(weights["head.heads.0.weight"], initial.state_dict()["head.heads.0.weight"])

    results = json.loads((run_dir / "results.json").read_text())
    assert results["fusion"] == "cross_modal"
    cfg = finetuned.cfg
    samples = read_samples(val, finetuned.tokenizer, finetuned.spec, DataConfig(train=val, max_text_length=24), cfg.task)
    expected = evaluate_samples(finetuned.model, samples, cfg, finetuned.tokenizer.pad_token_id, torch.device("cpu"))
    assert results["metrics"]["accuracy"] == pytest.approx(expected["accuracy"])
