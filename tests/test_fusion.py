"""Fusion strategies over a tiny random ImageBERT: routing properties, exact reproductions, gradients.

Layers are observed with forward hooks on the pretrained ``BertLayer``s and sub-blocks, so the
strategies carry no test code. Each strategy is built as the fine-tuning model builds (and
initialises) it.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from finetune.config import TaskConfig
from finetune.fusion import FUSION_STRATEGIES, FusionConfig
from finetune.fusion.muse import lowest_attended
from finetune.fusion.routing import FusionInputs
from finetune.tasks import FinetuneModel
from pretrain.model import ImageBertConfig, ImageBertModel

HIDDEN, FEATURE_DIM, NUM_CLASSES, VOCAB = 32, 16, 5, 30522
CLS_ID, SEP_ID = 101, 102


def tiny_encoder(layers: int = 3, seed: int = 0, dropout: float = 0.1) -> ImageBertModel:
    torch.manual_seed(seed)
    config = ImageBertConfig(
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        feature_dim=FEATURE_DIM,
        num_region_classes=NUM_CLASSES,
    )
    return ImageBertModel(config).eval()


def build_fusion(cfg: FusionConfig, encoder: ImageBertModel):
    """The strategy as ``FinetuneModel`` builds and initialises it (over ``encoder``, in place)."""
    task = TaskConfig(name="classification", label_names=["a", "b"])
    return FinetuneModel(encoder.config, task, cfg, encoder=encoder).fusion.eval()


def make_batch(seed: int = 1, padded: bool = True) -> dict[str, torch.Tensor]:
    """Two samples: 10 text tokens and 6 regions; the second sample padded to 7 tokens / 4 regions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (2, 10), generator=g)
    input_ids[:, 0] = CLS_ID
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    region_mask = torch.ones(2, 6, dtype=torch.long)
    input_ids[0, -1] = SEP_ID
    if padded:
        input_ids[1, 6], input_ids[1, 7:], attention_mask[1, 7:] = SEP_ID, 0, 0
        region_mask[1, 4:] = 0
    else:
        input_ids[1, -1] = SEP_ID
    corners = torch.rand(2, 6, 2, 2, generator=g).sort(dim=2).values  # x1 <= x2, y1 <= y2
    x1, x2, y1, y2 = corners[..., 0, 0], corners[..., 1, 0], corners[..., 0, 1], corners[..., 1, 1]
    geometry = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], -1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_features": torch.randn(2, 6, FEATURE_DIM, generator=g).abs(),
        "region_geometry": geometry,
        "region_mask": region_mask,
    }


