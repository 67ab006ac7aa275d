"""Training a head on a feature store (docs/paper.md, "Training").

:func:`train` takes a :class:`heads.train.config.TrainConfig`, checks the store and the configuration
before any training starts, trains with the schedule :mod:`heads.train.schedule` chooses for the
store's size (the paper's on a store of AVA's size; the callbacks are :mod:`heads.train.callbacks`),
evaluates on val and test and writes the run folder (:class:`heads.run.Run`):

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

import contextlib
import dataclasses
import datetime
import logging
import platform
import time

import keras
import numpy as np

from mlsp.version import __version__
from mlsp.runtime import backend
from mlsp.runtime.atomic import describe_os_error
from mlsp.errors import ConfigError, RunInterrupted, StoreError, TrainingError, WriteError
from mlsp.runtime.precision import DEFAULT as DEFAULT_PRECISION, dtype_policy, resolve_logged as resolve_precision
from mlsp.runtime.progress import null_progress, resolve as resolve_progress
from mlsp.store.read import FeatureStore, find_latest_store
from mlsp.store.format import FEATURES_ROOT, LABELLED_SPLITS, NARROW, POOLINGS, SPLITS, WIDE_GRID, pooling_of

from .callbacks import HistoryCSV, ProgressBar, Throughput, ViewMeanValidation
from .config import TrainConfig
from ..data import FeatureSource, TrainBatches, open_features, predict_views
from ..evaluation import EVAL_SPLITS, labelled_split, write_outputs
from ..models import build_head
from ..registry import HEADS, HeadSpec, get_head
from ..run import Run, default_run_dir, store_record
from .schedule import Schedule, describe, fmt_lr
from .schedule_callback import StepOrPlateauSchedule
from ..targets import (TARGETS, TargetSpec, has_votes, initial_bias, mos_of, training_labels,
                      validation_loss)


log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "TrainingData", "Fitted", "train", "fit", "check_store", "check_target",
           "HistoryCSV", "ProgressBar", "Throughput", "ViewMeanValidation"]  # the last four: heads.train.callbacks


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
    if store.pooling not in POOLINGS:
        raise StoreError(f"{store.path}: unknown pooling {store.pooling!r}")
    wide = pooling_of(store.pooling).wide
    if wide and (len(store.feature_shape) != 3 or store.feature_shape[0] != store.feature_shape[1]):
        raise StoreError(f"{store.path}: wide features should be (grid, grid, C) per view, found {store.feature_shape}")
    if spec.needs_wide and not wide:
        raise ConfigError(
            f"head {head!r} needs wide (5x5) features, but {store.path} holds narrow ones; "
            "extract with `mlsp extract --wide`, or choose a narrow head "
            f"({', '.join(h.name for h in HEADS.specs() if not h.needs_wide)})"
        )
    if store.n_images == 0:
        raise StoreError(f"{store.path}: the store holds no images")
    labelled = np.isfinite(store.mos)
    if not labelled.any():
        raise StoreError(f"{store.path}: every MOS is NaN: the store has no labels; extract it with labels")
    counts = {s: int((store.split == s).sum()) for s in SPLITS}
    rows = {}
    for split in LABELLED_SPLITS:
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
# Training
# --------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, progress=False) -> TrainResult:
    """Train ``config.head`` on ``config.store`` (the newest store under features/ if None).

    ``progress``: ``True`` for a bar per epoch on the console, or a :mod:`mlsp.runtime.progress` factory.

    The steps: check the configuration (:func:`_check_config`); open the store, check it and plan
    the run (:func:`_prepare`); create the run folder with its record (:func:`_record`); fit and
    predict val and test (:func:`_fit_and_predict`); save the model, stopping a diverged run
    (:func:`_save_model`); write the evaluation and close the record (:func:`_finish`)."""
    spec, goal = _check_config(config)
    store_path = config.store or find_latest_store(FEATURES_ROOT)
    if config.store is None:
        log.info("no store given: using the newest one, %s", store_path)
    started = time.time()
    precision = resolve_precision(config.precision, "training precision")
    with FeatureStore(store_path) as store:
        job = _prepare(config, store, store_path=store_path, spec=spec, goal=goal, precision=precision)
        run = Run.create(job.run_dir, _record(job))
        log.info("run folder: %s", job.run_dir)
        fitted, predictions = _fit_and_predict(job, run, progress=progress)
        with _stop_marks(run, NOT_SAVED):
            history = run.history()
            _save_model(job, run, fitted, predictions=predictions, history=history)
        with _stop_marks(run, SAVED_NOT_EVALUATED):
            metrics = write_outputs(job.run_dir, store, predictions)
            _finish(run, fitted, history=history, metrics=metrics, started=started)
    return TrainResult(run_dir=job.run_dir, metrics=metrics, history=history, config=run.config)


#: What a run keeps when Ctrl-C stops it at each step (in its config.json as ``error``).
NO_WEIGHTS = "stopped before the first epoch ended: no weights to keep"
NOT_SAVED = "stopped after training, before its model was saved: no model to keep; train again"
SAVED_NOT_EVALUATED = ("stopped after its model was saved (the best weights), before its evaluation was written: "
                       "`mlsp evaluate RUN` writes it")


@contextlib.contextmanager
def _stop_marks(run: Run, kept: str):
    """A Ctrl-C in this step marks the run ``interrupted`` with what it keeps, and stops training
    (:class:`mlsp.errors.RunInterrupted`: a KeyboardInterrupt that says so); a file that cannot be
    written (a full disk while the model or the evaluation is saved) marks it ``failed``, so no
    run that stopped stays ``running``."""
    try:
        yield
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        run.save_config(status="interrupted", error=kept)
        raise RunInterrupted(run.path, kept) from None
    except (WriteError, OSError) as exc:
        _mark_failed(run, exc)
        raise


def _mark_failed(run: Run, exc: BaseException):
    """Mark ``run`` failed with ``exc`` as its error; where even that cannot be written, say so."""
    error = str(exc) if isinstance(exc, WriteError) else f"{type(exc).__name__}: {describe_os_error(exc)}"
    try:
        run.save_config(status="failed", error=error)
    except (WriteError, OSError) as again:
        log.warning("%s: the run could not be marked failed either (%s); it stopped at: %s", run.config_path,
                    again, error)


@dataclasses.dataclass
class _Job:
    """One training's resolved inputs, handed from step to step of :func:`train`."""

    config: TrainConfig
    spec: HeadSpec
    goal: TargetSpec
    store_path: str
    precision: str  # as resolved for this machine
    plan: Schedule  # the schedule for the store's training split
    plan_why: str  # why that schedule
    head_options: dict  # resolved for the store's channels
    run_dir: str
    data: TrainingData


