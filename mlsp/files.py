"""Files mlsp writes: complete or absent, one writer per store, one-line errors.

- :class:`AtomicPath`: every file mlsp writes (store, shard, model, CSV, JSON) is written under a
  temporary name beside its final one and renamed over it when complete (``os.replace``, atomic
  on POSIX within one file system), so a crash, a full disk or Ctrl-C never leaves a truncated
  file under a real name. The standard library and h5py offer no such helper (``tempfile``
  names a file but neither syncs nor renames it; h5py writes in place).
- :class:`StoreLock`: one writer per store, through a lock file beside it.
- :func:`describe_os_error` and :class:`mlsp.errors.WriteError`: an ``OSError`` (no space left,
  read-only file system, missing folder) becomes one line that names the path.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import logging
import os
import re
import socket

from .errors import StoreLocked, WriteError

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


SPACE_MARGIN = 1 << 20  # bytes kept free beyond a write's own size, for HDF5's metadata


class NoSpace(OSError):
    """Raised by :func:`ensure_space` before a write that would not fit (errno ENOSPC)."""


def ensure_space(path: str, nbytes: int, margin: int = SPACE_MARGIN):
    """Raise :class:`NoSpace` unless the file system of ``path`` (a file or folder; the nearest
    existing folder above it) has ``nbytes + margin`` bytes free for this user.

    HDF5 must never meet a full disk itself: when a write fails inside it, closing the file
    fails too and h5py's objects of that file crash the interpreter when freed (a segmentation
    fault). So mlsp checks before each write into an HDF5 file (one ``statvfs`` call, about a
    microsecond) and stops cleanly, keeping what is finished. Another process can still fill
    the disk between the check and the write: that case is handled (see
    ``mlsp.store.ShardWriter.discard``) but may lose the open shard."""
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return  # no statvfs here: the write itself will tell
    free = st.f_bavail * st.f_frsize
    if free < nbytes + margin:
        raise NoSpace(errno.ENOSPC, f"{free} bytes free, {nbytes + margin} needed", path)


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


class StoreLock:
    """One writer per store: an exclusive ``flock`` on ``<store>.lock``, which holds the writer's pid.

    The kernel releases the lock when its process ends, however it ends (``kill -9`` included),
    so a lock file left by a dead process is recognised as stale and taken over; a live holder
    makes :meth:`acquire` raise :class:`~mlsp.errors.StoreLocked` naming the store and the pid.
    The file is removed on release. Where the lock file cannot be created because the folder is
    read-only, nobody can write the store, so there is nothing to guard: :attr:`read_only` is
    set and the caller goes on reading (a rerun with nothing to do works on read-only media).
    """

    def __init__(self, store_path):
        self.store = os.fspath(store_path)
        self.path = self.store + ".lock"
        self.read_only = False
        self._fd = None

    def acquire(self) -> "StoreLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    self.read_only = True
                    log.debug("%s: folder not writable (%s), not locking", self.store, describe_os_error(exc))
                    return self
                raise WriteError(self.path, describe_os_error(exc), "nothing was written") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise StoreLocked(self.store, holder) from None
            # the previous holder may have removed the file between our open and our lock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            log.info("%s: taking over the lock left by %s, which is no longer running", self.store, stale)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self._fd)  # closing releases the lock
        self._fd = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
