"""Metrics (docs/paper.md, "Metrics") and the evaluation of a trained run on a store.

- SRCC (Spearman) and PLCC (Pearson) between predicted and true MOS;
- accuracy of the binary decision at MOS 5 (high quality is MOS > 5, for truth and prediction);
- balanced accuracy: the mean of the recalls of the two classes (of the classes present), since
  plain accuracy rewards predicting the majority (about 70% of AVA's test set is high quality);
- n, the number of images;
- for a run of the ``distribution`` target (:mod:`heads.targets`), on the images with votes
  (``n_votes``): the mean EMD between predicted and true vote histograms, r = 1 (``emd1``) and
  r = 2 (``emd2``, the training loss), and SRCC/PLCC between the predicted and the true opinion
  standard deviation (``std_srcc``, ``std_plcc``). The MOS metrics use the predicted histogram's
  mean, so they compare with the paper's.

A correlation that is undefined (fewer than 2 images, or a constant prediction) is ``None``.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from typing import Mapping

import numpy as np

from mlsp.runtime.atomic import atomic_path, describe_os_error, write_json
from mlsp.errors import ConfigError, StoreError, WriteError
from mlsp.store.read import FeatureStore

from .data import open_features, predict_views
from .run import Run
from .columns import prediction_columns
from .targets import emd, moments, mos_of, vote_histograms

log = logging.getLogger(__name__)

THRESHOLD = 5.0
EVAL_SPLITS = ("val", "test")


def _correlation(name: str, a, b):
    """scipy.stats' ``name`` ("spearmanr", "pearsonr") of a and b; None where undefined."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    from scipy import stats  # here: scipy.stats takes a second to import, every command would pay it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(getattr(stats, name)(a, b)[0])
    return value if np.isfinite(value) else None


