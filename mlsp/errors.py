"""Exception types of mlsp.

Every error a user can cause (a bad file, a mismatched store, missing weights) is one of these,
with a message that says what was received and what to do. The CLI turns them into a one-line
message and a non-zero exit code; library users can catch :class:`MLSPError`.
"""


class MLSPError(Exception):
    """Base class of every error mlsp raises on purpose."""


class ConfigError(MLSPError, ValueError):
    """An argument or option has a value that cannot be used."""


class WeightsUnavailableError(MLSPError):
    """Pretrained weights were asked for but cannot be loaded (offline, missing or bad file)."""


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


class StoreConfigMismatch(StoreError):
    """A store (or an unfinished extraction) was made with another configuration."""

    def __init__(self, path, differences):
        self.path = str(path)
        self.differences = dict(differences)
        diff = "; ".join(f"{k}: store has {a!r}, asked for {b!r}" for k, (a, b) in self.differences.items())
        super().__init__(
            f"{path} was made with another configuration ({diff}). "
            "Use another --out, or delete the store to start over."
        )


class TrainingError(MLSPError):
    """Training a head cannot start or did not produce a model (e.g. the loss diverged)."""
