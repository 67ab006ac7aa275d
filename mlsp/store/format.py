"""The feature store's format: names and shapes (``features/README.md``); its
attributes are :mod:`mlsp.store.config`'s table.

:data:`FORMAT_VERSION` is bumped whenever the format changes. Reading is :mod:`mlsp.store.read`,
writing a whole store :mod:`mlsp.store.write`, an extraction's crash-safe shards
:mod:`mlsp.store.shards`. The views, the splits, the wide grid and the poolings are defined here once.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import h5py
import numpy as np

from ..errors import StoreError

FORMAT_VERSION = 3
FEATURES_ROOT = "features"  # where stores go by default: features/<dataset>/<name>.h5
LABELLED_SPLITS = ("train", "val", "test")  # what training needs, each with labelled images
SPLITS = LABELLED_SPLITS + ("unlabeled",)
WIDE_GRID = 5  # wide pooling's grid: each block resized to 5x5


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How every block of a store is pooled: to one value per channel (narrow) or to a
    ``grid`` x ``grid`` map (wide). Stores, configurations and catalogues keep its ``name``;
    code asks this type (:func:`pooling_of`) rather than comparing names."""

    name: str
    grid: int

    @property
    def wide(self) -> bool:
        return self.grid > 1

    @property
    def flag(self) -> str:
        """The extract option that makes it (``--wide`` / ``--narrow``)."""
        return f"--{self.name}"

    def feature_shape(self, n_views: int, channels: int) -> tuple:
        """Shape of one image's features: (V, C) narrow, (V, grid, grid, C) wide."""
        return (n_views, self.grid, self.grid, channels) if self.wide else (n_views, channels)

    def __str__(self):
        return self.name


NARROW = Pooling("narrow", 1)
WIDE = Pooling("wide", WIDE_GRID)
POOLINGS = {p.name: p for p in (NARROW, WIDE)}  # name -> Pooling


def pooling_of(value: "str | bool | Pooling") -> Pooling:
    """The pooling of a name (a store's attribute, a configuration), of ``--wide``'s bool, or
    itself; a StoreError names an unknown one."""
    if isinstance(value, Pooling):
        return value
    if isinstance(value, bool):
        return WIDE if value else NARROW
    if value not in POOLINGS:
        raise StoreError(f"unknown pooling {value!r}; expected one of {', '.join(POOLINGS)}")
    return POOLINGS[value]


REQUIRED_DATASETS = ("features", "ids", "views", "mos", "votes", "split")
# Each image's source file as it was read (mlsp.images.identity): size, modification time (ns), SHA-256.
# Since format version 3; rows of older stores carry -1, -1, "" (not recorded).
IDENTITY_DATASETS = ("file_sizes", "file_mtimes", "sha256")
REQUIRED_ATTRS = ("format_version", "net", "pooling", "block_names", "block_channels")
# What each root attribute is, and which of them are the configuration: mlsp.store.config.

STR_DTYPE = h5py.string_dtype("utf-8")


def encode_name(value) -> bytes:
    """A string as the store keeps it: UTF-8, where a file name that is not valid UTF-8 (which
    Python reads with surrogate escapes, ``'\\udcff'`` for the byte 0xff) keeps its own bytes,
    so that :func:`decode_strings` gives back the very same name."""
    return str(value).encode("utf-8", "surrogateescape")


def as_str_array(values: Iterable[str]) -> np.ndarray:
    return np.array([encode_name(v) for v in values], dtype=object)


def decode_strings(values) -> list[str]:
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values]


def feature_shape(pooling: "str | Pooling", n_views: int, channels: int) -> tuple:
    """Shape of one image's features: (V, C) narrow, (V, 5, 5, C) wide."""
    return pooling_of(pooling).feature_shape(n_views, channels)


def feature_chunks(pooling: "str | Pooling", n_views: int, channels: int) -> tuple:
    """HDF5 chunk of /features: one image's views (narrow) or one view (wide) per read."""
    shape = feature_shape(pooling, n_views, channels)
    return (1, 1) + shape[1:] if pooling_of(pooling).wide else (1,) + shape


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_h5(path: str, mode: str = "r", **kwargs) -> h5py.File:
    """h5py.File, with a file that is not HDF5 (or whose header is damaged) as a StoreError."""
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        raise StoreError(f"{path}: not a readable HDF5 file ({first_line(exc)})") from exc


def attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "OSU":
            return decode_strings(v.tolist())
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_errors(f: h5py.File) -> list[dict]:
    """The ``/errors`` group of a store or shard as ``[{"id", "path", "reason"}]``."""
    g = f.get("errors")
    if g is None or "id" not in g:
        return []
    columns = [decode_strings(g[key][:]) for key in ("id", "path", "reason")]
    return [{"id": i, "path": p, "reason": r} for i, p, r in zip(*columns)]


def read_sources(f: h5py.File) -> list[tuple]:
    """``(id, path, size, identity)`` of every row of a store or shard, in row order; the identity
    a :class:`mlsp.images.identity.FileIdentity` (not known in stores older than format version 3)."""
    ids, paths = decode_strings(f["ids"][:]), decode_strings(f["paths"][:])
    return list(zip(ids, paths, (tuple(s) for s in f["sizes"][:]), read_identities(f, len(ids))))


def read_identities(f: h5py.File, n: int) -> list:
    """The :class:`mlsp.images.identity.FileIdentity` of each of the ``n`` rows (not known where the
    store predates them)."""
    from ..images.identity import UNKNOWN, FileIdentity

    if not all(key in f for key in IDENTITY_DATASETS):
        return [FileIdentity(UNKNOWN, UNKNOWN, "")] * n
    columns = f["file_sizes"][:].tolist(), f["file_mtimes"][:].tolist(), decode_strings(f["sha256"][:])
    return [FileIdentity(int(a), int(b), c) for a, b, c in zip(*columns)]