def _check_config(config) -> tuple[HeadSpec, TargetSpec]:
    """The head's and the target's specs; a wrong configuration fails before the store is opened."""
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train() takes a TrainConfig, received {type(config).__name__}")
    config.validate()
    spec = get_head(config.head)
    goal = TARGETS.get(config.target)
    spec.resolve_options(config.head_options)  # an unknown option fails before the store is opened
    return spec, goal


def _prepare(config: TrainConfig, store: FeatureStore, *, store_path: str, spec: HeadSpec, goal: TargetSpec,
             precision: str) -> _Job:
    """Check ``store`` for the head and the target, plan the schedule for its training split,
    choose the run folder (refusing one that holds a run) and open the features."""
    rows = check_target(store, goal, check_store(store, spec.name))
    plan, why = config.schedule(len(rows["train"]))
    head_options = spec.resolve_options(config.head_options, channels=sum(store.block_channels))
    run_dir = config.out or default_run_dir(store_path, spec.name)
    Run.refuse_existing(run_dir)
    reduce_grid = pooling_of(store.pooling).wide and not spec.needs_wide
    if reduce_grid:
        log.info("%s takes narrow features: each view of this wide store is reduced to the mean of its "
                 "5x5 grid, which equals the narrow feature", spec.name)
    log.info("schedule: %s; %s", describe(plan, len(rows["train"])), why)
    data = TrainingData.open(store, rows, goal, reduce_grid=reduce_grid, memory_budget=config.memory_budget)
    return _Job(config=config, spec=spec, goal=goal, store_path=store_path, precision=precision, plan=plan,
                plan_why=why, head_options=head_options, run_dir=run_dir, data=data)


