"""Evaluation metrics over a whole split: what a study's ``metric`` may name."""

from __future__ import annotations

import numpy as np

# name -> the direction that is better; a study's `direction` must agree.
METRICS = {"accuracy": "maximize", "f1": "maximize", "matthews": "maximize", "loss": "minimize"}


def compute(predictions: np.ndarray, labels: np.ndarray, loss: float, num_labels: int) -> dict[str, float]:
    """Accuracy, F1 (of class 1 for two classes, as GLUE reports it; macro otherwise),
    Matthews correlation, and the mean cross-entropy ``loss``."""
    accuracy = float((predictions == labels).mean()) if len(labels) else 0.0
    return {
        "accuracy": accuracy,
        "f1": _f1(predictions, labels, num_labels),
        "matthews": _matthews(predictions, labels, num_labels),
        "loss": loss,
    }


def _f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    classes = [1] if num_labels == 2 else list(range(num_labels))
    scores = []
    for c in classes:
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def _matthews(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """The multi-class Matthews correlation (Gorodkin 2004) from the confusion matrix."""
    k = max(num_labels, 1)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (gold, pred), 1.0)
    t, p = confusion.sum(1), confusion.sum(0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return float((c * s - (t * p).sum()) / denominator) if denominator else 0.0
