"""The one reader and writer of partial files: rows appended as they are finished, one JSON
value per line, so that an interrupted command goes on from them (``mlsp score --out``'s
``OUT.partial``, ``mlsp personalize --evaluate``'s ``evaluation.csv.partial``).

Any string round-trips: JSON escapes line breaks, and with ``ensure_ascii`` every other character
Python's ``str.splitlines()`` would break a line at (``\\x1c``..``\\x1e``, ``\\x85``, U+2028,
U+2029) is written as an escape too; lines are split at ``\\n`` alone. A last line cut by a kill
(no ``\\n`` yet) is dropped from the file on reading; its row is computed again.
"""

from __future__ import annotations

import json
import os


class JsonLines:
    """An append-only file of one JSON value per line."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.handle = None

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read(self) -> list[tuple[int, object]]:
        """``(line number, value)`` of each complete, non-blank line; the value is :data:`DAMAGED`
        for a line that is not JSON (the caller says what that means). A missing file is empty.
        Raises ``UnicodeDecodeError`` for a file that is not UTF-8 text."""
        if not self.exists():
            return []
        with open(self.path, "rb") as handle:
            data = handle.read()
        if data and not data.endswith(b"\n"):  # a line cut by a kill
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data))
        text = data.decode("utf-8")
        rows = []
        for number, line in enumerate(text.split("\n")[:-1], 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except (json.JSONDecodeError, RecursionError):
                    rows.append((number, DAMAGED))
        return rows

    def start(self):
        """An empty file (its folder made), replacing what was there."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.close()
        with open(self.path, "w"):
            pass

    def append(self, row):
        """One row, flushed to the file at once (floats as repr: read back exactly)."""
        if self.handle is None:
            self.handle = open(self.path, "a", encoding="utf-8")
        self.handle.write(json.dumps(row, ensure_ascii=True) + "\n")
        self.handle.flush()

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def remove(self):
        self.close()
        if self.exists():
            os.remove(self.path)


#: What :meth:`JsonLines.read` gives for a line that is not JSON.
DAMAGED = object()
