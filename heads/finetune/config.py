"""Every option of ``mlsp finetune`` and its default, in one place (the CLI and docs read them here).

Defaults follow the seeds: the two phases of NIMA (the new head first, the backbone frozen; then
the unfrozen part at a lower rate) and the learning rates of the fine-tuned classifiers (Wang,
Li, Porikli: 0.001 for the new layer, 0.0001 for the others, SGD). ``optimizer`` ``adam`` with
``head_lr 0.001`` and ``backbone_lr 0.00003`` is idealo's NIMA (docs/finetune.md has each
seed's command).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mlsp.backbone.weights import WeightsSource
from mlsp.errors import ConfigError
from mlsp.extraction.job import ExtractConfig, extract as extract_images
from mlsp.runtime.precision import DEFAULT as DEFAULT_PRECISION, check as check_precision
from mlsp.images.readahead import DECODE_WORKERS
from mlsp.registry import Registry

from ..targets import TARGETS, TargetSpec
from .nets import DEFAULT_NET, NETS

#: What a fine-tuned network predicts: mlsp's targets (MOS, the vote distribution) and the
#: 2-class decision of the fine-tuned classifiers.
FINETUNE_TARGETS: Registry[TargetSpec] = Registry("fine-tuning target")
for _name in TARGETS:
    FINETUNE_TARGETS.register(TARGETS[_name])
FINETUNE_TARGETS.register(TargetSpec("binary", 2, "softmax", "categorical_crossentropy",
                                     "good (MOS > 5) or bad, 2-class softmax, cross-entropy (the fine-tuned "
                                     "classifiers); --delta leaves out the images near 5"))
OPTIMIZERS = ("sgd", "adam")
SGD_MOMENTUM = 0.9
RESIZE_RATIO = 256 / 224  # images are resized to size * 256/224 and randomly cropped to size (NIMA's 256 -> 224)
ALL = "all"


def _default(parameter: str):
    """``mlsp extract``'s default of ``parameter``: the splits are drawn as a store's."""
    import inspect

    return inspect.signature(extract_images).parameters[parameter].default


@dataclasses.dataclass
class FinetuneConfig:
    """One fine-tuning run. ``unfreeze``: ``"all"`` or the number of top blocks trained in phase
    2 (0: only the head, ever). ``fc``: widths of dense layers (ReLU) between the pooled features
    and the output (the reduced fc6/fc7); empty: none (NIMA). ``head_epochs``: phase 1's epochs,
    ``epochs``: phase 2's at most (early stopping on validation loss with ``patience``). The splits
    are drawn as ``mlsp extract`` draws them (same labels, test list or fraction, val fraction and
    seed: the same test split as the store of the same folder)."""

    images: str
    labels: str
    out: str | None = None
    test_list: str | None = None
    net: str = DEFAULT_NET
    target: str = "mos"
    weights: str = ExtractConfig.weights
    size: int = 224
    delta: float = 0.0
    fc: tuple = ()
    dropout: float = 0.75  # NIMA's
    head_epochs: int = 5
    epochs: int = 10
    unfreeze: str = ALL
    optimizer: str = "sgd"
    head_lr: float = 1e-3
    backbone_lr: float = 1e-4
    phase2_head_lr: float | None = None  # the head's rate in phase 2; None: head_lr
    batch_size: int = 32
    patience: int = 3
    steps_per_epoch: int = 0  # 0: one pass over the training images
    val_fraction: float = _default("val_fraction")
    test_fraction: float = _default("test_fraction")
    seed: int = _default("seed")
    workers: int = DECODE_WORKERS
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        self.fc = tuple(int(w) for w in self.fc)
        self.unfreeze = str(self.unfreeze)
        NETS.get(self.net)
        FINETUNE_TARGETS.get(self.target)
        WeightsSource.parse(self.weights)
        check_precision(self.precision)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, received {self.optimizer!r}")
        if self.unfreeze != ALL and not (self.unfreeze.isdigit()):
            raise ConfigError(f"--unfreeze takes 'all' or a number of top blocks, received {self.unfreeze!r}")
        if self.delta and self.target != "binary":
            raise ConfigError("--delta leaves out the images near MOS 5 of the binary target; give --target binary")
        if not 0 <= self.delta < 4.5:
            raise ConfigError(f"--delta must be in [0, 4.5), received {self.delta!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), received {self.dropout!r}")
        spec = NETS[self.net]
        if self.size < spec.min_side:
            raise ConfigError(f"--size {self.size}: {self.net} needs at least {spec.min_side} px")
        if min(self.head_lr, self.backbone_lr) <= 0 or self.batch_size < 1 or min(self.epochs, self.head_epochs) < 0:
            raise ConfigError("learning rates and --batch-size must be positive, epochs not negative")
        if any(w < 1 for w in self.fc):
            raise ConfigError(f"--fc widths must be positive, received {self.fc}")

    @property
    def resize(self) -> int:
        """The square side images are resized to before the random crop of ``size``."""
        return int(round(self.size * RESIZE_RATIO))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fc": list(self.fc)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown fine-tuning options: {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def training_key(self) -> dict:
        """What a resumed run must share with the interrupted one: everything but where the
        output goes and the decoding threads (which change no result)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("out", "workers")}