def with_other_image(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = dict(batch)
    changed["region_features"] = batch["region_features"].flip(0) * 3 + 1
    changed["region_geometry"] = batch["region_geometry"].flip(1)
    return changed


def layer_calls(fusion, batch) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Every call of a pretrained layer during one forward: (layer index, input states, output states)."""
    calls = []
    # MBT's per-modality parameters: the image stream's own copies count as the same layers.
    image_layers = getattr(fusion, "image_layers", None) or []
    hooks = [
        layer.register_forward_hook(lambda m, args, out, i=index: calls.append((i, args[0].detach(), out.detach())))
        for layers in (fusion.layers, image_layers)
        for index, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            fusion(FusionInputs(**batch))
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.parametrize("padded", [False, True])
def test_single_stream_reproduces_imagebert(padded):
    encoder = tiny_encoder()
    batch = make_batch(padded=padded)
    fusion = build_fusion(FusionConfig(name="single_stream"), encoder).eval()
    with torch.no_grad():
        expected = encoder(**batch)
        out = fusion(FusionInputs(**batch))
    assert torch.equal(out.text_states, expected.last_hidden_state[:, :10])
    assert torch.equal(out.region_states, expected.last_hidden_state[:, 10:])
    assert torch.equal(out.pooled[0], expected.pooler_output)


@pytest.mark.parametrize("name", FUSION_STRATEGIES)
def test_output_shapes_and_pooled_dims(name):
    fusion = build_fusion(FusionConfig(name=name), tiny_encoder()).eval()
    with torch.no_grad():
        out = fusion(FusionInputs(**make_batch()))
    assert out.text_states.shape == (2, 10, HIDDEN)
    assert out.region_states.shape == (2, 6, HIDDEN)
    expected_dims = {
        "single_stream": [HIDDEN],
        "mbt": [HIDDEN, HIDDEN],
        "muse": [2 * HIDDEN],
        "mi2p": [HIDDEN],
        "late": [2 * HIDDEN],
    }[name]
    assert fusion.pooled_dims == expected_dims
    assert [p.shape for p in out.pooled] == [(2, d) for d in expected_dims]
    assert all(torch.isfinite(p).all() for p in out.pooled)
    assert out.aux_loss is None  # MuSE's auxiliary losses are for training only
    if name == "muse":
        fusion.train()
        assert fusion(FusionInputs(**make_batch())).aux_loss.item() > 0
    assert fusion.hidden_size == HIDDEN


def test_mbt_without_bottlenecks_lets_nothing_cross():
    fusion = build_fusion(FusionConfig(name="mbt", mbt_bottlenecks=0, mbt_fusion_layer=1), tiny_encoder())
    batch = make_batch()
    calls_a, calls_b = layer_calls(fusion, batch), layer_calls(fusion, with_other_image(batch))
    # Each layer runs twice, the text stream then the image stream.
    assert [i for i, _, _ in calls_a] == [0, 0, 1, 1, 2, 2]
    for (index, _, text_a), (_, _, text_b) in zip(calls_a[0::2], calls_b[0::2]):
        assert torch.equal(text_a, text_b), f"text moved in layer {index}"
    for (index, _, image_a), (_, _, image_b) in zip(calls_a[1::2], calls_b[1::2]):
        assert not torch.allclose(image_a, image_b), f"the change did not reach the image stream in layer {index}"
    with torch.no_grad():
        out_a, out_b = fusion(FusionInputs(**batch)), fusion(FusionInputs(**with_other_image(batch)))
    assert torch.equal(out_a.text_states, out_b.text_states)
    assert torch.equal(out_a.pooled[0], out_b.pooled[0])
    assert not torch.allclose(out_a.pooled[1], out_b.pooled[1])


def test_mbt_bottlenecks_carry_image_into_text_only_after_fusion_layer():
    fusion_layer, text_length, bottlenecks = 1, 10, 4
    cfg = FusionConfig(name="mbt", mbt_bottlenecks=bottlenecks, mbt_fusion_layer=fusion_layer)
    fusion = build_fusion(cfg, tiny_encoder(layers=4))
    batch = make_batch()
    calls_a, calls_b = layer_calls(fusion, batch), layer_calls(fusion, with_other_image(batch))
    for (index, text_in, text_a), (_, _, text_b) in zip(calls_a[0::2], calls_b[0::2]):
        # From L_f on the text's call of the layer also holds the B bottleneck tokens.
        assert text_in.shape[1] == text_length + (bottlenecks if index >= fusion_layer else 0)
        # In layer L_f the bottlenecks are still the learned initial tokens; image content reaches
        # them there, and the text from layer L_f + 1 on.
        same = torch.equal(text_a[:, :text_length], text_b[:, :text_length])
        assert same == (index <= fusion_layer), f"layer {index}"


def test_mbt_default_fusion_layer_is_two_thirds_of_depth_with_one_layer_after_it():
    assert build_fusion(FusionConfig(name="mbt"), tiny_encoder(layers=6)).fusion_layer == 4
    # Two thirds of 3 would be 2: the last layer, after which no text layer reads the bottlenecks.
    assert build_fusion(FusionConfig(name="mbt"), tiny_encoder(layers=3)).fusion_layer == 1


def test_muse_exchanges_below_the_quantile_in_exact_layers():
    theta, start, end = 0.3, 1, 2
    encoder = tiny_encoder(layers=4)
    cfg = FusionConfig(name="muse", muse_exchange_start=start, muse_exchange_end=end, muse_exchange_quantile=theta)
    fusion = build_fusion(cfg, encoder).eval()
    batch = make_batch()
    text_real = batch["attention_mask"].bool()
    image_real = torch.cat([torch.ones(2, 1, dtype=torch.bool), batch["region_mask"].bool()], 1)

    # Observe the real sub-blocks: what leaves self-attention and what enters the feed-forward block.
    attention_out, ffn_in = {}, {}
    hooks = []
    for index, layer in enumerate(encoder.bert.encoder.layer):
        hooks.append(
            layer.attention.register_forward_hook(
                lambda m, a, out, i=index: attention_out.setdefault(i, []).append(out[0].detach())
            )
        )
        hooks.append(
            layer.intermediate.register_forward_pre_hook(
                lambda m, a, i=index: ffn_in.setdefault(i, []).append(a[0].detach())
            )
        )
    with torch.no_grad():
        fusion(FusionInputs(**batch))
    for hook in hooks:
        hook.remove()

    for index in range(4):
        (text_att, image_att), (text_ffn, image_ffn) = attention_out[index], ffn_in[index]
        text_changed = (text_att != text_ffn).any(-1)
        image_changed = (image_att != image_ffn).any(-1)
        if not start <= index <= end:
            assert not text_changed.any() and not image_changed.any(), f"exchange outside mu..eta in layer {index}"
            continue
        for sample in range(2):
            n_text = int(text_real[sample].sum()) - 1  # real tokens other than [CLS]
            n_regions = int(image_real[sample].sum()) - 1
            # Below the theta-quantile of n distinct attention weights: ceil(theta * (n - 1)) tokens.
            assert int(text_changed[sample].sum()) == math.ceil(theta * (n_text - 1))
            assert int(image_changed[sample].sum()) == math.ceil(theta * (n_regions - 1))
        # Never [CLS], never padding.
        assert not text_changed[:, 0].any() and not (text_changed & ~text_real).any()
        assert not image_changed[:, 0].any() and not (image_changed & ~image_real).any()
        # The rule: exchanged token = itself + the other modality's mean (over its real tokens) after attention.
        image_mean = (image_att * image_real[..., None]).sum(1) / image_real.sum(1, keepdim=True)
        text_mean = (text_att * text_real[..., None]).sum(1) / text_real.sum(1, keepdim=True)
        expected_text = text_att + image_mean[:, None]
        expected_image = image_att + text_mean[:, None]
        assert torch.allclose(text_ffn[text_changed], expected_text[text_changed], atol=1e-6)
        assert torch.allclose(image_ffn[image_changed], expected_image[image_changed], atol=1e-6)


def test_lowest_attended_is_the_references_quantile_rule():
    """Per sample: real non-[CLS] tokens strictly below numpy's theta-quantile of their [CLS] attention."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(6, 12, dtype=torch.bool)
    for row, real in enumerate([1, 2, 4, 6, 11, 12]):
        mask[row, :real] = True
    scores = torch.rand(6, 12, generator=g)
    scores[5, 3:6] = scores[5, 2]  # ties: all or none of them are below the threshold
    for theta in (0.0, 0.1, 0.2, 0.5, 1.0):
        selected = lowest_attended(scores, mask, theta)
        for row in range(6):
            real = scores[row, 1 : int(mask[row].sum())].double().numpy()
            expected = np.zeros(12, dtype=bool)
            if len(real):
                expected[1 : 1 + len(real)] = real < np.quantile(real, theta)
            assert selected[row].tolist() == expected.tolist(), (theta, row)
    assert not lowest_attended(scores, mask, 1.0)[0].any()  # [CLS] alone: nothing to exchange


def test_muse_auxiliary_losses_follow_their_weights():
    encoder = tiny_encoder(dropout=0.0)  # training mode (aux losses on) yet deterministic
    batch = make_batch()

    def muse(alpha, beta):
        cfg = FusionConfig(name="muse", muse_caption_weight=alpha, muse_generation_weight=beta, muse_aux_noise=0)
        return build_fusion(cfg, encoder).train()

    off = muse(0, 0)
    assert off.caption_decoder is None and off.region_generator is None
    assert off(FusionInputs(**batch)).aux_loss is None
    caption_only, both, half = muse(1, 0), muse(1, 1), muse(0.5, 0.5)
    both.caption_decoder.load_state_dict(caption_only.caption_decoder.state_dict())
    half.caption_decoder.load_state_dict(caption_only.caption_decoder.state_dict())
    half.region_generator.load_state_dict(both.region_generator.state_dict())
    caption_loss = caption_only(FusionInputs(**batch)).aux_loss
    # An untrained caption decoder is near-uniform over the vocabulary: cross-entropy close to log(V).
    assert abs(caption_loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0
    total = both(FusionInputs(**batch)).aux_loss
    assert (total - caption_loss).item() > 0  # the generation loss
    assert torch.allclose(half(FusionInputs(**batch)).aux_loss, total / 2, rtol=1e-5)


def image_stream_reference(encoder: ImageBertModel, batch) -> torch.Tensor:
    """The image alone through the plain BertModel: image [CLS] (segment 1, position 0), then regions."""
    cls = encoder.get_input_embeddings()(batch["input_ids"][:, :1])
    regions = encoder.region_embeddings(batch["region_features"], batch["region_geometry"])
    length = regions.shape[1] + 1
    positions = torch.full((1, length), encoder.config.region_position_id)
    positions[0, 0] = 0
    mask = torch.cat([torch.ones(2, 1, dtype=torch.long), batch["region_mask"]], 1)
    out = encoder.bert(
        inputs_embeds=torch.cat([cls, regions], 1),
        attention_mask=mask,
        token_type_ids=torch.ones(2, length, dtype=torch.long),
        position_ids=positions.expand(2, -1),
    )
    return out.last_hidden_state


def test_mi2p_with_zero_plugins_reproduces_the_host_streams():
    encoder = tiny_encoder()
    batch = make_batch()
    fusion = build_fusion(FusionConfig(name="mi2p"), encoder).eval()
    with torch.no_grad():
        out = fusion(FusionInputs(**batch))
        text_alone = encoder.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        image_alone = image_stream_reference(encoder, batch)
    assert torch.equal(out.text_states, text_alone.last_hidden_state)
    assert torch.equal(out.region_states, image_alone[:, 1:])
    # So at initialisation the text host ignores the image entirely...
    with torch.no_grad():
        other = fusion(FusionInputs(**with_other_image(batch)))
    assert torch.equal(other.text_states, out.text_states)
    # ...and once a plug-in's output projection is non-zero, the image reaches the text.
    with torch.no_grad():
        fusion.image_into_text[0].out.weight.normal_(std=0.5)
        injected_a, injected_b = fusion(FusionInputs(**batch)), fusion(FusionInputs(**with_other_image(batch)))
    assert not torch.allclose(injected_a.text_states, injected_b.text_states)


def test_late_fusion_streams_never_meet():
    fusion = build_fusion(FusionConfig(name="late"), tiny_encoder()).eval()
    batch = make_batch()
    with torch.no_grad():
        out_a, out_b = fusion(FusionInputs(**batch)), fusion(FusionInputs(**with_other_image(batch)))
    assert torch.equal(out_a.text_states, out_b.text_states)
    assert torch.equal(out_a.pooled[0][:, :HIDDEN], out_b.pooled[0][:, :HIDDEN])
    assert not torch.allclose(out_a.pooled[0][:, HIDDEN:], out_b.pooled[0][:, HIDDEN:])


def _objective(out, heads) -> torch.Tensor:
    logits = torch.stack([head(p) for head, p in zip(heads, out.pooled)]).mean(0)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])) + out.text_states.pow(2).mean()
    return loss + (out.aux_loss if out.aux_loss is not None else 0)


