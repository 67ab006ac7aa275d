"""The feature store: one HDF5 file, the contract between extraction and training.

The format is documented in ``features/README.md``; :data:`FORMAT_VERSION` is bumped whenever
it changes. This module owns reading and writing it. Extraction writes through
:class:`ShardWriter` (crash-safe partial results) and :func:`finalize_store` (one sorted file);
everything downstream reads through :class:`FeatureStore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import json
import logging
import os
from typing import Iterable, Sequence

import h5py
import numpy as np

from . import __version__
from .atomic import AtomicPath, is_write_failure, remove_stale_temporaries
from .errors import StoreConfigMismatch, StoreError
from .files import ensure_space

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test", "unlabeled")
AUGMENTED_VIEWS = ("tl", "tl_flip", "tr", "tr_flip", "bl", "bl_flip", "br", "br_flip")
FULL_VIEW = ("full",)
REQUIRED_DATASETS = ("features", "ids", "views", "mos", "votes", "split")
REQUIRED_ATTRS = ("format_version", "net", "pooling", "block_names", "block_channels")
# The attributes that make two extractions produce comparable features. A store is only ever
# extended, or scored against, under the same values.
CONFIG_KEYS = (
    "net",
    "pooling",
    "views",
    "weights_source",
    "weights_sha256",
    "preprocessing",
    "crop_fraction",
    "max_side",
    "precision",
)

_STR = h5py.string_dtype("utf-8")


def _as_str_array(values: Iterable[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def feature_shape(pooling: str, n_views: int, channels: int) -> tuple:
    """Shape of one image's features: (V, C) narrow, (V, 5, 5, C) wide."""
    if pooling == "narrow":
        return (n_views, channels)
    if pooling == "wide":
        return (n_views, 5, 5, channels)
    raise StoreError(f"unknown pooling {pooling!r}; expected 'narrow' or 'wide'")


def feature_chunks(pooling: str, n_views: int, channels: int) -> tuple:
    """HDF5 chunk of /features: one image's views (narrow) or one view (wide) per read."""
    shape = feature_shape(pooling, n_views, channels)
    if pooling == "narrow":
        return (1,) + shape
    return (1, 1) + shape[1:]


