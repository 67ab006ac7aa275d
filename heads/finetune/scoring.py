"""A fine-tuned run after training: its model saved, its val and test predictions and metrics,
and ``mlsp score --images``, ``mlsp evaluate`` and ``mlsp export`` on it.

A fine-tuned run has no store: it scores image files. Each image is resized to the run's
``size`` x ``size`` (as validation and test were) and scored once. The score columns are those
of a run of the same target: ``pred`` (the MOS; a distribution's mean, with
``pred_opinion_std`` and ``p1``..``p10``; for a ``binary`` run the probability that the image is
good, MOS > 5) and ``pred_std`` (0: one view).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from mlsp.runtime.atomic import atomic_path, write_json
from mlsp.runtime.files import file_sha256
from mlsp.errors import ConfigError
from mlsp.runtime.progress import ProgressFactory, null_progress
from mlsp.images.readahead import DECODE_WORKERS, LocalRunner

from ..run import FINETUNED, Run
from ..columns import prediction_columns
from . import checkpoint
from .config import FinetuneConfig
from .images import LabelledImages, load_whole, predict_files
from .metrics import run_metrics

log = logging.getLogger(__name__)
SPLITS = ("val", "test")


def open_run(run_dir: str, *, finished: bool = True, allow_unfinished: bool = False) -> tuple[Run, FinetuneConfig]:
    """A fine-tuned run and its configuration."""
    run = Run.open(run_dir, finished=finished, allow_unfinished=allow_unfinished)
    if run.config.get("kind") != FINETUNED:
        raise ConfigError(f"{run_dir} is not a fine-tuned run (mlsp finetune)")
    return run, FinetuneConfig.from_dict(run.config["finetune"])


def columns_of(target: str, pred: np.ndarray) -> dict:
    """(n, K) network outputs -> the score columns (see the module's docstring)."""
    if target == "binary":
        columns = {"pred": pred[:, 1]}
    else:
        columns = prediction_columns(pred[:, 0] if pred.shape[1] == 1 else pred)
    return {"pred": columns.pop("pred"), "pred_std": np.zeros(len(pred)), **columns}


def write_outputs(out_dir: str, target: str, data: LabelledImages, predictions: dict, delta: float) -> dict:
    """``metrics.json`` and ``predictions.csv`` (id, split, mos, the score columns, path) for
    ``{split: (rows, outputs)}``; returns the metrics."""
    os.makedirs(out_dir, exist_ok=True)
    metrics, header, lines = {}, None, []
    for split, (rows, pred) in predictions.items():
        metrics[split] = run_metrics(target, data.mos[rows], pred, data.votes[rows], delta)
        columns = columns_of(target, pred)
        columns.pop("pred_std")
        header = ["id", "split", "mos", *columns, "path"]
        for k, r in enumerate(rows):
            values = [data.mos[r], *(c[k] for c in columns.values())]
            lines.append([data.ids[r], split, *("" if not np.isfinite(v) else f"{v:.6g}" for v in values),
                          data.paths[r]])
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    with (atomic_path(os.path.join(out_dir, "predictions.csv")) as tmp,
          open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle):
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(lines)
    for split, m in metrics.items():
        log.info("%s: %s", split, ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in m.items()))
    return metrics


def _predictions(model, data: LabelledImages, config: FinetuneConfig) -> dict:
    out = {}
    for split in SPLITS:
        rows = data.rows(split)
        if len(rows):
            out[split] = (rows, predict_files(model, [data.paths[r] for r in rows], config.size,
                                              batch_size=config.batch_size, workers=config.workers, mirror=False))
    return out


def finish(job, run: Run, precision: str) -> dict:
    """Save the best weights as ``model.keras`` (float32), predict val and test, write the
    metrics and close the run's record; the checkpoint is removed."""
    from . import model as network

    config, state = job.config, job.state
    saved = job.model
    if precision != "float32":
        saved, _ = network.build(dataclasses.replace(config, weights="random:0"),
                                 job.target.output_bias(job.labels[job.rows["train"]]))
        saved.set_weights(job.model.get_weights())
    run.save_model(saved)
    metrics = write_outputs(run.path, config.target, job.data, _predictions(saved, job.data, config), config.delta)
    history = state["history"]
    run.save_config(
        status="finished", epochs_run=len(history), best_epoch=state["best_epoch"], best_val_loss=state["best"],
        params_trained=state["params"], metrics=metrics, test_ids=job.data.test_ids(),
        timing={"seconds": round(state["seconds"], 2),  # images/s: the training batches, not a phase's first epoch
                "train_samples_per_second": round(state["train_images"] / state["train_seconds"], 2)
                if state["train_seconds"] else None,
                "epoch_seconds": [h["seconds"] for h in history]})
    path = os.path.join(run.path, checkpoint.FILE)
    if os.path.exists(path):
        os.remove(path)
    log.info("done: test SRCC %s; run folder %s", metrics.get("test", {}).get("srcc"), run.path)
    return metrics


