"""The paper's learning-rate schedule as one Keras callback (the values: :mod:`heads.train.schedule`).

docs/paper.md, "Training": LR 1e-4, divided by 10 every 20 epochs or when the validation loss has not
improved for 5 epochs, whichever comes first, down to 1e-6; at each change the best weights so
far are reloaded; training stops when the last LR stage ends (20 epochs, or 5 without
improvement); the result is the best weights on validation loss.

At each change the optimizer's state (Adam's moments and step count) is reset too: the authors'
code recompiled the model for each LR stage, which starts a fresh optimizer.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from mlsp.errors import TrainingError

from .schedule import PAPER, lr_stages

log = logging.getLogger(__name__)


class StepOrPlateauSchedule(keras.callbacks.Callback):
    """Divide the LR by ``1/factor`` after ``stage_epochs`` epochs at one LR or ``patience`` epochs
    without improvement of ``monitor``, whichever comes first; reload the best weights and reset
    the optimizer at each change; stop after the last stage. The best weights are restored at
    the end of training.

    Adds ``lr`` (the LR the epoch ran with) to the epoch's logs. ``events`` records every change:
    ``{"epoch", "from", "to", "reason", "best_epoch"}`` with reason ``"stage"`` or ``"plateau"``.
    """

    def __init__(self, lr: float = PAPER.lr, factor: float = PAPER.lr_factor, min_lr: float = PAPER.min_lr,
                 stage_epochs: int = PAPER.lr_epochs, patience: int = PAPER.patience, monitor: str = "val_loss",
                 min_delta: float = 0.0, reset_optimizer: bool = True):
        super().__init__()
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), received {factor!r}")
        self.stages = lr_stages(lr, factor, min_lr)
        self.stage_epochs = int(stage_epochs)
        self.patience = int(patience)
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.reset_optimizer = reset_optimizer
        self._reset_state()

    def _reset_state(self):
        self.stage = 0
        self.best = np.inf
        self.best_epoch = None
        self.best_weights = None
        self.wait = 0
        self.stage_epoch = 0
        self.events = []
        self.stopped_epoch = None

    @property
    def lr(self) -> float:
        return self.stages[self.stage]

    def on_train_begin(self, logs=None):
        self._reset_state()
        self._set_lr(self.lr)

    def _set_lr(self, lr: float):
        self.model.optimizer.learning_rate.assign(lr)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["lr"] = self.lr
        if self.monitor not in logs:
            raise TrainingError(f"the LR schedule monitors {self.monitor!r}, missing from the epoch's logs")
        current = float(logs[self.monitor])
        if np.isfinite(current) and current < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = current, epoch, 0
            self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
        self.stage_epoch += 1
        reason = "stage" if self.stage_epoch >= self.stage_epochs else "plateau" if self.wait >= self.patience else None
        if reason is None:
            return
        if self.stage + 1 >= len(self.stages):
            log.info("epoch %d: last LR stage (%.0e) ended (%s); stopping", epoch + 1, self.lr, reason)
            self.stopped_epoch = epoch
            self.model.stop_training = True
            return
        old = self.lr
        self.stage += 1
        self.wait = 0
        self.stage_epoch = 0
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        if self.reset_optimizer:
            self._reset_optimizer()
        self._set_lr(self.lr)
        best = "none" if self.best_epoch is None else self.best_epoch + 1
        self.events.append({"epoch": epoch + 1, "from": old, "to": self.lr, "reason": reason, "best_epoch": best})
        log.info("epoch %d: LR %.0e -> %.0e (%s), reloaded the best weights (epoch %s)",
                 epoch + 1, old, self.lr, "after %d epochs" % self.stage_epochs if reason == "stage"
                 else "no improvement for %d epochs" % self.patience, best)

    def _reset_optimizer(self):
        """Zero the optimizer's step count and slots (Adam's moments). Under float16 Keras wraps
        the optimizer in a LossScaleOptimizer, whose own variables (the loss scale) must stay:
        a loss scale of 0 would turn every later loss into NaN."""
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        for variable in optimizer.variables:
            variable.assign(keras.ops.zeros(variable.shape, variable.dtype))

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
