"""Scoring: a trained run applied to a whole store, or to new image files.

Both give one row per image, in the columns of :mod:`heads.columns`. Scoring
images runs the backbone recorded with the run -- the same net, pooling, views, weights (by
hash), ``max_side`` and precision as the store it was trained on -- and rounds the features to
float16 as the store does, so its numbers equal extracting and then scoring from a store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Sequence

import numpy as np

from mlsp.runtime.atomic import atomic_path, write_json
from mlsp.runtime.files import file_sha256
from mlsp.store.config import SCORED_KEYS
from mlsp.errors import ImageDecodeError, ResumeError, StoreConfigMismatch
from mlsp.runtime.jsonlines import JsonLines
from mlsp.extraction.job import ExtractConfig, FeatureExtractor, collect_inputs
from mlsp.runtime.progress import ProgressFactory, null_progress
from mlsp.images.readahead import DECODE_WORKERS, LocalRunner
from mlsp.store.read import SLAB_BYTES, FeatureStore

from ..data import view_predictions
from ..run import Run
from .. import columns

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
    for key in SCORED_KEYS:
        a, b = info["config"].get(key), store.attrs.get(key)
        if a != b:
            log.warning("%s: %s differs from the run's store (%r, store has %r); scores may not be comparable",
                        store.path, key, a, b)


def view_scores(model, features: np.ndarray) -> np.ndarray:
    """(n, V, ...) features -> (n, V) predictions per view (:func:`heads.data.view_predictions`);
    (n, V, K) for a head of K outputs."""
    pred = view_predictions(model, features)
    return pred[..., 0] if pred.shape[-1] == 1 else pred


def score_store(run_dir: str, store_path: str, out: str | None = None, *, batch_images: int | None = None,
                progress: ProgressFactory = null_progress, allow_unfinished: bool = False,
                apply=None):
    """Score every image of a store with a trained run; returns a pandas DataFrame.
    ``allow_unfinished``: also an interrupted or diverged run (:meth:`heads.run.Run.open`).
    Images are read ``batch_images`` at a time; by default as many as fit in
    :data:`mlsp.store.read.SLAB_BYTES` (memory stays bounded whatever the store's width: 9 images of
    irv2 wide with 8 views, 417 of iv3 narrow). ``apply``: (n, V, ...) features -> score columns
    in place of the run's head (:func:`head_columns`), e.g. personal models of this run
    (``mlsp.api.score`` chooses)."""
    run = Run.open(run_dir, allow_unfinished=allow_unfinished)
    if apply is None:
        apply = head_columns(run.load_model())
    return score_features(apply, store_path, out, check=lambda store: check_store_matches(run, store),
                          batch_images=batch_images, progress=progress)


def head_columns(model):
    """A head (a Keras model) as a function: (n, V, ...) features -> the score columns."""
    def apply(features):
        return columns.from_views(view_scores(model, features))

    return apply


def score_features(apply, store_path: str, out: str | None = None, *, check=None, batch_images: int | None = None,
                   progress: ProgressFactory = null_progress):
    """Score every image of a store with ``apply`` ((n, V, ...) features -> score columns, e.g.
    :func:`head_columns`), after ``check(store)`` (which raises where the store does not fit);
    see :func:`score_store`."""
    with FeatureStore(store_path) as store:
        if check is not None:
            check(store)
        n = store.n_images
        batch_images = batch_images or max(1, SLAB_BYTES // store.image_nbytes)
        parts = []
        bar = progress(total=n, desc="score", unit="img")
        try:
            for start in range(0, n, batch_images):
                rows = np.arange(start, min(n, start + batch_images))
                parts.append(apply(store.read(rows)))
                bar.update(len(rows))
        finally:
            bar.close()
        frame = columns.frame(store.ids, columns.stack(parts), store.mos, store.split)
    if out:
        _write_csv(frame, out)
    return frame


class HeadScorer:
    """A head on a backbone's features: one image's views -> its score columns (``pred``,
    ``pred_std``, ...). A processor for :class:`mlsp.images.readahead.LocalRunner` and
    :mod:`mlsp.extraction.cluster` (``info``, ``load_views``, ``process``). Features are rounded to float16
    as the store does."""

    def __init__(self, model, extractor: FeatureExtractor):
        self.model, self.extractor = model, extractor

    def load_views(self, path: str):
        return self.extractor.load_views(path)

    def process(self, views: np.ndarray) -> dict:
        scores = columns.from_views(view_scores(self.model, self.extractor.process(views)[None]))
        return {k: float(v[0]) for k, v in scores.items()}


class ImageScorer(HeadScorer):
    """Backbone, pooling and a run's head (:class:`HeadScorer`), with the run's views."""

    def __init__(self, run_dir: str, config: ExtractConfig, extractor: FeatureExtractor | None = None,
                 allow_unfinished: bool = False):
        self.run = Run.open(run_dir, allow_unfinished=allow_unfinished)
        extractor = extractor or FeatureExtractor(config, cache=True)
        self.run.check_weights(extractor.weights_record)
        self.head_sha256 = file_sha256(self.run.model_path)  # the head as loaded: a retrained run differs
        super().__init__(self.run.load_model(), extractor)

    def info(self) -> dict:
        """What scored the images (``<out>.partial.json``): the run, its head by hash (a run
        retrained into the same folder is another model), the backbone's weights and precision."""
        return {"run": os.path.abspath(self.run.path), "head_sha256": self.head_sha256,
                "weights": self.extractor.weights_record, "precision": self.extractor.config.precision}

    def configuration(self) -> dict:
        """What must be the same on every Ray worker (:mod:`mlsp.extraction.cluster`): the head (by its
        file's hash) and the backbone's configuration."""
        return {"head_sha256": self.head_sha256, **self.extractor.configuration()}


