"""``mlsp compare``: the test metrics of several runs side by side (MLSP heads and fine-tuned
networks alike), recomputed from each run's ``predictions.csv`` on the one test split they
share; runs whose test splits differ are refused, naming the difference.

Per run: SRCC and PLCC of its score against the MOS; accuracy, balanced accuracy and AUC of the
good/bad decision on the test images at least ``delta`` from MOS 5 (:mod:`heads.finetune.metrics`);
a distribution's EMD (r = 2, from its ``metrics.json``, on the same split); the parameters
trained, the training time and the training images (or stored features) per second. An MLSP
run's time is its head's training only: the features were extracted once before (``mlsp
extract``), a cost every head trained on the store shares.
"""

from __future__ import annotations

import html
import json
import logging
import os
from typing import Sequence

import numpy as np

from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ConfigError

from ..run import FINETUNED, Run
from .metrics import run_metrics

log = logging.getLogger(__name__)
COLUMNS = (("run", "run"), ("method", "method"), ("model", "model"), ("n", "test images"), ("srcc", "SRCC"),
           ("plcc", "PLCC"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("auc", "AUC"),
           ("n_binary", "images decided"), ("emd2", "EMD (r=2)"), ("params_trained", "parameters trained"),
           ("train_seconds", "training time (s)"), ("images_per_second", "training images/s"))
EXAMPLES = 5


def _test_rows(run: Run):
    import pandas as pd

    path = run.file("predictions.csv")
    if not os.path.isfile(path):
        raise ConfigError(f"{run.path} has no predictions.csv: evaluate it first (mlsp evaluate {run.path})")
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False, na_values=[""])
    return frame[frame["split"] == "test"]


def _check_same_split(names: Sequence[str], frames: Sequence):
    """Every run's test split is the first's, or a ConfigError naming the difference."""
    first = set(frames[0]["id"])
    for name, frame in zip(names[1:], frames[1:]):
        ids = set(frame["id"])
        if ids == first:
            continue
        only_a, only_b = sorted(first - ids), sorted(ids - first)
        parts = [f"{len(s)} test images only in {n} (e.g. {', '.join(s[:EXAMPLES])})"
                 for n, s in ((names[0], only_a), (name, only_b)) if s]
        raise ConfigError(f"the test splits of {names[0]} and {name} differ: {'; '.join(parts)}; compare runs "
                          "made from the same images, labels and test list (or test fraction and seed)")


def _describe(run: Run) -> tuple[str, str, int | None]:
    """(method, model, parameters trained) of a run."""
    c = run.config
    if c.get("kind") == FINETUNED:
        f = c["finetune"]
        fc = f" fc {'-'.join(map(str, f['fc']))}" if f.get("fc") else ""
        return "fine-tuned", f"{f['net']}{fc}, {f['target']}, unfreeze {f['unfreeze']}", c.get("params_trained")
    model = run.load_model()
    params = int(sum(int(np.prod(v.shape)) for v in model.trainable_weights))
    store = c["store"]
    return "MLSP", f"{store['net']} {store['pooling']}, {c['head']}, {c.get('target', 'mos')}", params


def run_row(run_dir: str, frame, delta: float) -> dict:
    """One run's row of the comparison."""
    run = Run.open(run_dir, finished=False)
    method, model, params = _describe(run)
    target = run.config.get("target", "mos")
    metrics = run_metrics(target, frame["mos"].to_numpy(np.float64), frame["pred"].to_numpy(np.float64),
                          delta=delta)
    stored = run.config.get("metrics", {}).get("test", {})
    timing = run.config.get("timing", {})
    return {"run": run_dir, "method": method, "model": model, "target": target, **metrics,
            "emd2": stored.get("emd2"), "params_trained": params, "train_seconds": timing.get("seconds"),
            "images_per_second": timing.get("train_samples_per_second")}


def compare(runs: Sequence[str], *, out: str | None = None, delta: float = 0.0) -> list[dict]:
    """The rows of the comparison (see the module's docstring); ``out``: also an HTML page."""
    if len(runs) < 2:
        raise ConfigError("mlsp compare takes at least two runs")
    frames = [_test_rows(Run.open(r, finished=False)) for r in runs]
    if not len(frames[0]):
        raise ConfigError(f"{runs[0]} has no test predictions: its dataset has no test split")
    _check_same_split(list(runs), frames)
    rows = [run_row(r, f, delta) for r, f in zip(runs, frames)]
    if out:
        write_page(out, rows, delta)
    return rows


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "&ndash;"
    if key == "params_trained":
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.1f}" if key in ("train_seconds", "images_per_second") else f"{value:.4f}"
    return html.escape(str(value))


def write_page(out: str, rows: list, delta: float) -> str:
    """One self-contained HTML page of the comparison, written whole."""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{_cell(key, row.get(key))}</td>" for key, _ in COLUMNS) + "</tr>"
                   for row in rows)
    decided = f"at least {delta:g} from MOS 5" if delta else "all test images"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mlsp compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:nth-child(-n+3),th{{text-align:left}}</style>
</head><body>
<h1>Test metrics on one split</h1>
<p>{len(rows)} runs, the same {rows[0]['n']} test images. Accuracy, balanced accuracy and AUC: good is MOS &gt; 5,
on {decided}. An MLSP run's training time is its head's alone (the features were extracted once before);
its images/s are stored features per second.</p>
<table id="comparison"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<script type="application/json" id="data">{html.escape(json.dumps(rows, default=str), quote=False)}</script>
</body></html>
"""
    with atomic_path(out, keep_extension=True) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(page)
    log.info("wrote %s", out)
    return out
