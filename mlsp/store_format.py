"""The feature store's format: names and shapes (``features/README.md``); its
attributes are :mod:`mlsp.store_config`'s table.

:data:`FORMAT_VERSION` is bumped whenever the format changes. Reading is :mod:`mlsp.store`,
writing a whole store :mod:`mlsp.store_write`, an extraction's crash-safe shards
:mod:`mlsp.shards`. The views, the splits, the wide grid and the poolings are defined here once.
"""

from __future__ import annotations

from typing import Iterable

import h5py
import numpy as np

from .errors import StoreError

FORMAT_VERSION = 2
FEATURES_ROOT = "features"  # where stores go by default: features/<dataset>/<name>.h5
LABELLED_SPLITS = ("train", "val", "test")  # what training needs, each with labelled images
SPLITS = LABELLED_SPLITS + ("unlabeled",)
# the stored views of an image: 4 corner crops and their mirror images, or the whole image
AUGMENTED_VIEWS = ("tl", "tl_flip", "tr", "tr_flip", "bl", "bl_flip", "br", "br_flip")
FULL_VIEW = ("full",)
WIDE_GRID = 5  # wide pooling's grid: each block resized to 5x5
POOLINGS = {"narrow": 1, "wide": WIDE_GRID}  # pooling -> grid side


def pooling_of(wide: bool) -> str:
    """The pooling's name for ``--wide`` / ``--narrow``."""
    return "wide" if wide else "narrow"


REQUIRED_DATASETS = ("features", "ids", "views", "mos", "votes", "split")
REQUIRED_ATTRS = ("format_version", "net", "pooling", "block_names", "block_channels")
# What each root attribute is, and which of them are the configuration: mlsp.store_config.

STR_DTYPE = h5py.string_dtype("utf-8")


def as_str_array(values: Iterable[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def decode_strings(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def feature_shape(pooling: str, n_views: int, channels: int) -> tuple:
    """Shape of one image's features: (V, C) narrow, (V, 5, 5, C) wide."""
    if pooling == "narrow":
        return (n_views, channels)
    if pooling == "wide":
        return (n_views, WIDE_GRID, WIDE_GRID, channels)
    raise StoreError(f"unknown pooling {pooling!r}; expected 'narrow' or 'wide'")


def feature_chunks(pooling: str, n_views: int, channels: int) -> tuple:
    """HDF5 chunk of /features: one image's views (narrow) or one view (wide) per read."""
    shape = feature_shape(pooling, n_views, channels)
    if pooling == "narrow":
        return (1,) + shape
    return (1, 1) + shape[1:]


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
        return v.decode("utf-8")
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
    """``(id, path, size)`` of every row of a store or shard, in row order."""
    return list(zip(decode_strings(f["ids"][:]), decode_strings(f["paths"][:]), (tuple(s) for s in f["sizes"][:])))
