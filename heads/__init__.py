"""Stage 2 of MLSP: shallow heads trained on the features of a store (:mod:`mlsp.store`).

Public API::

    list_heads() -> list[HeadSpec]                  # the registry (no Keras import)
    build_head(name, block_channels, *, pooling="narrow", output_bias=0.0, **options) -> keras.Model
    train(TrainConfig(head="pool3fc", store=...), progress=False) -> TrainResult
    evaluate(run_dir, store=None, *, out=None, memory_budget=None) -> {"val": {...}, "test": {...}}

The modules: :mod:`heads.registry` (names -> HeadSpec), :mod:`heads.models` (the four heads),
:mod:`heads.data` (feeding features from memory or the store), :mod:`heads.schedule` (the
paper's LR schedule), :mod:`heads.training`, :mod:`heads.evaluation`, :mod:`heads.plots`. Everything
but the registry imports Keras, so it is loaded on first use.
"""

import importlib
import logging

from .registry import HEADS, HeadSpec, get_head, list_heads, register

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "build_head": "heads.models",
    "train": "heads.training",
    "TrainConfig": "heads.training",
    "TrainResult": "heads.training",
    "evaluate": "heads.evaluation",
    "compute_metrics": "heads.evaluation",
}

__all__ = ["HEADS", "HeadSpec", "get_head", "list_heads", "register", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'heads' has no attribute {name!r}")
