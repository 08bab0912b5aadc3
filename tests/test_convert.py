"""``python -m pretrain.convert``: VisualBERT and UNITER checkpoints as releases.

VisualBERT is compared with ``transformers``' own ``VisualBertModel`` / ``VisualBertForPreTraining``
on random weights. UNITER is not installable, so its state dict is built here with the names and
shapes of its public model code (``UniterForPretraining``: ``model/model.py``, ``model/pretrain.py``)
and its region embedding is written out from the paper's equations.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import VisualBertConfig, VisualBertForPreTraining, VisualBertModel

from finetune.config import TaskConfig
from finetune.fusion import FUSION_STRATEGIES, FusionConfig
from finetune.tasks import build_finetune_model
from preprocess.feature_format import region_geometry
from pretrain import foreign_weights
from pretrain.convert import main as convert_main
from pretrain.model import ImageBertForPretraining
from pretrain.release import load_release
from pretrain.weights import load_model, quiet_transformers
from tests.finetune_fixtures import (
    FEATURE_DIM,
    minilm_tokenizer,
    symbolic_spec,
    task_config_dict,
    write_symbolic_task_shards,
)
from tests.pretrain_runs import free_port

REPO = Path(__file__).resolve().parents[1]
VOCAB = 30522  # the MiniLM tokenizer's, which the converted releases carry
HIDDEN, LAYERS, INTERMEDIATE, MAX_POSITIONS = 32, 2, 64, 64
LABELS = symbolic_spec().num_classes


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.5): LayerNorms and biases that are not 1 and 0, so every
    tensor the conversion moves changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model.eval()


def visualbert_dir(out: Path, model_class=VisualBertForPreTraining, seed: int = 0, with_tokenizer: bool = True) -> Path:
    config = VisualBertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS, visual_embedding_dim=FEATURE_DIM,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    with quiet_transformers():
        randomised(model_class(config), seed).save_pretrained(out)
    if with_tokenizer:
        minilm_tokenizer().save_pretrained(out)
    return out


# ------------------------------------------------------------------------------- UNITER, from its code


def uniter_shapes(hidden, layers, intermediate, vocab, max_positions, img_dim, label_dim) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``UniterForPretraining(config, img_dim, img_label_dim).state_dict()``."""
    def linear(name, out_dim, in_dim):
        return {f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)}

    def norm(name):
        return {f"{name}.weight": (hidden,), f"{name}.bias": (hidden,)}

    e, i = "uniter.embeddings.", "uniter.img_embeddings."
    shapes = {
        e + "word_embeddings.weight": (vocab, hidden), e + "position_embeddings.weight": (max_positions, hidden),
        e + "token_type_embeddings.weight": (2, hidden), **norm(e + "LayerNorm"),
        **linear(i + "img_linear", hidden, img_dim), **norm(i + "img_layer_norm"), **norm(i + "pos_layer_norm"),
        **linear(i + "pos_linear", hidden, 7), i + "mask_embedding.weight": (2, img_dim), **norm(i + "LayerNorm"),
        **linear("uniter.pooler.dense", hidden, hidden),
        **linear("cls.predictions.transform.dense", hidden, hidden), **norm("cls.predictions.transform.LayerNorm"),
        "cls.predictions.bias": (vocab,), "cls.predictions.decoder.weight": (vocab, hidden),
        **linear("feat_regress.net.0", hidden, hidden), **norm("feat_regress.net.2"),
        "feat_regress.weight": (hidden, img_dim), "feat_regress.bias": (img_dim,),
        **linear("region_classifier.net.0", hidden, hidden), **norm("region_classifier.net.2"),
        **linear("region_classifier.net.3", label_dim, hidden), **linear("itm_output", 2, hidden),
    }
    for n in range(layers):
        layer = f"uniter.encoder.layer.{n}."
        for part in ("query", "key", "value"):
            shapes.update(linear(layer + f"attention.self.{part}", hidden, hidden))
        shapes.update({**linear(layer + "attention.output.dense", hidden, hidden), **norm(layer + "attention.output.LayerNorm"),
                       **linear(layer + "intermediate.dense", intermediate, hidden),
                       **linear(layer + "output.dense", hidden, intermediate), **norm(layer + "output.LayerNorm")})
    return shapes


