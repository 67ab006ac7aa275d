"""``mlsp finetune``: the two phases, early stopping, a checkpoint per epoch and resume.

Phase 1 trains the new head with the backbone frozen (``head_epochs``, at ``head_lr``); phase 2
the head (at ``phase2_head_lr``, default ``head_lr``) and the unfrozen top of the backbone (at
``backbone_lr``), each part with its own optimizer (``sgd`` with momentum, or ``adam``), for at
most ``epochs``. After every epoch the validation loss decides: the best weights are kept, and
``patience`` epochs without improvement end the phase; each phase starts from the best weights
so far, and the run's model is the best of all. The run folder is a run like ``mlsp train``'s
(``config.json`` with ``"kind": "finetune"``, ``model.keras``, ``history.csv``,
``metrics.json``, ``predictions.csv``), plus ``checkpoint.npz``: the same command run again on a
folder whose training was interrupted or killed resumes from it, with the result an
uninterrupted run gives (same seed: the batches, crops, flips and dropout draws of an epoch come
from the seed and the epoch's number alone).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import logging
import math
import os
import time

import numpy as np

from mlsp.runtime import backend
from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ConfigError, RunInterrupted
from mlsp.runtime.precision import resolve_logged as resolve_precision
from mlsp.runtime.progress import ProgressFactory, null_progress

from ..run import FINETUNED as KIND, Run
from ..targets import emd
from . import checkpoint, model as network
from .checkpoint import Checkpoint
from .config import SGD_MOMENTUM, FinetuneConfig
from .images import LabelledImages, Target, n_steps, predict_files, train_batches
from .metrics import run_metrics

log = logging.getLogger(__name__)
HISTORY_FIELDS = ("epoch", "phase", "loss", "val_loss", "val_srcc", "seconds")


@dataclasses.dataclass
class FinetuneResult:
    run_dir: str
    config: dict
    metrics: dict


def validation_loss(target: str, labels, pred) -> float:
    """The loss early stopping watches: MSE, the mean EMD (r = 2) or the cross-entropy."""
    labels, pred = np.asarray(labels, np.float64), np.asarray(pred, np.float64)
    if target == "mos":
        return float(np.mean((pred.reshape(-1) - labels) ** 2))
    if target == "distribution":
        return float(np.mean(emd(labels, pred, 2)))
    return float(np.mean(-np.sum(labels * np.log(np.clip(pred, 1e-7, 1.0)), axis=1)))


class _Training:
    """One run's network, data, optimizers and loop state."""

    def __init__(self, config: FinetuneConfig, run: Run, data: LabelledImages, precision: str, progress):
        import keras

        self.config, self.run, self.data, self.progress = config, run, data, progress
        self.target = Target(config.target, config.delta)
        self.labels = self.target.labels(data)
        self.rows = {s: self.target.usable(data, data.rows(s)) for s in ("train", "val")}
        if len(self.rows["train"]) < 1 or len(self.rows["val"]) < 1:
            raise ConfigError(f"{config.images}: fine-tuning needs labelled training and validation images with the "
                              f"{config.target} target; found {len(self.rows['train'])} and {len(self.rows['val'])}")
        backend.set_random_seed(config.seed)
        bias = self.target.output_bias(self.labels[self.rows["train"]])
        self.model, self.weights_record = network.build(config, bias, precision)
        self.loss_fn = keras.losses.get(_loss_name(config.target))
        self.state = {"phase": 1, "epoch": 0, "best": math.inf, "best_epoch": None, "wait": 0, "history": [],
                      "seconds": 0.0, "train_seconds": 0.0, "train_images": 0, "params": 0}
        self.best_weights = None
        self.optimizers = {}
        self.session_start = time.time()

    def elapsed(self) -> float:
        """Seconds of this run so far, over every session that trained it."""
        return self.state.get("seconds_before", 0.0) + time.time() - self.session_start

    def calibrate(self):
        """Batch-norm statistics of a random backbone from (at most 64) training images."""
        from .images import load_whole
        from .nets import NETS

        rows = self.rows["train"][:64]
        batch = np.stack([load_whole(self.data.paths[r], self.config.size) for r in rows])
        network.calibrate_batch_norm(network.backbone_of(self.model), batch, NETS[self.config.net].preprocessing)
        log.info("random weights: batch-norm statistics measured on %d training images", len(rows))

    # -- the phases ------------------------------------------------------------------------
    def phases(self) -> list:
        c = self.config
        second = c.epochs if c.unfreeze != "0" else 0
        return [(1, c.head_epochs), (2, second)]

    def start_phase(self, phase: int):
        import keras

        c = self.config
        head_vars, backbone_vars = network.set_phase(self.model, c, phase)
        rates = {"head": c.head_lr if phase == 1 else (c.phase2_head_lr or c.head_lr), "backbone": c.backbone_lr}
        make = (lambda lr: keras.optimizers.SGD(lr, momentum=SGD_MOMENTUM)) if c.optimizer == "sgd" else \
            (lambda lr: keras.optimizers.Adam(lr))
        self.parts = {"head": head_vars, "backbone": backbone_vars if phase == 2 else []}
        self.optimizers = {name: make(rates[name]) for name, v in self.parts.items() if v}
        for name, optimizer in self.optimizers.items():
            optimizer.build(self.parts[name])
        self.state["params"] = max(self.state["params"], network.count(head_vars + self.parts["backbone"]))
        self.step = backend.compile_step(self._step)
        log.info("phase %d: %s trainable parameters (%s)", phase, f"{network.count(head_vars + self.parts['backbone']):,}",
                 ", ".join(f"{n} at {rates[n]:g}" for n in self.optimizers))

    def _step(self, x, y):
        from keras import ops

        names = list(self.optimizers)
        variables = [v for n in names for v in self.parts[n]]

        def loss():
            return ops.mean(self.loss_fn(y, self.model(x, training=True)))

        value, grads = backend.loss_and_gradients(loss, variables)
        at = 0
        for name in names:
            k = len(self.parts[name])
            self.optimizers[name].apply_gradients(zip(grads[at:at + k], self.parts[name]))
            at += k
        return value

    # -- one epoch -------------------------------------------------------------------------
    def epoch_number(self, phase: int) -> int:
        """Epochs before this one, over both phases (the seed of its batches)."""
        return (self.config.head_epochs if phase == 2 else 0) + self.state["epoch"]

    def train_epoch(self, phase: int, n_epochs: int) -> dict:
        c = self.config
        steps = n_steps(len(self.rows["train"]), c.batch_size, c.steps_per_epoch)
        bar = self.progress(total=steps, desc=f"phase {phase} epoch {self.state['epoch'] + 1}/{n_epochs}",
                            unit="batch", leave=True)
        started, losses, images = time.perf_counter(), [], 0
        try:
            for x, y in train_batches(self.data, self.labels, self.rows["train"], seed=c.seed,
                                      epoch=self.epoch_number(phase), resize=c.resize, size=c.size,
                                      batch_size=c.batch_size, steps=c.steps_per_epoch, workers=c.workers):
                losses.append(float(self.step(x, y)))
                images += len(x)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", refresh=False)
            seconds = time.perf_counter() - started
            row = {"loss": float(np.mean(losses)) if losses else math.nan, **self.validate()}
            bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "val_loss", "val_srcc") if row[k] is not None})
        finally:
            bar.close()
        if self.state["epoch"] > 0 or n_epochs == 1:  # a phase's first epoch also compiles its step
            self.state["train_seconds"] += seconds
            self.state["train_images"] += images
        return {**row, "seconds": round(seconds, 3)}

    def predict(self, rows) -> np.ndarray:
        c = self.config
        return predict_files(self.model, [self.data.paths[r] for r in rows], c.size, batch_size=c.batch_size,
                             workers=c.workers)

    def validate(self) -> dict:
        rows = self.rows["val"]
        pred = self.predict(rows)
        ok = np.all(np.isfinite(pred), axis=1)
        loss = validation_loss(self.config.target, self.labels[rows][ok], pred[ok].squeeze(-1)
                               if pred.shape[1] == 1 else pred[ok])
        srcc = run_metrics(self.config.target, self.data.mos[rows][ok], pred[ok])["srcc"]
        return {"val_loss": loss, "val_srcc": srcc}


