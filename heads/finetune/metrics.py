"""The metrics of a fine-tuned run (and of ``mlsp compare``): mlsp's own (:mod:`heads.evaluation`:
SRCC, PLCC, accuracy and balanced accuracy at MOS 5, the EMD of a distribution) and those of the
binary classifiers' papers: accuracy, balanced accuracy and the area under the ROC curve of the
good/bad decision, on the images whose MOS is at least ``delta`` from 5 (the images in between
are left out, as the papers do).

A run's *score* of an image is its predicted MOS (``mos``, ``distribution``: the histogram's
mean) or, for a ``binary`` run, the probability that the image is good; the decision is the score
above 5, or above 0.5.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..evaluation import THRESHOLD, compute_metrics, decision_accuracy, distribution_metrics
from ..targets import mos_of

DECISION = {"binary": 0.5}  # a binary run's score is a probability; the others' a MOS (decided at THRESHOLD)


def auc(positive, score) -> float | None:
    """Area under the ROC curve of ``score`` for the boolean ``positive``: the probability that a
    positive outscores a negative, ties counting half (Mann-Whitney U over the average ranks);
    None without both classes."""
    positive = np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return None
    ranks = stats.rankdata(np.asarray(score, np.float64))
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def binary_metrics(mos, score, decision: float, delta: float = 0.0) -> dict:
    """``accuracy``, ``balanced_accuracy`` and ``auc`` of good (MOS > 5) against ``score >
    decision``, on the images with ``|MOS - 5| >= delta`` (``n_binary`` of them)."""
    mos, score = np.asarray(mos, np.float64), np.asarray(score, np.float64)
    keep = np.isfinite(mos) & np.isfinite(score) & (np.abs(mos - THRESHOLD) >= delta)
    high, said = mos[keep] > THRESHOLD, score[keep] > decision
    if not keep.any():
        return {"accuracy": None, "balanced_accuracy": None, "auc": None, "n_binary": 0}
    accuracy, balanced = decision_accuracy(high, said)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "auc": auc(high, score[keep]),
            "n_binary": int(keep.sum())}


def score_of(target: str, pred) -> np.ndarray:
    """A run's score per image (see the module's docstring) from its output (n,), (n, 2), (n, 10)."""
    pred = np.asarray(pred, np.float64)
    if target == "binary":
        return pred[:, 1] if pred.ndim == 2 else pred
    return mos_of(pred[:, 0] if pred.ndim == 2 and pred.shape[1] == 1 else pred)


def run_metrics(target: str, mos, pred, votes=None, delta: float = 0.0) -> dict:
    """Every metric of one split: SRCC and PLCC of the score against the MOS (all images), the
    binary ones (:func:`binary_metrics`), and a distribution's EMD (``votes`` given)."""
    score = score_of(target, pred)
    mos = np.asarray(mos, np.float64)
    ok = np.isfinite(score) & np.isfinite(mos)
    base = compute_metrics(mos[ok], score[ok])
    metrics = {"srcc": base["srcc"], "plcc": base["plcc"], "n": base["n"],
               **binary_metrics(mos[ok], score[ok], DECISION.get(target, THRESHOLD), delta)}
    if target == "distribution" and votes is not None:
        metrics.update(distribution_metrics(np.asarray(votes)[ok], np.asarray(pred)[ok]))
    return metrics
