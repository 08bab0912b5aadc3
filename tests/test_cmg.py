"""CMG building blocks (pretrain/cmg.py): the EMA, multimodal or not, against a hand computation,
the same step over two ranks, dead-code reset and its switch, CLUB on Gaussians with known mutual
information, Cross-CPC on aligned against shuffled sequences, the region reading order; the
ablation switches as config keys and in a release, old ones included."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.cmg import (
    CMGObjectives, CrossCPC, ModalityAutoencoder, SequenceCLUB, SharedCodebook, code_matching_loss, reading_order,
)
from pretrain_runs import free_port


def codebook_with(embedding, decay, epsilon=0.0, dead_after=300, **switches):
    book = SharedCodebook(len(embedding), len(embedding[0]), decay=decay, epsilon=epsilon, dead_after=dead_after,
                          **switches)
    book.embedding.copy_(torch.tensor(embedding))
    book.ema_weight.copy_(book.embedding * book.ema_count[:, None])
    return book


# m after the step below: with the counterparts (the multimodal EMA) and without them (ablation).
HAND_EMA_WEIGHT = {True: [[1.5, 1.25], [7.25, 7.5]], False: [[0.5, 0.0], [9.5, 10.0]]}


@pytest.mark.parametrize("multimodal", [True, False])
def test_ema_matches_hand_computation(multimodal):
    book = codebook_with([[0.0, 0.0], [10.0, 10.0]], decay=0.5, multimodal=multimodal)
    # text: [1, 0] -> code 0, [9, 10] -> code 1, and a padded [100, 100] that must count nowhere
    text = torch.tensor([[[1.0, 0.0], [9.0, 10.0], [100.0, 100.0]]])
    text_mask = torch.tensor([[True, True, False]])
    regions = torch.tensor([[[0.0, 0.0]]])  # -> code 0
    stats = book.update(text, text_mask, regions, None)
    # Counterparts: each text vector attends to the one region, [0, 0]; the region scores 0
    # against both valid text vectors, so its counterpart is their mean [5, 5].
    # counts: code 0 <- t1, r; code 1 <- t2.
    # sums, multimodal: code 0: (t1 + 0)/2 + (r + [5, 5])/2 = [3, 2.5]; code 1: (t2 + 0)/2 = [4.5, 5].
    # sums, without the counterparts: code 0: t1 + r = [1, 0]; code 1: t2 = [9, 10].
    # N = 0.5 [1, 1] + 0.5 [2, 1] = [1.5, 1]; m = 0.5 [[0, 0], [10, 10]] + 0.5 sums.
    ema_weight = torch.tensor(HAND_EMA_WEIGHT[multimodal])
    assert torch.allclose(book.ema_count, torch.tensor([1.5, 1.0]))
    assert torch.allclose(book.ema_weight, ema_weight)
    assert torch.allclose(book.embedding, ema_weight / torch.tensor([[1.5], [1.0]]))
    assert int(stats["codes_used"]) == 2 and int(stats["codes_reset"]) == 0
    assert stats["perplexity_regions"].item() == pytest.approx(1.0)
    assert stats["perplexity_text"].item() == pytest.approx(2.0)
    assert stats["perplexity"].item() == pytest.approx(math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)))
    assert int(book.updates) == 1


def test_laplace_smoothing_keeps_unused_codes_finite():
    book = codebook_with([[0.0, 0.0], [10.0, 10.0]], decay=0.5, epsilon=1e-5)
    for _ in range(40):  # code 1 never chosen: its count decays but the smoothing keeps it > 0
        book.update(torch.zeros(1, 2, 2), None, torch.zeros(1, 1, 2), None)
    assert torch.isfinite(book.embedding).all() and book.ema_count[1] > 0


def _random_batch(seed, samples=4):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(samples, 5, 3, generator=g)
    regions = torch.randn(samples, 4, 3, generator=g)
    text_mask = torch.rand(samples, 5, generator=g) > 0.3
    region_mask = torch.rand(samples, 4, generator=g) > 0.3
    text_mask[:, 0] = region_mask[:, 0] = True
    return text, text_mask, regions, region_mask


def _two_rank_update(rank, port, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    book = SharedCodebook(6, 3, decay=0.8, dead_after=2, seed=3)
    for step in range(steps):
        text, text_mask, regions, region_mask = _random_batch(step)
        half = slice(2 * rank, 2 * rank + 2)
        book.update(text[half], text_mask[half], regions[half], region_mask[half])
    torch.save(book.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_update_over_two_ranks_equals_one_rank_on_the_whole_batch(tmp_path):
    steps = 4
    mp.spawn(_two_rank_update, args=(free_port(), steps, str(tmp_path)), nprocs=2)
    single = SharedCodebook(6, 3, decay=0.8, dead_after=2, seed=3)
    for step in range(steps):
        single.update(*_random_batch(step))
    assert int(single.updates) == steps
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            assert torch.allclose(state[name].float(), value.float(), atol=1e-6), (rank, name)


def _two_clusters():
    points = torch.tensor([[[-1.0, 0.0], [1.0, 0.0], [-1.1, 0.1], [1.1, -0.1]]])
    return points, None, points.clone(), None


def test_dead_code_reset_revives_an_unused_code():
    book = codebook_with([[0.0, 0.0], [100.0, 100.0]], decay=0.5, epsilon=1e-5, dead_after=2)
    stats = [book.update(*_two_clusters()) for _ in range(6)]
    assert [int(s["codes_used"]) for s in stats[:2]] == [1, 1]
    assert sum(int(s["codes_reset"]) for s in stats) == 1
    # Once moved next to code 0, code 1 takes one cluster and keeps it.
    assert [int(s["codes_used"]) for s in stats[3:]] == [2, 2, 2]
    assert stats[-1]["perplexity"].item() == pytest.approx(2.0)
    assert book.embedding[0, 0] * book.embedding[1, 0] < 0  # one code on each cluster

    # Never revived: below its threshold, or past it with the reset off (the ablation), where
    # the code still counts its unused steps.
    for dead_after, code_reset in ((1000, True), (2, False)):
        control = codebook_with([[0.0, 0.0], [100.0, 100.0]], decay=0.5, epsilon=1e-5, dead_after=dead_after,
                                code_reset=code_reset)
        stats = [control.update(*_two_clusters()) for _ in range(6)]
        assert [int(s["codes_used"]) for s in stats] == [1] * 6
        assert [int(s["codes_reset"]) for s in stats] == [0] * 6
        assert control.unused_steps.tolist() == [0, 6]
        assert control.embedding[1].min() > 90  # still far from both clusters (the smoothing moves it a little)


def test_reset_is_a_function_of_the_state():
    def run():
        book = codebook_with([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]], decay=0.5, epsilon=1e-5, dead_after=1)
        for _ in range(3):
            book.update(*_two_clusters())
        return book.embedding.clone()

    assert torch.equal(run(), run())


def gaussian_pairs(rho, samples, length, dim, generator):
    x = torch.randn(samples, length, dim, generator=generator)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(samples, length, dim, generator=generator)
    return x, y


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_club_on_gaussians_bounds_the_known_mutual_information(rho):
    torch.manual_seed(0)
    dim, g = 2, torch.Generator().manual_seed(1)
    club = SequenceCLUB(dim, dim, hidden=32)
    optimizer = torch.optim.Adam(club.parameters(), lr=1e-2)
    for _ in range(300):
        x, y = gaussian_pairs(rho, 64, 4, dim, g)
        optimizer.zero_grad()
        club.approximation_loss(x, y, None).backward()
        optimizer.step()
    x, y = gaussian_pairs(rho, 2048, 4, dim, g)
    mask = torch.ones(2048, 4, dtype=torch.bool)
    mask[:, 3] = False  # padded positions must not count
    y_padded = y.clone()
    y_padded[:, 3] = 1e3
    estimate = club.mi_upper_bound(x, y_padded, mask).item()
    true_mi = -dim / 2 * math.log(1 - rho**2)
    # With the exact q(y|x) = N(rho x, 1 - rho^2), CLUB equals dim * rho^2 / (1 - rho^2).
    club_at_optimum = dim * rho**2 / (1 - rho**2)
    assert estimate == pytest.approx(club_at_optimum, abs=0.1)
    assert estimate >= true_mi - 0.05


def test_club_cannot_be_lowered_by_rescaling_the_specific_part():
    """The main network minimises the bound through y: growing y (which q cannot follow at once)
    must not pay, so the bound is the same for any per-dimension scale and shift of y."""
    torch.manual_seed(0)
    club = SequenceCLUB(3, 3, hidden=8)
    x, y = torch.randn(6, 5, 3), torch.randn(6, 5, 3)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = False
    bound = club.mi_upper_bound(x, y, mask)
    stretched = y * torch.tensor([100.0, 0.1, 7.0]) + 5.0
    torch.testing.assert_close(club.mi_upper_bound(x, stretched, mask), bound, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(club.approximation_loss(x, stretched, mask), club.approximation_loss(x, y, mask),
                               rtol=1e-4, atol=1e-4)


def test_club_gradients_stay_on_their_side():
    club = SequenceCLUB(3, 3, hidden=8)
    x = torch.randn(4, 5, 3, requires_grad=True)
    y = torch.randn(4, 5, 3, requires_grad=True)
    club.mi_upper_bound(x, y, None).backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in club.parameters())
    x.grad = y.grad = None
    club.approximation_loss(x, y, None).backward()
    assert x.grad is None and y.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in club.parameters())


def rotating_pairs(samples, length, generator, shuffled):
    """Two views of one latent sequence u_{t+1} = Q u_t: each modality's prefix fixes the
    other's next item. Shuffled: b comes from another sample, so nothing is predictable."""
    latent_dim, dim = 4, 8
    q = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=torch.Generator().manual_seed(7)))[0]
    to_a = torch.randn(latent_dim, dim, generator=torch.Generator().manual_seed(8))
    to_b = torch.randn(latent_dim, dim, generator=torch.Generator().manual_seed(9))
    u = [torch.randn(samples, latent_dim, generator=generator)]
    for _ in range(length - 1):
        u.append(u[-1] @ q.t())
    u = torch.stack(u, dim=1)
    a = u @ to_a + 0.05 * torch.randn(samples, length, dim, generator=generator)
    b = u @ to_b + 0.05 * torch.randn(samples, length, dim, generator=generator)
    if shuffled:
        b = b[torch.randperm(samples, generator=generator)]
    return a, b