def _loss_name(target: str):
    from .config import FINETUNE_TARGETS

    return FINETUNE_TARGETS[target].resolve_loss()


def _epoch_done(job: _Training, phase: int, row: dict) -> bool:
    """Record an epoch (history, best weights, patience, checkpoint); True where the phase ends."""
    s = job.state
    s["epoch"] += 1
    s["history"].append({"epoch": len(s["history"]) + 1, "phase": phase, **row})
    s["seconds"] = job.elapsed()
    if row["val_loss"] < s["best"]:  # the best weights of the whole run
        s["best"], s["best_epoch"] = row["val_loss"], len(s["history"])
        job.best_weights = [np.array(w) for w in job.model.get_weights()]
    if row["val_loss"] < s.get("phase_best", math.inf):  # patience counts within the phase
        s["phase_best"], s["wait"] = row["val_loss"], 0
    else:
        s["wait"] += 1
    _write_history(job.run, s["history"])
    checkpoint.save(job.run.path, s, job.model, job.best_weights, job.optimizers)
    return s["wait"] >= job.config.patience


def _run_phases(job: _Training, resumed: Checkpoint | None):
    for phase, n_epochs in job.phases():
        if phase < job.state["phase"] or n_epochs == 0:
            continue
        job.start_phase(phase)
        if resumed is not None:
            for name, optimizer in job.optimizers.items():
                if resumed.part(f"opt_{name}"):
                    resumed.assign(f"opt_{name}", optimizer.variables)
            resumed = None
        while job.state["epoch"] < n_epochs:
            if _epoch_done(job, phase, job.train_epoch(phase, n_epochs)):
                log.info("phase %d: no improvement for %d epochs: the phase ends", phase, job.config.patience)
                break
        if job.best_weights is not None:
            job.model.set_weights(job.best_weights)
        job.state.update(phase=phase + 1, epoch=0, wait=0, phase_best=math.inf)
        job.optimizers = {}
        checkpoint.save(job.run.path, job.state, job.model, job.best_weights, {})


