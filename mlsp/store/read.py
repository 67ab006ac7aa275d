"""The feature store: one HDF5 file, the contract between extraction and training.

The format is documented in ``features/README.md``. The store is four rooms:

- :mod:`mlsp.store.format`: names, shapes and configuration keys (:data:`FORMAT_VERSION`);
- this module: reading, through :class:`FeatureStore` (everything downstream reads this way);
- :mod:`mlsp.store.write`: writing a whole store, merging an extraction (:func:`finalize_store`);
- :mod:`mlsp.store.shards`: an extraction's crash-safe partial results (:class:`ShardWriter`).

Every public name of the four stays importable from here.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from typing import Sequence

import h5py
import numpy as np

from ..version import __version__
from ..errors import StoreError
from ..runtime.progress import Closing, ProgressFactory, null_progress
from .shards import PARTIAL_SUFFIX
from .config import CONFIG_KEYS, INSPECTED_KEYS
from .format import (FEATURES_ROOT, FORMAT_VERSION, REQUIRED_ATTRS, REQUIRED_DATASETS, SPLITS, attr_value,
                     decode_strings, first_line, open_h5, read_errors, read_identities)
from ..images.decode import AUGMENTED_VIEWS, FULL_VIEWS

log = logging.getLogger(__name__)

SLAB_BYTES = 64 * 2**20  # largest single read of consecutive images


class FeatureStore(Closing):
    """Read access to a finished store; features stay on disk until read.

    >>> with FeatureStore("features/sample/irv2_wide.h5") as store:
    ...     x = store.read([0, 5, 7])            # (3, V, ...) float16
    ...     x = store.read([0, 5], views=[2, 0])  # (2, ...) one view per image
    """

    def __init__(self, path: str, check_labels: bool = True):
        self.path = str(path)
        self.check_labels = check_labels  # False: extraction, which may be about to rewrite them
        if not os.path.isfile(self.path):
            raise StoreError(f"{self.path}: no such feature store")
        self._file = open_h5(self.path)
        try:
            self._open()
        except StoreError:
            self._file.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError) as exc:
            # h5py's answers to flipped bytes in the file's metadata
            self._file.close()
            raise StoreError(f"{self.path}: damaged HDF5 file ({first_line(exc)}); extract it again") from exc

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
        self.attrs = {k: attr_value(v) for k, v in f.attrs.items()}
        self.features = f["features"]
        self.ids = np.array(decode_strings(f["ids"][:]), dtype=object)
        self.views = decode_strings(f["views"][:])
        self.mos = f["mos"][:].astype(np.float32)
        self.votes = f["votes"][:].astype(np.float32)
        self.split = np.array(decode_strings(f["split"][:]), dtype=object)
        self.paths = np.array(decode_strings(f["paths"][:]), dtype=object) if "paths" in f else None
        self.block_names = list(self.attrs["block_names"])
        self.block_channels = [int(c) for c in self.attrs["block_channels"]]
        if sum(self.block_channels) != self.channels:
            raise StoreError(
                f"{self.path}: block_channels sum to {sum(self.block_channels)} but features have "
                f"{self.channels} channels"
            )
        if len(self.views) != self.n_views:
            raise StoreError(f"{self.path}: {len(self.views)} view names for {self.n_views} stored views")
        self._check_rows(f)
        if self.check_labels:
            self._check_labels()

    def _check_rows(self, f: h5py.File):
        """Ids unique, splits and views among the format's names (views in their stored order),
        sizes not negative: what an edited store could break and a reader would take on trust."""
        if len(set(self.ids.tolist())) != len(self.ids):
            dup = [i for i, c in Counter(self.ids.tolist()).items() if c > 1]
            raise StoreError(f"{self.path}: image id {dup[0]!r} appears more than once"
                             + (f" (and {len(dup) - 1} more ids)" if len(dup) > 1 else "") + "; the store is damaged")
        bad = sorted(set(self.split.tolist()) - set(SPLITS))
        if bad:
            raise StoreError(f"{self.path}: unknown split {bad[0]!r} (known: {', '.join(SPLITS)}); the store is damaged")
        known = [v for v in self.views if v in AUGMENTED_VIEWS]
        if (len(set(self.views)) != len(self.views) or known != [v for v in AUGMENTED_VIEWS if v in known]
                or ("views" in self.attrs and list(self.attrs["views"]) != self.views)):
            raise StoreError(f"{self.path}: views {self.views} are not in the format's order {list(AUGMENTED_VIEWS)} "
                             f"(or {list(FULL_VIEWS)}), or differ from the attribute views "
                             f"{self.attrs.get('views')}; the store is damaged")
        if "sizes" in f:
            sizes = f["sizes"][:]
            if sizes.size and sizes.min() < 0:
                k = int(np.flatnonzero((sizes < 0).any(axis=1))[0])
                raise StoreError(f"{self.path}: image {self.ids[k]} has a negative size {sizes[k].tolist()}; "
                                 "the store is damaged")

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

    def check_features(self, rows: Sequence[int] | None = None, progress: ProgressFactory = null_progress,
                       block_bytes: int = SLAB_BYTES):
        """Raise :class:`StoreError` naming the first image whose features are not finite.

        Cost: one sequential read of the features of ``rows`` (all images by default), in blocks
        of consecutive images of at most ``block_bytes`` (memory: one block), plus one
        ``np.isfinite`` pass over them: about the time of reading the store once (the disk, or
        the page cache, is the limit). Training and scoring check each batch as they read it
        instead (:func:`check_finite`); ``mlsp inspect`` runs this over the whole store.
        ``progress`` is a progress factory (:mod:`mlsp.runtime.progress`).
        """
        rows = np.arange(self.n_images) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        step = max(1, block_bytes // self.image_nbytes)
        bar = progress(total=len(rows), desc="check", unit="img")
        try:
            for lo, hi in consecutive_runs(rows, step):
                part = rows[lo:hi]
                try:
                    block = self.features[int(part[0]):int(part[-1]) + 1]
                except (OSError, ValueError, RuntimeError) as exc:
                    raise StoreError(f"{self.path}: cannot read the features of images {self.ids[part[0]]} to "
                                     f"{self.ids[part[-1]]} ({first_line(exc)}); the store is damaged") from exc
                check_finite(self.path, block, part, self.ids)
                bar.update(len(part))
        finally:
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

    @property
    def image_nbytes(self) -> int:
        """Bytes of one image's stored features (all its views)."""
        return max(1, int(np.prod(self.features.shape[1:])) * self.features.dtype.itemsize)

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
        return read_errors(self._file)

    def identities(self) -> dict:
        """{path: :class:`mlsp.images.identity.FileIdentity`} of every image (its file as it was read)."""
        return dict(zip(self.paths.tolist(), read_identities(self._file, self.n_images)))

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
            for lo, hi in consecutive_runs(unique):
                self.features.read_direct(block, np.s_[unique[lo]:unique[hi - 1] + 1], np.s_[lo:hi])
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


