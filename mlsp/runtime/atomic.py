"""Files written whole or not at all: a temporary name beside the target, renamed when complete.

Every file mlsp writes (store, shard, model, CSV, JSON) goes through :class:`AtomicPath`
(:func:`atomic_path`, :func:`write_json`): written under a hidden temporary name in the same
folder, fsync'ed, and renamed over its final name (``os.replace``, atomic on POSIX within one
file system). A reader, or a rerun after a crash, a full disk or Ctrl-C, sees the old file or
the new one, never a truncated one under the final name. The standard library and h5py offer
no such helper (``tempfile`` names a file but neither syncs nor renames it; h5py writes in
place). An ``OSError`` while writing (no space left, read-only file system, missing folder)
becomes a :class:`~mlsp.errors.WriteError`: one line naming the file and what was kept.

Writes into a cache never follow links (:func:`open_no_follow`, :func:`refuse_link`): a symbolic
link planted where mlsp keeps its own file (a partial download, a cached model, a temporary name)
would make mlsp write, truncate or vouch for a file elsewhere. Such a path is refused in one line
(:class:`~mlsp.errors.LinkRefused`); a temporary name found as a link is removed, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import re
import stat

from ..errors import LinkRefused, WriteError

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


def refuse_link(path: str) -> None:
    """:class:`LinkRefused` when ``path`` is a symbolic link (or exists and is not a regular file or
    folder); nothing when it is absent."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise LinkRefused(path, _link(path))
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise LinkRefused(path, "not a regular file")


def _link(path: str) -> str:
    try:
        return f"a symbolic link (to {os.readlink(path)!r})"
    except OSError:  # a loop of links above it
        return "a symbolic link"


def open_no_follow(path: str, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o644) -> int:
    """``os.open`` of a regular file that refuses a symbolic link (``O_NOFOLLOW``) and anything else
    that is not a regular file (a named pipe is not waited on): :class:`LinkRefused`. Other
    ``OSError`` s are the caller's. The descriptor is the file: write and check through it, not
    through the name, which another process could swap."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise LinkRefused(path, _link(path)) from None
        if exc.errno == errno.ENXIO:  # a named pipe without a reader
            raise LinkRefused(path, "not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LinkRefused(path, "not a regular file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def same_file(path: str, fd: int) -> bool:
    """Whether ``path`` (not followed) is still the file open as ``fd``."""
    try:
        there, here = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISREG(there.st_mode) and (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


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
            self._clear_planted()
        except OSError as exc:
            raise self.error(exc) from exc

    def _clear_planted(self):
        """A link (or pipe) found under the temporary name is removed, never written through: the
        name is predictable (this process's id)."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(self.tmp).st_mode):
                os.unlink(self.tmp)

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
