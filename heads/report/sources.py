"""The kinds of source :mod:`heads.report.build` reports on, each a detector and a page builder
(registered in :data:`heads.report.build.SOURCES`): a scores file, a run folder, a personalisation
evaluation folder."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from mlsp.errors import ConfigError

from .. import columns
from .build import (HISTOGRAM_COLUMNS, report_source, Page, Photos, place_photos, figure, figures, note, section, table)

log = logging.getLogger(__name__)

PERSONALISATION_COLUMNS = ("user", "k", "repeat", "n_adapt", "n_test", "srcc_generic", "srcc_personal")


def _read_csv(path: str, required=()):
    """A CSV as a pandas frame (``id`` and ``user`` as text); a file that cannot be read or lacks
    ``required`` columns is a one-line error."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={"id": str, "user": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(map(str, frame.columns))})")
    return frame


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


# --------------------------------------------------------------------------------------------
# A scores file
# --------------------------------------------------------------------------------------------


def is_scores(path: str) -> bool:
    if not os.path.isfile(path) or not path.lower().endswith((".csv", ".csv.gz")):
        return False
    return True


@report_source('scores', 'a CSV written by mlsp score --out (id, pred, ...)', is_scores)
def scores_page(path: str, *, images, saliency, max_photos, progress, out_dir) -> Page:
    from ..plots import plot_score_histogram

    frame = _read_csv(path, columns.REQUIRED)
    frame = frame.rename(columns={columns.PRED: "score", columns.OPINION_STD: "opinion_std"})
    if columns.PATH in frame:
        base = os.path.dirname(os.path.abspath(path))  # relative paths: from the scores file's folder
        frame["path"] = [p if not isinstance(p, str) or os.path.isabs(p) else os.path.join(base, p)
                         for p in frame["path"]]
    frame = place_photos(frame, images)
    photos = Photos(frame, out_dir).build(max_photos, saliency, progress)
    scored = int(np.isfinite(frame["score"].to_numpy(np.float64)).sum())
    sections = [section("Scores", figures(figure(plot_score_histogram(None, frame["score"]),
                                                 "Histogram of the predicted scores")))]
    if scored < len(frame):
        sections.append(note(f"{len(frame) - scored} files could not be scored; their tiles say why."))
    if all(c in frame for c in HISTOGRAM_COLUMNS):
        sections.append(note("A distribution head: each tile shows the predicted vote histogram (scores 1..10) "
                             "and the opinion spread (its standard deviation)."))
    sections.append(photos.best_and_worst())
    subtitle = f"{path}: {scored:,} photos scored" + (f" of {len(frame):,}" if scored < len(frame) else "")
    return Page(f"Scores: {os.path.basename(path)}", subtitle, sections, photos)


# --------------------------------------------------------------------------------------------
# A run folder
# --------------------------------------------------------------------------------------------


def is_run(path: str) -> bool:
    from ..run import CONFIG_FILE

    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


@report_source('run', 'a run folder of mlsp train (config.json)', is_run)
def run_page(path: str, *, images, saliency, max_photos, progress, out_dir) -> Page:
    from ..run import Run, read_config

    run = Run(path, read_config(os.path.join(path, "config.json")))
    metrics = _read_json(run.file("metrics.json"))
    sections = [_metrics_section(metrics)]
    predictions = run.file("predictions.csv")
    photos = None
    if os.path.isfile(predictions):
        frame = _read_csv(predictions, ("id", "pred", "mos"))  # a distribution run's: also the true opinion_std
        frame = frame.rename(columns={"opinion_std": "true_opinion_std"})
        frame = frame.rename(columns={columns.PRED: "score", columns.OPINION_STD: "opinion_std"})
        if saliency is None and os.path.isdir(run.file("saliency")):
            saliency = run.file("saliency")
        photos = Photos(place_photos(frame, images), out_dir).build(max_photos, saliency, progress)
        sections.append(_charts(run, frame, metrics))
        sections.append(_misses(photos, frame))
        if images is None:
            sections.insert(0, note("Photos: give the folder the run's store was extracted from with --images DIR "
                                    "to see them."))
    else:
        log.warning("%s: no predictions.csv (the run was not evaluated): the report has no photos; "
                    "`mlsp evaluate %s` makes it", path, path)
        sections.insert(0, note(f"No predictions.csv in {path}: the run was not evaluated, so there are no "
                                f"photos or scatter plots here. `mlsp evaluate {path}` makes it."))
        sections.append(_charts(run, None, metrics))
    sections.append(section("Configuration", "<details><summary>config.json</summary><pre>"
                            + _escape(json.dumps(run.config, indent=2, default=str)) + "</pre></details>"))
    head = run.config.get("head", "?")
    store = run.config.get("store", {})
    subtitle = f"{path}: head {head} on {store.get('net', '?')} {store.get('pooling', '')}, status {run.status}"
    return Page(f"Run: {os.path.basename(os.path.normpath(path))}", subtitle, sections, photos)


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _metrics_section(metrics: dict | None) -> str:
    if not metrics:
        return section("Metrics", note("No metrics.json: the run was not evaluated."))
    keys = [k for k in ("srcc", "plcc", "accuracy", "balanced_accuracy", "emd1", "emd2", "std_srcc", "std_plcc", "n")
            if any(k in m for m in metrics.values())]
    return section("Metrics", table(["split", *keys], [[split, *(m.get(k) for k in keys)]
                                                         for split, m in metrics.items()]))


