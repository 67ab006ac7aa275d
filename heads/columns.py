"""The scores CSV's columns: one schema for ``mlsp score`` (a store or image files, a run or a
released model), for personal scores and for the report that reads them (docs/scoring.md).

A row per image: ``id``; ``pred`` (the mean prediction over the image's views, the MOS 1-10) and
``pred_std`` (its spread over the views); a head of the ``distribution`` target adds
``pred_opinion_std`` (how much people would disagree) and ``p1``..``p10`` (the mean predicted
histogram; ``pred`` is its mean); personal models add ``pred_<user>``; then, where known,
``path`` (scored files), ``mos`` and ``split`` (a store's). Files that could not be scored keep
their row with an empty ``pred`` and the reason in ``error``.
"""

from __future__ import annotations

import numpy as np

from mlsp.store.labels import N_BINS

from .targets import moments

ID, PRED, PRED_STD, OPINION_STD = "id", "pred", "pred_std", "pred_opinion_std"
PATH, MOS, SPLIT, ERROR = "path", "mos", "split", "error"
BINS = tuple(f"p{k}" for k in range(1, N_BINS + 1))
REQUIRED = (ID, PRED)  # what makes a CSV a scores file (mlsp report)
#: how help texts name the columns
SUMMARY = f"{ID}, {PRED}, {PRED_STD}[, {OPINION_STD}, {BINS[0]}..{BINS[-1]}][, {MOS}, {SPLIT}]"


def names(outputs: int = 1) -> list[str]:
    """The score columns of a head with ``outputs`` outputs (1: the MOS; N_BINS: a histogram)."""
    return [PRED, PRED_STD] if outputs == 1 else [PRED, PRED_STD, OPINION_STD, *BINS]


def user_column(user: str) -> str:
    """A person's column (``mlsp score --user``)."""
    return f"{PRED}_{user}"


def prediction_columns(pred) -> dict:
    """Predictions (n,) of the MOS or (n, N_BINS) histograms -> ``pred``, and for a histogram
    ``pred_opinion_std`` and ``p1``..``p10`` (evaluation's predictions.csv too)."""
    pred = np.asarray(pred, dtype=np.float64)
    if pred.ndim == 1:
        return {PRED: pred}
    mean, std = moments(pred)
    return {PRED: mean, OPINION_STD: std, **{name: pred[:, k] for k, name in enumerate(BINS)}}


def from_views(p: np.ndarray) -> dict:
    """(n, V) or (n, V, K) view predictions -> the score columns: ``pred`` and ``pred_std`` (the
    mean and spread over the views of the MOS), and a histogram's ``pred_opinion_std``, ``p1``..."""
    if p.ndim == 2:
        return {PRED: p.mean(1), PRED_STD: p.std(1)}
    columns = prediction_columns(p.mean(1))  # the mean histogram over the views
    return {PRED: columns.pop(PRED), PRED_STD: moments(p)[0].std(1), **columns}


def stack(parts: list, outputs: int = 1) -> dict:
    """Score columns of several batches, one after the other (none: the empty columns)."""
    if not parts:
        return {name: [] for name in names(outputs)}
    return {k: np.concatenate([c[k] for c in parts]) for k in parts[0]}


def frame(ids, columns: dict, mos=None, split=None, paths=None):
    """The scores as a pandas DataFrame, its columns in the schema's order."""
    import pandas as pd

    data = {ID: list(ids), **{k: np.asarray(v, np.float64) for k, v in columns.items()}}
    if paths is not None:
        data[PATH] = list(paths)
    if mos is not None:
        data[MOS] = np.asarray(mos, np.float64)
    if split is not None:
        data[SPLIT] = list(split)
    return pd.DataFrame(data)