def _resume(job: _Training) -> Checkpoint | None:
    if not Checkpoint.exists(job.run.path):
        return None
    saved = Checkpoint(job.run.path)
    saved.assign("model", job.model.variables)
    job.state = {**saved.state, "seconds_before": saved.state["seconds"]}
    best = saved.part("best")
    if best:
        if [a.shape for a in best] != [tuple(w.shape) for w in job.model.weights]:
            saved.assign("best", job.model.weights)  # raises: not this network's
        job.best_weights = best
    log.info("%s: resuming after epoch %d (phase %d)", saved.path, len(job.state["history"]), job.state["phase"])
    return saved


def _write_history(run: Run, history: list):
    with atomic_path(run.history_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def _open_run(config: FinetuneConfig, record: dict) -> tuple[Run, bool]:
    """The run folder: a new one, or an interrupted one of the same configuration (resumed)."""
    path = config.out
    if not os.path.exists(os.path.join(path, "config.json")):
        return Run.create(path, record), False
    run = Run(path, _read_config(path))
    if run.config.get("kind") != KIND or run.status == "finished":
        Run.refuse_existing(path)
    have = run.config.get("finetune_key", {})
    diff = sorted(k for k in set(have) | set(record["finetune_key"]) if have.get(k) != record["finetune_key"].get(k))
    if diff:
        raise ConfigError(f"{path} holds an unfinished fine-tuning run with other options ({', '.join(diff)}); "
                          "run the same command to resume it, or choose another --out")
    run.save_config(status="running")
    return run, True


def _read_config(path: str) -> dict:
    from ..run import read_config

    return read_config(os.path.join(path, "config.json"))


def _record(config: FinetuneConfig, data: LabelledImages, precision: str) -> dict:
    from heads.train.loop import versions

    return {"kind": KIND, "store": None, "head": f"finetune-{config.net}", "target": config.target,
            "finetune": config.to_dict(), "finetune_key": config.training_key(),
            "images": os.path.abspath(config.images), "labels": os.path.abspath(config.labels),
            "test_list": os.path.abspath(config.test_list) if config.test_list else None,
            "splits": {s: int(len(data.rows(s))) for s in ("train", "val", "test")},
            "precision": precision, "versions": versions(), "status": "running",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def finetune(config: FinetuneConfig, *, progress: ProgressFactory = null_progress) -> FinetuneResult:
    """Fine-tune (see the module's docstring); returns the run folder, its config and metrics."""
    if config.out is None:
        raise ConfigError("fine-tuning needs a run folder (--out)")
    precision = resolve_precision(config.precision)
    if precision == "float16":
        raise ConfigError("fine-tuning trains in float32 or bfloat16 (float16 would need loss scaling); "
                          "--precision auto picks bfloat16 where the hardware has it")
    if config.weights.startswith("random"):
        log.warning("fine-tuning a RANDOM backbone (weights %s): no ImageNet knowledge to start from; fine for "
                    "tests, not a comparison with MLSP", config.weights)
    data = LabelledImages.load(config.images, config.labels, config.test_list, val_fraction=config.val_fraction,
                               test_fraction=config.test_fraction, seed=config.seed)
    run, resuming = _open_run(config, _record(config, data, precision))
    job = _Training(config, run, data, precision, progress)
    resumed = _resume(job) if resuming else None
    if resumed is None and config.weights.startswith("random"):
        job.calibrate()
    run.save_config(weights=job.weights_record)
    try:
        with backend.deterministic_ops(True):
            _run_phases(job, resumed)
    except KeyboardInterrupt:
        kept = ("its checkpoint after the last finished epoch: run the same command again to resume"
                if Checkpoint.exists(run.path) else "nothing: it stopped before the first epoch ended")
        run.save_config(status="interrupted", error=kept)
        raise RunInterrupted(run.path, kept) from None
    except Exception as exc:
        run.save_config(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    job.state["seconds"] = job.elapsed()
    from .scoring import finish

    metrics = finish(job, run, precision)
    return FinetuneResult(run.path, run.config, metrics)
