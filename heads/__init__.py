"""Stage 2 of MLSP: shallow heads trained on the features of a store (:mod:`mlsp.store.read`).

Public API::

    HEADS.specs() -> list[HeadSpec]                 # the registry (no Keras import); HEADS.register(spec)
    build_head(name, block_channels, *, pooling="narrow", output_bias=0.0, **options) -> keras.Model
    train(TrainConfig(head="pool3fc", store=...), progress=False) -> TrainResult
    evaluate(run_dir, store=None, *, out=None, memory_budget=None) -> {"val": {...}, "test": {...}}

The modules: :mod:`heads.registry` (names -> HeadSpec), :mod:`heads.models` (the four heads) and
:mod:`heads.layers` (their registered layers), :mod:`heads.targets` (what a head predicts: the
MOS or the vote distribution) and :mod:`heads.distribution` (the distribution's EMD loss),
:mod:`heads.data` (feeding features from memory or the store), :mod:`heads.train.schedule` (the
schedule's values for a store's size), :mod:`heads.train.schedule_callback` (the paper's LR schedule),
:mod:`heads.train.loop`, :mod:`heads.run` (a run folder), :mod:`heads.evaluation`,
:mod:`heads.score.scoring` (a run applied to a store or to image files), :mod:`heads.score.export` (backbone +
head as one model), :mod:`heads.plots`, :mod:`heads.score.catalogue` (the catalogue of released
pretrained heads, fetched and checked), :mod:`heads.score.keras2` (the authors' Keras 2 weight files
imported into single3fc/pool3fc), :mod:`heads.score.released` (a released model scored
with its own test-time views) and :mod:`heads.personal` (a head adapted to one person).
Everything but the registry, the targets and the catalogue imports Keras, so it is loaded on
first use.
"""

import importlib
import logging
import os

import wrapt

from mlsp import KERAS_HOOK_ENV

from . import models  # noqa: F401  (registers the heads, beside their builders)
from .registry import HEADS, HeadSpec, get_head

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _register_layers(keras_module):
    from . import distribution, layers  # noqa: F401  (their layers and loss register themselves)


# like mlsp's: the heads' layers are registered as soon as Keras is imported, so every saved
# model.keras loads with keras.saving.load_model(path, safe_mode=True) after `import heads`
# (MLSP_KERAS_HOOK=0 turns it off: then `import heads.layers, heads.distribution` registers them)
if os.environ.get(KERAS_HOOK_ENV, "1") != "0":
    wrapt.register_post_import_hook(_register_layers, "keras")

_LAZY = {
    "build_head": "heads.models",
    "train": "heads.train.loop",
    "TrainConfig": "heads.train.config",
    "TrainResult": "heads.train.loop",
    "evaluate": "heads.evaluation",
    "compute_metrics": "heads.evaluation",
    "Run": "heads.run",
    "score_store": "heads.score.scoring",
    "score_images": "heads.score.scoring",
}

__all__ = ["HEADS", "HeadSpec", "get_head", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'heads' has no attribute {name!r}")
