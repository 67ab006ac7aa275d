"""What makes a stored image the same file: its size, modification time and SHA-256.

An image is found again by its path relative to the input folder; a path alone does not say the
file is the one stored (cameras reuse IMG_0001.JPG in every batch; a photo edited in place keeps
its name). So every stored row records its file's size, modification time (ns) and the SHA-256
of its bytes (features/README.md), and a rerun compares each file it would skip as done: size
and modification time unchanged, the same file (the quick check of ``make`` and ``rsync``);
otherwise its SHA-256 decides. A different file under a stored path is a conflict, refused in
one line naming both (:class:`~mlsp.errors.IdentityConflict`), never skipped as done. Rows
written before this was recorded (format version 2 and older) are taken on their path, as then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

from ..runtime.files import file_sha256

log = logging.getLogger(__name__)

UNKNOWN = -1  # the size and time of a row stored before identities were recorded


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    size: int  # bytes
    mtime_ns: int
    sha256: str  # hex; "" when unknown

    @property
    def known(self) -> bool:
        return bool(self.sha256)

    def describe(self) -> str:
        return f"{self.size} bytes, sha256 {self.sha256[:12]}" if self.known else "identity not recorded"


def of_file(path: str) -> FileIdentity:
    """Size, modification time and SHA-256 of a file (read once, in 1 MiB blocks)."""
    st = os.stat(path)
    return FileIdentity(int(st.st_size), int(st.st_mtime_ns), file_sha256(path))


def of_bytes(raw: bytes, status: os.stat_result) -> FileIdentity:
    """:func:`of_file` of a file's bytes already read, with its status taken before the read
    (:func:`mlsp.images.decode.read_file`): the file is read once for its pixels and its identity."""
    return FileIdentity(int(status.st_size), int(status.st_mtime_ns), hashlib.sha256(raw).hexdigest())


def same_file(path: str, stored: FileIdentity) -> tuple[bool, FileIdentity | None]:
    """(whether ``path`` is still the file ``stored`` describes, its identity where it was read).
    Unchanged size and modification time: the same without reading it; else its SHA-256 decides.
    A row without a recorded identity, or a file that cannot be read now, counts as the same
    (the path is all that is known; reading the file is what extraction would report)."""
    if not stored.known:
        return True, None
    try:
        st = os.stat(path)
        if st.st_size == stored.size and st.st_mtime_ns == stored.mtime_ns:
            return True, None
        now = of_file(path)
    except OSError:
        return True, None
    return now.size == stored.size and now.sha256 == stored.sha256, now


def conflicts(candidates, stored: dict) -> list[tuple[str, str, FileIdentity, FileIdentity]]:
    """``(path, key, stored identity, identity now)`` of every ``(path, key)`` among ``candidates``
    whose key is stored (``stored``: key -> :class:`FileIdentity`) for a different file."""
    found = []
    for path, key in candidates:
        if key in stored:
            same, now = same_file(path, stored[key])
            if not same:
                found.append((path, key, stored[key], now))
    return found
