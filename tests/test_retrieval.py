"""Retrieval recall@K (``pretrain.retrieval``): hand-computed rankings, the tie rule, streaming, two ranks."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.retrieval import hit_probability, recall_at_k
from pretrain_runs import free_port

# 3 images, 6 captions; captions 0,1 belong to image 0, 2,3 to image 1, 4,5 to image 2.
CAPTION_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])
SCORES = torch.tensor(
    [
        # c0   c1   c2   c3   c4    c5
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # image 0: best own caption c0 first            -> hit @1
        [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],  # image 1: c0, c1 above its best own c2           -> hit @3
        [0.1, 0.2, 0.3, 0.4, 0.05, 0.0],  # image 2: c0..c3 above its best own c4          -> hit @5
    ]
)
# Text to image, per caption (own image, candidates above it, tied with it):
# c0 own i0 .9: 0 above -> @1;  c1 own i0 .1: i1 .6, i2 .2 above -> @3;  c2 own i1 .5: i0 .8 above -> @2
# c3 own i1 .1: i0 .2, i2 .4 above -> @3;  c4 own i2 .05: i0 .3, i1 .2 above -> @3
# c5 own i2 .0: i1 .3 above, i0 .0 tied -> @1: 0, @2: 1/2 (the tie goes either way), @3: 1
KS = (1, 2, 3, 5)
EXPECTED = {
    "i2t_r1": 100 / 3, "i2t_r2": 100 / 3, "i2t_r3": 200 / 3, "i2t_r5": 100.0,
    "t2i_r1": 100 / 6, "t2i_r2": 250 / 6, "t2i_r3": 100.0, "t2i_r5": 100.0,
}


def score_from(matrix: torch.Tensor, calls: list | None = None):
    def score_batch(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(len(images))
        return matrix[images, captions]

    return score_batch


@pytest.mark.parametrize("image_block,caption_block,batch_size", [(3, 6, 100), (2, 4, 3), (1, 1, 1)])
def test_hand_computed_example(image_block, caption_block, batch_size):
    out = recall_at_k(score_from(SCORES), CAPTION_IMAGE, 3, batch_size, ks=KS, image_block=image_block,
                      caption_block=caption_block)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value), key
    assert out["rsum"] == pytest.approx(sum(EXPECTED.values()))
    assert (out["num_images"], out["num_captions"]) == (3, 6)


def test_a_constant_scorer_gets_chance_exactly():
    out = recall_at_k(score_from(torch.zeros(3, 6)), CAPTION_IMAGE, 3, 4, ks=KS)
    for k in KS:
        assert out[f"t2i_r{k}"] == pytest.approx(out[f"t2i_r{k}_chance"]) == pytest.approx(100 * min(k, 3) / 3)
        # An image with 2 of 6 captions: P(one of them in a random top k) = 1 - C(4, k) / C(6, k).
        chance = 100 * (1 - math.comb(4, k) / math.comb(6, k)) if k <= 4 else 100.0
        assert out[f"i2t_r{k}"] == pytest.approx(out[f"i2t_r{k}_chance"]) == pytest.approx(chance)


def test_hit_probability_against_enumerating_every_tie_order():
    """Ties as a random order: enumerate every order of the tied candidates and count the hits."""
    for above, tied, positives, k in itertools.product(range(3), range(4), range(1, 3), range(1, 6)):
        candidates = ["neg"] * tied + ["pos"] * positives
        orders = list(itertools.permutations(range(len(candidates))))
        hits = sum(any(candidates[i] == "pos" for i in order[: max(k - above, 0)]) for order in orders)
        expected = hits / len(orders)
        got = hit_probability(torch.tensor([float(above)]), torch.tensor([float(tied)]), torch.tensor([float(positives)]), k)
        assert got.item() == pytest.approx(expected), (above, tied, positives, k)


def test_streams_a_large_gallery_in_blocks():
    # 1,000 images x 5,000 captions with a dot-product scorer: each caption's own image wins.
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
    caption_image = torch.arange(5000) % 1000
    captions = images[caption_image] + 0.01 * torch.randn(5000, 16)
    calls = []

    def score_batch(i, c):
        calls.append(len(i))
        return (images[i] * captions[c]).sum(1)

    out = recall_at_k(score_batch, caption_image, 1000, 10**6, image_block=250, caption_block=1000)
    assert out["i2t_r1"] == 100.0 and out["t2i_r1"] == 100.0
    # The positives once, then every pair once, never more than one block at a time.
    assert sum(calls) == 5000 + 1000 * 5000 and max(calls) == 250 * 1000


def test_every_image_needs_a_caption():
    with pytest.raises(ValueError, match="every one of the 3 images needs at least one caption"):
        recall_at_k(score_from(SCORES), torch.tensor([0, 0, 1]), 3, 4)


def _two_ranks(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    calls = []
    results[rank] = (recall_at_k(score_from(SCORES, calls), CAPTION_IMAGE, 3, 4, ks=KS), calls)
    dist.destroy_process_group()


def test_two_ranks_share_the_forwards_and_agree():
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(port, results), nprocs=2)
    (out0, calls0), (out1, calls1) = results[0], results[1]
    assert out0 == out1 == pytest.approx(recall_at_k(score_from(SCORES), CAPTION_IMAGE, 3, 4, ks=KS))
    # Batches of 4 pairs: the 6 positives are 2 batches, the 18 gallery pairs 5. Each rank runs
    # the same number of forwards (ZeRO-3 gathers the parameters in each): rank 1 pads its 3
    # with one it discards.
    assert len(calls0) == len(calls1) == 4
    assert sum(calls0) + sum(calls1) == 6 + 18 + 4
