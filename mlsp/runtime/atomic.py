"""Files written whole or not at all: a temporary name beside the target, renamed when complete.

Every file mlsp writes (store, shard, model, CSV, JSON) goes through :class:`AtomicPath`
(:func:`atomic_path`, :func:`write_json`): written under a hidden temporary name in the same
folder, fsync'ed, and renamed over its final name (``os.replace``, atomic on POSIX within one
file system). A reader, or a rerun after a crash, a full disk or Ctrl-C, sees the old file or
the new one, never a truncated one under the final name. The standard library and h5py offer
no such helper (``tempfile`` names a file but neither syncs nor renames it; h5py writes in
place). An ``OSError`` while writing (no space left, read-only file system, missing folder)
becomes a :class:`~mlsp.errors.WriteError`: one line naming the file and what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re

from ..errors import WriteError

log = logging.getLogger(__name__)

_TEMP_MARK = ".tmp-"

_PLAIN = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder",
    errno.EIO: "input/output error (failing disk or lost network share?)",
}


def os_error_number(exc: BaseException) -> int | None:
    """The errno of an ``OSError``, also when h5py only put it in the message (``errno = 28``)."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int):
        return number
    match = re.search(r"errno = (\d+)", str(exc))
    return int(match.group(1)) if match else None


def is_write_failure(exc: BaseException) -> bool:
    """An ``OSError``, or h5py's ``RuntimeError`` that carries an errno (a write that failed inside
    HDF5, e.g. "Can't decrement id ref count (file write failed: ... errno = 28 ...)")."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "errno = " in str(exc))


def describe_os_error(exc: BaseException) -> str:
    """A short plain reason for an ``OSError``: "no space left on the device", ..."""
    number = os_error_number(exc)
    if number in _PLAIN:
        return _PLAIN[number]
    if number is not None:
        return os.strerror(number).lower()
    text = getattr(exc, "strerror", None) or str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def temporary_name(path: str, keep_extension: bool = False) -> str:
    """The temporary name of ``path`` while it is written: hidden, in the same folder, with this
    process's id: ``features/x/s.h5`` -> ``features/x/.s.h5.tmp-1234``. Hidden names that do
    not end like the real one are never taken for a finished file (``*.h5`` globs skip them).
    ``keep_extension`` keeps the extension last, for writers that insist on it (Keras: ``.keras``):
    ``runs/x/model.keras`` -> ``runs/x/.model.tmp-1234.keras``."""
    folder, name = os.path.split(os.fspath(path))
    if keep_extension:
        stem, ext = os.path.splitext(name)
        return os.path.join(folder, f".{stem}{_TEMP_MARK}{os.getpid()}{ext}")
    return os.path.join(folder, f".{name}{_TEMP_MARK}{os.getpid()}")


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove temporaries of ``path`` left by processes that died while writing it (any pid).
    Call it only while holding the right to write ``path`` (e.g. its :class:`StoreLock`)."""
    folder, name = os.path.split(os.fspath(path))
    stem, ext = os.path.splitext(name)
    folder = glob.escape(folder or ".")
    patterns = [f".{glob.escape(name)}{_TEMP_MARK}*", f".{glob.escape(stem)}{_TEMP_MARK}*{glob.escape(ext)}"]
    removed = []
    for stale in sorted({p for pattern in patterns for p in glob.glob(os.path.join(folder, pattern))}):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
            removed.append(stale)
    if removed:
        log.debug("removed unfinished files of earlier runs: %s", ", ".join(removed))
    return removed


def fsync_path(path: str):
    """Flush a written file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicPath:
    """A file written under a temporary name and renamed over ``path`` when complete.

    As a context manager, for a file written in one go::

        with AtomicPath("runs/x/metrics.json") as tmp:
            with open(tmp, "w") as handle:
                json.dump(metrics, handle)

    or held open across calls (a shard that fills image by image): ``a = AtomicPath(p)``, write
    to ``a.tmp``, then ``a.commit()`` or ``a.discard()``.

    On success the file is fsync'ed and renamed; on any exception the temporary is removed and
    nothing under ``path`` changes. An ``OSError`` (while writing, or from the rename) becomes a
    :class:`~mlsp.errors.WriteError` naming ``path``, saying ``kept`` (what is still there:
    "the previous file is unchanged" by default) -- one line for the user. The parent folder is
    created when missing (``makedirs=False``: a missing folder is that error). ``keep_extension``:
    see :func:`temporary_name`.
    """

    def __init__(self, path, *, kept: str | None = None, makedirs: bool = True, sync: bool = True,
                 keep_extension: bool = False):
        self.path = os.fspath(path)
        self.tmp = temporary_name(self.path, keep_extension)
        self.kept = kept
        self.sync = sync
        try:
            if makedirs:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        except OSError as exc:
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> WriteError:
        kept = self.kept
        if kept is None:
            kept = "the previous file is unchanged" if os.path.exists(self.path) else "nothing was written"
        return WriteError(self.path, describe_os_error(exc), kept)

    def commit(self) -> str:
        try:
            if self.sync:
                fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise self.error(exc) from exc
        if self.sync:
            with contextlib.suppress(OSError):  # the rename itself; not every file system syncs folders
                fsync_path(os.path.dirname(os.path.abspath(self.path)))
        return self.path

    def discard(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
            return False
        self.discard()
        if is_write_failure(exc):
            raise self.error(exc) from exc
        return False


def atomic_path(path, **options) -> AtomicPath:
    """``with atomic_path(path) as tmp:`` write ``tmp``; see :class:`AtomicPath` for ``options``."""
    return AtomicPath(path, **options)


def write_json(path: str, data, **dump_options) -> None:
    """``data`` as indented JSON (``default=str`` for what JSON lacks), written atomically."""
    dump_options.setdefault("indent", 2)
    dump_options.setdefault("default", str)
    with AtomicPath(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, **dump_options)
        handle.write("\n")