def consecutive_runs(sorted_rows, max_rows: int | None = None) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]``: positions in ``sorted_rows`` (ascending, repeats allowed) whose rows
    are consecutive (or repeated), each of at most ``max_rows`` positions. One slice read per run
    is two orders of magnitude faster than h5py's list indexing on chunked data."""
    rows = np.asarray(sorted_rows, dtype=np.int64)
    if not len(rows):
        return []
    breaks = (np.flatnonzero(~np.isin(np.diff(rows), (0, 1))) + 1).tolist()
    runs = []
    for lo, hi in zip([0] + breaks, breaks + [len(rows)]):
        step = max_rows or hi - lo
        runs += [(start, min(hi, start + step)) for start in range(lo, hi, step)]
    return runs


def chunk_offsets(ds: h5py.Dataset) -> np.ndarray | None:
    """Byte offsets of the store's chunks in its file: (N,) narrow, (N, V) wide; None if not usable.

    The store's ``/features`` is chunked one image (narrow) or one view (wide) per chunk and never
    compressed (features/README.md), so a view is a run of bytes at a known place in the file
    and can be read with one positional read, without h5py's per-call cost and lock (several
    times faster, and parallel). Anything else (filters, another chunking, a chunk never
    written, byte order, no positional reads on this OS, an h5py without ``chunk_iter``) gives
    None: the caller reads through h5py.
    """
    shape = ds.shape
    wide = len(shape) == 5
    want = (1, 1) + tuple(shape[2:]) if wide else (1,) + tuple(shape[1:])
    if (not hasattr(os, "preadv") or ds.chunks != want or ds.dtype.byteorder == ">"
            or ds.id.get_create_plist().get_nfilters()):
        return None
    grid = tuple(shape[:2]) if wide else tuple(shape[:1])
    offsets = np.full(grid, -1, dtype=np.int64)
    try:
        if ds.id.get_num_chunks() != int(np.prod(grid)):
            return None
        if wide:
            def visit(info):
                offsets[info.chunk_offset[0], info.chunk_offset[1]] = info.byte_offset
        else:
            def visit(info):
                offsets[info.chunk_offset[0]] = info.byte_offset
        ds.id.chunk_iter(visit)
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        log.debug("%s: no direct reads (%s)", ds.file.filename, exc)
        return None
    return offsets if offsets.size and offsets.min() >= 0 else None


