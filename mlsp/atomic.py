"""Files written whole or not at all: a temporary name beside the target, renamed when complete.

A reader (or a rerun after a crash, a full disk, Ctrl-C) sees either the old file or the new
one, never a truncated one under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any
    failure removed. Keeps the extension last (``x.tmp.keras``), for writers that check it."""
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}{suffix}{ext}" if ext else path + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, data, **dump_options) -> None:
    """``data`` as indented JSON (``default=str`` for what JSON lacks), written atomically."""
    dump_options.setdefault("indent", 2)
    dump_options.setdefault("default", str)
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, **dump_options)
        handle.write("\n")
