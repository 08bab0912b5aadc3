"""Task metrics against hand-computed examples (retrieval: tests/test_retrieval.py)."""

import pytest
import torch

from finetune.metrics import classification_metrics, entity_metrics, entity_spans, multilabel_metrics


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