@pytest.mark.parametrize("shuffled", [False, True])
def test_cross_cpc_falls_on_aligned_sequences_and_not_on_shuffled(shuffled):
    torch.manual_seed(0)
    g, batch = torch.Generator().manual_seed(2), 32
    cpc = CrossCPC(dim=8, context_dim=32, steps=2)
    optimizer = torch.optim.Adam(cpc.parameters(), lr=3e-3)
    for _ in range(150):
        a, b = rotating_pairs(batch, 6, g, shuffled)
        optimizer.zero_grad()
        cpc(a, None, b, None)[0].backward()
        optimizer.step()
    with torch.no_grad():
        a, b = rotating_pairs(batch, 6, g, shuffled)
        loss, accuracy = cpc(a, None, b, None)
    chance = math.log(batch)
    if shuffled:
        assert loss.item() > chance - 0.15 and accuracy.item() < 0.15
    else:
        # measured: 1.72 (chance 3.47), accuracy 0.40 (chance 1/32)
        assert loss.item() < chance - 1.2 and accuracy.item() > 0.25


def test_cross_cpc_ignores_padding():
    torch.manual_seed(0)
    cpc = CrossCPC(dim=4, context_dim=8, steps=1)
    a, b = torch.randn(3, 5, 4), torch.randn(3, 4, 4)
    a_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    b_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    before = cpc(a, a_mask, b, b_mask)[0]
    a2, b2 = a.clone(), b.clone()
    a2[~a_mask], b2[~b_mask] = 99.0, -99.0
    assert torch.allclose(cpc(a2, a_mask, b2, b_mask)[0], before)


