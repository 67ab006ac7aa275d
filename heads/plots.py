"""PNG plots (matplotlib, Agg backend): of a run, predicted against true MOS, the loss curves and
the learning rate; a histogram of scores (for :mod:`heads.report.build`); the gain of personalisation
per person. Each writes ``path``, or with ``path=None`` returns the PNG's bytes."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from mlsp.runtime.atomic import atomic_path

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_predictions(path: str | None, results: Mapping[str, tuple], metrics: Mapping[str, dict] | None = None,
                     threshold: float = 5.0):
    """One panel per split: predicted (y) against true (x) MOS, the diagonal and the threshold."""
    plt = _pyplot()
    splits = [s for s in results if len(results[s][0])]
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5 * max(1, len(splits)), 5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        mos, pred = (np.asarray(v, dtype=float) for v in results[split])
        lo = float(np.nanmin([mos.min(), pred.min(), 1.0]))
        hi = float(np.nanmax([mos.max(), pred.max(), 10.0]))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, zorder=1)
        ax.axvline(threshold, color="0.85", lw=1, zorder=0)
        ax.axhline(threshold, color="0.85", lw=1, zorder=0)
        ax.scatter(mos, pred, s=4 if len(mos) > 2000 else 10, alpha=0.5, zorder=2)
        title = f"{split} (n={len(mos)})"
        m = (metrics or {}).get(split)
        if m:
            parts = [f"{k.upper()} {m[k]:.3f}" for k in ("srcc", "plcc") if m.get(k) is not None]
            if m.get("accuracy") is not None:
                parts.append(f"acc {100 * m['accuracy']:.1f}%")
            title += "\n" + ", ".join(parts)
        ax.set_title(title)
        ax.set_xlabel("true MOS")
        ax.set_ylabel("predicted MOS")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
    return _save(fig, path)


def plot_history(path: str | None, history: Sequence[Mapping], events: Sequence[Mapping] = ()):
    """Training and validation loss per epoch (log scale), LR changes as vertical lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = [int(r["epoch"]) for r in history]
    for key, label in (("loss", "train loss (one random view)"), ("val_loss", "val loss (mean over views)")):
        values = [float(r[key]) if r.get(key) is not None else np.nan for r in history]
        ax.plot(epochs, values, marker="o", ms=3, label=label)
    for event in events:
        ax.axvline(event["epoch"] + 0.5, color="0.7", ls="--", lw=1)
        ax.text(event["epoch"] + 0.5, 1.0, f" lr {event['to']:.0e}", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8, color="0.4")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    positive = [float(r[k]) for r in history for k in ("loss", "val_loss")
                if r.get(k) is not None and np.isfinite(float(r[k])) and float(r[k]) > 0]
    if positive:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_lr(path: str | None, history: Sequence[Mapping]):
    """The learning rate per epoch (log scale), from ``history.csv``'s ``lr`` column."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    rows = [r for r in history if r.get("lr") is not None]
    ax.step([int(r["epoch"]) for r in rows], [float(r["lr"]) for r in rows], where="mid", marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    if rows and min(float(r["lr"]) for r in rows) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_score_histogram(path: str | None, scores, label: str = "predicted MOS"):
    """How the scores spread: a histogram over the finite ones."""
    plt = _pyplot()
    scores = np.asarray(scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(scores, bins=min(50, max(5, int(np.sqrt(len(scores))))), color="#3b6ea8", edgecolor="white", lw=0.5)
    ax.set_xlabel(label)
    ax.set_ylabel("photos")
    ax.set_title(f"n = {len(scores):,}")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _save(fig, path: str | None):
    """PNG under a temporary name, renamed when complete (:mod:`mlsp.runtime.atomic`); ``path=None``:
    the PNG's bytes."""
    import io

    plt = _pyplot()
    fig.tight_layout()
    try:
        if path is None:
            buffer = io.BytesIO()
            fig.savefig(buffer, dpi=100, format="png")
            return buffer.getvalue()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def plot_gain_per_person(path: str | None, people):
    """Each person's mean gain in SRCC of the personal over the generic model (bars, sorted, the
    spread over repeats as error bars), one panel per k. ``people``: a DataFrame with the
    columns k, user, mean, std (:func:`heads.personal.protocol.per_person_gain`)."""
    plt = _pyplot()
    ks = sorted(people["k"].unique()) or [0]
    fig, axes = plt.subplots(len(ks), 1, figsize=(max(6.0, 0.18 * people["user"].nunique() + 2), 3.2 * len(ks)),
                             squeeze=False)
    for ax, k in zip(axes[:, 0], ks):
        at = people[people["k"] == k].sort_values("mean")
        x = np.arange(len(at))
        ax.bar(x, at["mean"], yerr=at["std"].fillna(0), color=np.where(at["mean"] >= 0, "tab:blue", "tab:red"),
               error_kw={"lw": 0.8, "ecolor": "0.4"})
        ax.axhline(0, color="0.3", lw=0.8)
        if len(at):
            ax.axhline(at["mean"].mean(), color="tab:green", lw=1, ls="--", label=f"mean {at['mean'].mean():+.3f}")
            ax.legend(loc="upper left")
        ax.set_xticks(x)
        ax.set_xticklabels(at["user"], rotation=90, fontsize=7)
        ax.set_ylabel("SRCC gain")
        ax.set_title(f"k = {k}: SRCC gain per person (mean over repeats)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)

    return None