def evaluate(run_dir: str, images: str | None = None, *, out: str | None = None) -> dict:
    """Recompute a fine-tuned run's metrics on val and test from the image files (``images``:
    the run's folder by default, with the run's labels and splits)."""
    run, config = open_run(run_dir, finished=False)
    images = images or run.config["images"]
    data = LabelledImages.load(images, run.config["labels"], run.config.get("test_list"),
                               val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
    if run.config.get("test_ids") and data.test_ids() != run.config["test_ids"]:
        log.warning("%s: the test split differs from the run's (%d images, the run's %d)", images,
                    len(data.test_ids()), len(run.config["test_ids"]))
    predictions = _predictions(run.load_model(), data, config)
    if not predictions:
        raise ConfigError(f"{images}: no labelled val or test images to evaluate on")
    return write_outputs(out or run_dir, config.target, data, predictions, config.delta)


class FinetunedScorer:
    """A fine-tuned run as a scoring processor (:class:`mlsp.images.readahead.LocalRunner`)."""

    def __init__(self, run_dir: str, allow_unfinished: bool = False):
        self.run, self.config = open_run(run_dir, allow_unfinished=allow_unfinished)
        self.model = self.run.load_model()
        self.sha256 = file_sha256(self.run.model_path)

    def info(self) -> dict:
        return {"run": os.path.abspath(self.run.path), "model_sha256": self.sha256}

    def load_views(self, path: str):
        return load_whole(path, self.config.size)[None], None

    def process(self, views: np.ndarray) -> dict:
        pred = np.asarray(self.model.predict_on_batch(views), np.float64).reshape(len(views), -1)
        return {k: float(v[0]) for k, v in columns_of(self.config.target, pred).items()}


def score_images(run_dir: str, inputs: str | Sequence[str], out: str | None = None, *,
                 workers: int = DECODE_WORKERS, progress: ProgressFactory = null_progress,
                 allow_unfinished: bool = False):
    """Score image files with a fine-tuned run; ``(frame, errors)`` as :func:`heads.score.scoring.score_images`."""
    from heads.score.scoring import score_files

    return score_files(LocalRunner(FinetunedScorer(run_dir, allow_unfinished), workers), inputs, out,
                       progress=progress)


def build_export(run_dir: str, *, allow_unfinished: bool = False, interpolation: str = "area"):
    """Images of any size (RGB 0..255) -> resized to the run's size -> the network -> the MOS
    (batch,); a distribution run: a dict of mos, opinion_std and distribution; a binary run: the
    probability that the image is good (batch,). ``interpolation``: the resize's (``area`` as
    scoring decodes; saliency takes ``bilinear``, which has a gradient)."""
    import keras

    from mlsp.backbone.layers import ViewMean

    from ..layers import HistogramMoments

    run, config = open_run(run_dir, allow_unfinished=allow_unfinished)
    network = run.load_model()
    images = keras.Input((None, None, 3), name="images")
    x = keras.layers.Resizing(config.size, config.size, interpolation=interpolation,
                              antialias=interpolation == "bilinear", name="resize")(images)
    pred = network(x)
    name = f"mlsp_finetune_{config.net}_{config.target}"
    if config.target == "distribution":
        mos, std = HistogramMoments(name="moments")(pred)
        return keras.Model(images, {"mos": mos, "opinion_std": std, "distribution": pred}, name=name)
    if config.target == "binary":
        pick = keras.layers.Dense(1, use_bias=False, trainable=False, name="p_good",
                                  kernel_initializer=keras.initializers.Constant([[0.0], [1.0]]))
        pred = pick(pred)
    return keras.Model(images, ViewMean(1, name="squeeze")(pred), name=name)


def export(run_dir: str, out: str | None = None, *, allow_unfinished: bool = False) -> str:
    from heads.score.export import save

    return save(build_export(run_dir, allow_unfinished=allow_unfinished),
                out or os.path.join(run_dir, "scoring_model.keras"))


class SaliencyModel:
    """A fine-tuned run as :func:`heads.report.saliency.explain` takes it: its image-to-score model
    (the resize bilinear and antialiased, which has a gradient) and the side photos are decoded at."""

    def __init__(self, run_dir: str, allow_unfinished: bool = False):
        self.name = run_dir
        self.max_side = 2 * open_run(run_dir, allow_unfinished=allow_unfinished)[1].size  # as scoring decodes
        self.model = build_export(run_dir, allow_unfinished=allow_unfinished, interpolation="bilinear")