@pytest.mark.parametrize("name", FUSION_STRATEGIES)
def test_gradients_reach_new_and_pretrained_parameters(name):
    encoder = tiny_encoder()
    fusion = build_fusion(FusionConfig(name=name, mbt_fusion_layer=1), encoder).train()
    heads = torch.nn.ModuleList(torch.nn.Linear(d, 2) for d in fusion.pooled_dims)
    optimizer = torch.optim.SGD([*fusion.parameters(), *heads.parameters()], lr=0.5)
    batch = make_batch()
    # Zero-initialised outputs (MI2P) pass no gradient to what feeds them until after one step.
    for _ in range(2):
        optimizer.zero_grad()
        _objective(fusion(FusionInputs(**batch)), heads).backward()
        optimizer.step()
    new = {n: p for n, p in fusion.named_parameters() if not n.startswith("encoder.") and p.requires_grad}
    if name in ("single_stream", "late"):
        assert not new
    for param_name, param in new.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {param_name}"
    last_layer = encoder.bert.encoder.layer[-1].output.dense.weight
    assert last_layer.grad is not None and last_layer.grad.abs().sum() > 0


@pytest.mark.parametrize("name", FUSION_STRATEGIES)
def test_a_few_steps_fit_a_label_that_needs_both_modalities(name):
    torch.manual_seed(0)
    encoder = tiny_encoder()
    # Dropout off (eval) so that a dozen steps on one batch show the fit, not the noise.
    fusion = build_fusion(FusionConfig(name=name, mbt_fusion_layer=1), encoder).eval()
    heads = torch.nn.ModuleList(torch.nn.Linear(d, 2) for d in fusion.pooled_dims)
    optimizer = torch.optim.AdamW([*fusion.parameters(), *heads.parameters()], lr=3e-3)
    batch = make_batch(padded=False)
    batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    batch["input_ids"][2:, 1:5] = 1500  # a text change and an image change flip the label
    batch["region_features"][[1, 2]] += 2.0
    labels = torch.tensor([0, 1, 1, 0])  # label = (text changed) xor (image changed)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        out = fusion(FusionInputs(**batch))
        logits = torch.stack([head(p) for head, p in zip(heads, out.pooled)]).mean(0)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        losses.append(loss.item())
        (loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        optimizer.step()
    assert losses[-1] < losses[0] * 0.7, losses


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "cross"}, "fusion.name"),
        ({"mbt_bottlenecks": -1}, "fusion.mbt_bottlenecks"),
        ({"muse_exchange_quantile": 1.5}, "fusion.muse_exchange_quantile"),
        ({"muse_caption_weight": -0.1}, "fusion.muse_caption_weight"),
        ({"mbt_fusion_layer": -2}, "fusion.mbt_fusion_layer"),
        ({"mbt_parameters": "both"}, "fusion.mbt_parameters is 'both'; choose one of per_modality, shared"),
        ({"mbt_classifier": "mlp"}, "fusion.mbt_classifier"),
        ({"mi2p_foreign": "frozen"}, "fusion.mi2p_foreign is 'frozen'; choose one of frozen_copy, shared"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**overrides)