def uniter_state_dict(seed: int = 0, img_dim: int = FEATURE_DIM, label_dim: int = LABELS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = uniter_shapes(HIDDEN, LAYERS, INTERMEDIATE, VOCAB, MAX_POSITIONS, img_dim, label_dim)
    state = {k: torch.randn(shape, generator=g) * 0.5 for k, shape in shapes.items()}
    state["uniter.img_embeddings.mask_embedding.weight"][0] = 0  # UNITER keeps row 0 (unmasked) at zero
    state["cls.predictions.decoder.weight"] = state["uniter.embeddings.word_embeddings.weight"]  # tied
    state["feat_regress.weight"] = state["uniter.img_embeddings.img_linear.weight"]  # tied
    return state


def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-12)


def uniter_regions(state, features, position7, masked=None):
    """UNITER's region embedding: LN(LN(W_f f + b) + LN(W_p p + b) + token_type[1]); a masked region's
    feature is zeroed and given mask_embedding[1] (UniterImageEmbeddings, MRM's masking)."""
    i = "uniter.img_embeddings."
    if masked is not None:
        features = features.masked_fill(masked[..., None], 0) + state[i + "mask_embedding.weight"][masked.long()]
    image = _ln(F.linear(features, state[i + "img_linear.weight"], state[i + "img_linear.bias"]), state, i + "img_layer_norm")
    position = _ln(F.linear(position7, state[i + "pos_linear.weight"], state[i + "pos_linear.bias"]), state, i + "pos_layer_norm")
    return _ln(image + position + state["uniter.embeddings.token_type_embeddings.weight"][1], state, i + "LayerNorm")


def uniter_text(state, input_ids):
    """UniterTextEmbeddings: LN(word + position (0..T-1) + token_type[0])."""
    e = "uniter.embeddings."
    positions = torch.arange(input_ids.shape[1])
    summed = (state[e + "word_embeddings.weight"][input_ids] + state[e + "position_embeddings.weight"][positions]
              + state[e + "token_type_embeddings.weight"][0])
    return _ln(summed, state, e + "LayerNorm")


def boxes_and_geometry(seed: int, batch: int = 2, regions: int = 5, width: int = 640, height: int = 480):
    """Pixel boxes, the shards' 5-d geometry of them (preprocess's own function), and UNITER's 7-d
    position (x1, y1, x2, y2, w, h, w*h, normalised) written from its definition."""
    rng = np.random.default_rng(seed)
    xs = np.sort(rng.uniform(0, width, (batch, regions, 2)), -1)
    ys = np.sort(rng.uniform(0, height, (batch, regions, 2)), -1)
    boxes = np.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], -1).astype(np.float32)
    geometry = np.stack([region_geometry(b, width, height) for b in boxes])
    x1, y1, x2, y2 = (torch.from_numpy(boxes[..., k]).double() for k in range(4))
    w, h = (x2 - x1) / width, (y2 - y1) / height
    position7 = torch.stack([x1 / width, y1 / height, x2 / width, y2 / height, w, h, w * h], -1).float()
    return torch.from_numpy(geometry), position7


def uniter_config_file(directory: Path) -> Path:
    """UNITER's model config JSON (its config/uniter-base.json, at this test's sizes)."""
    path = directory / "uniter-tiny.json"
    path.write_text(json.dumps({
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": INTERMEDIATE, "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": 2, "num_hidden_layers": LAYERS, "type_vocab_size": 2, "vocab_size": VOCAB,
    }))
    return path


def converted_uniter(state, directory: Path) -> ImageBertForPretraining:
    imported = foreign_weights.uniter_weights(copy.copy(state), LABELS, uniter_config_file(directory))
    return load_model(ImageBertForPretraining, None, config=imported.config, state_dict=imported.weights,
                      may_be_missing=imported.absent, what="UNITER test state dict")


# ------------------------------------------------------------------------------------------ VisualBERT


