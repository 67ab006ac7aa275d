"""Feeding stored features to a head: from memory when they fit, else straight from the store.

A :class:`FeatureSource` hands out the features of given images, either one chosen view per
image (training) or all views (validation, test). Two kinds:

- :class:`MemorySource`: the needed images' features loaded once (when they fit under the
  memory budget, see :func:`open_features`);
- :class:`StoreSource`: every read goes to the file, through the store's own
  :class:`mlsp.store.read.FeatureReader` (this module never opens the file). A training batch reads
  one view per image, each with one positional read at the view's byte offset (the store's
  chunks are uncompressed, one image or one view each), which is several times faster than an
  h5py call per view and runs in parallel threads; stores laid out otherwise are read through
  h5py with its chunk cache off, so one view costs that view's bytes only. All views are read
  one slice per run of consecutive images: h5py's fancy (list) indexing is two orders of
  magnitude slower.

:class:`TrainBatches` draws each epoch's batches (one random stored view per image, a seeded
shuffle) and :func:`predict_views` predicts the mean over all stored views of each image. Both
read ahead in a background thread, so the head does not wait on the disk.

Narrow heads on a wide store: with ``reduce_grid`` the sources return the mean over the 5x5
grid of each view (in float32), which equals the narrow feature.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import resource
import threading
from typing import Iterable, Iterator, Sequence

import keras
import numpy as np

from mlsp.errors import ConfigError, StoreError
from mlsp.images.readahead import wait_waking
from mlsp.store.read import SLAB_BYTES, FeatureReader, FeatureStore

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text) -> int:
    """``"512MB"``, ``"2G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (binary units: 1 GB = 2**30)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"not a memory size: {text!r}; expected e.g. 512MB, 2GB, 1.5GiB or a number of bytes")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 0:
        raise ConfigError(f"a memory size cannot be negative, received {text!r}")
    return value