def _record(job: _Job) -> dict:
    """The run's ``config.json`` as training starts (status ``running``)."""
    config, plan, store = job.config, job.plan, job.data.store
    return {
        "store": store_record(job.store_path, store),
        "head": job.spec.name,
        "head_options": job.head_options,
        "target": job.goal.name,
        "train": config.to_dict(),
        "schedule": {**plan.to_dict(), "max_epochs": plan.max_epochs(config.epochs), "why": job.plan_why},
        "splits": {k: int(len(v)) for k, v in job.data.rows.items()},
        "data": {"mode": job.data.source.mode, "reduce_grid": job.data.reduce_grid,
                 "memory_budget": config.memory_budget, "workers": config.workers},
        "output_bias": job.data.output_bias,
        "max_epochs": plan.max_epochs(config.epochs),
        "precision": job.precision,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
    }


def _fit_and_predict(job: _Job, run: Run, *, progress) -> tuple[Fitted, dict]:
    """:func:`fit`, then the predictions (split -> (rows, predictions)) on val and test; a failure
    marks the run ``failed``, a Ctrl-C ``interrupted`` (:func:`fit` itself keeps the best weights
    when one comes after the first epoch)."""
    source, rows = job.data.source, job.data.rows
    try:
        with backend.deterministic_ops(job.config.deterministic):
            with _stop_marks(run, NO_WEIGHTS):
                fitted = fit(job.config, job.plan, job.data, head_options=job.head_options,
                             history_path=run.history_path, progress=progress, precision=job.precision)
            with _stop_marks(run, NOT_SAVED):
                predictions = {split: (rows[split], predict_views(fitted.model, source, rows[split]))
                               for split in EVAL_SPLITS}
    except Exception as exc:
        # a damaged store met in a reading thread reaches here wrapped in TensorFlow's error
        failure = source.failure or exc
        run.save_config(status="failed", error=f"{type(failure).__name__}: {failure}")
        if source.failure is not None:
            raise source.failure from None
        raise
    finally:
        source.close()
    return fitted, predictions


def _save_model(job: _Job, run: Run, fitted: Fitted, *, predictions: dict, history: list):
    """Save the model, taking what the store holds (a narrow head on a wide store gets its grid
    mean); a run that diverged keeps its model, is marked ``diverged`` and is a TrainingError."""
    data, rows = job.data, job.data.rows
    constant = None if job.goal.outputs == 1 else validation_loss(  # the mean training histogram's EMD
        data.labels[rows["val"]],
        np.broadcast_to(data.labels[rows["train"]].mean(axis=0), data.labels[rows["val"]].shape))
    diverged = divergence(history, fitted.schedule.best, data.mos[rows["train"]], data.mos[rows["val"]],
                          {k: (r, mos_of(p)) for k, (r, p) in predictions.items()}, constant_loss=constant)
    store = data.store
    export = build_head(job.spec.name, store.block_channels, pooling=store.pooling, grid=_grid(store),
                        output_bias=data.output_bias, target=job.goal.name, **job.head_options)
    export.set_weights(fitted.model.get_weights())
    run.save_model(export)
    if diverged is not None:
        run.save_config(status="diverged", error=diverged, epochs_run=len(history),
                        best_val_loss=float(fitted.schedule.best), lr_changes=fitted.schedule.events)
        raise TrainingError(f"training diverged: {diverged}; try a lower --lr (this run's: {fmt_lr(job.plan.lr)}); "
                            f"{run.config_path} marks the run diverged")