@pytest.mark.parametrize("model_class", [VisualBertForPreTraining, VisualBertModel])
def test_converted_visualbert_computes_what_visualbert_computes(model_class, tmp_path):
    source = visualbert_dir(tmp_path / "vb", model_class)
    original = model_class.from_pretrained(source).eval()
    imported = foreign_weights.visualbert_weights(source, LABELS)
    model = load_model(ImageBertForPretraining, None, config=imported.config, state_dict=imported.weights,
                       may_be_missing=imported.absent).eval()
    assert not model.config.region_feature_norm and not model.config.region_geometry
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1000, 2000, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    features = torch.randn(3, 5, FEATURE_DIM, generator=g)
    region_mask = torch.ones(3, 5, dtype=torch.long)
    region_mask[2, 3:] = 0
    geometry = torch.rand(3, 5, 5, generator=g)  # VisualBERT embeds no boxes: whatever they are, nothing changes
    encoder = original.visual_bert if model_class is VisualBertForPreTraining else original
    with torch.no_grad():
        theirs = encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids),
                         visual_embeds=features, visual_attention_mask=region_mask,
                         visual_token_type_ids=torch.ones_like(region_mask))
        ours = model.imagebert(input_ids, attention_mask, features, geometry, region_mask)
        other_boxes = model.imagebert(input_ids, attention_mask, features, geometry.flip(1), region_mask)
    assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max() <= 1e-5
    assert (ours.pooler_output - theirs.pooler_output).abs().max() <= 1e-5
    assert torch.equal(other_boxes.last_hidden_state, ours.last_hidden_state)
    assert theirs.last_hidden_state.std() > 0.5  # a real output, not a collapsed one
    if model_class is VisualBertForPreTraining:  # the MLM and sentence-image heads came along
        with torch.no_grad():
            heads = original(input_ids=input_ids, attention_mask=attention_mask, visual_embeds=features,
                             visual_attention_mask=region_mask)
            mlm = model.mlm_head(ours.last_hidden_state)
            itm = model.itm_head(ours.pooler_output)
        assert (mlm - heads.prediction_logits).abs().max() <= 1e-5
        assert (itm - heads.seq_relationship_logits.flip(-1)).abs().max() <= 1e-5  # their 0 is "matches", our 1
    else:
        assert model.mlm_head.bias.abs().sum() == 0  # a VisualBertModel has none: initialised


# ---------------------------------------------------------------------------------------------- UNITER


