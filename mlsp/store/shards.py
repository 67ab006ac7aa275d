"""Crash-safe partial results of an extraction: shard files in ``<store>.partial/``.

A shard is written under a temporary name and renamed when complete: it is complete or absent.
:func:`mlsp.store.write.finalize_store` merges the shards into the store.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil

import h5py
import numpy as np

from ..runtime.atomic import AtomicPath, is_write_failure, write_json
from ..errors import StoreConfigMismatch, StoreError
from ..runtime.files import ensure_space
from .config import config_differences
from .format import (as_str_array, feature_chunks, feature_shape, open_h5, read_errors,
                           read_sources)
from ..images.identity import UNKNOWN, FileIdentity
from .write import create_layout, write_errors, write_identities

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"  # <store>.partial/: the shards of an unfinished extraction


#: An open shard is completed (and so kept through a crash) after this many images, seconds or bytes.
FLUSH_IMAGES = 64
FLUSH_SECONDS = 30.0
FLUSH_BYTES = 1 << 30


def partial_dir(store_path: str) -> str:
    """The folder of a store's unfinished extraction."""
    return str(store_path) + PARTIAL_SUFFIX


def remove_store(store_path: str):
    """Delete a store and its unfinished partial results, where they exist."""
    if os.path.exists(store_path):
        os.remove(store_path)
    if os.path.isdir(partial_dir(store_path)):
        shutil.rmtree(partial_dir(store_path))


@dataclasses.dataclass
class ShardRecord:
    """What one shard of an unfinished extraction holds."""

    path: str
    ids: list
    paths: list
    errors: list
    identities: list  # mlsp.images.identity.FileIdentity of each image


class ShardWriter:
    """Crash-safe partial results of an extraction, in ``<store>.partial/``.

    Each image's features are written into the open shard file as they arrive (memory stays
    flat: one image at a time, whatever the number of images or the size of wide features).
    The open shard lives under a temporary name (:class:`mlsp.runtime.atomic.AtomicPath`); every
    ``flush_images`` images, ``flush_bytes`` bytes or ``flush_seconds`` seconds it is completed
    (ids, paths, sizes, errors), fsync'ed and renamed to ``shard-NNNNNN.h5``. A shard is
    therefore either complete or absent: Ctrl-C or SIGTERM completes the open one, and a kill or
    power loss loses only the images since the last shard (their temporary is removed by the
    next run). ``config.json`` in the folder holds the extraction's configuration, so a rerun with
    another configuration is refused, not mixed in. Nothing is created on disk before the first
    image or error arrives (a rerun with nothing to do works on read-only media).

    One writer per folder: hold the store's :class:`mlsp.runtime.files.StoreLock` while writing.
    """

    def __init__(self, store_path: str, config: dict, layout: dict, flush_images: int = FLUSH_IMAGES,
                 flush_seconds: float = FLUSH_SECONDS, flush_bytes: int = FLUSH_BYTES):
        import time

        self._time = time.monotonic
        self.dir = partial_dir(store_path)
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
        self._records = []  # (id, path, size, identity) of the images in the open shard
        self._errors = []
        self._bytes = 0
        self._opened = self._time()
        self._next_index = 1 + max([shard_number(p) for p in self.shard_paths()] or [0])

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
            with open_h5(p) as f:
                rows = read_sources(f)
                records.append(ShardRecord(p, [r[0] for r in rows], [r[1] for r in rows], read_errors(f),
                                           [r[3] for r in rows]))
        return records

    @property
    def pending(self) -> int:
        """Images and errors in the open shard, not yet on disk under a real name."""
        return len(self._records) + len(self._errors)

    @property
    def open_images(self) -> int:
        """Images in the open shard (lost if it cannot be completed)."""
        return len(self._records)

    def add(self, image_id: str, path: str, size: tuple, features: np.ndarray, identity=None):
        """Write one image's features into the open shard (raises :class:`mlsp.runtime.files.NoSpace`,
        with the open shard intact, when the disk cannot take them). ``identity``: its file's
        :class:`mlsp.images.identity.FileIdentity` (None: not known)."""
        features = np.asarray(features, dtype=np.float16)
        ensure_space(self.dir, features.nbytes)
        f = self._open()
        ds = f["features"]
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = features
        self._records.append((image_id, path, tuple(int(v) for v in size),
                              identity or FileIdentity(UNKNOWN, UNKNOWN, "")))
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
            write_json(self._config_path, {**self.config, **self.layout}, indent=1, sort_keys=True)
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
                create_layout(f, n, self.layout["views"], self.layout["pooling"], self.layout["channels"], {})
                if n:
                    f["ids"][...] = as_str_array(r[0] for r in self._records)
                    f["paths"][...] = as_str_array(r[1] for r in self._records)
                    f["sizes"][...] = np.array([r[2] for r in self._records], dtype=np.int32)
                    write_identities(f, [r[3] for r in self._records])
                write_errors(f, self._errors)
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

    def discard(self) -> int:
        """Drop the open shard (its images will be extracted again by the next run); the number of
        images dropped."""
        if self._shard is None:
            return 0
        target, f = self._shard
        dropped = len(self._records)
        try:
            f.close()
        except Exception:  # noqa: BLE001 (any failure of HDF5 here is the one handled below)
            # HDF5 met a failed write (a full disk): the file cannot be closed, and freeing h5py's
            # objects of it would crash the interpreter. Keep them until the process ends.
            _UNCLOSABLE.append(f)
        target.discard()
        self._shard, self._records, self._errors, self._bytes = None, [], [], 0
        return dropped

    def close(self):
        """Complete the open shard; the same as :meth:`flush`."""
        self.flush()


_UNCLOSABLE: list = []  # h5py files whose close failed (see ShardWriter.discard)


def shard_number(path: str) -> int:
    return int(os.path.basename(path).split("-")[1].split(".")[0])
