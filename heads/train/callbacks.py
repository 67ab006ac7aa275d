"""The training loop's callbacks: validation on the mean over views, throughput, history.csv and
a progress bar per epoch. The LR schedule is :class:`heads.train.schedule_callback.StepOrPlateauSchedule`."""

from __future__ import annotations

import csv
import time

import keras
import numpy as np

from mlsp.runtime.atomic import atomic_path
from mlsp.runtime.progress import ProgressFactory, console_progress

from ..data import predict_views
from ..evaluation import compute_metrics
from ..targets import mos_of, validation_loss


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

    def timing(self) -> dict:
        """What the run's ``config.json`` records: samples per second and each epoch's seconds."""
        return {"train_samples_per_second": (round(self.samples_per_second, 1)
                                             if self.samples_per_second else None),
                "epoch_seconds": [round(t, 3) for t in self.epoch_seconds]}


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
    """A progress bar per epoch (``progress``, a :mod:`mlsp.runtime.progress` factory) showing the loss,
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