def test_uniter_key_map_covers_every_tensor_of_uniter_base():
    """UNITER-base's names and shapes (bert-base-cased vocabulary, 2048-d features, 1601 labels) on
    the meta device: every tensor lands on one of ours with our shape, and every one of ours is filled."""
    shapes = uniter_shapes(768, 12, 3072, 28996, 512, 2048, 1601)
    assert len(shapes) == 16 * 12 + 38
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    imported = foreign_weights.uniter_weights(state, 1601)
    config = imported.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.vocab_size, config.feature_dim, config.region_own_norm) == (768, 12, 12, 3072, 28996, 2048, True)
    assert imported.absent == []
    with torch.device("meta"):
        ours = ImageBertForPretraining(config).state_dict()
    ours.pop("mlm_head.decoder.weight"), ours.pop("mlm_head.decoder.bias")  # tied to the word embeddings and mlm_head.bias
    assert {k: tuple(v.shape) for k, v in imported.weights.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_uniter_region_from_the_shards_5d_geometry_equals_uniters_from_7d(tmp_path):
    state = uniter_state_dict(seed=1)
    model = converted_uniter(state, tmp_path).eval()
    geometry, position7 = boxes_and_geometry(seed=2)
    features = torch.randn(2, 5, FEATURE_DIM, generator=torch.Generator().manual_seed(4))
    masked = torch.tensor([[False, True, False, False, True], [True, False, False, False, False]])
    with torch.no_grad():
        ours = model.imagebert.embed_regions(features, geometry)
        ours_masked = model.imagebert.embed_regions(features, geometry, masked)
    theirs = uniter_regions(state, features, position7)
    assert (ours - theirs).abs().max() <= 1e-5 and theirs.std() > 0.5
    assert (ours_masked - uniter_regions(state, features, position7, masked)).abs().max() <= 1e-5
    # LayerNorms under TensorFlow's names (gamma, beta), which UNITER's own loader accepts, convert the same.
    legacy = {k.removesuffix("LayerNorm.weight") + "LayerNorm.gamma" if k.endswith("LayerNorm.weight") else
              k.removesuffix("LayerNorm.bias") + "LayerNorm.beta" if k.endswith("LayerNorm.bias") else k: v
              for k, v in state.items()}
    assert sum(k.endswith(".gamma") for k in legacy) == 2 + 2 * LAYERS + 1
    with torch.no_grad():
        assert torch.equal(converted_uniter(legacy, tmp_path).eval().imagebert.embed_regions(features, geometry), ours)
    # The map itself, on the geometry alone: M @ g is UNITER's position vector.
    mapped = geometry.double() @ foreign_weights.UNITER_POSITION_FROM_GEOMETRY.T
    assert (mapped - position7.double()).abs().max() <= 1e-6


def test_converted_uniter_sequence_output_is_uniters(tmp_path):
    """Text and regions embedded by UNITER's equations, then BERT layers with UNITER's additive mask,
    equal ``ImageBertModel.forward`` (the path for regions with a LayerNorm of their own)."""
    state = uniter_state_dict(seed=5)
    model = converted_uniter(state, tmp_path).eval()
    geometry, position7 = boxes_and_geometry(seed=6)
    g = torch.Generator().manual_seed(7)
    features = torch.randn(2, 5, FEATURE_DIM, generator=g)
    input_ids = torch.randint(1000, 2000, (2, 8), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    region_mask = torch.ones(2, 5, dtype=torch.long)
    region_mask[0, 4:] = 0
    with torch.no_grad():
        ours = model.imagebert(input_ids, attention_mask, features, geometry, region_mask)
        hidden = torch.cat([uniter_text(state, input_ids), uniter_regions(state, features, position7)], 1)
        mask = torch.cat([attention_mask, region_mask], 1).float()
        additive = (1.0 - mask)[:, None, None, :] * -10000.0  # UniterModel's extended attention mask
        for layer in model.imagebert.bert.encoder.layer:
            hidden = layer(hidden, additive)
        pooled = torch.tanh(F.linear(hidden[:, 0], state["uniter.pooler.dense.weight"], state["uniter.pooler.dense.bias"]))
    assert (ours.last_hidden_state - hidden).abs().max() <= 1e-5
    assert (ours.pooler_output - pooled).abs().max() <= 1e-5
    itm = F.linear(pooled, state["itm_output.weight"], state["itm_output.bias"])
    assert (model.itm_head(ours.pooler_output) - itm).abs().max() <= 1e-5  # same label order as ours: 1 matches


def test_uniter_region_classifier_for_other_labels_starts_fresh(tmp_path):
    state = uniter_state_dict(seed=0, label_dim=LABELS + 3)
    imported = foreign_weights.uniter_weights(state, LABELS, uniter_config_file(tmp_path))
    assert imported.notes and "MOC head starts fresh" in imported.notes[0]
    model = load_model(ImageBertForPretraining, None, config=imported.config, state_dict=imported.weights,
                       may_be_missing=imported.absent)
    assert model.moc_head.out.weight.shape == (LABELS, HIDDEN)
    assert torch.equal(model.mrfr_head.out.weight, state["uniter.img_embeddings.img_linear.weight"].T)


# ---------------------------------------------------------------------- releases, fusion, the command


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Both converted by the command, in this process: a VisualBERT with its own tokenizer, UNITER with --tokenizer."""
    root = tmp_path_factory.mktemp("convert")
    spec_dir = root / "spec"
    spec_dir.mkdir()
    symbolic_spec().save(spec_dir)
    visualbert = visualbert_dir(root / "visualbert")
    checkpoint = root / "uniter.pt"
    torch.save(uniter_state_dict(seed=3), checkpoint)
    tokenizer = root / "tokenizer"
    minilm_tokenizer().save_pretrained(tokenizer)
    assert convert_main(["--from", "visualbert", str(visualbert), "--out", str(root / "r-vb"),
                         "--feature-spec", str(spec_dir)]) == 0
    assert convert_main(["--from", "uniter", str(checkpoint), "--out", str(root / "r-uniter"),
                         "--feature-spec", str(spec_dir / "feature_spec.json"), "--tokenizer", str(tokenizer),
                         "--uniter-config", str(uniter_config_file(root))]) == 0
    return root, {"visualbert": root / "r-vb", "uniter": root / "r-uniter"}


@pytest.mark.parametrize("source", ["visualbert", "uniter"])
def test_every_fusion_strategy_builds_from_a_converted_release(releases, source):
    release = load_release(releases[1][source])
    assert release.feature_spec == symbolic_spec()
    task = TaskConfig(**task_config_dict("classification"))
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (2, 6), generator=g)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "region_features": torch.randn(2, 4, FEATURE_DIM, generator=g), "region_geometry": boxes_and_geometry(1, 2, 4)[0],
             "region_mask": torch.ones(2, 4, dtype=torch.long), "region_blanked": None, "labels": torch.tensor([0, 1])}
    for name in FUSION_STRATEGIES:
        model = build_finetune_model(copy.deepcopy(release.model), task, FusionConfig(name=name)).eval()
        out = model(batch)
        assert torch.isfinite(out.loss), name
        if name == "single_stream":  # the joint encoding fine-tuning sees is the converted model's forward
            with torch.no_grad():
                states = model.fusion.encoder(input_ids, batch["attention_mask"], batch["region_features"],
                                              batch["region_geometry"], batch["region_mask"]).last_hidden_state
                fused = model.fusion(_fusion_inputs(batch))
            assert (torch.cat([fused.text_states, fused.region_states], 1) - states).abs().max() <= 1e-5


def _fusion_inputs(batch):
    from finetune.fusion.routing import FusionInputs

    return FusionInputs(batch["input_ids"], batch["attention_mask"], batch["region_features"], batch["region_geometry"],
                        batch["region_mask"])


def test_convert_refuses_bad_input_with_one_line(releases, tmp_path, capsys):
    root, _ = releases
    spec = str(root / "spec")
    cases = [
        (["--from", "oscar", str(root / "uniter.pt")], "--from 'oscar': convert takes one of"),
        (["--from", "uniter", str(root / "uniter.pt")], "a UNITER checkpoint holds no tokenizer: give --tokenizer"),
        (["--from", "visualbert", str(root / "uniter.pt")], "is not a VisualBERT model directory"),
        (["--from", "uniter", str(root / "spec" / "feature_spec.json"), "--tokenizer", str(root / "tokenizer")],
         "not a PyTorch state dict"),
    ]
    fine_tuned = tmp_path / "uniter-vqa.pt"  # a task head the map does not know
    torch.save({**uniter_state_dict(), "vqa_output.0.weight": torch.zeros(3, HIDDEN)}, fine_tuned)
    cases.append((["--from", "uniter", str(fine_tuned), "--tokenizer", str(root / "tokenizer"),
                   "--uniter-config", str(root / "uniter-tiny.json")], "unused ['vqa_output.0.weight']"))
    no_tokenizer = visualbert_dir(tmp_path / "vb-bare", VisualBertModel, with_tokenizer=False)
    cases.append((["--from", "visualbert", str(no_tokenizer)], "holds no tokenizer files: give --tokenizer DIR"))
    wide = tmp_path / "wide"
    wide.mkdir()
    wide_spec = symbolic_spec(feature_dim=FEATURE_DIM + 8)
    wide_spec.save(wide)
    cases.append((["--from", "visualbert", str(root / "visualbert"), "--feature-spec", str(wide)],
                  "takes 16-d region features but the feature spec"))
    for args, message in cases:
        args = args + ([] if "--feature-spec" in args else ["--feature-spec", spec])
        assert convert_main([*args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fine_tune_each_converted_release_with_mbt(releases):
    """The README's commands: ``python -m pretrain.convert`` of each source, then
    ``python -m finetune --init RELEASE fusion.name=mbt`` for a few steps."""
    root, _ = releases
    data = root / "data"
    write_symbolic_task_shards("classification", data / "train", 24, seed=1)
    write_symbolic_task_shards("classification", data / "val", 8, seed=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "MASTER_PORT": str(free_port())}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    sources = {
        "visualbert": ["visualbert", str(root / "visualbert")],
        "uniter": ["uniter", str(root / "uniter.pt"), "--tokenizer", str(root / "tokenizer"),
                   "--uniter-config", str(root / "uniter-tiny.json")],
    }
    for source, args in sources.items():
        release = root / f"cli-{source}"
        converted = subprocess.run([sys.executable, "-m", "pretrain.convert", "--from", *args, "--out", str(release),
                                    "--feature-spec", str(data / "train")], cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=120)
        assert converted.returncode == 0 and converted.stdout.strip() == str(release), converted.stderr[-3000:]
        run_dir = root / f"ft-{source}"
        done = subprocess.run(
            [sys.executable, "-m", "finetune", "--config", str(REPO / "configs/finetune/classification.yaml"),
             "--init", str(release), "--run-dir", str(run_dir), f"shards_root={data}", "data.train=train/00000.tar",
             "data.val=val/00000.tar", "eval.every_steps=3", "train.steps=3", "train.warmup_steps=0", "data.batch_size=8", "data.num_workers=0",
             "data.max_text_length=24", "checkpoint.every_steps=3", "logging.every_steps=1", "logging.progress_bar=false",
             "fusion.name=mbt", "fusion.mbt_fusion_layer=1", "deepspeed.precision=fp32"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert json.loads((run_dir / "done.json").read_text())["global_step"] == 3
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step3"
        results = json.loads((run_dir / "results.json").read_text())
        assert results["fusion"] == "mbt" and 0 <= results["metrics"]["accuracy"] <= 100
