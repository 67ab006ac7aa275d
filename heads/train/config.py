"""The training configuration: every hyper-parameter of a run, as given (``None``: chosen from the
store's size by :func:`heads.train.schedule.resolve_schedule`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from mlsp.errors import ConfigError
from mlsp.runtime.precision import DEFAULT as DEFAULT_PRECISION, check as check_precision

from ..registry import get_head
from .schedule import MAX_AUTO_LR, PAPER, resolve_schedule
from ..targets import DEFAULT_TARGET, TARGETS


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run.

    ``lr``, ``min_lr`` and ``steps_per_epoch`` left at ``None`` are chosen from the store's size
    (:func:`heads.train.schedule.resolve_schedule`: the paper's values on a store of AVA's size, more
    steps per epoch and a higher LR on small ones); the other defaults are the paper's
    (:data:`heads.train.schedule.PAPER`). ``epochs`` caps the number of epochs; ``None`` runs until the
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
    precision: str = DEFAULT_PRECISION

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
        TARGETS.get(self.target)
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
        check_precision(self.precision)
        if not isinstance(self.head_options, dict):
            raise ConfigError(f"head_options must be a mapping, received {self.head_options!r}")

    def schedule(self, n_train: int) -> tuple:
        """``(Schedule, why)`` for ``n_train`` training images: :func:`heads.train.schedule.resolve_schedule`."""
        return resolve_schedule(n_train, lr=self.lr, min_lr=self.min_lr, steps_per_epoch=self.steps_per_epoch,
                                lr_factor=self.lr_factor, lr_epochs=self.lr_epochs, patience=self.patience,
                                batch_size=self.batch_size)
