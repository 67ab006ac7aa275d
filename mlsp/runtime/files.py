"""One writer per store, and room on the disk before HDF5 writes.

- :class:`StoreLock`: one writer per store, through a lock file beside it.
- :func:`ensure_space`: HDF5 must never meet a full disk itself (see there).

Files are written whole or not at all through :mod:`mlsp.runtime.atomic`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import logging
import os
import socket

from .atomic import describe_os_error
from ..errors import StoreLocked, StoreLockUnavailable, WriteError

log = logging.getLogger(__name__)


def file_sha256(path: str, block: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in blocks: mlsp's one file hasher (weights, downloads,
    photos' identities, the trust index)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()

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
    ``mlsp.store.shards.ShardWriter.discard``) but may lose the open shard."""
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


class StoreLock:
    """One writer per store: an exclusive ``flock`` on ``<store>.lock``, which holds the writer's pid.

    The kernel releases the lock when its process ends, however it ends (``kill -9`` included),
    so a lock file left by a dead process is recognised as stale and taken over; a live holder
    makes :meth:`acquire` raise :class:`~mlsp.errors.StoreLocked` naming the store and the pid.
    The file is removed on release.

    A lock that cannot be taken is a refusal, never a licence to write unguarded: a lock file
    that exists but cannot be opened (another user's, in a shared folder) and a file system that
    cannot lock (``ENOLCK``: an NFS share without a lock service) raise
    :class:`~mlsp.errors.StoreLockUnavailable`, leaving no lock file of ours behind. Only where
    nobody can write the folder (a read-only file system, or a folder this user cannot write and
    no lock file in it) is there nothing to guard: :attr:`read_only` is set and the caller goes
    on reading (a rerun with nothing to do works on read-only media); any write then fails on
    its own, with its one-line :class:`~mlsp.errors.WriteError`.
    """

    def __init__(self, store_path):
        self.store = os.fspath(store_path)
        self.path = self.store + ".lock"
        self.read_only = False
        self._fd = None

    def _open(self) -> int | None:
        """The lock file, opened for writing (created when missing); None where nobody can write
        the folder."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            folder = os.path.dirname(os.path.abspath(self.path))
            if exc.errno == errno.EROFS or (exc.errno in (errno.EACCES, errno.EPERM)
                                            and not os.path.lexists(self.path) and not os.access(folder, os.W_OK)):
                self.read_only = True
                log.debug("%s: folder not writable (%s), not locking", self.store, describe_os_error(exc))
                return None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise StoreLockUnavailable(self.store, self.path, f"{describe_os_error(exc)}: the lock file "
                                           f"belongs to another user{_holder_of(self.path)}") from None
            raise WriteError(self.path, describe_os_error(exc), "nothing was written") from exc

    def _lock(self, fd: int, created: bool):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreLocked(self.store, holder) from None
        except OSError as exc:  # ENOLCK (NFS without a lock service), ...
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    os.remove(self.path)
            why = ("the file system cannot lock files (ENOLCK: an NFS share without a lock service?)"
                   if exc.errno == errno.ENOLCK else describe_os_error(exc))
            raise StoreLockUnavailable(self.store, self.path, why) from None

    def acquire(self) -> "StoreLock":
        while True:
            created = not os.path.lexists(self.path)
            fd = self._open()
            if fd is None:
                return self
            self._lock(fd, created)
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


def _holder_of(path: str) -> str:
    """`` (pid ... since ...)``: what a lock file we cannot write says, where we can read it."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(200).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