def config_differences(have: dict, want: dict) -> dict:
    """{key: (have, want)} for every configuration key whose values differ."""
    diff = {}
    for key in CONFIG_KEYS:
        a, b = have.get(key), want.get(key)
        if isinstance(a, np.ndarray):
            a = a.tolist()
        if isinstance(b, np.ndarray):
            b = b.tolist()
        if isinstance(a, (list, tuple)):
            a = list(a)
        if isinstance(b, (list, tuple)):
            b = list(b)
        if a != b:
            diff[key] = (a, b)
    return diff


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class FeatureStore:
    """Read access to a finished store; features stay on disk until read.

    >>> with FeatureStore("features/sample/irv2_wide.h5") as store:
    ...     x = store.read([0, 5, 7])            # (3, V, ...) float16
    ...     x = store.read([0, 5], views=[2, 0])  # (2, ...) one view per image
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise StoreError(f"{self.path}: no such feature store")
        self._file = _open_h5(self.path)
        try:
            self._open()
        except StoreError:
            self._file.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError) as exc:
            # h5py's answers to flipped bytes in the file's metadata
            self._file.close()
            raise StoreError(f"{self.path}: damaged HDF5 file ({_first_line(exc)}); extract it again") from exc

    def _open(self):
        f = self._file
        missing = [k for k in REQUIRED_DATASETS if k not in f] + [k for k in REQUIRED_ATTRS if k not in f.attrs]
        if missing:
            raise StoreError(f"{self.path}: not an mlsp feature store, missing {', '.join(missing)}")
        version = int(f.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {version} is newer than this mlsp "
                f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade mlsp"
            )
        lengths = {k: f[k].shape[0] for k in ("features", "ids", "paths", "sizes", "mos", "votes", "split") if k in f}
        if len(set(lengths.values())) > 1:
            raise StoreError(f"{self.path}: datasets of unequal length ("
                             + ", ".join(f"{k} {v}" for k, v in lengths.items()) + "); the store is damaged")
        self.attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        self.features = f["features"]
        self.ids = np.array(_decode(f["ids"][:]), dtype=object)
        self.views = _decode(f["views"][:])
        self.mos = f["mos"][:].astype(np.float32)
        self.votes = f["votes"][:].astype(np.float32)
        self.split = np.array(_decode(f["split"][:]), dtype=object)
        self.paths = np.array(_decode(f["paths"][:]), dtype=object) if "paths" in f else None
        self.block_names = list(self.attrs["block_names"])
        self.block_channels = [int(c) for c in self.attrs["block_channels"]]
        if sum(self.block_channels) != self.channels:
            raise StoreError(
                f"{self.path}: block_channels sum to {sum(self.block_channels)} but features have "
                f"{self.channels} channels"
            )
        if len(self.views) != self.n_views:
            raise StoreError(f"{self.path}: {len(self.views)} view names for {self.n_views} stored views")
        self._check_labels()

    def _check_labels(self):
        """MOS is NaN (no label) or in 1..10, vote counts finite and >= 0 where present."""
        bad = ~np.isnan(self.mos) & ~((self.mos >= 1) & (self.mos <= 10))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise StoreError(f"{self.path}: image {self.ids[k]} has MOS {self.mos[k]:g}, outside 1..10"
                             + (f" (and {int(bad.sum()) - 1} more)" if bad.sum() > 1 else "")
                             + "; the store is damaged: extract it again, or rewrite its labels with "
                             "`mlsp extract` and --labels")
        present = ~np.isnan(self.votes).all(axis=1)
        bad = present & ~(np.isfinite(self.votes) & (self.votes >= 0)).all(axis=1)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise StoreError(f"{self.path}: image {self.ids[k]} has invalid vote counts {self.votes[k].tolist()}"
                             "; the store is damaged")

    def check_features(self, rows: Sequence[int] | None = None, progress=None, block_bytes: int = 64 << 20):
        """Raise :class:`StoreError` naming the first image whose features are not finite.

        Cost: one sequential read of the features of ``rows`` (all images by default), in blocks
        of consecutive images of at most ``block_bytes`` (memory: one block), plus one
        ``np.isfinite`` pass over them: about the time of reading the store once (the disk, or
        the page cache, is the limit). Training and scoring check each batch as they read it
        instead (:func:`check_finite`); ``mlsp inspect`` runs this over the whole store.
        ``progress`` is a tqdm-like factory.
        """
        rows = np.arange(self.n_images) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        per_image = max(1, int(np.prod(self.features.shape[1:])) * self.features.dtype.itemsize)
        step = max(1, block_bytes // per_image)
        bar = progress(total=len(rows), desc="check", unit="img") if progress else None
        try:
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for run in np.split(rows, breaks) if len(rows) else []:
                for start in range(0, len(run), step):
                    part = run[start:start + step]
                    try:
                        block = self.features[int(part[0]):int(part[-1]) + 1]
                    except (OSError, ValueError, RuntimeError) as exc:
                        raise StoreError(f"{self.path}: cannot read the features of images {self.ids[part[0]]} to "
                                         f"{self.ids[part[-1]]} ({_first_line(exc)}); the store is damaged") from exc
                    check_finite(self.path, block, part, self.ids)
                    if bar is not None:
                        bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()

    # -- description -------------------------------------------------------------------------
    @property
    def net(self) -> str:
        return str(self.attrs["net"])

    @property
    def pooling(self) -> str:
        return str(self.attrs["pooling"])

    @property
    def n_images(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_views(self) -> int:
        return int(self.features.shape[1])

    @property
    def channels(self) -> int:
        return int(self.features.shape[-1])

    @property
    def feature_shape(self) -> tuple:
        """Shape of one view's features: (C,) narrow or (5, 5, C) wide."""
        return tuple(self.features.shape[2:])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.features.shape)) * self.features.dtype.itemsize

    def config(self) -> dict:
        return {k: self.attrs.get(k) for k in CONFIG_KEYS}

    def fingerprint(self) -> str:
        """A short hash of the configuration and the image ids: the identity of the features."""
        import hashlib

        digest = hashlib.sha256(json.dumps(self.config(), sort_keys=True, default=str).encode())
        for i in self.ids:
            digest.update(i.encode("utf-8") + b"\0")
        return digest.hexdigest()[:16]

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def errors(self) -> list[dict]:
        g = self._file.get("errors")
        if g is None or "id" not in g:
            return []
        return [
            {"id": i, "path": p, "reason": r}
            for i, p, r in zip(_decode(g["id"][:]), _decode(g["path"][:]), _decode(g["reason"][:]))
        ]

    # -- reading -----------------------------------------------------------------------------
    def read(self, indices: Sequence[int], views: Sequence[int] | None = None) -> np.ndarray:
        """Features of the given images (any order, repeats allowed), straight from disk.

        ``views=None`` returns all views, (n, V, ...); otherwise one view per image, (n, ...).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            shape = self.features.shape[1:] if views is None else self.features.shape[2:]
            return np.empty((0,) + tuple(shape), dtype=self.features.dtype)
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        unique, inverse = np.unique(sorted_idx, return_inverse=True)
        if views is None:
            # h5py's list indexing is slow on chunked data: read runs of consecutive rows as slices
            block = np.empty((len(unique),) + tuple(self.features.shape[1:]), dtype=self.features.dtype)
            breaks = np.flatnonzero(np.diff(unique) != 1) + 1
            for run in np.split(np.arange(len(unique)), breaks):
                first, last = unique[run[0]], unique[run[-1]]
                self.features.read_direct(block, np.s_[first:last + 1], np.s_[run[0]:run[-1] + 1])
            out = block[inverse]
        else:
            views = np.asarray(views, dtype=np.int64)[order]
            out = np.empty((len(indices),) + self.feature_shape, dtype=self.features.dtype)
            for k, (i, v) in enumerate(zip(sorted_idx, views)):
                out[k] = self.features[i, v]
        result = np.empty_like(out)
        result[order] = out
        check_finite(self.path, result, indices, self.ids)
        return result

    def load(self) -> np.ndarray:
        """All features in memory (only when they fit; see :attr:`nbytes`), checked to be finite."""
        out = self.features[...]
        check_finite(self.path, out, np.arange(len(out)), self.ids)
        return out

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (
            f"FeatureStore({self.path!r}, net={self.net}, pooling={self.pooling}, "
            f"images={self.n_images}, views={self.n_views}, channels={self.channels})"
        )


def check_finite(path: str, features: np.ndarray, rows: Sequence[int], ids=None):
    """Raise :class:`StoreError` naming the first image among ``rows`` whose ``features`` (one
    entry per row, any views) hold a NaN or an infinity: what flipped bits in a float16 store
    look like. One ``np.isfinite`` pass over what was read (a fraction of reading it); ``ids``
    (a sequence, or a callable ``row -> id``) names the image."""
    features = np.asarray(features)
    if features.size == 0 or np.isfinite(features).all():
        return
    flat = np.isfinite(features.reshape(len(features), -1)).all(axis=1)
    k = int(np.flatnonzero(~flat)[0])
    row = int(np.asarray(rows)[k])
    if callable(ids):
        name = ids(row)
    else:
        name = ids[row] if ids is not None else None
    image = f"image {name} (row {row})" if name is not None else f"the image at row {row}"
    raise StoreError(f"{path}: {image} has features that are not finite (NaN or infinity) ({int((~flat).sum())} "
                     "such images in this read): the store is damaged; extract it again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_h5(path: str, mode: str = "r", **kwargs) -> h5py.File:
    """h5py.File, with a file that is not HDF5 (or whose header is damaged) as a StoreError."""
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        raise StoreError(f"{path}: not a readable HDF5 file ({_first_line(exc)})") from exc


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "OSU":
            return _decode(v.tolist())
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def open_store(path: str) -> FeatureStore:
    return FeatureStore(path)


def find_latest_store(root: str = "features") -> str:
    """The most recently modified finished store (``*.h5``) under ``root``."""
    candidates = [p for p in glob.glob(os.path.join(root, "**", "*.h5"), recursive=True) if os.path.isfile(p)]
    candidates = [p for p in candidates if ".partial" not in p]
    if not candidates:
        raise StoreError(f"no feature store under {root}/; run `mlsp extract` first or pass --store")
    return max(candidates, key=os.path.getmtime)


def describe(path: str, check_features: bool = False, progress=None) -> dict:
    """What a store holds, as plain data (used by ``mlsp inspect``).

    Labels and dataset lengths are always checked (opening the store does). ``check_features``
    also reads every feature once (:meth:`FeatureStore.check_features`: the time of one
    sequential read of the store) and sets ``features_check`` to ``"ok"`` or the problem."""
    with FeatureStore(path) as s:
        counts = {k: int((s.split == k).sum()) for k in SPLITS}
        labelled = np.isfinite(s.mos)
        info = {
            "path": s.path,
            "format_version": s.attrs.get("format_version"),
            "net": s.net,
            "pooling": s.pooling,
            "images": s.n_images,
            "views": s.views,
            "channels": s.channels,
            "blocks": len(s.block_names),
            "features_shape": list(s.features.shape),
            "features_dtype": str(s.features.dtype),
            "features_chunks": list(s.features.chunks or ()),
            "size_gib": round(s.nbytes / 2**30, 3),
            "splits": counts,
            "labelled": int(labelled.sum()),
            "mos_mean": float(np.nanmean(s.mos)) if labelled.any() else None,
            "mos_std": float(np.nanstd(s.mos)) if labelled.any() else None,
            "errors": len(s.errors()),
        }
        if check_features:
            try:
                s.check_features(progress=progress)
                info["features_check"] = "ok"
            except StoreError as exc:
                info["features_check"] = str(exc)
        for key in ("weights_source", "weights_sha256", "preprocessing", "crop_fraction", "max_side",
                    "precision", "dataset", "labels_file", "test_list", "val_fraction", "seed",
                    "labels_without_images", "backend", "backend_version", "device", "mlsp_version", "created"):
            if key in s.attrs:
                info[key] = s.attrs[key]
        return info


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_attrs(f: h5py.File, attrs: dict):
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            f.attrs.create(key, _as_str_array(value), dtype=_STR)
        elif isinstance(value, dict):
            f.attrs[key] = json.dumps(value, sort_keys=True)
        else:
            f.attrs[key] = value


def write_store(
    path: str,
    features: np.ndarray,
    ids: Sequence[str],
    *,
    net: str,
    pooling: str,
    block_names: Sequence[str],
    block_channels: Sequence[int],
    views: Sequence[str] | None = None,
    mos=None,
    votes=None,
    split=None,
    paths=None,
    errors: Sequence[dict] = (),
    attrs: dict | None = None,
):
    """Write a complete store from in-memory arrays (tests, synthetic stores, small data).

    Extraction does not use this: it streams through :class:`ShardWriter` and
    :func:`finalize_store`, which write the same layout.
    """
    features = np.asarray(features)
    n = features.shape[0]
    n_views = features.shape[1]
    if views is None:
        views = AUGMENTED_VIEWS if n_views == 8 else FULL_VIEW if n_views == 1 else [f"v{i}" for i in range(n_views)]
    mos = np.full(n, np.nan, np.float32) if mos is None else np.asarray(mos, np.float32)
    votes = np.full((n, 10), np.nan, np.float32) if votes is None else np.asarray(votes, np.float32)
    if split is None:
        split = np.where(np.isfinite(mos), "train", "unlabeled")
    base = dict(attrs or {})
    base.update(net=net, pooling=pooling, block_names=list(block_names),
                block_channels=[int(c) for c in block_channels])
    with AtomicPath(path) as tmp, h5py.File(tmp, "w") as f:
        _create_layout(f, n, list(views), pooling, features.shape[-1], base)
        f["features"][...] = features.astype(np.float16)
        f["ids"][...] = _as_str_array(ids)
        f["paths"][...] = _as_str_array(paths if paths is not None else ids)
        f["sizes"][...] = 0
        f["mos"][...] = mos
        f["votes"][...] = votes
        f["split"][...] = _as_str_array(split)
        _write_errors(f, errors)


def _create_layout(f: h5py.File, n: int, views: list, pooling: str, channels: int, attrs: dict):
    shape = feature_shape(pooling, len(views), channels)
    if "features" not in f:  # a shard creates it first, to fill it image by image
        f.create_dataset(
            "features", shape=(n,) + shape, maxshape=(None,) + shape, dtype=np.float16,
            chunks=feature_chunks(pooling, len(views), channels),
        )
    f.create_dataset("ids", shape=(n,), dtype=_STR)
    f.create_dataset("paths", shape=(n,), dtype=_STR)
    f.create_dataset("sizes", shape=(n, 2), dtype=np.int32)
    f.create_dataset("views", data=_as_str_array(views), dtype=_STR)
    f.create_dataset("mos", shape=(n,), dtype=np.float32)
    f.create_dataset("votes", shape=(n, 10), dtype=np.float32)
    f.create_dataset("split", shape=(n,), dtype=_STR)
    full = {"format_version": FORMAT_VERSION, "mlsp_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    full.update(attrs)
    write_attrs(f, full)


def _write_errors(f: h5py.File, errors: Sequence[dict]):
    if "errors" in f:
        del f["errors"]
    g = f.create_group("errors")
    for key in ("id", "path", "reason"):
        g.create_dataset(key, data=_as_str_array([e[key] for e in errors]), dtype=_STR)


@dataclasses.dataclass
class ShardRecord:
    """What one shard of an unfinished extraction holds."""

    path: str
    ids: list
    paths: list
    errors: list


class ShardWriter:
    """Crash-safe partial results of an extraction, in ``<store>.partial/``.

    Each image's features are written into the open shard file as they arrive (memory stays
    flat: one image at a time, whatever the number of images or the size of wide features).
    The open shard lives under a temporary name (:class:`mlsp.files.AtomicPath`); every
    ``flush_images`` images, ``flush_bytes`` bytes or ``flush_seconds`` seconds it is completed
    (ids, paths, sizes, errors), fsync'ed and renamed to ``shard-NNNNNN.h5``. A shard is
    therefore either complete or absent: Ctrl-C or SIGTERM completes the open one, and a kill or
    power loss loses only the images since the last shard (their temporary is removed by the
    next run). ``config.json`` in the folder holds the extraction's configuration, so a rerun with
    another configuration is refused, not mixed in. Nothing is created on disk before the first
    image or error arrives (a rerun with nothing to do works on read-only media).

    One writer per folder: hold the store's :class:`mlsp.files.StoreLock` while writing.
    """

    def __init__(self, store_path: str, config: dict, layout: dict, flush_images: int = 64,
                 flush_seconds: float = 30.0, flush_bytes: int = 1 << 30):
        import time

        self._time = time.monotonic
        self.dir = str(store_path) + ".partial"
        self.config = dict(config)
        self.layout = dict(layout)  # views, pooling, channels
        self.flush_images = flush_images
        self.flush_seconds = flush_seconds
        self.flush_bytes = flush_bytes
        self._config_path = os.path.join(self.dir, "config.json")
        if os.path.exists(self._config_path):
            with open(self._config_path) as handle:
                try:
                    have = json.load(handle)
                except ValueError as exc:
                    raise StoreError(f"{self._config_path}: not valid JSON ({exc}); delete the folder "
                                     f"{self.dir} to start the extraction over") from exc
            diff = config_differences(have, self.config)
            if diff:
                raise StoreConfigMismatch(self.dir, diff)
        self._shard = None  # (AtomicPath, h5py.File) of the open shard
        self._records = []  # (id, path, size) of the images in the open shard
        self._errors = []
        self._bytes = 0
        self._opened = self._time()
        self._next_index = 1 + max([_shard_number(p) for p in self.shard_paths()] or [0])

    def remove(self):
        """Delete the (shard-less) partial folder once nothing in it is needed."""
        if not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def shard_paths(self) -> list:
        return sorted(glob.glob(os.path.join(self.dir, "shard-*.h5")))

    def read_shards(self) -> list[ShardRecord]:
        records = []
        for p in self.shard_paths():
            with _open_h5(p) as f:
                g = f["errors"]
                errors = [
                    {"id": i, "path": q, "reason": r}
                    for i, q, r in zip(_decode(g["id"][:]), _decode(g["path"][:]), _decode(g["reason"][:]))
                ]
                records.append(ShardRecord(p, _decode(f["ids"][:]), _decode(f["paths"][:]), errors))
        return records

    @property
    def pending(self) -> int:
        """Images and errors in the open shard, not yet on disk under a real name."""
        return len(self._records) + len(self._errors)

    def add(self, image_id: str, path: str, size: tuple, features: np.ndarray):
        """Write one image's features into the open shard (raises :class:`mlsp.files.NoSpace`,
        with the open shard intact, when the disk cannot take them)."""
        features = np.asarray(features, dtype=np.float16)
        ensure_space(self.dir, features.nbytes)
        f = self._open()
        ds = f["features"]
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = features
        self._records.append((image_id, path, tuple(int(v) for v in size)))
        self._bytes += features.nbytes
        self._maybe_flush()

    def add_error(self, image_id: str, path: str, reason: str):
        self._open()
        self._errors.append({"id": image_id, "path": path, "reason": reason})
        self._maybe_flush()

    def _open(self) -> h5py.File:
        if self._shard is not None:
            return self._shard[1]
        ensure_space(self.dir, 0)
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
        if not os.path.exists(self._config_path):
            with AtomicPath(self._config_path) as tmp, open(tmp, "w") as handle:
                json.dump({**self.config, **self.layout}, handle, indent=1, sort_keys=True)
        # what a killed writer left (this one holds the store's lock)
        for stale in glob.glob(os.path.join(self.dir, "*.tmp")) + glob.glob(os.path.join(self.dir, ".*.tmp-*")):
            os.remove(stale)
        name = os.path.join(self.dir, f"shard-{self._next_index:06d}.h5")
        target = AtomicPath(name, kept="the images of earlier shards are kept")
        f = h5py.File(target.tmp, "w")
        shape = feature_shape(self.layout["pooling"], len(self.layout["views"]), self.layout["channels"])
        f.create_dataset("features", shape=(0,) + shape, maxshape=(None,) + shape, dtype=np.float16,
                         chunks=feature_chunks(self.layout["pooling"], len(self.layout["views"]),
                                               self.layout["channels"]))
        self._shard = (target, f)
        self._opened = self._time()
        return f

    def _maybe_flush(self):
        if (self.pending >= self.flush_images or self._bytes >= self.flush_bytes
                or self._time() - self._opened >= self.flush_seconds):
            self.flush()

    def flush(self):
        """Complete the open shard and rename it to its real name (nothing to do if none is open)."""
        if self._shard is None:
            return
        target, f = self._shard
        n = len(self._records)
        try:
            with f:
                f["features"].resize(n, axis=0)  # an image interrupted half-way is not in the shard
                _create_layout(f, n, self.layout["views"], self.layout["pooling"], self.layout["channels"], {})
                if n:
                    f["ids"][...] = _as_str_array(r[0] for r in self._records)
                    f["paths"][...] = _as_str_array(r[1] for r in self._records)
                    f["sizes"][...] = np.array([r[2] for r in self._records], dtype=np.int32)
                _write_errors(f, self._errors)
        except BaseException as exc:
            _UNCLOSABLE.append(f)  # its close may have failed: see discard()
            target.discard()
            self._shard, self._records, self._errors, self._bytes = None, [], [], 0
            if is_write_failure(exc):
                raise target.error(exc) from exc
            raise
        target.commit()
        log.debug("wrote %d images and %d errors to %s", n, len(self._errors), target.path)
        self._next_index += 1
        self._shard, self._records, self._errors, self._bytes = None, [], [], 0

    def discard(self):
        """Drop the open shard (its images will be extracted again by the next run)."""
        if self._shard is None:
            return
        target, f = self._shard
        try:
            f.close()
        except Exception:  # noqa: BLE001 (any failure of HDF5 here is the one handled below)
            # HDF5 met a failed write (a full disk): the file cannot be closed, and freeing h5py's
            # objects of it would crash the interpreter. Keep them until the process ends.
            _UNCLOSABLE.append(f)
        target.discard()
        self._shard, self._records, self._errors, self._bytes = None, [], [], 0

    def close(self):
        """Complete the open shard; the same as :meth:`flush`."""
        self.flush()


_UNCLOSABLE: list = []  # h5py files whose close failed (see ShardWriter.discard)


def _shard_number(path: str) -> int:
    return int(os.path.basename(path).split("-")[1].split(".")[0])


def finalize_store(
    path: str,
    shard_dir: str,
    attrs: dict,
    label_fn,
    previous: str | None = None,
    progress=None,
):
    """Merge an unfinished extraction (and a previous finished store) into one sorted store.

    Rows are ordered by source path, so an interrupted and resumed run gives the same file as
    an uninterrupted one. ``label_fn(ids) -> (mos, votes, split)`` assigns labels. Features are
    copied one image at a time: memory stays bounded whatever the store's size. ``progress``
    is a tqdm-like factory, called with the number of images to write. The result is
    written under a temporary name and renamed over ``path``; the shard folder is removed last.
    """
    sources = []  # (sort key path, id, size, file path, row)
    errors = {}
    if previous:
        with h5py.File(previous, "r") as f:
            for row, (i, p, s) in enumerate(zip(_decode(f["ids"][:]), _decode(f["paths"][:]), f["sizes"][:])):
                sources.append((p, i, tuple(s), previous, row))
            if "errors" in f:
                g = f["errors"]
                for i, q, r in zip(_decode(g["id"][:]), _decode(g["path"][:]), _decode(g["reason"][:])):
                    errors[q] = {"id": i, "path": q, "reason": r}
    for shard in sorted(glob.glob(os.path.join(shard_dir, "shard-*.h5"))):
        with h5py.File(shard, "r") as f:
            for row, (i, p, s) in enumerate(zip(_decode(f["ids"][:]), _decode(f["paths"][:]), f["sizes"][:])):
                sources.append((p, i, tuple(s), shard, row))
            g = f["errors"]
            for i, q, r in zip(_decode(g["id"][:]), _decode(g["path"][:]), _decode(g["reason"][:])):
                errors[q] = {"id": i, "path": q, "reason": r}
    # The newest result for a path wins (a shard after a previous store); so does the newest
    # for an id, when a file was replaced by one of another name (x.png by x.jpg).
    latest, by_id = {}, {}
    for src in sources:
        old = by_id.get(src[1])
        if old is not None and old[0] != src[0]:
            log.warning("%s replaces %s (same id %r)", src[0], old[0], src[1])
            latest.pop(old[0], None)
        latest[src[0]] = by_id[src[1]] = src
    rows = [latest[k] for k in sorted(latest)]
    for k in latest:
        errors.pop(k, None)
    ids = [r[1] for r in rows]
    mos, votes, split = label_fn(ids)
    per_image = int(np.prod(feature_shape(attrs["pooling"], len(attrs["views"]), int(sum(attrs["block_channels"])))))
    ensure_space(path, len(rows) * (per_image * 2 + 512), margin=4 << 20)
    bar = progress(total=len(rows), desc="write store", unit="img") if progress else None
    target = AtomicPath(path, kept=f"the extracted images are kept in {shard_dir}"
                        + (f" and {previous} is unchanged" if previous else "")
                        + "; free space and run the same command again")
    with target as tmp, h5py.File(tmp, "w") as out:
        _create_layout(out, len(rows), attrs["views"], attrs["pooling"], int(sum(attrs["block_channels"])), attrs)
        out["ids"][...] = _as_str_array(ids)
        out["paths"][...] = _as_str_array(r[0] for r in rows)
        out["sizes"][...] = np.array([r[2] for r in rows], dtype=np.int32).reshape(len(rows), 2)
        out["mos"][...] = mos
        out["votes"][...] = votes
        out["split"][...] = _as_str_array(split)
        _write_errors(out, [errors[k] for k in sorted(errors)])
        # copy source file by source file (one open file at a time), each row to its place
        by_source = {}
        for dest, r in enumerate(rows):
            by_source.setdefault(r[3], []).append((r[4], dest))
        for source, pairs in by_source.items():
            with h5py.File(source, "r") as src:
                for row, dest in pairs:
                    out["features"][dest] = src["features"][row]
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
    for shard in glob.glob(os.path.join(shard_dir, "*")):
        os.remove(shard)
    os.rmdir(shard_dir)
    return len(rows), len(errors)


def relabel_store(path: str, label_fn, attrs: dict, keys: Sequence[str]) -> int:
    """Rewrite labels and splits of a finished store in place (features untouched).

    ``label_fn`` runs first, so it may still add to ``attrs``; then ``keys`` of ``attrs`` are
    written. Nothing is written when nothing changed (so this works on read-only media).
    Returns the number of images."""
    with _open_h5(path) as f:
        ids = _decode(f["ids"][:])
        mos, votes, split = label_fn(ids)
        have = {k: _attr_value(f.attrs[k]) for k in keys if k in f.attrs}
        unchanged = (np.array_equal(f["mos"][:], np.asarray(mos, np.float32), equal_nan=True)
                     and np.array_equal(f["votes"][:], np.asarray(votes, np.float32), equal_nan=True)
                     and _decode(f["split"][:]) == [str(v) for v in split]
                     and all(have.get(k) == attrs[k] for k in keys if k in attrs))
    if unchanged:
        log.debug("%s: labels unchanged", path)
        return len(ids)
    with h5py.File(path, "r+") as f:
        f["mos"][...] = mos
        f["votes"][...] = votes
        f["split"][...] = _as_str_array(split)
        write_attrs(f, {k: attrs[k] for k in keys if k in attrs})
        return len(ids)