def _finish(run: Run, fitted: Fitted, *, history: list, metrics: dict, started: float):
    """``loss.png``, the run's record closed (``finished``, or ``interrupted`` when Ctrl-C stopped
    training after an epoch) and the test figures logged."""
    from ..plots import plot_history

    schedule = fitted.schedule
    plot_history(run.file("loss.png"), history, schedule.events)
    run.save_config(
        status="interrupted" if fitted.interrupted else "finished",
        epochs_run=len(history),
        best_epoch=None if schedule.best_epoch is None else schedule.best_epoch + 1,
        best_val_loss=float(schedule.best),
        lr_changes=schedule.events,
        timing={"seconds": round(time.time() - started, 2), **fitted.throughput.timing()},
        metrics=metrics,
    )
    extra = "" if "emd2" not in metrics["test"] else \
        f", EMD (r=2) {_fmt(metrics['test']['emd2'])}, opinion std SRCC {_fmt(metrics['test']['std_srcc'])}"
    log.info("done in %.0f s: test SRCC %s, PLCC %s%s; run folder %s", time.time() - started,
             _fmt(metrics["test"]["srcc"]), _fmt(metrics["test"]["plcc"]), extra, run.path)


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
    return int(store.feature_shape[0]) if pooling_of(store.pooling).wide else WIDE_GRID


def _build(head, head_options, store, output_bias, reduce_grid, target, precision=DEFAULT_PRECISION):
    """The head as trained (narrow input where the grid is reduced), under a Keras dtype policy."""
    with dtype_policy(precision):
        return build_head(head, store.block_channels, pooling=NARROW.name if reduce_grid else store.pooling,
                          grid=_grid(store), output_bias=output_bias, target=target, **head_options)


@dataclasses.dataclass
class TrainingData:
    """What the loop needs from a checked store: its labelled rows per split, their features
    (``source``, from memory or streamed), the MOS and the target's labels of every row, and the
    head's output bias."""

    store: FeatureStore
    source: FeatureSource
    rows: dict  # split -> labelled rows
    mos: np.ndarray  # (n_images,) float64
    labels: np.ndarray  # what the target trains on: the MOS, or the vote histograms
    output_bias: object  # the head's starting prediction (a float, or one per output)
    reduce_grid: bool  # a narrow head on a wide store: each view's grid mean

    @classmethod
    def open(cls, store: FeatureStore, rows: dict, goal: TargetSpec, *, reduce_grid: bool,
             memory_budget) -> "TrainingData":
        """The features of ``rows`` (train, val, test) from ``store``, and the labels ``goal`` trains on."""
        all_rows = np.concatenate([rows["train"], rows["val"], rows["test"]])
        source = open_features(store, all_rows, reduce_grid=reduce_grid, memory_budget=memory_budget)
        mos = store.mos.astype(np.float64)
        labels = training_labels(goal, mos, store.votes)
        output_bias = initial_bias(goal, labels[rows["train"]])
        output_bias = output_bias[0] if len(output_bias) == 1 else output_bias
        return cls(store=store, source=source, rows=rows, mos=mos, labels=labels, output_bias=output_bias,
                   reduce_grid=reduce_grid)


@dataclasses.dataclass
class Fitted:
    """What :func:`fit` returns: the model with the best weights on validation loss, the LR
    schedule (best epoch and loss, LR changes), the throughput, and whether Ctrl-C stopped it."""

    model: keras.Model
    schedule: StepOrPlateauSchedule
    throughput: Throughput
    interrupted: bool


def fit(config: TrainConfig, plan: Schedule, data: TrainingData, *, head_options: dict, history_path: str,
        progress=False, precision: str = DEFAULT_PRECISION):
    """Build the head and train it with ``plan`` (the resolved schedule) at ``precision``; the
    :class:`Fitted` model holds the best weights on validation loss."""
    store, source, rows, mos, labels = data.store, data.source, data.rows, data.mos, data.labels
    head = config.head
    backend.set_random_seed(config.seed)
    target = TARGETS.get(config.target)
    model = _build(head, head_options, store, data.output_bias, data.reduce_grid, target.name, precision)
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
        HistoryCSV(history_path),
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
        twin = _build(head, head_options, store, data.output_bias, data.reduce_grid, target.name)
        twin.set_weights(model.get_weights())
        model = twin
    return Fitted(model=model, schedule=schedule, throughput=throughput, interrupted=interrupted)
