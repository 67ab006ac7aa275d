"""The generic head seen from a person: its prediction, its last hidden layer, its last layers.

A personal model adapts a run's head (the *generic* model) without retraining it:

- the residual methods read the input of the head's last Dense layer (its *last hidden layer*;
  for Single-1FC, the features themselves), averaged over an image's views;
- fine-tuning copies the head's *tail*: the last Dense layer and the layers before it up to and
  including the Dense before that, when they form a chain (3FC heads: ``fc2, bn2, dropout2,
  out``; Single-1FC and Multi-3FC's weighted sum: the last Dense alone).

:class:`GenericHead` computes all of it in one pass over a store's features (one Keras model with
three outputs) and names the generic model by its file's SHA-256, which a personal model keeps.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from mlsp.runtime.files import file_sha256
from mlsp.errors import ConfigError
from mlsp.runtime.progress import ProgressFactory, null_progress
from mlsp.store.read import SLAB_BYTES, FeatureStore

from ..run import MODEL_FILE, Run
from ..score.scoring import check_store_matches
from .adapt import GENERIC_SCALE
from .features import pooled

log = logging.getLogger(__name__)

#: Layers a fine-tuned tail may hold besides Dense ones (none has more than one input).
TAIL_LAYERS = (keras.layers.BatchNormalization, keras.layers.Dropout, keras.layers.Activation)
TAIL_DENSE = 2


def last_dense(model) -> keras.layers.Dense:
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ConfigError(f"the head {model.name!r} has no Dense layer to adapt")
    return dense[-1]


def tail_layers(model, n_dense: int = TAIL_DENSE) -> list:
    """The chain of layers that ends in the last Dense layer and holds at most ``n_dense`` Dense ones."""
    by_output = {id(layer.output): layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}
    chain, dense = [last_dense(model)], 1
    while dense < n_dense:
        source = chain[0].input
        before = by_output.get(id(source)) if not isinstance(source, (list, tuple)) else None
        if before is None or not isinstance(before, (keras.layers.Dense, *TAIL_LAYERS)):
            break
        chain.insert(0, before)
        dense += isinstance(before, keras.layers.Dense)
    return chain


class GenericHead:
    """A finished run's head (a run of the ``mos`` target), or a released model's
    (:meth:`released`), opened for personalisation."""

    def __init__(self, run_dir: str, allow_unfinished: bool = False):
        self.run = Run.open(run_dir, allow_unfinished=allow_unfinished)
        target = self.run.config.get("target", "mos")
        if target != "mos":
            raise ConfigError(f"{run_dir}: a run of the {target!r} target; personal models adapt a run of "
                              "the mos target (mlsp train --target mos)")
        self.name = self.run.path
        self.source = {"run": self.run.path, "model": MODEL_FILE, "net": self.run.store_info["net"],
                       "pooling": self.run.store_info["pooling"]}
        self.check_store = lambda store: check_store_matches(self.run, store)
        self._taps(self.run.load_model(), file_sha256(self.run.model_path))

    @classmethod
    def released(cls, model: str, progress=None) -> "GenericHead":
        """A released model's head (a catalogue name or the path of its file, as ``mlsp score
        --model`` takes it), named by its file's SHA-256; stores must hold its own features."""
        from ..score.released import open_model

        opened = open_model(model, progress=progress)
        head = cls.__new__(cls)
        head.run, head.name = None, opened.spec.name
        head.source = {"run": None, "model": opened.spec.name, "net": opened.spec.net,
                       "pooling": opened.spec.pooling}
        head.check_store = opened.check_store
        head._taps(opened.head, opened.spec.sha256)
        return head

    def _taps(self, model, sha256: str):
        self.model, self.sha256 = model, sha256
        self.tail = tail_layers(self.model)
        hidden = last_dense(self.model).input
        self.taps = keras.Model(self.model.input, [self.model.output, hidden, self.tail[0].input])
        self.hidden_dim = int(hidden.shape[-1])
        self.fine_tuner = None  # made on first use (heads.personal.methods.FineTuner)

    def describe(self) -> dict:
        """What a personal model records of the generic one."""
        return {**self.source, "sha256": self.sha256, "head": self.model.name, "scale": list(GENERIC_SCALE),
                "tail": [layer.name for layer in self.tail]}

    def open_store(self, path: str) -> FeatureStore:
        """The store, checked to hold features this head takes (same net, pooling and blocks)."""
        store = FeatureStore(path)
        try:
            self.check_store(store)
        except BaseException:
            store.close()
            raise
        return store

    def apply(self, features: np.ndarray):
        """(n, V, ...) features -> per view: generic prediction (n, V), last hidden layer
        (n, V, d) and the tail's input (n, V, d_tail)."""
        n, v = features.shape[:2]
        flat = features.reshape((n * v,) + features.shape[2:])
        pred, hidden, tail = (np.asarray(a, np.float64) for a in self.taps.predict_on_batch(flat))
        return pred.reshape(n, v), hidden.reshape(n, v, -1), tail.reshape(n, v, -1)

    def embed(self, store: FeatureStore, rows, progress: ProgressFactory = null_progress, basis=None):
        """Generic prediction (n,) and last hidden layer (n, d), each the mean over the views, of
        the given store rows (read once, in slabs, sorted; returned in the order asked), and with
        a ``basis`` (:class:`heads.personal.features.Basis`) their content (n, D) from the same
        read (None without)."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        generic = np.empty(len(rows))
        hidden = np.empty((len(rows), self.hidden_dim), np.float32)
        content = None if basis is None else np.empty((len(rows), basis.dims))
        step = max(1, SLAB_BYTES // store.image_nbytes)
        bar = progress(total=len(rows), desc="generic", unit="img")
        try:
            for start in range(0, len(rows), step):
                at = order[start:start + step]
                read = store.read(rows[at])
                pred, h, _ = self.apply(read)
                generic[at], hidden[at] = pred.mean(1), h.mean(1)
                if basis is not None:
                    content[at] = basis.project(pooled(read))
                bar.update(len(at))
        finally:
            bar.close()
        return generic, hidden, content

    def tail_inputs(self, store: FeatureStore, rows) -> np.ndarray:
        """(n, V, d_tail) per-view inputs of the tail (what fine-tuning trains on)."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        out = None
        step = max(1, SLAB_BYTES // store.image_nbytes)
        for start in range(0, len(rows), step):
            at = order[start:start + step]
            tail = self.apply(store.read(rows[at]))[2]
            if out is None:
                out = np.empty((len(rows),) + tail.shape[1:], np.float32)
            out[at] = tail
        return out if out is not None else np.empty((0, 1, 1), np.float32)


def open_generic(source, allow_unfinished: bool = False) -> GenericHead:
    """``source`` as a :class:`GenericHead`: one already opened, or a run folder."""
    return source if isinstance(source, GenericHead) else GenericHead(source, allow_unfinished=allow_unfinished)
