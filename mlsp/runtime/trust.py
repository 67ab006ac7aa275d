"""Which cached files mlsp may use: only those whose content hash mlsp recorded itself.

A cache folder is writable by whoever shares it (or a careless copy): an entry with a matching
hash written *beside it* proves nothing, since whoever wrote the entry can write that hash too.
So a cache entry is used only when its content hash is one of

- pinned in code (a download's known SHA-256, e.g. ImageNet weights or pretrained heads), or
- recorded by mlsp in a :class:`TrustIndex` when mlsp itself wrote the entry: a JSON file
  outside every entry's folder (``$KERAS_HOME/mlsp/<cache>.trusted.json``), written only here,
  atomically and under a lock (never through a link), never by loading or running an entry.

Anything else is rebuilt or refused, never loaded. A cache folder that cannot be written (read
only, full) means no cache: :meth:`TrustIndex.record` says whether the hash was recorded, and the
caller drops an entry it could not vouch for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os

from .atomic import describe_os_error, write_json
from .files import file_sha256
from ..errors import WriteError

log = logging.getLogger(__name__)

INDEX_VERSION = 1


def tree_sha256(folder: str, suffix: str = "") -> str:
    """One SHA-256 over every file under ``folder`` (those whose name ends in ``suffix``):
    relative paths and contents, sorted; a file added, removed, renamed or changed changes it.
    Links are hashed as their target's path (never followed), so an entry cannot point outside
    itself unnoticed."""
    digest = hashlib.sha256()
    for parent, _, names in sorted(os.walk(folder)):
        for name in sorted(n for n in names if n.endswith(suffix)):
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            body = ("link:" + os.readlink(path)) if os.path.islink(path) else file_sha256(path)
            digest.update(f"{rel}\0{body}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


class TrustIndex:
    """``name -> sha256`` of the entries mlsp wrote into one cache, kept in ``path`` (a JSON file
    outside every entry's folder)."""

    def __init__(self, path: str):
        self.path = path

    def _read(self) -> dict:
        try:
            with open(self.path) as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # damaged or unreadable: nothing in it is trusted
            log.warning("%s cannot be read (%s); no cached entry is trusted until it is written again",
                        self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def trusted(self, name: str) -> str | None:
        """The SHA-256 mlsp recorded for ``name``, or None."""
        value = self._read().get(name)
        return value if isinstance(value, str) else None

    def record(self, name: str, sha256: str | None) -> bool:
        """Record (``None``: forget) the hash of entry ``name``; False, logged, where the index cannot
        be written (a read-only or full cache folder): the caller then does not keep the entry."""
        try:
            with self._locked():
                entries = self._read()
                if sha256 is None:
                    if entries.pop(name, None) is None:
                        return True
                else:
                    entries[name] = sha256
                write_json(self.path, {"version": INDEX_VERSION, "entries": entries})
        except (OSError, WriteError) as exc:
            log.info("cannot record in %s (%s): no cache", self.path,
                     exc if isinstance(exc, WriteError) else describe_os_error(exc))
            return False
        return True

    @contextlib.contextmanager
    def _locked(self):
        """One writer of the index at a time (``<index>.lock``; released when the process ends)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