class FeatureReader(Closing):
    """The store's features read for training: the one other way into ``/features``.

    :class:`FeatureStore` opens everything a store holds; this opens ``/features`` alone, with
    h5py's chunk cache off (a read of one view reads that view's bytes only). Two reads:

    - :meth:`image_runs`: all views of images, one h5py slice read per run of consecutive rows
      (validation, test, loading into memory);
    - :meth:`read_views`: one view per image (training batches), one positional read at the
      view's byte offset where the layout allows (:func:`chunk_offsets`; no lock held, so
      threads reading ahead run in parallel), else one h5py read per view.

    Both check that what they read is finite (:func:`check_finite`), naming the image.
    """

    def __init__(self, path: str, direct: bool = True):
        self.path = str(path)
        self._file = open_h5(self.path, rdcc_nbytes=0)
        if "features" not in self._file:
            self._file.close()
            raise StoreError(f"{self.path}: not an mlsp feature store, missing features")
        self.features = self._file["features"]
        self.n_views = int(self.features.shape[1])
        self.view_shape = tuple(self.features.shape[2:])
        self.dtype = np.dtype(self.features.dtype)
        self.view_nbytes = int(np.prod(self.view_shape)) * self.dtype.itemsize
        self.image_nbytes = self.n_views * self.view_nbytes
        self._offsets = chunk_offsets(self.features) if direct else None
        self._fd = os.open(self.path, os.O_RDONLY) if self._offsets is not None else None
        if self._offsets is None:
            log.debug("%s: reading views through h5py", self.path)

    @property
    def direct(self) -> bool:
        """True when views are read straight from their byte offsets in the file."""
        return self._offsets is not None

    def image_runs(self, indices, max_bytes: int = SLAB_BYTES):
        """Yield ``(positions, block)``: ``block`` the features (all views) of ``indices[positions]``,
        read as one slice of consecutive rows of at most ``max_bytes``, in file order."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        rows = indices[order]
        for lo, hi in consecutive_runs(rows, max(1, max_bytes // self.image_nbytes)):
            first = int(rows[lo])
            block = self.features[first:int(rows[hi - 1]) + 1][rows[lo:hi] - first]
            check_finite(self.path, block, rows[lo:hi], self.image_id)
            yield order[lo:hi], block

    def read_views(self, indices, views) -> np.ndarray:
        """``(n, *view_shape)``: view ``views[k]`` of image ``indices[k]``, for every k."""
        indices, views = np.asarray(indices, dtype=np.int64), np.asarray(views, dtype=np.int64)
        out = np.empty((len(indices),) + self.view_shape, self.dtype)
        order = np.argsort(indices, kind="stable")  # in file order
        if self._offsets is None:
            for k in order:
                out[k] = self.features[int(indices[k]), int(views[k])]
        else:
            self._pread_views(out, indices, views, order)
        check_finite(self.path, out, indices, self.image_id)
        return out

    def _pread_views(self, out, indices, views, order):
        """Fill ``out`` straight from the views' byte offsets in the file, in file order."""
        if self._offsets.ndim == 1:  # narrow: one chunk per image, its views one after the other
            starts = self._offsets[indices] + views * self.view_nbytes
        else:  # wide: one chunk per view
            starts = self._offsets[indices, views]
        for k in order:
            got = os.preadv(self._fd, [memoryview(out[k]).cast("B")], int(starts[k]))
            if got != self.view_nbytes:
                raise StoreError(f"{self.path}: short read of image {int(indices[k])} (file truncated?)")

    def image_id(self, row: int) -> str:
        """The id of the image at ``row`` (read only to name it in an error)."""
        value = self._file["ids"][row]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._file.close()


def open_store(path: str) -> FeatureStore:
    return FeatureStore(path)


def find_latest_store(root: str = FEATURES_ROOT) -> str:
    """The most recently modified finished store (``*.h5``) under ``root``."""
    candidates = [p for p in glob.glob(os.path.join(root, "**", "*.h5"), recursive=True) if os.path.isfile(p)]
    candidates = [p for p in candidates if PARTIAL_SUFFIX not in p]
    if not candidates:
        raise StoreError(f"no feature store under {root}/; run `mlsp extract` first or pass --store")
    return max(candidates, key=os.path.getmtime)


def describe(path: str, check_features: bool = False, progress: ProgressFactory = null_progress) -> dict:
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
        for key in INSPECTED_KEYS:
            if key in s.attrs:
                info[key] = s.attrs[key]
        return info
