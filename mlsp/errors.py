"""Exception types of mlsp.

Every error a user can cause (a bad file, a mismatched store, missing weights) is one of these,
with a message that says what was received and what to do. The CLI turns them into a one-line
message and a non-zero exit code; library users can catch :class:`MLSPError`.
"""

import os


class MLSPError(Exception):
    """Base class of every error mlsp raises on purpose."""


class ConfigError(MLSPError, ValueError):
    """An argument or option has a value that cannot be used."""


class WeightsUnavailableError(MLSPError):
    """Pretrained weights were asked for but cannot be loaded (offline, missing or bad file)."""


class IntegrityError(WeightsUnavailableError):
    """A file is not the one expected: its size or sha256 differs from the pinned one. It is never
    used; the message names the file, what it is and what was expected."""

    def __init__(self, path, found: str, expected: str, advice: str = ""):
        self.path = str(path)
        self.found = found
        self.expected = expected
        super().__init__(f"{path}: {found}, expected {expected}; refused{advice}")


class DownloadError(WeightsUnavailableError):
    """No source gave a valid copy of a file (offline, every URL failed, or each copy failed its
    check). The message is one line: the file, its size and sha256, what each URL did, the URLs
    to fetch it from by hand and where to put it."""

    def __init__(self, dest, *, size: int, sha256: str, urls, failures, advice: str = "", label: str = ""):
        self.path = str(dest)
        self.size = size
        self.sha256 = sha256
        self.urls = tuple(urls)
        self.failures = tuple(failures)
        tried = "; ".join(self.failures) or "no URL is known for it"
        where = f"from {' or '.join(self.urls)} " if self.urls else ""
        super().__init__(
            f"cannot download {label or os.path.basename(self.path)} ({tried}). Download it by hand {where}"
            f"({size:,} bytes, sha256 {sha256}) and put it at {self.path}{advice}")


class KerasGraphChanged(MLSPError):
    """The installed Keras no longer has the graph attributes :mod:`mlsp.backbone.graph` reads."""


class LabelsError(MLSPError, ValueError):
    """A label file (AVA.txt, CSV, test list) is malformed; the message names file and line."""


class ImageDecodeError(MLSPError):
    """One image could not be used. Extraction records it in the store's /errors and goes on."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class StoreError(MLSPError):
    """A feature store is missing, malformed, or of an unsupported format version."""


class NoUsableImages(MLSPError):
    """Not one input of an extraction could be used, so no store was written; ``errors`` lists
    every input with its reason (``{"id", "path", "reason"}``)."""

    def __init__(self, where, errors):
        self.errors = list(errors)
        first = self.errors[0] if self.errors else {"path": where, "reason": "no inputs"}
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"{where}: none of the {len(self.errors)} inputs could be used, so no store was written; "
                         f"{first['path']}: {first['reason']}{more}")


class StoreConfigMismatch(StoreError):
    """A store (or an unfinished extraction) was made with another configuration.

    ``advice`` says what to do; the default suits extraction (another --out, or start over).
    Long values (a net's 43 block names) are summarised, so the message stays one line.
    """

    EXTRACT_ADVICE = "Use another --out, or delete the store to start over."

    def __init__(self, path, differences, advice: str | None = None):
        self.path = str(path)
        self.differences = dict(differences)
        diff = "; ".join(f"{k}: store has {_summary(a)}, asked for {_summary(b)}"
                         for k, (a, b) in self.differences.items())
        super().__init__(f"{path} was made with another configuration ({diff}). "
                         f"{advice or self.EXTRACT_ADVICE}")


def _summary(value, limit: int = 4) -> str:
    """``repr`` of a value, lists longer than ``limit`` as their length, first and last items."""
    if isinstance(value, (list, tuple)) and len(value) > limit:
        return f"{len(value)} items [{value[0]!r}, ..., {value[-1]!r}]"
    return repr(value)


class IdentityConflict(StoreError):
    """A file differs from the one stored under its path (:mod:`mlsp.images.identity`); ``conflicts``:
    ``(path, key, stored identity, identity now)`` each."""

    def __init__(self, store, conflicts):
        self.store = str(store)
        self.conflicts = list(conflicts)
        path, key, was, now = self.conflicts[0]
        more = f" (and {len(self.conflicts) - 1} more such files)" if len(self.conflicts) > 1 else ""
        super().__init__(
            f"{path}: a different file than the {key} stored in {store} ({was.describe()}; this one: "
            f"{now.describe()}){more}; a store never replaces an image: rename the new file, or extract "
            "into another --out")


class StoreLocked(StoreError):
    """Another process is writing the store (see :class:`mlsp.runtime.files.StoreLock`)."""

    def __init__(self, path, holder: str):
        self.path = str(path)
        self.holder = holder
        super().__init__(
            f"{path} is being written by another mlsp process ({holder or 'pid unknown'}): one writer per "
            "store; wait for it to finish, or write to another --out")


class ResumeError(MLSPError):
    """What an interrupted run left to resume from is damaged or was made by something else; the
    message names the file and what to do (delete it to start over)."""


class StoreLockUnavailable(StoreError):
    """The store's lock cannot be taken (another user's lock file, a file system without locks):
    nothing is written, since one writer per store could not be guaranteed."""

    def __init__(self, path, lock_path, reason: str):
        self.path = str(path)
        self.lock_path = str(lock_path)
        super().__init__(
            f"{lock_path}: cannot take the store's lock ({reason}); nothing was written. One writer per "
            "store: wait for the other writer, delete the lock file if no mlsp process writes the store, "
            "or write to another --out on a local disk")


class WriteError(MLSPError):
    """A file could not be written (no space left, read-only file system, missing folder, ...).

    The message names the file, the reason and what was kept."""

    def __init__(self, path, reason: str, kept: str):
        self.path = str(path)
        self.reason = reason
        self.kept = kept
        super().__init__(f"{path}: cannot write: {reason}; {kept}")


class LinkRefused(WriteError):
    """A path where mlsp keeps its own file (a cache entry, a partial download) is a symbolic link,
    or not a regular file: mlsp never writes or reads its caches through one (:func:`mlsp.runtime.atomic.open_no_follow`)."""

    def __init__(self, path, what: str):
        self.path = str(path)
        self.reason = what
        self.kept = "nothing was written"
        MLSPError.__init__(self, f"{path}: {what}, where mlsp keeps a file of its own; refused (mlsp never writes "
                                 "or reads its cache through links): delete it and run again")


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a download; ``kept`` says what is kept for the next try, truly
    (a partial file that received no byte is not kept)."""

    def __init__(self, kept: str):
        self.kept = kept
        super().__init__(kept)


class TrainingError(MLSPError):
    """Training a head cannot start or did not produce a model (e.g. the loss diverged)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped training a head at a point where the run is not finished;
    ``kept`` says what its folder holds then (its ``config.json`` says the same)."""

    def __init__(self, run_dir: str, kept: str):
        self.run_dir = str(run_dir)
        self.kept = kept
        super().__init__(f"{run_dir}: {kept}")


class ClusterError(MLSPError):
    """A job spread over Ray cannot start or go on (no cluster, workers that cannot build the model
    or keep dying). Finished images are kept; a rerun resumes."""