def compute_metrics(mos, pred, threshold: float = THRESHOLD) -> dict:
    """``{"srcc", "plcc", "accuracy", "balanced_accuracy", "n"}`` of predictions against true MOS."""
    mos = np.asarray(mos, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if mos.shape != pred.shape or mos.ndim != 1:
        raise ValueError(f"mos and pred must be 1-d and of equal length, received {mos.shape} and {pred.shape}")
    n = int(len(mos))
    if n == 0:
        return {"srcc": None, "plcc": None, "accuracy": None, "balanced_accuracy": None, "n": 0}
    accuracy, balanced = decision_accuracy(mos > threshold, pred > threshold)
    return {
        "srcc": _correlation("spearmanr", mos, pred),
        "plcc": _correlation("pearsonr", mos, pred),
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "n": n,
    }


def decision_accuracy(high, said) -> tuple[float, float]:
    """Accuracy and balanced accuracy (the mean recall of the classes present) of the good/bad
    decisions ``said`` against the truth ``high`` (boolean arrays, not empty)."""
    recalls = [float(np.mean(said[cls] == high[cls])) for cls in (high, ~high) if cls.any()]
    return float(np.mean(said == high)), float(np.mean(recalls))


def distribution_metrics(votes, pred) -> dict:
    """``{"emd1", "emd2", "std_srcc", "std_plcc", "n_votes"}`` of (n, 10) predicted histograms
    against the (n, 10) vote counts, on the images with votes; ``None`` where undefined."""
    truth = vote_histograms(votes)
    ok = np.all(np.isfinite(truth), axis=-1)
    truth, pred = truth[ok], np.asarray(pred, np.float64)[ok]
    if not len(truth):
        return {"emd1": None, "emd2": None, "std_srcc": None, "std_plcc": None, "n_votes": 0}
    std_true, std_pred = moments(truth)[1], moments(pred)[1]
    return {
        "emd1": float(np.mean(emd(truth, pred, 1))),
        "emd2": float(np.mean(emd(truth, pred, 2))),
        "std_srcc": _correlation("spearmanr", std_true, std_pred),
        "std_plcc": _correlation("pearsonr", std_true, std_pred),
        "n_votes": int(len(truth)),
    }


def labelled_split(store: FeatureStore, split: str) -> np.ndarray:
    """Rows of ``split`` with a known MOS."""
    idx = store.split_indices(split)
    return idx[np.isfinite(store.mos[idx])]


def write_outputs(out_dir: str, store: FeatureStore, predictions: Mapping[str, tuple],
                  threshold: float = THRESHOLD) -> dict:
    """Write ``metrics.json``, ``predictions.csv`` and ``predictions.png`` for {split: (rows, pred)}.

    ``pred``: (n,) MOS, or (n, 10) histograms (the ``distribution`` target), which add the
    distribution's metrics and the columns ``opinion_std`` (true, from the votes; empty without),
    ``pred_opinion_std`` and ``p1``..``p10``. Returns the metrics, ``{split: {...}}``.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise WriteError(out_dir, describe_os_error(exc), "nothing was written") from exc
    metrics, results = {}, {}
    header, rows_out = ["id", "split", "mos", "pred"], []
    for split, (rows, pred) in predictions.items():
        mos = store.mos[rows].astype(np.float64)
        metrics[split] = compute_metrics(mos, mos_of(pred), threshold)
        columns = prediction_columns(pred)
        if np.ndim(pred) == 2:
            votes = store.votes[rows]
            metrics[split].update(distribution_metrics(votes, pred))
            columns = {"pred": columns.pop("pred"), "opinion_std": moments(vote_histograms(votes))[1], **columns}
        results[split] = (mos, columns["pred"])
        header = ["id", "split", "mos", *columns]
        rows_out += [[store.ids[r], split, m, *values] for r, m, *values in zip(rows, mos, *columns.values())]
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    with (atomic_path(os.path.join(out_dir, "predictions.csv")) as tmp,
          open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle):  # ids not UTF-8: bytes
        writer = csv.writer(handle)
        writer.writerow(header)
        for image_id, split, *values in rows_out:
            writer.writerow([image_id, split, *("" if not np.isfinite(v) else f"{v:.6g}" for v in values)])
    from .plots import plot_predictions

    plot_predictions(os.path.join(out_dir, "predictions.png"), results, metrics, threshold)
    for split, m in metrics.items():
        log.info("%s: %s", split, ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in m.items()))
    return metrics


def evaluate(run_dir: str, store: str | None = None, *, out: str | None = None,
             memory_budget: int | None = None) -> dict:
    """Recompute a run's metrics on val and test: its own store, or another one with the same layout.

    Loads ``model.keras`` (safe_mode), predicts the mean over all stored views of each labelled
    val and test image and writes ``metrics.json``, ``predictions.csv`` and ``predictions.png`` to
    ``out``: by default the run folder for its own store, ``RUN_DIR/eval-<store>-<fingerprint>``
    for another store. Returns ``{split: metrics}``.
    """
    run = Run.open(run_dir, finished=False)
    config = run.config
    store_path = store or config["store"]["path"]
    model = run.load_model()
    with FeatureStore(store_path) as s:
        want = tuple(model.input_shape[1:])
        if tuple(s.feature_shape) != want:
            raise ConfigError(
                f"{store_path}: features of shape {tuple(s.feature_shape)} per view ({s.net}, {s.pooling}), "
                f"but the model of {run_dir} takes {want} (trained on {config['store']['net']}, "
                f"{config['store']['pooling']})"
            )
        if list(s.block_channels) != list(config["store"]["block_channels"]):
            raise ConfigError(f"{store_path}: another block layout than the store the model was trained on")
        same = s.fingerprint() == config["store"].get("fingerprint")
        if not same:
            log.warning("evaluating on %s, not the store the run was trained on (%s)", store_path,
                        config["store"]["path"])
        rows = {split: labelled_split(s, split) for split in EVAL_SPLITS}
        rows = {k: v for k, v in rows.items() if len(v)}
        if not rows:
            raise StoreError(f"{store_path}: no labelled val or test images to evaluate on")
        source = open_features(s, np.concatenate(list(rows.values())), memory_budget=memory_budget)
        try:
            predictions = {split: (r, predict_views(model, source, r)) for split, r in rows.items()}
        finally:
            source.close()
        if out is None:
            stem = os.path.splitext(os.path.basename(store_path))[0]
            out = run_dir if same else os.path.join(run_dir, f"eval-{stem}-{s.fingerprint()}")
        metrics = write_outputs(out, s, predictions)
    log.info("wrote metrics and predictions to %s", out)
    return metrics