def test_reconstruction_ignores_padding():
    torch.manual_seed(0)
    auto = ModalityAutoencoder(hidden_size=6, code_dim=3, specific_dim=4)
    hidden, mask = torch.randn(2, 3, 6), torch.tensor([[True, True, False], [True, False, False]])
    z, s = auto(hidden)
    loss = auto.reconstruction_loss(hidden, z, s, mask)
    changed = hidden.clone()
    changed[~mask] = 50.0
    z2, s2 = auto(changed)
    assert torch.allclose(auto.reconstruction_loss(changed, z2, s2, mask), loss)


def test_reading_order_goes_by_bands_then_left_to_right():
    def box(xc, yc):
        return [xc - 0.05, yc - 0.05, xc + 0.05, yc + 0.05, 0.01]

    geometry = torch.tensor([[box(0.8, 0.1), box(0.5, 0.9), box(0.2, 0.15), box(0.1, 0.5), box(0.5, 0.5)]])
    mask = torch.tensor([[True, True, True, True, False]])
    # bands of 1/3: top: x 0.2 (2), x 0.8 (0); middle: x 0.1 (3); bottom: (1); padded (4) last
    assert reading_order(geometry, mask).tolist() == [[2, 0, 3, 1, 4]]


def test_codebook_state_is_in_the_state_dict():
    book = SharedCodebook(4, 2)
    assert {"embedding", "ema_count", "ema_weight", "unused_steps", "updates"} <= set(book.state_dict())
    with pytest.raises(ValueError, match="decay"):
        SharedCodebook(4, 2, decay=1.0)