def _read_int(path: str):
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _status_kib(key: str):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_memory() -> int:
    """Bytes this process can still allocate: the least of free RAM, its cgroup's and its rlimits' room."""
    room = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    room.append(int(line.split()[1]) * 1024)
    except OSError:
        pages = getattr(os, "sysconf", lambda _: -1)("SC_AVPHYS_PAGES")
        if pages and pages > 0:
            room.append(pages * os.sysconf("SC_PAGE_SIZE"))
    limit = _read_int("/sys/fs/cgroup/memory.max") or _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if limit and limit < 2**60:
        used = (_read_int("/sys/fs/cgroup/memory.current")
                or _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes") or 0)
        room.append(limit - used)
    for which, key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            room.append(soft - (_status_kib(key) or 0))
    return max(0, min(room)) if room else 0


def default_memory_budget() -> int:
    """Half of :func:`available_memory`: the rest is for the model, batches and copies."""
    return available_memory() // 2


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def grid_mean(x: np.ndarray) -> np.ndarray:
    """(..., 5, 5, C) -> (..., C): the mean over the grid, in float32 (= the narrow feature)."""
    return x.astype(np.float32).mean(axis=(-3, -2))


class FeatureSource:
    """Features of the store's images by store row; see the module docstring."""

    mode = "?"
    failure: StoreError | None = None  # a damaged store met while reading (see StoreSource._checked)
    n_views: int
    view_shape: tuple  # one view's features as handed out
    dtype: np.dtype

    def take(self, indices: Sequence[int], views: Sequence[int] | None = None) -> np.ndarray:
        """(n, *view_shape) with one view per image, or (n, V, *view_shape) with ``views=None``."""
        raise NotImplementedError

    @property
    def view_nbytes(self) -> int:
        return int(np.prod(self.view_shape)) * np.dtype(self.dtype).itemsize

    def close(self):
        pass


class StoreSource(FeatureSource):
    """Reads every batch from the store, through :class:`mlsp.store.read.FeatureReader`.

    One view per image (training batches): one positional read per view at its byte offset when
    the store's layout allows, else one h5py read. All views (validation, test, loading into
    memory): one read per run of consecutive images.
    """

    mode = "stream"

    def __init__(self, path: str, reduce_grid: bool = False, direct: bool = True):
        self.path = str(path)
        self.reader = FeatureReader(self.path, direct=direct)
        self.reduce_grid = bool(reduce_grid)
        self.n_views = self.reader.n_views
        stored = self.reader.view_shape
        if self.reduce_grid:
            if len(stored) != 3:
                self.reader.close()
                raise StoreError(f"{self.path}: grid reduction asked for, but features are not wide: {stored}")
            self.view_shape, self.dtype = stored[-1:], np.dtype(np.float32)
        else:
            self.view_shape, self.dtype = stored, self.reader.dtype

    @property
    def direct(self) -> bool:
        """True when views are read straight from their byte offsets in the file (see
        :func:`mlsp.store.read.chunk_offsets`)."""
        return self.reader.direct

    @property
    def stored_image_nbytes(self) -> int:
        """Bytes of one image (all views) in the file."""
        return self.reader.image_nbytes

    def _finish(self, x: np.ndarray) -> np.ndarray:
        return grid_mean(x) if self.reduce_grid else x

    def take(self, indices, views=None):
        if views is None:
            indices = np.asarray(indices, dtype=np.int64)
            out = np.empty((len(indices), self.n_views) + self.view_shape, self.dtype)
            for positions, block in self._checked(self.reader.image_runs, indices, SLAB_BYTES):
                out[positions] = self._finish(block)
            return out
        return self._finish(self._checked(self.reader.read_views, indices, views))

    def _checked(self, read, *args):
        """``read(*args)`` of the store's reader, which checks that features are finite
        (:func:`mlsp.store.read.check_finite`). A failure is also kept in :attr:`failure`: raised in a
        thread of Keras' data pipeline, it reaches the trainer wrapped in TensorFlow's error."""
        try:
            result = read(*args)
            return list(result) if not isinstance(result, np.ndarray) else result
        except StoreError as exc:
            self.failure = exc
            raise

    def close(self):
        self.reader.close()


class MemorySource(FeatureSource):
    """The needed images' features held in memory (all views)."""

    mode = "memory"

    def __init__(self, features: np.ndarray, rows: np.ndarray, n_store_images: int):
        self.features = features
        self.n_views = int(features.shape[1])
        self.view_shape = tuple(features.shape[2:])
        self.dtype = features.dtype
        self._row = np.full(n_store_images, -1, dtype=np.int64)
        self._row[rows] = np.arange(len(rows))

    def _rows(self, indices):
        rows = self._row[np.asarray(indices, dtype=np.int64)]
        if len(rows) and rows.min() < 0:
            raise IndexError("image not loaded into memory")
        return rows

    def take(self, indices, views=None):
        rows = self._rows(indices)
        if views is None:
            return self.features[rows]
        return self.features[rows, np.asarray(views, dtype=np.int64)]


def needed_bytes(store: FeatureStore, n_images: int, reduce_grid: bool = False) -> int:
    """Memory that ``n_images`` images' features (all views) take once loaded."""
    per_view = store.channels * 4 if reduce_grid else int(np.prod(store.feature_shape)) * store.features.dtype.itemsize
    return int(n_images) * store.n_views * per_view


def open_features(store: FeatureStore, indices: Sequence[int], *, reduce_grid: bool = False,
                  memory_budget: int | None = None) -> FeatureSource:
    """A source for the images ``indices``: in memory when their features fit the budget, else the store.

    ``memory_budget`` in bytes; ``None`` is :func:`default_memory_budget`, 0 always streams.
    """
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    need = needed_bytes(store, len(indices), reduce_grid)
    stream = StoreSource(store.path, reduce_grid=reduce_grid)
    if need > budget:
        log.info("streaming features from %s: %.2f GiB needed, memory budget %.2f GiB",
                 store.path, need / 2**30, budget / 2**30)
        return stream
    log.info("loading %d images x %d views (%.2f GiB) into memory (budget %.2f GiB)",
             len(indices), store.n_views, need / 2**30, budget / 2**30)
    try:
        features = np.empty((len(indices), stream.n_views) + stream.view_shape, stream.dtype)
    except MemoryError:
        log.warning("could not allocate %.2f GiB for the features: streaming them from the store instead",
                    need / 2**30)
        return stream
    try:
        step = max(1, SLAB_BYTES // stream.stored_image_nbytes)
        for start in range(0, len(indices), step):
            features[start:start + step] = stream.take(indices[start:start + step])
    finally:
        stream.close()
    return MemorySource(features, indices, store.n_images)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def epoch_plan(n_images: int, n_views: int, batch_size: int, seed: int, epoch: int,
               steps: int | None = None) -> list:
    """The batches of one epoch: a list of (positions, views), positions into the training images.

    A pure function of its arguments. With ``steps=None`` an epoch is one pass: every image once,
    in a random order, with one random view each, in ceil(n / batch_size) batches of (nearly)
    equal size (no tiny last batch for batch normalisation). With ``steps`` the epoch has that
    many full batches, drawn from as many passes as needed, each pass a new order and new views.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    if steps is None:
        order = rng.permutation(n_images)
        views = rng.integers(0, n_views, size=n_images)
        n_batches = max(1, math.ceil(n_images / batch_size))
        return list(zip(np.array_split(order, n_batches), np.array_split(views, n_batches)))
    total = int(steps) * min(batch_size, n_images)
    passes = math.ceil(total / n_images)
    order = np.concatenate([rng.permutation(n_images) for _ in range(passes)])[:total]
    views = rng.integers(0, n_views, size=passes * n_images)[:total]
    return list(zip(np.array_split(order, steps), np.array_split(views, steps)))


class TrainBatches(keras.utils.PyDataset):
    """The training batches: (features of one random view per image, label), reshuffled every epoch.

    ``mos``: the label of each image, (n,) MOS or (n, K) for a target of K outputs (the vote
    histograms of :mod:`heads.targets`).

    ``workers > 1`` reads batches ahead in that many threads (Keras' ordered enqueuer: the batch
    order, and so the result, does not depend on it).
    """

    def __init__(self, source: FeatureSource, indices, mos, *, batch_size: int, seed: int,
                 steps_per_epoch: int | None = None, workers: int, max_queue_size: int = 8):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mos = np.asarray(mos, dtype=np.float32)
        if len(self.indices) != len(self.mos) or not len(self.indices):
            raise ValueError("indices and mos must be non-empty and of the same length")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self._plan = self.plan(0)

    def plan(self, epoch: int) -> list:
        return epoch_plan(len(self.indices), self.source.n_views, self.batch_size, self.seed, epoch,
                          self.steps_per_epoch)

    def __len__(self):
        return len(self._plan)

    def batch_items(self, i: int):
        """(store rows, views) of batch ``i`` of the current epoch."""
        positions, views = self._plan[i]
        return self.indices[positions], views

    def __getitem__(self, i):
        positions, views = self._plan[i]
        x = self.source.take(self.indices[positions], views)
        y = self.mos[positions]
        return x, (y[:, None] if y.ndim == 1 else y)

    def on_epoch_end(self):
        # Keras starts the read-ahead of an epoch before on_epoch_begin: plan it here. (Keras also
        # calls this once before the first epoch, after reading two batches to learn their shapes.)
        self.epoch += 1
        self._plan = self.plan(self.epoch)


def prefetch(items: Iterable, size: int = 2) -> Iterator:
    """Iterate ``items`` computed ahead in a background thread (at most ``size`` waiting)."""
    done = object()
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def work():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except Exception as exc:  # handed to the consumer, raised there
            q.put(exc)

    thread = threading.Thread(target=work, name="mlsp-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = wait_waking(q.get, queue.Empty)  # Ctrl-C is seen at once
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def view_predictions(model, features: np.ndarray, rows: int = 0) -> np.ndarray:
    """``(n, V, ...)`` features of n images -> ``(n, V, outputs)``: the model's prediction for
    every view, in one call. ``rows``: pad the call to this many views with zeros (one input shape
    for every call of a loop, so Keras traces once)."""
    n, v = features.shape[:2]
    flat = features.reshape((n * v,) + features.shape[2:])
    if len(flat) < rows:
        flat = np.concatenate([flat, np.zeros((rows - len(flat),) + flat.shape[1:], flat.dtype)])
    return np.asarray(model.predict_on_batch(flat), dtype=np.float64)[: n * v].reshape(n, v, -1)


def predict_views(model, source: FeatureSource, indices: Sequence[int], batch_views: int = 2048) -> np.ndarray:
    """The model's prediction for each image: the mean over all its stored views.

    Shape (n,) for a model of one output (MOS), (n, K) for K outputs (a histogram: the mean
    histogram over the views).
    """
    indices = np.asarray(indices, dtype=np.int64)
    n_views = source.n_views
    per_chunk = max(1, min(batch_views // n_views, SLAB_BYTES // max(1, n_views * source.view_nbytes)))
    chunks = [indices[i:i + per_chunk] for i in range(0, len(indices), per_chunk)]
    outputs = int(np.prod(model.output_shape[1:]))
    out = np.empty((len(indices), outputs), dtype=np.float64)
    pos = 0
    rows = min(per_chunk, len(indices)) * n_views  # one input shape: the last chunk is padded
    for chunk, x in zip(chunks, prefetch(source.take(c) for c in chunks)):
        out[pos:pos + len(chunk)] = view_predictions(model, x, rows).mean(axis=1)
        pos += len(chunk)
    return out[:, 0] if outputs == 1 else out
