"""The feature store: one HDF5 file, the contract between extraction and training.

The format is documented in ``features/README.md``; :data:`FORMAT_VERSION` is bumped whenever
it changes. This module owns reading and writing it. Extraction writes through
:class:`ShardWriter` (crash-safe partial results) and :func:`finalize_store` (one sorted file);
everything downstream reads through :class:`FeatureStore`.
"""

from __future__ import annotations

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
from .errors import StoreConfigMismatch, StoreError

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
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        f = self._file
        missing = [k for k in REQUIRED_DATASETS if k not in f] + [k for k in REQUIRED_ATTRS if k not in f.attrs]
        if missing:
            self._file.close()
            raise StoreError(f"{self.path}: not an mlsp feature store, missing {', '.join(missing)}")
        version = int(f.attrs["format_version"])
        if version > FORMAT_VERSION:
            self._file.close()
            raise StoreError(
                f"{self.path}: store format version {version} is newer than this mlsp "
                f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade mlsp"
            )
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
        return result

    def load(self) -> np.ndarray:
        """All features in memory (only when they fit; see :attr:`nbytes`)."""
        return self.features[...]

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


def describe(path: str) -> dict:
    """What a store holds, as plain data (used by ``mlsp inspect``)."""
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
        for key in ("weights_source", "weights_sha256", "preprocessing", "crop_fraction", "max_side",
                    "precision", "dataset", "labels_file", "test_list", "val_fraction", "seed",
                    "labels_without_images", "mlsp_version", "created"):
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


def _fsync_path(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    tmp = str(path) + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(tmp, "w") as f:
        _create_layout(f, n, list(views), pooling, features.shape[-1], base)
        f["features"][...] = features.astype(np.float16)
        f["ids"][...] = _as_str_array(ids)
        f["paths"][...] = _as_str_array(paths if paths is not None else ids)
        f["sizes"][...] = 0
        f["mos"][...] = mos
        f["votes"][...] = votes
        f["split"][...] = _as_str_array(split)
        _write_errors(f, errors)
    os.replace(tmp, path)


def _create_layout(f: h5py.File, n: int, views: list, pooling: str, channels: int, attrs: dict):
    shape = feature_shape(pooling, len(views), channels)
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

    Features are buffered and written as a shard file every ``flush_images`` images,
    ``flush_bytes`` bytes (which bounds memory with wide features) or ``flush_seconds``
    seconds: written under a temporary name, fsync'ed, then renamed. A shard is
    therefore either complete or absent: Ctrl-C flushes the buffer, and a kill or power loss
    loses only the images not yet flushed. ``config.json`` in the folder holds the extraction's
    configuration, so a rerun with another configuration is refused, not mixed in.
    """

    def __init__(self, store_path: str, config: dict, layout: dict, flush_images: int = 64,
                 flush_seconds: float = 30.0, flush_bytes: int = 64 << 20):
        import time

        self._time = time.monotonic
        self.dir = str(store_path) + ".partial"
        self.config = dict(config)
        self.layout = dict(layout)  # views, pooling, channels
        self.flush_images = flush_images
        self.flush_seconds = flush_seconds
        self.flush_bytes = flush_bytes
        os.makedirs(self.dir, exist_ok=True)
        cfg_path = os.path.join(self.dir, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as handle:
                have = json.load(handle)
            diff = config_differences(have, self.config)
            if diff:
                raise StoreConfigMismatch(self.dir, diff)
        else:
            tmp = cfg_path + ".tmp"
            with open(tmp, "w") as handle:
                json.dump({**self.config, **self.layout}, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, cfg_path)
        for stale in glob.glob(os.path.join(self.dir, "*.tmp")):
            os.remove(stale)
        self._buffer = []
        self._errors = []
        self._last_flush = self._time()
        self._next_index = 1 + max([_shard_number(p) for p in self.shard_paths()] or [0])

    def remove(self):
        """Delete the (shard-less) partial folder once nothing in it is needed."""
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def shard_paths(self) -> list:
        return sorted(glob.glob(os.path.join(self.dir, "shard-*.h5")))

    def read_shards(self) -> list[ShardRecord]:
        records = []
        for p in self.shard_paths():
            with h5py.File(p, "r") as f:
                g = f["errors"]
                errors = [
                    {"id": i, "path": q, "reason": r}
                    for i, q, r in zip(_decode(g["id"][:]), _decode(g["path"][:]), _decode(g["reason"][:]))
                ]
                records.append(ShardRecord(p, _decode(f["ids"][:]), _decode(f["paths"][:]), errors))
        return records

    def add(self, image_id: str, path: str, size: tuple, features: np.ndarray):
        self._buffer.append((image_id, path, size, np.asarray(features, dtype=np.float16)))
        self._maybe_flush()

    def add_error(self, image_id: str, path: str, reason: str):
        self._errors.append({"id": image_id, "path": path, "reason": reason})
        self._maybe_flush()

    def _maybe_flush(self):
        pending = len(self._buffer) + len(self._errors)
        buffered = sum(b[3].nbytes for b in self._buffer)
        if (pending >= self.flush_images or buffered >= self.flush_bytes
                or (pending and self._time() - self._last_flush >= self.flush_seconds)):
            self.flush()

    def flush(self):
        if not self._buffer and not self._errors:
            return
        name = os.path.join(self.dir, f"shard-{self._next_index:06d}.h5")
        tmp = name + ".tmp"
        n = len(self._buffer)
        with h5py.File(tmp, "w") as f:
            _create_layout(f, n, self.layout["views"], self.layout["pooling"], self.layout["channels"], {})
            if n:
                for k, b in enumerate(self._buffer):  # row by row: no second copy of the buffer
                    f["features"][k] = b[3]
                f["ids"][...] = _as_str_array(b[0] for b in self._buffer)
                f["paths"][...] = _as_str_array(b[1] for b in self._buffer)
                f["sizes"][...] = np.array([b[2] for b in self._buffer], dtype=np.int32)
            _write_errors(f, self._errors)
        _fsync_path(tmp)
        os.replace(tmp, name)
        log.debug("flushed %d images and %d errors to %s", n, len(self._errors), name)
        self._next_index += 1
        self._buffer, self._errors = [], []
        self._last_flush = self._time()


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
    bar = progress(total=len(rows), desc="write store", unit="img") if progress else None
    tmp = str(path) + ".tmp"
    with h5py.File(tmp, "w") as out:
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
    _fsync_path(tmp)
    os.replace(tmp, path)
    for shard in glob.glob(os.path.join(shard_dir, "*")):
        os.remove(shard)
    os.rmdir(shard_dir)
    return len(rows), len(errors)


def relabel_store(path: str, label_fn, attrs: dict, keys: Sequence[str]) -> int:
    """Rewrite labels and splits of a finished store in place (features untouched).

    ``label_fn`` runs first, so it may still add to ``attrs``; then ``keys`` of ``attrs`` are
    written. Returns the number of images."""
    with h5py.File(path, "r+") as f:
        ids = _decode(f["ids"][:])
        mos, votes, split = label_fn(ids)
        f["mos"][...] = mos
        f["votes"][...] = votes
        f["split"][...] = _as_str_array(split)
        write_attrs(f, {k: attrs[k] for k in keys if k in attrs})
        return len(ids)
