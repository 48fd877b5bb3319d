"""The paper's classification metrics (GLUE conventions): accuracy; F1 of the positive class (label 1);
Pearson and Spearman correlation (Spearman = Pearson of the ranks, ties given their average rank); and the
reported combinations: MRPC the mean of F1 and accuracy, STS-B the mean of Pearson and Spearman. Values in
percent, as the paper's tables."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    _same_length(predictions, labels)
    return 100.0 * sum(int(p) == int(y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def f1_positive(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1: 2 TP / (2 TP + FP + FN); 0 when there is no positive prediction or label."""
    _same_length(predictions, labels)
    tp = sum(int(p) == 1 and int(y) == 1 for p, y in zip(predictions, labels, strict=True))
    fp = sum(int(p) == 1 and int(y) != 1 for p, y in zip(predictions, labels, strict=True))
    fn = sum(int(p) != 1 and int(y) == 1 for p, y in zip(predictions, labels, strict=True))
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation x 100; 0 when either side is constant."""
    _same_length(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    return 100.0 * sxy / math.sqrt(sxx * syy)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def task_metrics(metric: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """Every component and the reported ``score`` of ``metric`` (accuracy | f1_accuracy | pearson_spearman)."""
    if metric == "accuracy":
        acc = accuracy(predictions, labels)
        return {"accuracy": acc, "score": acc}
    if metric == "f1_accuracy":
        acc, f1 = accuracy(predictions, labels), f1_positive(predictions, labels)
        return {"accuracy": acc, "f1": f1, "score": (acc + f1) / 2}
    if metric == "pearson_spearman":
        p, s = pearson(predictions, labels), spearman(predictions, labels)
        return {"pearson": p, "spearman": s, "score": (p + s) / 2}
    raise ValueError(f"metric must be accuracy, f1_accuracy or pearson_spearman; got {metric!r}")


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or not len(a):
        raise ValueError(f"need equally long, non-empty predictions and labels; got {len(a)} and {len(b)}")