@dataclasses.dataclass(frozen=True)
class ScoreRecipe:
    """How a Ray worker builds an :class:`ImageScorer` (the run folder must be readable there)."""

    run_dir: str
    config: ExtractConfig
    allow_unfinished: bool = False

    def build(self) -> ImageScorer:
        return ImageScorer(self.run_dir, self.config, allow_unfinished=self.allow_unfinished)


def score_images(run_dir: str, inputs: str | Sequence[str], out: str | None = None, *,
                 weights: str | None = None, precision: str | None = None, workers: int = DECODE_WORKERS,
                 progress: ProgressFactory = null_progress, extractor: FeatureExtractor | None = None,
                 allow_unfinished: bool = False, cluster=None):
    """Score image files with a trained run: backbone, pooling and head, streaming.

    Memory stays bounded (a few decoded images ahead, one image's views in the model). The
    frame has ``id``, ``pred``, ``pred_std`` (and a distribution run's columns) and ``path``.
    Files that cannot be used are skipped and returned as ``errors`` (id, path, reason); they are
    also in the CSV with an empty ``pred`` and the reason in ``error``. Returns ``(frame, errors)``.
    ``allow_unfinished``: also an interrupted or diverged run.

    With ``out``, every scored image is appended to ``<out>.partial`` as it comes, so a run that
    is killed resumes with the images not yet scored; the finished CSV (in input order) replaces
    it. ``cluster`` (a :class:`mlsp.extraction.cluster.Cluster`) scores on its Ray workers instead of here.
    """
    run = Run.open(run_dir, allow_unfinished=allow_unfinished)
    config = run.extract_config(weights, precision)
    if config.precision != run.store_info["config"].get("precision"):
        log.warning("scoring at %s, the run's store was extracted at %s", config.precision,
                    run.store_info["config"].get("precision"))
    if cluster is not None:
        runner = cluster.runner(ScoreRecipe(os.path.abspath(run_dir), config, allow_unfinished))
    else:
        runner = LocalRunner(ImageScorer(run_dir, config, extractor, allow_unfinished), workers)
    return score_files(runner, inputs, out, progress=progress)


