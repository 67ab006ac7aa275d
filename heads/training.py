"""Training a head on a feature store (PAPER.md, "Training").

:func:`train` takes a :class:`TrainConfig`, checks the store and the configuration before any
training starts, trains with the schedule :mod:`heads.schedule` chooses for the store's size (the
paper's on a store of AVA's size), evaluates on val and test and writes the run folder:

- ``model.keras``: the best weights on validation loss (MSE of MOS, or for ``--target
  distribution`` the EMD of the vote histograms: :mod:`heads.targets`); takes one view of the
  store's features ((C,) narrow, (5, 5, C) wide) and loads with ``safe_mode``;
- ``config.json``: the store (path, fingerprint, layout), the head and its options, the target,
  every hyper-parameter as given (``train``) and as used (``schedule``, with why), the seed, how
  the data was fed, package versions, the LR changes;
- ``history.csv``: per epoch ``loss``, ``val_loss``, ``lr``, ``val_srcc``;
- ``metrics.json``, ``predictions.csv``, ``predictions.png`` (:mod:`heads.evaluation`) and
  ``loss.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import logging
import os
import platform
import time
from typing import Any, Mapping

import keras
import numpy as np

from mlsp import __version__, backend
from mlsp.atomic import atomic_path, write_json
from mlsp.errors import ConfigError, StoreError, TrainingError
from mlsp.extract import PRECISIONS, resolve_precision
from mlsp.progress import ProgressFactory, console_progress, null_progress, resolve as resolve_progress
from mlsp.store import FeatureStore, find_latest_store

from .data import TrainBatches, open_features, predict_views
from .evaluation import EVAL_SPLITS, compute_metrics, labelled_split, write_outputs
from .models import build_head
from .registry import get_head
from .schedule import MAX_AUTO_LR, PAPER, describe, fmt_lr, resolve_schedule
from .schedule_callback import StepOrPlateauSchedule
from .targets import (DEFAULT_TARGET, TargetSpec, get_target, has_votes, initial_bias, mos_of, training_labels,
                      validation_loss)

log = logging.getLogger(__name__)

FEATURES_ROOT = "features"
RUNS_ROOT = "runs"


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run.

    ``lr``, ``min_lr`` and ``steps_per_epoch`` left at ``None`` are chosen from the store's size
    (:func:`heads.schedule.resolve_schedule`: the paper's values on a store of AVA's size, more
    steps per epoch and a higher LR on small ones); the other defaults are the paper's
    (:data:`heads.schedule.PAPER`). ``epochs`` caps the number of epochs; ``None`` runs until the
    schedule ends (at most ``lr_epochs`` epochs per LR stage). ``steps_per_epoch=0`` makes an epoch
    one pass over the training images, however short. ``memory_budget`` (bytes): features up to
    this size are loaded into memory, larger ones are streamed from the store; ``None`` is half
    the memory available to the process, 0 always streams. ``workers``: threads reading batches
    ahead. Neither changes the result. ``target``
    (:data:`heads.targets.TARGETS`): ``"mos"`` (the paper's) or ``"distribution"`` (the vote
    histogram, EMD loss). ``precision``: the head's compute precision during training (Keras
    mixed precision: float32 weights, bfloat16 or float16 arithmetic; ``auto`` as for extraction);
    the saved model and every prediction are float32.
    """

    head: str
    store: str | None = None
    out: str | None = None
    head_options: dict = dataclasses.field(default_factory=dict)
    target: str = DEFAULT_TARGET
    epochs: int | None = None
    lr: float | None = None
    lr_factor: float = PAPER.lr_factor
    min_lr: float | None = None
    lr_epochs: int = PAPER.lr_epochs
    patience: int = PAPER.patience
    batch_size: int = PAPER.batch_size
    steps_per_epoch: int | None = None
    seed: int = 0
    deterministic: bool = True
    memory_budget: int | None = None
    workers: int = 2
    precision: str = "float32"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """A config from plain data (e.g. ``config.json``'s ``"train"``); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "head" not in data:
            raise ConfigError("a training config needs a head")
        config = cls(**dict(data))
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        """Raise :class:`ConfigError` for any value that cannot be used."""
        def positive(name, value, kind=int, allow_none=False):
            if value is None and allow_none:
                return
            ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
            if kind is float:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
                      and value > 0)
            if not ok:
                raise ConfigError(f"{name} must be a positive {kind.__name__}, received {value!r}")

        get_head(self.head)
        get_target(self.target)
        for name in ("lr_epochs", "patience", "batch_size", "workers"):
            positive(name, getattr(self, name))
        positive("epochs", self.epochs, allow_none=True)
        if self.steps_per_epoch != 0:
            positive("steps_per_epoch", self.steps_per_epoch, allow_none=True)
        for name in ("lr", "min_lr"):
            positive(name, getattr(self, name), float, allow_none=True)
        if not (isinstance(self.lr_factor, (int, float)) and 0 < self.lr_factor < 1):
            raise ConfigError(f"lr_factor must be in (0, 1), received {self.lr_factor!r}")
        top = MAX_AUTO_LR if self.lr is None else self.lr
        if self.min_lr is not None and self.min_lr > top:
            given = f"{self.lr}" if self.lr is not None else f"at most {top:g}, chosen from the store's size"
            raise ConfigError(f"min_lr ({self.min_lr}) is above lr ({given})")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, received {self.seed!r}")
        if self.memory_budget is not None and (not isinstance(self.memory_budget, int) or self.memory_budget < 0):
            raise ConfigError(f"memory_budget must be a number of bytes >= 0, received {self.memory_budget!r}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be auto or one of {', '.join(PRECISIONS)}, received {self.precision!r}")
        if not isinstance(self.head_options, dict):
            raise ConfigError(f"head_options must be a mapping, received {self.head_options!r}")

    def schedule(self, n_train: int) -> tuple:
        """``(Schedule, why)`` for ``n_train`` training images: :func:`heads.schedule.resolve_schedule`."""
        return resolve_schedule(n_train, lr=self.lr, min_lr=self.min_lr, steps_per_epoch=self.steps_per_epoch,
                                lr_factor=self.lr_factor, lr_epochs=self.lr_epochs, patience=self.patience,
                                batch_size=self.batch_size)


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    metrics: dict  # {"val": {...}, "test": {...}}
    history: list  # one dict per epoch
    config: dict  # what config.json holds


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_store(store: FeatureStore, head: str) -> dict:
    """The labelled rows of train, val and test; a clear error for a store the head cannot use."""
    spec = get_head(head)
    if store.pooling not in ("narrow", "wide"):
        raise StoreError(f"{store.path}: unknown pooling {store.pooling!r}")
    if store.pooling == "wide" and (len(store.feature_shape) != 3 or store.feature_shape[0] != store.feature_shape[1]):
        raise StoreError(f"{store.path}: wide features should be (grid, grid, C) per view, found {store.feature_shape}")
    if spec.needs_wide and store.pooling != "wide":
        raise ConfigError(
            f"head {head!r} needs wide (5x5) features, but {store.path} holds narrow ones; "
            "extract with `mlsp extract --wide`, or choose a narrow head (single1fc, single3fc, multi3fc)"
        )
    if store.n_images == 0:
        raise StoreError(f"{store.path}: the store holds no images")
    labelled = np.isfinite(store.mos)
    if not labelled.any():
        raise StoreError(f"{store.path}: every MOS is NaN: the store has no labels; extract it with labels")
    counts = {s: int((store.split == s).sum()) for s in ("train", "val", "test", "unlabeled")}
    rows = {}
    for split in ("train", "val", "test"):
        rows[split] = labelled_split(store, split)
        if not len(rows[split]):
            raise StoreError(
                f"{store.path}: the {split} split has no labelled images (images per split: {counts}); "
                "training needs train, val (model selection) and test"
            )
        missing = counts[split] - len(rows[split])
        if missing:
            log.warning("%d %s images have no MOS and are left out", missing, split)
    return rows


def check_target(store: FeatureStore, target: TargetSpec, rows: dict) -> dict:
    """The rows of each split that have the target's label: for ``distribution``, a vote histogram.

    A store whose labels are MOS only is an error; images without votes are left out, with a count.
    """
    if target.outputs == 1:
        return rows
    voted = has_votes(store.votes)
    if not voted.any():
        raise ConfigError(
            f"{store.path}: the labels are MOS only (no vote counts), but --target {target.name} learns the "
            "histogram of votes: extract with labels that give the 10 vote counts (AVA.txt, or a CSV with "
            "votes_1..votes_10), or train with --target mos"
        )
    out = {}
    for split, r in rows.items():
        out[split] = r[voted[r]]
        if len(out[split]) < len(r):
            log.warning("%d of %d labelled %s images have no votes and are left out (--target %s)",
                        len(r) - len(out[split]), len(r), split, target.name)
        if not len(out[split]):
            raise StoreError(f"{store.path}: no {split} image has votes; --target {target.name} needs them")
    return out


def default_run_dir(store_path: str, head: str, root: str = RUNS_ROOT) -> str:
    parent = os.path.basename(os.path.dirname(os.path.abspath(store_path)))
    stem = os.path.splitext(os.path.basename(store_path))[0]
    name = f"{stem}" if parent in ("", FEATURES_ROOT) else f"{parent}-{stem}"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, f"{name}-{head}-{stamp}")
    k = 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(root, f"{name}-{head}-{stamp}-{k}")
    return path


def versions() -> dict:
    import h5py
    import scipy

    out = {"mlsp": __version__, "python": platform.python_version(), "keras": keras.__version__,
           "numpy": np.__version__, "h5py": h5py.__version__, "scipy": scipy.__version__,
           "keras_backend": keras.backend.backend(), "platform": platform.platform()}
    info = backend.describe()
    out[info["backend"]] = info["backend_version"]
    out["device"] = info["device"]
    out["devices"] = backend.devices()
    return out


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------


class ViewMeanValidation(keras.callbacks.Callback):
    """``val_loss`` and ``val_srcc`` of the mean prediction over all stored views, per epoch.

    ``val_loss`` is the target's (:func:`heads.targets.validation_loss`): the MSE of MOS, or
    the mean EMD (r = 2) of the histograms; ``val_srcc`` that of the (predicted) MOS.
    """

    def __init__(self, source, rows, mos, labels=None):
        super().__init__()
        self.source, self.rows = source, np.asarray(rows)
        self.mos = np.asarray(mos, dtype=np.float64)
        self.labels = self.mos if labels is None else np.asarray(labels, dtype=np.float64)

    def on_epoch_end(self, epoch, logs=None):
        pred = predict_views(self.model, self.source, self.rows)
        if logs is not None:
            logs["val_loss"] = validation_loss(self.labels, pred)
            srcc = compute_metrics(self.mos, mos_of(pred))["srcc"]
            logs["val_srcc"] = float("nan") if srcc is None else srcc


class Throughput(keras.callbacks.Callback):
    """Training samples per second: the batches only (reading and the head's steps), not validation.

    Timed from the start of each epoch to its last batch, so reading that does not keep up
    counts. ``samples_per_second`` leaves out the first epoch (tracing, warm-up) when there are
    more.
    """

    def __init__(self, samples_per_epoch: int):
        super().__init__()
        self.samples_per_epoch = int(samples_per_epoch)
        self.epoch_seconds = []
        self._epoch_start = self._last_batch_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(self._last_batch_end - self._epoch_start)

    @property
    def samples_per_second(self):
        timed = self.epoch_seconds[1:] or self.epoch_seconds
        return self.samples_per_epoch * len(timed) / sum(timed) if timed and sum(timed) > 0 else None


class HistoryCSV(keras.callbacks.Callback):
    """``history.csv``: one row per epoch (numbered from 1), written as the epoch ends."""

    COLUMNS = ("epoch", "loss", "val_loss", "lr", "val_srcc")

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        self.rows = [list(self.COLUMNS)]
        self._write()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.rows.append([epoch + 1] + ["" if logs.get(k) is None else repr(float(logs[k])) for k in self.COLUMNS[1:]])
        self._write()

    def _write(self):  # the whole file each epoch (a few KB), complete or not at all
        with atomic_path(self.path, sync=False) as tmp, open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(self.rows)


class ProgressBar(keras.callbacks.Callback):
    """A progress bar per epoch (``progress``, a :mod:`mlsp.progress` factory) showing the loss,
    then val loss, val SRCC and LR."""

    def __init__(self, steps: int, epochs: int, progress: ProgressFactory = console_progress):
        super().__init__()
        self.steps, self.epochs, self.bar = steps, epochs, None
        self.progress = progress

    def on_epoch_begin(self, epoch, logs=None):
        self.bar = self.progress(total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                                 leave=True)

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            self.bar.update(1)
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is None:
            return
        logs = logs or {}
        post = {k: f"{float(logs[k]):.4f}" for k in ("loss", "val_loss", "val_srcc") if k in logs}
        if "lr" in logs:
            post["lr"] = f"{float(logs['lr']):.0e}"
        self.bar.set_postfix(post)
        self.bar.close()
        self.bar = None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _read_history(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v != ""} for r in rows]


def train(config: TrainConfig, *, progress=False) -> TrainResult:
    """Train ``config.head`` on ``config.store`` (the newest store under features/ if None).

    ``progress``: ``True`` for a bar per epoch on the console, or a :mod:`mlsp.progress` factory."""
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train() takes a TrainConfig, received {type(config).__name__}")
    config.validate()
    spec = get_head(config.head)
    goal = get_target(config.target)
    spec.resolve_options(config.head_options)  # an unknown option fails before the store is opened
    store_path = config.store or find_latest_store(FEATURES_ROOT)
    if config.store is None:
        log.info("no store given: using the newest one, %s", store_path)
    started = time.time()
    precision, why = resolve_precision(config.precision)
    if why != "as asked":
        log.info("training precision %s: %s", precision, why)
    with FeatureStore(store_path) as store:
        rows = check_target(store, goal, check_store(store, spec.name))
        plan, why = config.schedule(len(rows["train"]))
        head_options = spec.resolve_options(config.head_options, channels=sum(store.block_channels))
        run_dir = config.out or default_run_dir(store_path, spec.name)
        if os.path.exists(os.path.join(run_dir, "config.json")):
            raise ConfigError(f"{run_dir} already holds a run; choose another --out")
        reduce_grid = store.pooling == "wide" and not spec.needs_wide
        if reduce_grid:
            log.info("%s takes narrow features: each view of this wide store is reduced to the mean of its "
                     "5x5 grid, which equals the narrow feature", spec.name)
        os.makedirs(run_dir, exist_ok=True)
        log.info("run folder: %s", run_dir)
        log.info("schedule: %s; %s", describe(plan, len(rows["train"])), why)
        all_rows = np.concatenate([rows["train"], rows["val"], rows["test"]])
        source = open_features(store, all_rows, reduce_grid=reduce_grid, memory_budget=config.memory_budget)
        mos = store.mos.astype(np.float64)
        labels = training_labels(goal, mos, store.votes)
        output_bias = initial_bias(goal, labels[rows["train"]])
        output_bias = output_bias[0] if len(output_bias) == 1 else output_bias
        record = {
            "store": {
                "path": os.path.abspath(store_path), "fingerprint": store.fingerprint(), "net": store.net,
                "pooling": store.pooling, "block_names": store.block_names,
                "block_channels": store.block_channels, "views": store.views, "n_images": store.n_images,
                "config": store.config(),
            },
            "head": spec.name,
            "head_options": head_options,
            "target": goal.name,
            "train": config.to_dict(),
            "schedule": {**plan.to_dict(), "max_epochs": plan.max_epochs(config.epochs), "why": why},
            "splits": {k: int(len(v)) for k, v in rows.items()},
            "data": {"mode": source.mode, "reduce_grid": reduce_grid,
                     "memory_budget": config.memory_budget, "workers": config.workers},
            "output_bias": output_bias,
            "max_epochs": plan.max_epochs(config.epochs),
            "precision": precision,
            "versions": versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
        }
        config_path = os.path.join(run_dir, "config.json")
        write_json(config_path, record)
        try:
            with backend.deterministic_ops(config.deterministic):
                model, schedule, throughput, interrupted = _fit(
                    config, plan, spec.name, head_options, store, source, rows, mos, labels, output_bias,
                    reduce_grid, run_dir, progress, precision)
                predictions = {split: (rows[split], predict_views(model, source, rows[split])) for split in EVAL_SPLITS}
        except Exception as exc:
            # a damaged store met in a reading thread reaches here wrapped in TensorFlow's error
            failure = source.failure or exc
            record.update(status="failed", error=f"{type(failure).__name__}: {failure}")
            write_json(config_path, record)
            if source.failure is not None:
                raise source.failure from None
            raise
        except KeyboardInterrupt:  # before the first epoch ended: no weights to keep (after it, _fit keeps them)
            record.update(status="interrupted", error="stopped before the first epoch ended: no weights to keep")
            write_json(config_path, record)
            raise
        finally:
            source.close()
        history = _read_history(os.path.join(run_dir, "history.csv"))
        constant = None if goal.outputs == 1 else validation_loss(  # the mean training histogram's EMD
            labels[rows["val"]], np.broadcast_to(labels[rows["train"]].mean(axis=0), labels[rows["val"]].shape))
        diverged = divergence(history, schedule.best, mos[rows["train"]], mos[rows["val"]],
                              {k: (r, mos_of(p)) for k, (r, p) in predictions.items()}, constant_loss=constant)
        # the saved model takes what the store holds: a narrow head on a wide store gets its grid mean
        export = build_head(spec.name, store.block_channels, pooling=store.pooling, grid=_grid(store),
                            output_bias=output_bias, target=goal.name, **head_options)
        export.set_weights(model.get_weights())
        with atomic_path(os.path.join(run_dir, "model.keras"), keep_extension=True,
                         kept=f"{run_dir} holds the run's config.json and history.csv, not its model") as tmp:
            export.save(tmp)
        if diverged is not None:
            record.update(status="diverged", error=diverged, epochs_run=len(history),
                          best_val_loss=float(schedule.best), lr_changes=schedule.events)
            write_json(config_path, record)
            raise TrainingError(f"training diverged: {diverged}; try a lower --lr (this run's: {fmt_lr(plan.lr)}); "
                                f"{config_path} marks the run diverged")
        metrics = write_outputs(run_dir, store, predictions)
    from .plots import plot_history

    plot_history(os.path.join(run_dir, "loss.png"), history, schedule.events)
    record.update(
        status="interrupted" if interrupted else "finished",
        epochs_run=len(history),
        best_epoch=None if schedule.best_epoch is None else schedule.best_epoch + 1,
        best_val_loss=float(schedule.best),
        lr_changes=schedule.events,
        timing={"seconds": round(time.time() - started, 2),
                "train_samples_per_second": (round(throughput.samples_per_second, 1)
                                             if throughput.samples_per_second else None),
                "epoch_seconds": [round(t, 3) for t in throughput.epoch_seconds]},
        metrics=metrics,
    )
    write_json(config_path, record)
    extra = "" if "emd2" not in metrics["test"] else \
        f", EMD (r=2) {_fmt(metrics['test']['emd2'])}, opinion std SRCC {_fmt(metrics['test']['std_srcc'])}"
    log.info("done in %.0f s: test SRCC %s, PLCC %s%s; run folder %s", time.time() - started,
             _fmt(metrics["test"]["srcc"]), _fmt(metrics["test"]["plcc"]), extra, run_dir)
    return TrainResult(run_dir=run_dir, metrics=metrics, history=history, config=record)


#: A run whose best validation loss is over this many times that of predicting the mean training
#: MOS for every image has not learned: it blew up.
EXPLODED_LOSS = 10.0
#: Mean predictions may leave the training labels' range by this share of its span; further out,
#: the run diverged (a sane head stays near the labels it learned from).
RANGE_MARGIN = 0.5


def divergence(history: list, best_val_loss: float, train_mos, val_mos, predictions: dict,
               constant_loss: float | None = None) -> str | None:
    """Why a run diverged, in a few words, or ``None``: a training loss that was not finite, a best
    validation loss over ``EXPLODED_LOSS`` times the constant prediction's, or mean predictions
    (``predictions``: split -> (rows, predicted MOS)) outside the training labels' range widened by
    ``RANGE_MARGIN`` of its span on each side. ``constant_loss``: the constant prediction's
    validation loss for a target other than MOS (default: the MSE of predicting the mean MOS)."""
    for row in history:
        if not np.isfinite(row.get("loss", np.nan)):
            return f"the training loss was not finite at epoch {row['epoch']}"
    train_mos, val_mos = np.asarray(train_mos, np.float64), np.asarray(val_mos, np.float64)
    constant = float(np.mean((val_mos - train_mos.mean()) ** 2)) if constant_loss is None else float(constant_loss)
    if not np.isfinite(best_val_loss) or best_val_loss > EXPLODED_LOSS * max(constant, 0.01):
        what = "MSE" if constant_loss is None else "loss"
        return (f"the loss exploded (best validation {what} {best_val_loss:.4g}, over {EXPLODED_LOSS:g}x the "
                f"{constant:.3g} of predicting the mean {'MOS' if constant_loss is None else 'training histogram'})")
    lo, hi = float(train_mos.min()), float(train_mos.max())
    margin = RANGE_MARGIN * (hi - lo)
    for split, (_, pred) in predictions.items():
        pred = np.asarray(pred, np.float64)
        outside = ~np.isfinite(pred) | (pred < lo - margin) | (pred > hi + margin)
        if outside.any():
            worst = pred[outside][np.argmax(np.abs(np.nan_to_num(pred[outside], nan=np.inf) - (lo + hi) / 2))]
            return (f"{int(outside.sum())} of {len(pred)} {split} predictions leave the label range "
                    f"{lo:.3g}-{hi:.3g} by more than {RANGE_MARGIN:g} of its span (e.g. {worst:.4g})")
    return None


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


def _grid(store: FeatureStore) -> int:
    return int(store.feature_shape[0]) if store.pooling == "wide" else 5


def _build(head, head_options, store, output_bias, reduce_grid, target, precision="float32"):
    """The head as trained (narrow input where the grid is reduced), under a Keras dtype policy."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
    try:
        return build_head(head, store.block_channels, pooling="narrow" if reduce_grid else store.pooling,
                          grid=_grid(store), output_bias=output_bias, target=target, **head_options)
    finally:
        keras.config.set_dtype_policy(previous)


def _fit(config, plan, head, head_options, store, source, rows, mos, labels, output_bias, reduce_grid, run_dir,
         progress, precision="float32"):
    backend.set_random_seed(config.seed)
    target = get_target(config.target)
    model = _build(head, head_options, store, output_bias, reduce_grid, target.name, precision)
    model.compile(optimizer=keras.optimizers.Adam(plan.lr), loss=target.resolve_loss())
    log.info("%s: %s parameters (%s trainable)", head, f"{model.count_params():,}",
             f"{sum(int(np.prod(w.shape)) for w in model.trainable_weights):,}")
    batches = TrainBatches(source, rows["train"], labels[rows["train"]], batch_size=plan.batch_size,
                           seed=config.seed, steps_per_epoch=plan.steps_per_epoch, workers=config.workers)
    schedule = StepOrPlateauSchedule(lr=plan.lr, factor=plan.lr_factor, min_lr=plan.min_lr,
                                     stage_epochs=plan.lr_epochs, patience=plan.patience)
    per_epoch = len(rows["train"]) if plan.steps_per_epoch is None else \
        plan.steps_per_epoch * min(plan.batch_size, len(rows["train"]))
    throughput = Throughput(per_epoch)
    callbacks = [
        throughput,
        ViewMeanValidation(source, rows["val"], mos[rows["val"]], labels[rows["val"]]),
        schedule,
        keras.callbacks.TerminateOnNaN(),
        HistoryCSV(os.path.join(run_dir, "history.csv")),
    ]
    max_epochs = plan.max_epochs(config.epochs)
    factory = resolve_progress(progress)
    bar = None if factory is null_progress else ProgressBar(len(batches), max_epochs, factory)
    if bar is not None:
        callbacks.append(bar)
    log.info("target %s: %s", target.name, target.description)
    log.info("training %s on %d images (%d batches of <= %d per epoch, %d views each, data from %s), "
             "validating on %d, for at most %d epochs", head, len(rows["train"]), len(batches),
             plan.batch_size, source.n_views, source.mode, len(rows["val"]), max_epochs)
    # the batches are already shuffled (heads.data.epoch_plan): Keras keeps their order
    interrupted = False
    try:
        model.fit(batches, epochs=max_epochs, verbose=0, callbacks=callbacks, shuffle=False)
    except KeyboardInterrupt:
        if bar is not None and bar.bar is not None:
            bar.bar.close()
        if schedule.best_weights is None:
            raise
        interrupted = True
        log.warning("interrupted: keeping the best weights so far (epoch %d) and evaluating them; "
                    "Ctrl-C again to stop at once", schedule.best_epoch + 1)
        model.set_weights(schedule.best_weights)
    if schedule.best_weights is None:
        raise TrainingError("training did not produce a model: the validation loss was never finite "
                            "(the loss diverged?); try a lower --lr")
    if precision != "float32":
        # mixed precision keeps float32 weights: predict with a float32 copy (no rounded outputs)
        twin = _build(head, head_options, store, output_bias, reduce_grid, target.name)
        twin.set_weights(model.get_weights())
        model = twin
    return model, schedule, throughput, interrupted
