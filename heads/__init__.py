"""Stage 2 of MLSP: shallow heads trained on the features of a store (:mod:`mlsp.store`).

The core, here: :mod:`heads.registry` (names -> HeadSpec) and :mod:`heads.models` (the four heads,
each registered beside its builder), :mod:`heads.layers` (their registered layers),
:mod:`heads.targets` and :mod:`heads.distribution` (the MOS or the vote distribution, and its EMD
loss), :mod:`heads.columns` (the scores CSV), :mod:`heads.run` (a run folder), :mod:`heads.data`
(features fed from memory or the store), :mod:`heads.evaluation` and :mod:`heads.plots`. Around it:
:mod:`heads.train`, :mod:`heads.score` (scoring, export, the released models),
:mod:`heads.personal` and :mod:`heads.report` (the HTML report and saliency). The Python API of
every command is :mod:`mlsp.api`.

``import heads`` registers the heads (no Keras import) and, like ``import mlsp``, the heads' Keras
layers and loss the moment Keras is imported, so every saved ``model.keras`` loads with
``keras.saving.load_model(path, safe_mode=True)`` (``MLSP_KERAS_HOOK=0`` turns that hook off: then
``import heads.layers, heads.distribution`` registers them).
"""

import logging
import os

import wrapt

from mlsp import KERAS_HOOK_ENV

from . import models  # noqa: F401  (registers the heads, beside their builders)
from .registry import HEADS, HeadSpec, get_head

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["HEADS", "HeadSpec", "get_head"]


def _register_layers(keras_module):
    from . import distribution, layers  # noqa: F401  (their layers and loss register themselves)


if os.environ.get(KERAS_HOOK_ENV, "1") != "0":
    wrapt.register_post_import_hook(_register_layers, "keras")
