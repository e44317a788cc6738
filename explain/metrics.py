"""The scorers' metrics, as delphi and OpenAI define them (plain Python: no scikit-learn at run time).

classification  delphi log/result_analysis.py: compute_confusion (prediction >= 0.5 is a yes;
                unparsed rows left out) and compute_classification_metrics (balanced accuracy,
                precision, recall, F1; 0 where a denominator is 0); compute_auc = roc_auc_score
                of truth against the probabilities where they are not NULL.
correlation     OpenAI scoring.correlation_score: Pearson's r of the concatenated true and
                expected values (numpy.corrcoef; NaN where a side is constant).
"""

from __future__ import annotations

import math

CLASSIFICATION = ("balanced_accuracy", "precision", "recall", "f1")


def confusion(truth: list[bool], predictions: list[float | None]) -> dict:
    pairs = [(bool(t), p) for t, p in zip(truth, predictions) if p is not None]
    tp = sum(1 for t, p in pairs if t and p >= 0.5)
    tn = sum(1 for t, p in pairs if not t and p < 0.5)
    fp = sum(1 for t, p in pairs if not t and p >= 0.5)
    fn = sum(1 for t, p in pairs if t and p < 0.5)
    pos = sum(1 for t, _ in pairs if t)
    return dict(tp=tp, tn=tn, fp=fp, fn=fn, total=len(pairs), pos=pos, neg=len(pairs) - pos)


def classification(conf: dict) -> dict:
    tp, tn, fp, pos, neg = conf["tp"], conf["tn"], conf["fp"], conf["pos"], conf["neg"]
    balanced = ((tp / pos if pos > 0 else 0) + (tn / neg if neg > 0 else 0)) / 2
    precision = tp / (tp + fp) if tp + fp > 0 else 0
    recall = tp / pos if pos > 0 else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0
    return dict(balanced_accuracy=balanced, precision=precision, recall=recall, f1=f1)


def roc_auc(truth: list[bool], scores: list[float | None]) -> float | None:
    """Area under the ROC curve (ties count one half), over the pairs whose score is not None; None
    without both classes."""
    pairs = [(bool(t), float(s)) for t, s in zip(truth, scores) if s is not None]
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][1])
    ranks = [0.0] * len(pairs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and pairs[order[j + 1]][1] == pairs[order[i]][1]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    pos = sum(1 for t, _ in pairs if t)
    neg = len(pairs) - pos
    if pos == 0 or neg == 0:
        return None
    rank_sum = sum(r for r, (t, _) in zip(ranks, pairs) if t)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def correlation(true: list[float], predicted: list[float]) -> float:
    n = len(true)
    if n < 2:
        return math.nan
    mt, mp = sum(true) / n, sum(predicted) / n
    st = sum((t - mt) ** 2 for t in true)
    sp = sum((p - mp) ** 2 for p in predicted)
    if st == 0 or sp == 0:
        return math.nan
    return sum((t - mt) * (p - mp) for t, p in zip(true, predicted)) / math.sqrt(st * sp)
