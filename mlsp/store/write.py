"""Writing a feature store: its layout, the merge of an extraction's shards
(:func:`finalize_store`), and new labels for a finished store.

Every store is written under a temporary name and renamed when complete
(:class:`mlsp.runtime.atomic.AtomicPath`), so a store file is complete or absent.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import shutil
from typing import Sequence

import h5py
import numpy as np

from ..version import __version__
from ..runtime.atomic import AtomicPath
from ..errors import StoreError
from ..runtime.files import ensure_space
from ..images.identity import UNKNOWN
from ..runtime.progress import ProgressFactory, null_progress
from .format import (FORMAT_VERSION, STR_DTYPE, as_str_array, attr_value,
                           decode_strings, encode_name, feature_chunks, feature_shape, open_h5, read_errors, read_sources)

log = logging.getLogger(__name__)


def write_attrs(f: h5py.File, attrs: dict):
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            f.attrs.create(key, as_str_array(value), dtype=STR_DTYPE)
        elif isinstance(value, dict):
            f.attrs[key] = json.dumps(value, sort_keys=True)
        elif isinstance(value, str):  # a path may hold a name that is not UTF-8 (encode_name)
            f.attrs.create(key, encode_name(value), dtype=STR_DTYPE)
        else:
            f.attrs[key] = value


def create_layout(f: h5py.File, n: int, views: list, pooling: str, channels: int, attrs: dict):
    shape = feature_shape(pooling, len(views), channels)
    if "features" not in f:  # a shard creates it first, to fill it image by image
        f.create_dataset(
            "features", shape=(n,) + shape, maxshape=(None,) + shape, dtype=np.float16,
            chunks=feature_chunks(pooling, len(views), channels),
        )
    f.create_dataset("ids", shape=(n,), dtype=STR_DTYPE)
    f.create_dataset("paths", shape=(n,), dtype=STR_DTYPE)
    f.create_dataset("sizes", shape=(n, 2), dtype=np.int32)
    f.create_dataset("views", data=as_str_array(views), dtype=STR_DTYPE)
    f.create_dataset("mos", shape=(n,), dtype=np.float32)
    f.create_dataset("votes", shape=(n, 10), dtype=np.float32)
    f.create_dataset("split", shape=(n,), dtype=STR_DTYPE)
    f.create_dataset("file_sizes", shape=(n,), dtype=np.int64, fillvalue=UNKNOWN)
    f.create_dataset("file_mtimes", shape=(n,), dtype=np.int64, fillvalue=UNKNOWN)
    f.create_dataset("sha256", shape=(n,), dtype=STR_DTYPE)
    full = {"format_version": FORMAT_VERSION, "mlsp_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    full.update(attrs)
    write_attrs(f, full)


def write_identities(f: h5py.File, identities: Sequence):
    """Each row's :class:`mlsp.images.identity.FileIdentity` into a layout made by :func:`create_layout`."""
    if identities:
        f["file_sizes"][...] = np.array([i.size for i in identities], dtype=np.int64)
        f["file_mtimes"][...] = np.array([i.mtime_ns for i in identities], dtype=np.int64)
        f["sha256"][...] = as_str_array(i.sha256 for i in identities)


def write_errors(f: h5py.File, errors: Sequence[dict]):
    if "errors" in f:
        del f["errors"]
    g = f.create_group("errors")
    for key in ("id", "path", "reason"):
        g.create_dataset(key, data=as_str_array([e[key] for e in errors]), dtype=STR_DTYPE)