def test_the_switches_are_config_keys_saved_with_the_modules():
    from preprocess.config import ConfigError, load_config
    from pretrain.config import PretrainConfig
    from pretrain_runs import TINY

    overrides = ["shards_root=/x", "cmg.enabled=true"]
    fields = load_config(PretrainConfig, TINY, [*overrides, "cmg.multimodal_ema=false"]).cmg.module_fields()
    assert (fields["multimodal_ema"], fields["code_reset"]) == (False, True)
    with pytest.raises(ConfigError, match="cmg.code_reset"):
        load_config(PretrainConfig, TINY, [*overrides, "cmg.code_reset=sometimes"])


def test_a_release_from_before_the_switches_builds_the_papers_modules(tmp_path):
    """A release's ``config.json`` whose ``cmg`` lacks ``multimodal_ema`` and ``code_reset`` (written
    before they existed, so trained with both on) loads with both on; set, they reach the codebook."""
    from pretrain.model import ImageBertConfig, ImageBertForPretraining

    shape = {"num_codes": 4, "code_dim": 2, "decay": 0.9, "dead_after": 3}
    tiny = dict(feature_dim=6, num_region_classes=3, vocab_size=20, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=16)
    ImageBertConfig(**tiny, cmg=shape).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written["cmg"] = shape  # as a release from before the switches has it
    (tmp_path / "config.json").write_text(json.dumps(written))

    loaded = ImageBertConfig.from_pretrained(tmp_path)
    assert loaded.cmg == {**shape, "multimodal_ema": True, "code_reset": True}
    book = ImageBertForPretraining(loaded).cmg.codebook
    assert book.multimodal is True and book.code_reset is True
    ablated = ImageBertConfig(**tiny, cmg={**shape, "multimodal_ema": False, "code_reset": False})
    book = ImageBertForPretraining(ablated).cmg.codebook
    assert book.multimodal is False and book.code_reset is False
    with pytest.raises(ValueError, match="cmg.code_reset must be true or false, got 'no'"):
        ImageBertConfig(**tiny, cmg={**shape, "code_reset": "no"})


