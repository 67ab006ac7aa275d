"""The training schedule: which values a run uses (:func:`resolve_schedule`, a pure function of
the store's size and the user's settings; no Keras import), and the paper's learning-rate
schedule as one Keras callback (:class:`StepOrPlateauSchedule`, in :mod:`heads.train.schedule_callback`).

docs/paper.md, "Training": batch 128, LR 1e-4, divided by 10 every 20 epochs or when the validation
loss has not improved for 5 epochs, down to 1e-6. Those values are sized for AVA (1,749 steps
per epoch); :func:`resolve_schedule` keeps them on a store of that size and adapts the epoch's
length and the LR on smaller ones.
"""

from __future__ import annotations

import dataclasses
import math

from mlsp.errors import ConfigError

@dataclasses.dataclass(frozen=True)
class Schedule:
    """The values that define a run's schedule. ``steps_per_epoch=None``: an epoch is one pass
    over the training images (the paper's epoch); a number: that many batches, drawn from as many
    passes as needed, each with new random views."""

    lr: float
    min_lr: float
    lr_factor: float
    lr_epochs: int
    patience: int
    batch_size: int
    steps_per_epoch: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def stages(self) -> list:
        return lr_stages(self.lr, self.lr_factor, self.min_lr)

    def max_epochs(self, cap: int | None = None) -> int:
        """Epochs until the last LR stage ends (at most ``lr_epochs`` per stage), or ``cap``."""
        return int(cap) if cap is not None else len(self.stages) * self.lr_epochs


#: The paper's schedule (docs/paper.md, "Training"), sized for AVA: 223,795 training images, 1,749
#: batches of 128 per epoch.
PAPER = Schedule(lr=1e-4, min_lr=1e-6, lr_factor=0.1, lr_epochs=20, patience=5, batch_size=128,
                 steps_per_epoch=None)

#: An epoch of at least this many optimiser steps trains at the paper's LR. The paper's LR suits
#: its epochs (on AVA 1,749 steps); a shorter epoch would move the weights too little per LR stage.
FULL_EPOCH_STEPS = 1000
#: Epochs are never shorter than this many steps: a pass over fewer batches is repeated (each
#: time with new random views) up to it. With FULL_EPOCH_STEPS it caps the LR at 10x the paper's.
MIN_EPOCH_STEPS = 100
#: The highest LR the rule chooses (for the shortest epochs): 1e-3.
MAX_AUTO_LR = PAPER.lr * FULL_EPOCH_STEPS / MIN_EPOCH_STEPS


def resolve_schedule(n_train: int, *, lr: float | None = None, min_lr: float | None = None,
                     steps_per_epoch: int | None = None, lr_factor: float = PAPER.lr_factor,
                     lr_epochs: int = PAPER.lr_epochs, patience: int = PAPER.patience,
                     batch_size: int = PAPER.batch_size) -> tuple:
    """The schedule for ``n_train`` training images: ``(Schedule, why)``, ``why`` one sentence.

    A pure function of the store's size and what the user set (``None``: choose). The rule, in
    optimiser steps:

    - an epoch is one pass over the training images, but at least ``MIN_EPOCH_STEPS`` batches
      (a store of fewer than 12,800 images repeats its pass, with new random views);
    - the LR is the paper's 1e-4 when an epoch has at least ``FULL_EPOCH_STEPS`` steps, else
      scaled by ``FULL_EPOCH_STEPS / steps`` (at most 10x: 1e-3), so that each LR stage moves
      the weights about as far as the paper's does on AVA;
    - ``min_lr`` keeps the paper's ratio to the LR (1/100: three LR stages).

    A store of AVA's size (223,795 training images, 1,749 steps per epoch) gets exactly the
    paper's schedule. ``steps_per_epoch=0`` asks for one pass per epoch, however short.
    """
    n_train, batch_size = int(n_train), int(batch_size)
    if n_train < 1:
        raise ConfigError(f"the schedule needs at least one training image, received {n_train}")
    pass_steps = math.ceil(n_train / batch_size)
    reasons = []
    if steps_per_epoch is None:
        if pass_steps >= MIN_EPOCH_STEPS:
            reasons.append(f"an epoch (one pass) is {pass_steps:,} steps")
        else:
            steps_per_epoch = MIN_EPOCH_STEPS
            passes = MIN_EPOCH_STEPS * min(batch_size, n_train) / n_train
            reasons.append(f"a pass over {n_train:,} training images is only {pass_steps} steps: an epoch repeats "
                           f"it up to {MIN_EPOCH_STEPS} steps ({passes:.1f} passes, new random views each)")
    elif steps_per_epoch == 0:
        steps_per_epoch = None
        reasons.append(f"an epoch is one pass as asked ({pass_steps:,} steps)")
    else:
        reasons.append(f"{steps_per_epoch} steps per epoch as asked")
    epoch_steps = pass_steps if steps_per_epoch is None else int(steps_per_epoch)
    if lr is None:
        lr = float(f"{min(MAX_AUTO_LR, PAPER.lr * max(1.0, FULL_EPOCH_STEPS / epoch_steps)):.3g}")
        scale = lr / PAPER.lr
        if scale > 1:
            reasons.append(f"LR {fmt_lr(lr)} = the paper's {fmt_lr(PAPER.lr)} x {FULL_EPOCH_STEPS:,}/"
                           f"{max(epoch_steps, MIN_EPOCH_STEPS)} for epochs shorter than {FULL_EPOCH_STEPS:,} steps")
        else:
            reasons[-1] += f", at least {FULL_EPOCH_STEPS:,}: the paper's LR"
    else:
        reasons.append(f"LR {fmt_lr(lr)} as asked")
    if min_lr is None:
        min_lr = float(f"{lr * PAPER.min_lr / PAPER.lr:.3g}")
    elif min_lr > lr:
        raise ConfigError(f"min_lr ({min_lr:g}) is above lr ({lr:g})")
    schedule = Schedule(lr=float(lr), min_lr=float(min_lr), lr_factor=float(lr_factor), lr_epochs=int(lr_epochs),
                        patience=int(patience), batch_size=batch_size, steps_per_epoch=steps_per_epoch)
    why = "; ".join(reasons)
    return schedule, (f"the paper's schedule: {why}" if schedule == PAPER else why)


def fmt_lr(value: float) -> str:
    """A learning rate in short scientific notation: 1e-4, 9.09e-4."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def describe(schedule: Schedule, n_train: int) -> str:
    """The schedule in a few words, e.g. ``LR 1e-3 -> 1e-5 (/10 every 20 epochs or after 5 without
    improvement), batch 128, 100 steps per epoch``."""
    steps = (f"one pass per epoch ({math.ceil(n_train / schedule.batch_size):,} steps)"
             if schedule.steps_per_epoch is None else f"{schedule.steps_per_epoch} steps per epoch")
    return (f"LR {fmt_lr(schedule.lr)} -> {fmt_lr(schedule.min_lr)} (x{schedule.lr_factor:g} every "
            f"{schedule.lr_epochs} epochs or after {schedule.patience} without improvement), batch "
            f"{schedule.batch_size}, {steps}")


def lr_stages(lr: float, factor: float, min_lr: float) -> list:
    """The learning rates the schedule goes through: lr, lr*factor, ... down to min_lr."""
    stages = [float(lr)]
    while stages[-1] * factor >= min_lr * (1 - 1e-6):
        stages.append(float(f"{stages[-1] * factor:.6g}"))
    return stages

