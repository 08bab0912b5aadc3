"""Task metrics against hand-computed examples and brute-force references."""

import itertools

import pytest
import torch

from finetune.metrics import (
    RunningTopK,
    classification_metrics,
    entity_metrics,
    entity_spans,
    multilabel_metrics,
    retrieval_recall,
)

# 3 images, 6 captions; captions 0,1 belong to image 0, 2,3 to image 1, 4,5 to image 2.
CAPTION_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])
SCORES = torch.tensor(
    [
        # c0   c1   c2   c3   c4   c5
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # image 0: best caption c0 (its own)      -> i2t hit @1
        [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],  # image 1: ranks c0,c1,c2 -> own c2 at 3  -> hit @5 only
        [0.1, 0.2, 0.3, 0.4, 0.05, 0.0],  # image 2: own c4,c5 ranked 5th, 6th     -> hit @5 only
    ]
)
# Text to image (column-wise): c0 -> [i0 .9, i1 .7, i2 .1] own i0 rank1
# c1 -> [i1 .6, i2 .2, i0 .1] own i0 rank3;  c2 -> [i0 .8, i1 .5, i2 .3] own i1 rank2
# c3 -> [i2 .4, i0 .2, i1 .1] own i1 rank3;  c4 -> [i0 .3, i1 .2, i2 .05] own i2 rank3
# c5 -> [i1 .3, i0 .0, i2 .0] own i2 rank3 (tie with i0 broken by lower index first)
KS = (1, 2, 3, 5)
EXPECTED = {
    "i2t_r1": 100 / 3, "i2t_r2": 100 / 3, "i2t_r3": 200 / 3, "i2t_r5": 100.0,
    "t2i_r1": 100 / 6, "t2i_r2": 200 / 6, "t2i_r3": 100.0, "t2i_r5": 100.0,
}


def _score_block(image_ids, caption_ids):
    return SCORES[image_ids][:, caption_ids]


@pytest.mark.parametrize("image_chunk,caption_chunk", [(3, 6), (2, 4), (1, 1)])
def test_retrieval_recall_matches_hand_computed_example(image_chunk, caption_chunk):
    out = retrieval_recall(
        _score_block, CAPTION_IMAGE, 3, ks=KS, image_chunk=image_chunk, caption_chunk=caption_chunk
    )
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value), key
    assert out["rsum"] == pytest.approx(sum(EXPECTED.values()))


def test_running_topk_equals_full_sort_on_random_scores():
    torch.manual_seed(0)
    scores = torch.randn(7, 50)
    top = RunningTopK(7, 5)
    for c0 in range(0, 50, 13):
        cols = torch.arange(c0, min(c0 + 13, 50))
        top.update(torch.arange(7), scores[:, cols], cols)
    expected = scores.topk(5, dim=1)
    assert torch.equal(top.indices, expected.indices)
    assert torch.allclose(top.scores, expected.values)


def test_retrieval_streams_a_large_test_set_without_the_full_matrix():
    # 1,000 x 5,000 with a dot-product scorer: the answer is known (each caption's own image wins).
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
    caption_image = torch.arange(5000) % 1000
    captions = images[caption_image] + 0.01 * torch.randn(5000, 16)
    seen = []

    def block(i, c):
        seen.append(len(i) * len(c))
        return images[i] @ captions[c].T

    out = retrieval_recall(block, caption_image, 1000, image_chunk=250, caption_chunk=1000)
    assert out["i2t_r1"] == 100.0 and out["t2i_r1"] == 100.0
    assert max(seen) == 250 * 1000 and sum(seen) == 1000 * 5000


def test_classification_metrics():
    pred = torch.tensor([0, 1, 1, 2, 2, 2])
    true = torch.tensor([0, 1, 2, 2, 2, 0])
    out = classification_metrics(pred, true, num_classes=4)
    assert out["accuracy"] == pytest.approx(400 / 6)
    # class 0: tp1 fp0 fn1 -> 2/3; class1: tp1 fp1 fn0 -> 2/3; class2: tp2 fp1 fn1 -> 2/3; class3: 0
    assert out["macro_f1"] == pytest.approx(100 * (2 / 3 * 3) / 4)


def test_multilabel_metrics_hand_computed():
    pred = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    true = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 0]])
    out = multilabel_metrics(pred, true)
    # totals: tp=3 (00,11,20) fp=2 (02,21) fn=1 (12) -> micro 6/9
    assert out["micro_f1"] == pytest.approx(100 * 6 / 9)
    # class0 tp2 -> 1; class1 tp1 fp1 -> 2/3; class2 fp1 fn1 -> 0
    assert out["macro_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    # supports 2,1,1
    assert out["weighted_f1"] == pytest.approx(100 * (2 * 1 + 2 / 3) / 4)
    # samples: s0 tp1 fp1 -> 2/3; s1 tp1 fn1 -> 2/3; s2 tp1 fp1 -> 2/3
    assert out["samples_f1"] == pytest.approx(100 * 2 / 3)
    assert out["exact_match"] == 0.0


def test_entity_spans_follow_conlleval():
    tags = ["B-OBJ", "I-OBJ", "O", "I-OBJ", "I-OBJ", "B-OBJ", "B-OBJ", "I-OBJ"]
    assert entity_spans(tags) == {(0, 2, "OBJ"), (3, 5, "OBJ"), (5, 6, "OBJ"), (6, 8, "OBJ")}
    assert entity_spans(["B-A", "I-B"]) == {(0, 1, "A"), (1, 2, "B")}


def test_entity_metrics():
    gold = [["B-OBJ", "I-OBJ", "O", "B-OBJ"], ["O", "B-OBJ"]]
    pred = [["B-OBJ", "I-OBJ", "O", "O"], ["B-OBJ", "I-OBJ"]]
    out = entity_metrics(pred, gold)
    # gold 3 entities, predicted 2, correct 1
    assert out["precision"] == pytest.approx(50.0)
    assert out["recall"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    with pytest.raises(ValueError, match="sequence 0"):
        entity_metrics([["O"]], [["O", "O"]])