def test_cmg_objectives_train_together_and_move_the_codebook_only_in_training():
    torch.manual_seed(0)
    objectives = CMGObjectives(hidden_size=12, num_codes=8, code_dim=4, specific_dim=4, club_hidden=8,
                               cpc_context=8, dead_after=5)
    text, regions = torch.randn(3, 5, 12, requires_grad=True), torch.randn(3, 4, 12, requires_grad=True)
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    region_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    geometry = torch.rand(3, 4, 5)

    objectives.eval()
    before = objectives.codebook.embedding.clone()
    losses, stats = objectives(text, text_mask, regions, region_mask, geometry)
    assert torch.equal(objectives.codebook.embedding, before) and "perplexity" not in stats

    objectives.train()
    losses, stats = objectives(text, text_mask, regions, region_mask, geometry)
    assert set(losses) == {"reconstruction", "commitment", "club", "club_approximation", "cross_cpc", "code_matching"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert not torch.equal(objectives.codebook.embedding, before) and int(objectives.codebook.updates) == 1
    assert 1.0 <= stats["perplexity"].item() <= 8.0
    sum(losses.values()).backward()
    # Every trainable part gets a gradient; the codebook has none to get (buffers only).
    assert all(p.grad is not None for p in objectives.parameters())
    assert not any(True for _ in objectives.codebook.parameters())
    assert text.grad.abs().sum() > 0 and regions.grad.abs().sum() > 0


def test_code_matching_against_a_hand_computation():
    """L_cmcm on two samples, codes (0, 0), (4, 0), (0, 4): soft assignments softmax(-distance),
    averaged over each sample's valid positions; S_ij = P_t,i . log P_r,j + P_r,i . log P_t,j;
    cross-entropy of the diagonal. A sample without regions does not count."""
    codebook = SharedCodebook(3, 2)
    codebook.embedding.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]))
    text = torch.tensor([[[0.5, 0.0], [3.0, 1.0]], [[0.0, 3.5], [9.0, 9.0]], [[1.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    text_mask = torch.tensor([[True, True], [True, False], [True, True]])
    regions = torch.tensor([[[3.5, 0.0]], [[0.0, 4.0]], [[2.0, 2.0]]])
    region_mask = torch.tensor([[True], [True], [False]])  # the third sample has no region

    def distribution(vectors):
        distances = torch.stack([torch.tensor([math.dist(v, c) for c in codebook.embedding.tolist()]) for v in vectors])
        return torch.softmax(-distances, dim=-1).mean(0)

    p_text = torch.stack([distribution(text[0].tolist()), distribution(text[1, :1].tolist())])
    p_regions = torch.stack([distribution(regions[0].tolist()), distribution(regions[1].tolist())])
    scores = torch.tensor([[float((p_text[i] * p_regions[j].log()).sum() + (p_regions[i] * p_text[j].log()).sum())
                            for j in range(2)] for i in range(2)])
    expected = -(scores.diag() - scores.logsumexp(1)).mean()
    loss = code_matching_loss(codebook, text, text_mask, regions, region_mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert text.grad[:2].abs().sum() > 0 and text.grad[2].abs().sum() == 0  # only the counted samples
    # Captions and regions that choose the same codes score lower than the same ones mismatched.
    swapped = code_matching_loss(codebook, text, text_mask, regions[[1, 0, 2]], region_mask)
    assert loss.item() < swapped.item()
    none = code_matching_loss(codebook, text, text_mask, regions, torch.zeros_like(region_mask))
    assert none.item() == 0.0 and none.requires_grad
