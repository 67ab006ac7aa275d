"""Scoring: a trained run applied to a whole store, or to new image files.

Both give one row per image: ``id``, ``pred`` (the mean prediction over the image's views, as
in evaluation), ``pred_std`` (their spread) and, where known, ``mos`` and ``split``. A run of the
``distribution`` target (:mod:`heads.targets`) adds ``pred_opinion_std`` and ``p1``..``p10``, the
mean histogram over the views; ``pred`` is its mean. Scoring
images runs the backbone recorded with the run -- the same net, pooling, views, weights (by
hash), ``max_side`` and precision as the store it was trained on -- and rounds the features to
float16 as the store does, so its numbers equal extracting and then scoring from a store.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from mlsp.atomic import atomic_path
from mlsp.errors import ImageDecodeError, StoreConfigMismatch
from mlsp.extract import FeatureExtractor, collect_inputs
from mlsp.progress import ProgressFactory, null_progress
from mlsp.readahead import decode_ahead
from mlsp.store import FeatureStore

from .run import Run
from .targets import moments, prediction_columns

log = logging.getLogger(__name__)


def check_store_matches(run: Run, store: FeatureStore):
    """A trained head applies only to features of the same net, pooling and channel layout."""
    info = run.store_info
    diff = {}
    for key, have in (("net", store.net), ("pooling", store.pooling), ("block_channels", store.block_channels),
                      ("block_names", store.block_names)):
        if list(np.atleast_1d(info[key])) != list(np.atleast_1d(have)):
            diff[key] = (info[key], have)
    if "net" in diff:  # another net's blocks differ too: the net says it all
        diff = {k: v for k, v in diff.items() if k in ("net", "pooling")}
    if diff:  # "store has X, asked for Y": Y is what the run was trained on
        raise StoreConfigMismatch(
            store.path, {k: (b, a) for k, (a, b) in diff.items()},
            advice=f"The run {run.path} takes features of its own net and layout: score a store extracted "
                   "that way, or the images themselves (mlsp score RUN --images DIR).")
    for key in ("weights_sha256", "preprocessing", "crop_fraction", "precision", "max_side"):
        a, b = info["config"].get(key), store.attrs.get(key)
        if a != b:
            log.warning("%s: %s differs from the run's store (%r, store has %r); scores may not be comparable",
                        store.path, key, a, b)


def _frame(ids, columns: dict, mos=None, split=None, paths=None):
    import pandas as pd

    data = {"id": list(ids), **{k: np.asarray(v, np.float64) for k, v in columns.items()}}
    if paths is not None:
        data["path"] = list(paths)
    if mos is not None:
        data["mos"] = np.asarray(mos, np.float64)
    if split is not None:
        data["split"] = list(split)
    return pd.DataFrame(data)


def view_predictions(model, features: np.ndarray) -> np.ndarray:
    """(n, V, ...) features -> (n, V) predictions in one call; (n, V, K) for a head of K outputs."""
    n, v = features.shape[:2]
    flat = features.reshape((n * v,) + features.shape[2:])
    pred = np.asarray(model.predict_on_batch(flat), np.float64).reshape(n, v, -1)
    return pred[..., 0] if pred.shape[-1] == 1 else pred


def score_columns(p: np.ndarray) -> dict:
    """(n, V) or (n, V, K) view predictions -> the score columns: ``pred`` and ``pred_std`` (the
    mean and spread over the views of the MOS), and a histogram's ``pred_opinion_std``, ``p1``..."""
    if p.ndim == 2:
        return {"pred": p.mean(1), "pred_std": p.std(1)}
    columns = prediction_columns(p.mean(1))  # the mean histogram over the views
    return {"pred": columns.pop("pred"), "pred_std": moments(p)[0].std(1), **columns}


def _stack(parts: list) -> dict:
    """Score columns of several batches, one after the other."""
    if not parts:
        return {"pred": [], "pred_std": []}
    return {k: np.concatenate([c[k] for c in parts]) for k in parts[0]}


def score_store(run_dir: str, store_path: str, out: str | None = None, *, batch_images: int = 256,
                progress: ProgressFactory = null_progress, allow_unfinished: bool = False):
    """Score every image of a store with a trained run; returns a pandas DataFrame.
    ``allow_unfinished``: also an interrupted or diverged run (:meth:`heads.run.Run.open`)."""
    run = Run.open(run_dir, allow_unfinished=allow_unfinished)
    model = run.load_model()
    with FeatureStore(store_path) as store:
        check_store_matches(run, store)
        n = store.n_images
        parts = []
        bar = progress(total=n, desc="score", unit="img")
        try:
            for start in range(0, n, batch_images):
                rows = np.arange(start, min(n, start + batch_images))
                parts.append(score_columns(view_predictions(model, store.read(rows))))
                bar.update(len(rows))
        finally:
            bar.close()
        frame = _frame(store.ids, _stack(parts), store.mos, store.split)
    if out:
        _write_csv(frame, out)
    return frame


def score_images(run_dir: str, inputs: str | Sequence[str], out: str | None = None, *,
                 weights: str | None = None, precision: str | None = None, workers: int = 2,
                 progress: ProgressFactory = null_progress, extractor: FeatureExtractor | None = None,
                 allow_unfinished: bool = False):
    """Score image files with a trained run: backbone, pooling and head, streaming.

    Memory stays bounded (a few decoded images ahead, one image's views in the model). The
    frame has ``id``, ``pred``, ``pred_std`` (and a distribution run's columns) and ``path``.
    Files that cannot be used are skipped and returned as ``errors`` (id, path, reason); they are
    also in the CSV with an empty ``pred`` and the reason in ``error``. Returns ``(frame, errors)``.
    ``allow_unfinished``: also an interrupted or diverged run.
    """
    run = Run.open(run_dir, allow_unfinished=allow_unfinished)
    config = run.extract_config(weights, precision)
    if config.precision != run.store_info["config"].get("precision"):
        log.warning("scoring at %s, the run's store was extracted at %s", config.precision,
                    run.store_info["config"].get("precision"))
    paths, ids, skipped, root = collect_inputs(inputs)
    extractor = extractor or FeatureExtractor(config, cache=True)
    run.check_weights(extractor.weights_record)
    model = run.load_model()
    rows, errors = [], [{"id": os.path.splitext(os.path.basename(p))[0], "path": p, "reason": r} for p, r in skipped]
    bar = progress(total=len(paths), desc="score", unit="img")
    try:
        for (path, image_id), result in decode_ahead(extractor.load_views, list(zip(paths, ids)), workers, 4):
            if isinstance(result, ImageDecodeError):
                errors.append({"id": image_id, "path": path, "reason": result.reason})
            else:
                features = extractor(result[0]).astype(np.float16)  # as stored
                rows.append((image_id, score_columns(view_predictions(model, features[None])), path))
            bar.update(1)
    finally:
        bar.close()
    frame = _frame([r[0] for r in rows], _stack([r[1] for r in rows]), paths=[r[2] for r in rows])
    if out:
        import pandas as pd

        bad = pd.DataFrame({"id": [e["id"] for e in errors], "path": [e["path"] for e in errors],
                            "error": [e["reason"] for e in errors]})
        _write_csv(pd.concat([frame, bad], ignore_index=True) if errors else frame, out)
    return frame, errors


def _write_csv(frame, out: str):
    with atomic_path(out, keep_extension=True) as tmp:  # the extension last: pandas infers compression from it
        frame.to_csv(tmp, index=False, float_format="%.6g")
    log.info("wrote %d rows to %s", len(frame), out)


