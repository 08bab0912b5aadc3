"""pretrain.cpu_dropout: the same dropout as torch's (distribution, scaling, gradient, attention),
drawn cheaply, and the encoder trains with it on a CPU and evaluates exactly as SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pretrain import cpu_dropout
from pretrain.model import ImageBertConfig, ImageBertForPretraining
from pretrain.model_config import ObjectiveWeights

KEEP_SCALE = 65536 / (65536 - 6554)  # p = 0.1 rounded to 1/65536


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_p_of_the_elements_in_every_lane_and_scales_the_rest(p):
    torch.manual_seed(0)
    n = 4_000_000
    x = torch.ones(n, requires_grad=True)
    out = cpu_dropout.apply_dropout(x, p, training=True)
    dropped = out == 0
    sigma = (p * (1 - p) / (n / 4)) ** 0.5
    # Each 64-bit draw feeds four elements: every one of the four lanes must drop p (a draw whose
    # top bit were always 0 would show here as a lane dropping none or twice as many).
    assert (dropped.view(-1, 4).float().mean(0) - p).abs().max().item() < 5 * sigma
    kept = out[~dropped]
    scale = 65536 / (65536 - round(p * 65536))
    assert torch.all(kept == torch.tensor(scale, dtype=torch.float32))
    out.backward(torch.full_like(out, 2.0))
    assert torch.equal(x.grad, out.detach() * 2)


def test_reproducible_from_the_seed_and_fresh_on_every_call():
    x = torch.randn(64, 100)
    torch.manual_seed(1)
    first, second = (cpu_dropout.apply_dropout(x, 0.1, True) for _ in range(2))
    torch.manual_seed(1)
    assert torch.equal(cpu_dropout.apply_dropout(x, 0.1, True), first)
    assert not torch.equal(first, second)


def test_edges_are_torchs():
    x = torch.randn(8, 16)
    assert torch.equal(cpu_dropout.apply_dropout(x, 0.1, training=False), x)
    assert torch.equal(cpu_dropout.apply_dropout(x, 0.0, training=True), x)
    assert torch.equal(cpu_dropout.apply_dropout(x, 1.0, training=True), torch.zeros_like(x))
    torch.manual_seed(0)
    bf16 = cpu_dropout.apply_dropout(x.bfloat16(), 0.1, training=True)
    ratio = bf16.float() / x.bfloat16().float()
    assert bf16.dtype == torch.bfloat16 and (ratio == 0).any()
    assert ((ratio == 0) | ((ratio - KEEP_SCALE).abs() < 0.01)).all()


class _Attention(torch.nn.Module):
    is_causal = False


def _qkv_and_masks(batch=3, heads=4, length=9, dim=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(3))
    real = torch.ones(batch, length, dtype=torch.bool)
    real[1, 6:] = False  # padding keys
    boolean = real[:, None, None, :].expand(batch, 1, length, length)
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, torch.finfo(torch.float32).min)
    return q, k, v, boolean, additive


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_attention_is_sdpa_with_its_weights_dropped(mask_kind):
    q, k, v, boolean, additive = _qkv_and_masks()
    mask = boolean if mask_kind == "bool" else additive
    expected, _ = sdpa_attention_forward(_Attention(), q, k, v, boolean, dropout=0.0, scaling=0.3)
    # p under 1/131072 rounds to nothing dropped: the cheap path's own arithmetic against SDPA.
    kept_all, _ = cpu_dropout.attention(_Attention(), q, k, v, mask, dropout=1e-9, scaling=0.3)
    assert kept_all.shape == expected.shape == (3, 9, 4, 8)
    torch.testing.assert_close(kept_all, expected, rtol=1e-5, atol=1e-5)
    # Dropped: each draw differs from SDPA, their mean converges on it (E[dropout(w)] = w).
    torch.manual_seed(0)
    draws = torch.stack([cpu_dropout.attention(_Attention(), q, k, v, mask, dropout=0.1, scaling=0.3)[0] for _ in range(1000)])
    assert (draws[0] - expected).abs().max() > 0.05
    assert (draws.mean(0) - expected).abs().max() < 0.05
    # Padding keys stay out: changing their values changes nothing.
    v_changed = v.clone()
    v_changed[1, :, 6:] = 100.0
    torch.manual_seed(0)
    assert torch.allclose(cpu_dropout.attention(_Attention(), q, k, v_changed, mask, dropout=0.1, scaling=0.3)[0], draws[0])


def tiny_model(attention=None) -> ImageBertForPretraining:
    torch.manual_seed(0)
    config = ImageBertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        feature_dim=16, num_region_classes=5, attn_implementation=attention,
    )
    return ImageBertForPretraining(config)


def tiny_batch(batch=4, text=6, regions=5):
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(5, 50, (batch, text), generator=g), "attention_mask": torch.ones(batch, text, dtype=torch.long),
        "mlm_labels": torch.randint(5, 50, (batch, text), generator=g), "region_features": torch.rand(batch, regions, 16, generator=g),
        "region_blanked": torch.zeros(batch, regions, dtype=torch.bool), "region_geometry": torch.rand(batch, regions, 5, generator=g),
        "region_mask": torch.ones(batch, regions, dtype=torch.long), "region_masked": torch.rand(batch, regions, generator=g) < 0.3,
        "region_cls_prob": torch.softmax(torch.randn(batch, regions, 5, generator=g), -1), "itm_labels": torch.tensor([1, 0, 1, 0]),
    }


def test_the_encoder_trains_with_it_on_a_cpu_and_evaluates_as_sdpa():
    model = tiny_model()
    assert model.config._attn_implementation == cpu_dropout.ATTENTION
    assert sum(isinstance(m, cpu_dropout.CpuDropout) for m in model.modules()) == 1 + 2 * 3  # embeddings, 3 per layer
    model.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(tiny_batch(), ObjectiveWeights()).loss.backward()
    ops = {event.key for event in profile.key_averages()}
    assert "aten::random_" in ops and not ops & {"aten::bernoulli_", "aten::bernoulli", "aten::native_dropout"}

    model.eval()
    sdpa = copy.deepcopy(model)
    sdpa.config._attn_implementation_internal = "sdpa"  # the library's own, bypassing the model's choice
    with torch.no_grad():
        assert torch.equal(model(tiny_batch(), ObjectiveWeights()).loss, sdpa(tiny_batch(), ObjectiveWeights()).loss)


def test_an_explicit_attention_request_is_kept():
    assert tiny_model("eager").config._attn_implementation == "eager"