def score_files(runner, inputs: str | Sequence[str], out: str | None = None, *,
                progress: ProgressFactory = null_progress):
    """Score image files with a runner (:class:`mlsp.images.readahead.LocalRunner` or a Ray cluster's)
    over a scoring processor (:class:`ImageScorer`, or a pretrained model's); see
    :func:`score_images`. Returns ``(frame, errors)``."""
    paths, ids, skipped, root = collect_inputs(inputs)
    partial = _PartialScores(out + ".partial", runner.info()) if out else None
    done = partial.read() if partial else {}  # path -> {"id", "path", "columns" or "error"}
    todo = [(p, i) for p, i in zip(paths, ids) if p not in done]
    if done:
        log.info("%s: %d of %d images already scored; %d to go", partial.path, len(paths) - len(todo), len(paths),
                 len(todo))
    bar = progress(total=len(todo), desc="score", unit="img")
    try:
        for (path, image_id), result in runner.map(todo):
            if isinstance(result, ImageDecodeError):
                row = {"id": image_id, "path": path, "error": result.reason}
            else:
                row = {"id": image_id, "path": path, "columns": result[1]}
            done[path] = row
            if partial:
                partial.append(row)
            bar.update(1)
            if runner.postfix():
                bar.set_postfix(runner.postfix(), refresh=False)
    finally:
        bar.close()
        if partial:
            partial.close()
    ordered = [done[p] for p in paths]
    rows = [r for r in ordered if "columns" in r]
    errors = [{"id": os.path.splitext(os.path.basename(p))[0], "path": p, "reason": r} for p, r in skipped]
    errors += [{"id": r["id"], "path": r["path"], "reason": r["error"]} for r in ordered if "error" in r]
    names = list(rows[0]["columns"]) if rows else columns.names()
    frame = columns.frame([r["id"] for r in rows], {k: [r["columns"][k] for r in rows] for k in names},
                          paths=[r["path"] for r in rows])
    if out:
        import pandas as pd

        bad = pd.DataFrame({columns.ID: [e["id"] for e in errors], columns.PATH: [e["path"] for e in errors],
                            columns.ERROR: [e["reason"] for e in errors]})
        _write_csv(pd.concat([frame, bad], ignore_index=True) if errors else frame, out)
        partial.remove()
    return frame, errors


class _PartialScores:
    """``<out>.partial``: one JSON line per scored image, appended and flushed as it comes (a line
    cut by a kill is dropped on reading, and its image scored again), and
    ``<out>.partial.json``: what scored them (the run, its head's hash, the weights, the
    precision). A rerun with another run, a retrained head, other weights or precision is
    refused, not mixed in; so is a damaged file, in one line that says what to do."""

    def __init__(self, path: str, info: dict):
        self.path, self.meta = path, path + ".json"
        self.restart = (f"delete {self.path} and {self.meta} to score every image again, "
                        "or write to another --out")
        self.info = json.loads(json.dumps(info, default=str))
        if os.path.exists(self.meta):
            have = self._read_meta()
            diff = {k: (have.get(k), self.info.get(k)) for k in sorted(set(have) | set(self.info))
                    if have.get(k) != self.info.get(k)}
            if diff:
                raise StoreConfigMismatch(self.path, diff, advice=f"Its images were scored by another model: "
                                                                  f"{self.restart}.")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_json(self.meta, self.info)
        self.rows = JsonLines(path)

    def damaged(self, path: str, what: str) -> ResumeError:
        return ResumeError(f"{path}: {what}; the scores of an interrupted run cannot be trusted: {self.restart}")

    def _read_meta(self) -> dict:
        try:
            with open(self.meta) as handle:
                have = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.damaged(self.meta, f"damaged ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(have, dict):
            raise self.damaged(self.meta, "damaged (not a JSON object)")
        return have

    def read(self) -> dict:
        """{path: row} of the lines complete on disk (:class:`mlsp.runtime.jsonlines.JsonLines`)."""
        try:
            lines = self.rows.read()
        except UnicodeDecodeError:
            raise self.damaged(self.path, "damaged (not text)") from None
        rows = {}
        for number, value in lines:
            row = _partial_row(value)
            if row is None:
                raise self.damaged(self.path, f"line {number} is not a scored image (damaged)")
            rows[row["path"]] = row
        return rows

    def append(self, row: dict):
        self.rows.append(row)

    def close(self):
        self.rows.close()

    def remove(self):
        self.rows.remove()
        if os.path.exists(self.meta):
            os.remove(self.meta)


def _partial_row(row) -> dict | None:
    """One line of ``<out>.partial`` (its JSON value) as its row, or None when it is not one."""
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("id"), str):
        return None
    columns = row.get("columns")
    if isinstance(columns, dict) and columns and all(isinstance(v, (int, float)) for v in columns.values()):
        return row
    return row if isinstance(row.get("error"), str) and columns is None else None


def _write_csv(frame, out: str):
    with atomic_path(out, keep_extension=True) as tmp:  # the extension last: pandas infers compression from it
        frame.to_csv(tmp, index=False, float_format="%.6g", errors="surrogateescape")  # names not UTF-8: their bytes
    log.info("wrote %d rows to %s", len(frame), out)