def _charts(run, frame, metrics) -> str:
    from ..plots import plot_history, plot_lr, plot_predictions

    items = []
    if frame is not None:
        results = {split: (part["mos"].to_numpy(float), part["score"].to_numpy(float))
                   for split, part in frame.groupby("split", sort=False)}
        items.append(figure(plot_predictions(None, results, metrics), "Predicted against true MOS"))
    history = run.history()
    if history:
        items.append(figure(plot_history(None, history, run.config.get("lr_changes") or ()), "Loss per epoch"))
        if any("lr" in r for r in history):
            items.append(figure(plot_lr(None, history), "Learning rate per epoch"))
    return section("Training and predictions", figures(*items) if items else note("No history.csv yet."))


def _misses(photos: Photos, frame) -> str:
    """The largest over- and under-predictions of the test split (the val split without one)."""
    split = "test" if (frame["split"] == "test").any() else "val"
    rows = np.flatnonzero((frame["split"] == split).to_numpy())
    error = (frame["score"] - frame["mos"]).to_numpy(np.float64)[rows]
    keep = np.isfinite(error)
    rows, error = rows[keep], error[keep]
    over = rows[np.argsort(-error, kind="stable")][: min(24, int((error > 0).sum()))]
    under = rows[np.argsort(error, kind="stable")][: min(24, int((error < 0).sum()))]
    return (section(f"Largest over-predictions ({split} split)", photos.strip("over", over))
            + section(f"Largest under-predictions ({split} split)", photos.strip("under", under)))


# --------------------------------------------------------------------------------------------
# A personalisation evaluation folder
# --------------------------------------------------------------------------------------------


def is_personalisation(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "evaluation.csv"))


@report_source('personalisation', 'a personalisation evaluation folder (evaluation.csv)', is_personalisation)
def personalisation_page(path: str, *, images, saliency, max_photos, progress, out_dir) -> Page:
    from ..personal.protocol import EVALUATION_CSV, SUMMARY_JSON, per_person_gain
    from ..plots import plot_gain_per_person

    frame = _read_csv(os.path.join(path, EVALUATION_CSV), PERSONALISATION_COLUMNS)
    people = per_person_gain(frame)
    sections = [section("Gain per person", figures(figure(plot_gain_per_person(None, people),
                                                          "Mean SRCC gain of the personal model over the generic one")))]
    summary = _read_json(os.path.join(path, SUMMARY_JSON))
    if summary:
        stats = [s for s in ("people", "repeats", "mean", "std", "min", "max", "srcc_generic", "srcc_personal")
                 if any(isinstance(v, dict) and s in v for v in summary.values())]
        sections.append(section("Summary per k (gain in SRCC)", table(
            ["k", *stats], [[k, *(v.get(s) for s in stats)] for k, v in summary.items() if isinstance(v, dict)])))
    sections.append(section("Per person", table(
        ["person", "k", "mean gain in SRCC", "std over repeats"],
        [[r.user, int(r.k), float(r.mean), float(r.std)] for r in people.sort_values(["user", "k"]).itertuples()])))
    subtitle = f"{path}: {frame['user'].nunique()} people, k = {', '.join(map(str, sorted(frame['k'].unique())))}"
    return Page(f"Personalisation: {os.path.basename(os.path.normpath(path))}", subtitle, sections, None)
