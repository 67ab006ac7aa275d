"""What a head learns to predict: the target registry (no Keras import, so the CLI can list it).

- ``mos`` (the paper's): the head ends in ``Dense(1)``, trained with MSE on the MOS.
- ``distribution`` (NIMA's, beyond the paper): the head ends in ``Dense(10)`` and a softmax,
  a probability for each score 1..10, trained with the EMD (r = 2) against the image's
  normalised vote histogram (the store's ``/votes``). Its predicted MOS is the histogram's mean,
  its predicted opinion standard deviation the histogram's spread: how much people disagree.

Every head takes every target: :func:`heads.models.build_head` gives the head's last layer the
target's ``outputs`` units and appends its activation.

EMD between two histograms ``p``, ``q`` over the ordered scores 1..10 (NIMA, Talebi & Milanfar
2018)::

    EMD_r(p, q) = ( mean_k |CDF_p(k) - CDF_q(k)|^r ) ^ (1/r)

r = 2 is the training loss (:func:`heads.distribution.emd_loss`) and what early stopping and the
LR schedule watch on validation (``val_loss``); r = 1 and r = 2 are both in ``metrics.json``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mlsp.store.labels import N_BINS, SCORES, mos_from_votes
from typing import Callable

from mlsp.registry import Registry


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """One training target: the head's last layer and its loss."""

    name: str
    outputs: int  # units of the head's last layer
    activation: str | None  # applied after it (a stock Keras activation), None: linear
    loss: str | Callable  # a Keras loss name, or a function returning the loss (Keras is imported then)
    description: str

    def resolve_loss(self):
        """What ``model.compile(loss=...)`` takes: the name, or the loss the function returns."""
        return self.loss() if callable(self.loss) else self.loss


TARGETS: Registry[TargetSpec] = Registry("target")
TARGETS.register(TargetSpec("mos", 1, None, "mse", "the mean opinion score; MSE (the paper's)"))
def _emd_loss():
    from .distribution import emd_loss  # the Keras side: imported when training starts

    return emd_loss


TARGETS.register(TargetSpec("distribution", N_BINS, "softmax", _emd_loss,
                            "the histogram of votes over the scores 1..10; EMD r = 2 (NIMA); MOS = its mean, "
                            "opinion std = its spread"))
DEFAULT_TARGET = "mos"


# --------------------------------------------------------------------------------------------
# Histograms
# --------------------------------------------------------------------------------------------


def vote_histograms(votes) -> np.ndarray:
    """(n, 10) vote counts -> (n, 10) histograms summing to 1; rows of NaN where there are no votes."""
    votes = np.asarray(votes, dtype=np.float64)
    total = votes.sum(axis=-1, keepdims=True)
    ok = np.isfinite(total) & (total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, votes / np.where(ok, total, 1.0), np.nan)


def has_votes(votes) -> np.ndarray:
    """(n,) True where an image has a vote histogram."""
    return np.all(np.isfinite(vote_histograms(votes)), axis=-1)


def moments(p) -> tuple:
    """Mean and standard deviation of (..., 10) histograms over the scores 1..10."""
    p = np.asarray(p, dtype=np.float64)
    mean = mos_from_votes(p)
    var = (p @ SCORES**2) / p.sum(axis=-1) - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def emd(p, q, r: int = 2) -> np.ndarray:
    """Per-row EMD_r between (..., 10) histograms ``p`` and ``q`` (see the module's docstring)."""
    cdf = np.cumsum(np.asarray(p, np.float64), axis=-1) - np.cumsum(np.asarray(q, np.float64), axis=-1)
    return np.mean(np.abs(cdf) ** r, axis=-1) ** (1.0 / r)


# --------------------------------------------------------------------------------------------
# What training and evaluation need of a target
# --------------------------------------------------------------------------------------------


def training_labels(spec: TargetSpec, mos, votes) -> np.ndarray:
    """The target of each image: MOS (n,) or vote histograms (n, 10); NaN where unknown."""
    if spec.outputs == 1:
        return np.asarray(mos, dtype=np.float64)
    return vote_histograms(votes)


def initial_bias(spec: TargetSpec, train_labels) -> list:
    """The last layer's bias, so that an untrained head predicts the training mean.

    MOS: the mean training MOS. Distribution: the log of the mean training histogram (less
    its mean), so the softmax starts at that histogram.
    """
    mean = np.mean(np.asarray(train_labels, np.float64), axis=0)
    if spec.outputs == 1:
        return [float(mean)]
    logp = np.log(np.maximum(mean, 1e-4))
    return [float(v) for v in logp - logp.mean()]


def mos_of(pred) -> np.ndarray:
    """The predicted MOS of a head's output: (n,) as is, (n, 10) histograms their mean."""
    pred = np.asarray(pred, dtype=np.float64)
    return pred if pred.ndim == 1 else moments(pred)[0]


def validation_loss(labels, pred) -> float:
    """What the schedule watches: MSE of MOS, or the mean EMD (r = 2) of histograms."""
    labels, pred = np.asarray(labels, np.float64), np.asarray(pred, np.float64)
    if pred.ndim == 1:
        return float(np.mean((pred - labels) ** 2))
    return float(np.mean(emd(labels, pred, 2)))