def finalize_store(
    path: str,
    shard_dir: str,
    attrs: dict,
    label_fn,
    previous: str | None = None,
    progress: ProgressFactory = null_progress,
):
    """Merge an unfinished extraction (and a previous finished store) into one sorted store.

    Rows are ordered by source path, so an interrupted and resumed run gives the same file as
    an uninterrupted one. ``label_fn(ids) -> (mos, votes, split)`` assigns labels. Features are
    copied one image at a time: memory stays bounded whatever the store's size. ``progress``
    is a progress factory (:mod:`mlsp.runtime.progress`), called with the number of images to write.
    The result is written under a temporary name and renamed over ``path``; the shard folder is
    removed last.
    """
    sources = []  # (sort key path, id, size, file path, row)
    errors = {}
    for source in ([previous] if previous else []) + sorted(glob.glob(os.path.join(shard_dir, "shard-*.h5"))):
        with h5py.File(source, "r") as f:
            sources += [(p, i, s, source, row, ident) for row, (i, p, s, ident) in enumerate(read_sources(f))]
            errors.update((e["path"], e) for e in read_errors(f))
    # The newest result for a path wins (a shard after a previous store). Ids are unique by
    # construction (mlsp.images.decode.image_ids): two paths under one id are refused, never replaced.
    latest, by_id = {}, {}
    for src in sources:
        old = by_id.get(src[1])
        if old is not None and old[0] != src[0]:
            raise StoreError(f"{src[3]}: image id {src[1]!r} is held by both {old[0]} and {src[0]}; "
                             f"nothing was written to {path}")
        latest[src[0]] = by_id[src[1]] = src
    rows = [latest[k] for k in sorted(latest)]
    for k in latest:
        errors.pop(k, None)
    ids = [r[1] for r in rows]
    mos, votes, split = label_fn(ids)
    per_image = int(np.prod(feature_shape(attrs["pooling"], len(attrs["views"]), int(sum(attrs["block_channels"])))))
    ensure_space(path, len(rows) * (per_image * 2 + 512), margin=4 << 20)
    bar = progress(total=len(rows), desc="write store", unit="img")
    target = AtomicPath(path, kept=f"the extracted images are kept in {shard_dir}"
                        + (f" and {previous} is unchanged" if previous else "")
                        + "; free space and run the same command again")
    with target as tmp, h5py.File(tmp, "w") as out:
        create_layout(out, len(rows), attrs["views"], attrs["pooling"], int(sum(attrs["block_channels"])), attrs)
        out["ids"][...] = as_str_array(ids)
        out["paths"][...] = as_str_array(r[0] for r in rows)
        out["sizes"][...] = np.array([r[2] for r in rows], dtype=np.int32).reshape(len(rows), 2)
        write_identities(out, [r[5] for r in rows])
        out["mos"][...] = mos
        out["votes"][...] = votes
        out["split"][...] = as_str_array(split)
        write_errors(out, [errors[k] for k in sorted(errors)])
        # copy source file by source file (one open file at a time), each row to its place
        by_source = {}
        for dest, r in enumerate(rows):
            by_source.setdefault(r[3], []).append((r[4], dest))
        for source, pairs in by_source.items():
            with h5py.File(source, "r") as src:
                for row, dest in pairs:
                    out["features"][dest] = src["features"][row]
                    bar.update(1)
        bar.close()
    shutil.rmtree(shard_dir)  # shards, config.json and any killed writer's hidden temporary
    return len(rows), len(errors)


def relabel_store(path: str, label_fn, attrs: dict, keys: Sequence[str]) -> int:
    """Rewrite labels and splits of a finished store (features untouched), crash-safe.

    ``label_fn`` runs first, so it may still add to ``attrs``; then ``keys`` of ``attrs`` are
    written. HDF5 cannot change a file safely in place (a kill amid its metadata writes leaves
    it unreadable), so the store is copied under a temporary name, the copy relabelled, synced
    and renamed over the store: a kill at any point leaves the old labels or the new ones.
    This costs one copy of the file, as extending a store does. Nothing is written when nothing
    changed (so this works on read-only media). Returns the number of images."""
    with open_h5(path) as f:
        ids = decode_strings(f["ids"][:])
        mos, votes, split = label_fn(ids)
        have = {k: attr_value(f.attrs[k]) for k in keys if k in f.attrs}
        unchanged = (np.array_equal(f["mos"][:], np.asarray(mos, np.float32), equal_nan=True)
                     and np.array_equal(f["votes"][:], np.asarray(votes, np.float32), equal_nan=True)
                     and decode_strings(f["split"][:]) == [str(v) for v in split]
                     and all(have.get(k) == attrs[k] for k in keys if k in attrs))
    if unchanged:
        log.debug("%s: labels unchanged", path)
        return len(ids)
    ensure_space(path, os.path.getsize(path), margin=4 << 20)
    with AtomicPath(path, kept=f"{path} is unchanged") as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            f["mos"][...] = mos
            f["votes"][...] = votes
            f["split"][...] = as_str_array(split)
            write_attrs(f, {k: attrs[k] for k in keys if k in attrs})
    return len(ids)
