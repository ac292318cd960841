"""Evaluation metrics against figures worked out by hand, and the direction table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sweeper import record
from sweeper.finetune import metrics

# Two classes. Gold 1 1 1 1 0 0 0 0 0 0 against these predictions gives
# TP 3, FN 1, FP 2, TN 4.
GOLD = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PRED = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])

# Three classes: per class (tp, fp, fn) is (1, 1, 1), (2, 1, 0), (1, 0, 1).
GOLD3 = np.array([0, 0, 1, 1, 2, 2])
PRED3 = np.array([0, 1, 1, 1, 2, 0])


def test_accuracy_is_the_share_of_right_predictions() -> None:
    assert metrics.compute(PRED, GOLD, 0.0, 2)["accuracy"] == pytest.approx(7 / 10)
    assert metrics.compute(PRED3, GOLD3, 0.0, 3)["accuracy"] == pytest.approx(4 / 6)


def test_f1_of_two_classes_is_that_of_class_one_as_glue_reports_it() -> None:
    f1 = metrics.compute(PRED, GOLD, 0.0, 2)["f1"]
    assert f1 == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 2TP / (2TP + FP + FN) = 6/9
    macro = (6 / 9 + 2 * 4 / (2 * 4 + 1 + 2)) / 2
    assert f1 != pytest.approx(macro), "not the mean over both classes"


def test_f1_of_more_classes_is_the_macro_mean() -> None:
    f1 = metrics.compute(PRED3, GOLD3, 0.0, 3)["f1"]
    assert f1 == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)


def test_f1_is_zero_when_class_one_is_never_predicted_right() -> None:
    assert metrics.compute(np.zeros(4, dtype=int), np.array([1, 0, 1, 0]), 0.0, 2)["f1"] == 0.0


def test_matthews_of_two_classes_is_the_classic_coefficient() -> None:
    tp, fn, fp, tn = 3, 1, 2, 4
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 10 / sqrt(600)
    assert metrics.compute(PRED, GOLD, 0.0, 2)["matthews"] == pytest.approx(expected)


def test_matthews_of_more_classes_follows_gorodkin() -> None:
    # Rows (gold) sum to t = 2 2 2, columns (predicted) to p = 2 3 1; 4 of 6 on the diagonal:
    # (4*6 - t.p) / sqrt((36 - p.p) (36 - t.t)) = (24 - 12) / sqrt(22 * 24).
    assert metrics.compute(PRED3, GOLD3, 0.0, 3)["matthews"] == pytest.approx(12 / math.sqrt(22 * 24))


def test_matthews_is_one_when_all_right_minus_one_when_all_wrong_zero_for_one_class() -> None:
    assert metrics.compute(GOLD, GOLD, 0.0, 2)["matthews"] == pytest.approx(1.0)
    assert metrics.compute(1 - GOLD, GOLD, 0.0, 2)["matthews"] == pytest.approx(-1.0)
    assert metrics.compute(np.ones_like(GOLD), GOLD, 0.0, 2)["matthews"] == 0.0, "undefined: 0, as sklearn"


def test_loss_is_the_mean_cross_entropy_it_is_given() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    by_hand = float(np.mean([math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)]))
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert loss == pytest.approx(by_hand)
    scores = metrics.compute(logits.argmax(1).numpy(), labels.numpy(), loss, 2)
    assert scores["loss"] == loss


def test_an_empty_split_scores_zero_not_nan() -> None:
    empty = np.array([], dtype=int)
    scores = metrics.compute(empty, empty, 0.0, 2)
    assert (scores["accuracy"], scores["f1"], scores["matthews"]) == (0.0, 0.0, 0.0)


def test_the_direction_table_names_exactly_what_compute_returns() -> None:
    assert set(metrics.METRICS) == set(metrics.compute(PRED, GOLD, 0.5, 2))
    assert set(metrics.METRICS.values()) <= {"maximize", "minimize"}


def _scores(logits: torch.Tensor) -> dict[str, float]:
    """Every metric of a model that gives ``logits`` on the examples of ``GOLD``."""
    loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(GOLD)))
    return metrics.compute(logits.argmax(1).numpy(), GOLD, loss, 2)


@pytest.mark.parametrize("name", sorted(metrics.METRICS))
def test_the_direction_table_agrees_with_which_way_each_metric_improves(name: str) -> None:
    good = _scores(torch.nn.functional.one_hot(torch.tensor(GOLD), 2).float() * 4)  # all right, confidently
    poor = _scores(torch.tensor([[0.0, 0.5] if p else [0.5, 0.0] for p in PRED]))  # PRED: 7 of 10, hedging
    direction = record.direction_of(metrics.METRICS[name])
    assert record.better(good[name], poor[name], direction), (name, good[name], poor[name])
    assert not record.better(poor[name], good[name], direction)