def test_the_removed_mi2p_freeze_foreign_key_is_an_error_naming_it_and_its_successor():
    from preprocess.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="unknown key 'fusion.mi2p_freeze_foreign'.*mi2p_foreign"):
        from_dict(FusionConfig, {"name": "mi2p", "mi2p_freeze_foreign": True}, prefix="fusion")


def test_depth_dependent_values_are_checked_against_the_release():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="mbt_fusion_layer is 5 but the encoder has 3 layers"):
        build_fusion(FusionConfig(name="mbt", mbt_fusion_layer=5), encoder)
    with pytest.raises(ValueError, match="muse_exchange_start=2, muse_exchange_end=1"):
        build_fusion(FusionConfig(name="muse", muse_exchange_start=2, muse_exchange_end=1), encoder)
    with pytest.raises(ValueError, match="mi2p_heads=3 does not divide hidden_size=32"):
        build_fusion(FusionConfig(name="mi2p", mi2p_heads=3), encoder)
    resolved = FusionConfig(name="muse").resolved(6)
    assert (resolved.muse_exchange_start, resolved.muse_exchange_end) == (1, 3)


def _train_steps(model: FinetuneModel, batch: dict[str, torch.Tensor], steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the whole model through the engine's own parameter groups."""
    from pretrain.engine import param_groups

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model({**batch, "region_blanked": None, "labels": torch.tensor([0, 1])}).loss.backward()
        optimizer.step()
    model.eval()


def test_mi2p_foreign_extractor_is_a_frozen_pretrained_copy(tmp_path):
    from pretrain.engine import param_groups
    from pretrain.weights import load_model

    encoder = tiny_encoder()
    pretrained = {k: v.clone() for k, v in encoder.state_dict().items()}
    task = TaskConfig(name="classification", label_names=["a", "b"])
    model = FinetuneModel(encoder.config, task, FusionConfig(name="mi2p"), encoder=encoder)
    fusion, batch = model.fusion, make_batch()
    foreign = dict(fusion.foreign_encoder.named_parameters())
    assert foreign and not any(p.requires_grad for p in foreign.values())
    in_optimizer = {id(p) for group in param_groups(model, 0.01) for p in group["params"]}
    assert not in_optimizer & {id(p) for p in foreign.values()}
    with torch.no_grad():
        text, image = fusion.embed(FusionInputs(**batch))
        before = fusion.foreign_features(text, image, FusionInputs(**batch))

    _train_steps(model, batch)

    # The pretrained weights, bit for bit, while the host encoder they were copied from has moved.
    for name, param in foreign.items():
        assert torch.equal(param, pretrained[name]), f"foreign {name} changed"
    host = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(encoder.state_dict()[host], pretrained[host])
    with torch.no_grad():
        after = fusion.foreign_features(*fusion.embed(FusionInputs(**batch)), FusionInputs(**batch))
    assert all(torch.equal(a.states, b.states) for a, b in zip(before, after))
    # Export and reload: the frozen copy comes back as it was, still frozen.
    model.save_pretrained(tmp_path)
    loaded = load_model(FinetuneModel, tmp_path, task, FusionConfig(name="mi2p"))
    for name, param in loaded.fusion.foreign_encoder.named_parameters():
        assert torch.equal(param, pretrained[name]) and not param.requires_grad, name
    assert torch.equal(loaded.fusion.encoder.bert.encoder.layer[0].output.dense.weight,
                       encoder.bert.encoder.layer[0].output.dense.weight)


def test_mi2p_shared_foreign_extractor_drifts_with_the_host():
    """``mi2p_foreign: shared`` keeps no copy, and its foreign features move as the shared layers train."""
    encoder = tiny_encoder()
    task = TaskConfig(name="classification", label_names=["a", "b"])
    model = FinetuneModel(encoder.config, task, FusionConfig(name="mi2p", mi2p_foreign="shared"), encoder=encoder)
    fusion, inputs = model.fusion, FusionInputs(**make_batch())
    assert fusion.foreign_encoder is None
    with torch.no_grad():
        before = fusion.foreign_features(*fusion.embed(inputs), inputs)
    _train_steps(model, make_batch())
    with torch.no_grad():
        after = fusion.foreign_features(*fusion.embed(inputs), inputs)
    assert not torch.allclose(before[0].states, after[0].states)


def test_mbt_per_modality_parameters_start_pretrained_and_train_apart():
    encoder = tiny_encoder()
    task = TaskConfig(name="classification", label_names=["a", "b"])
    shared_model = FinetuneModel(encoder.config, task, FusionConfig(name="mbt", mbt_parameters="shared"),
                                 encoder=copy.deepcopy(encoder)).eval()
    model = FinetuneModel(encoder.config, task, FusionConfig(name="mbt"), encoder=encoder).eval()
    fusion, batch = model.fusion, make_batch()
    assert fusion.image_layers is not None and shared_model.fusion.image_layers is None
    # Copies of the pretrained layers: same values, separate parameters.
    for text_param, image_param in zip(fusion.layers.parameters(), fusion.image_layers.parameters()):
        assert torch.equal(text_param, image_param) and text_param is not image_param
    shared_model.fusion.bottlenecks.data.copy_(fusion.bottlenecks.data)
    with torch.no_grad():
        a, b = fusion(FusionInputs(**batch)), shared_model.fusion(FusionInputs(**batch))
    assert torch.equal(a.text_states, b.text_states) and torch.equal(a.region_states, b.region_states)
    _train_steps(model, batch)
    text_w, image_w = fusion.layers[0].output.dense.weight, fusion.image_layers[0].output.dense.weight
    assert not torch.equal(text_w, image_w)


def test_mbt_classifier_is_one_linear_on_both_cls_with_logits_averaged():
    encoder = tiny_encoder()
    task = TaskConfig(name="classification", label_names=["a", "b", "c"])
    model = FinetuneModel(encoder.config, task, FusionConfig(name="mbt"), encoder=encoder).eval()
    assert len(model.head.heads) == 1
    with torch.no_grad():
        pooled = model.fusion(FusionInputs(**make_batch())).pooled
        linear = model.head.heads[0]
        assert torch.allclose(model.head(pooled), (linear(pooled[0]) + linear(pooled[1])) / 2)
    per_modality = FinetuneModel(encoder.config, task, FusionConfig(name="mbt", mbt_classifier="per_modality"),
                                 encoder=encoder)
    assert len(per_modality.head.heads) == 2
