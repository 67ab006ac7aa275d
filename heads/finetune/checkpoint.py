"""A fine-tuning run's checkpoint, ``checkpoint.npz``, written whole after every epoch.

It holds every variable of the network (weights, batch-norm statistics and the dropout's random
state), both optimizers' variables (step counts, momenta or moments), the best weights so far
and the loop's state (phase, epoch, best validation loss, patience, history, time), so a run
resumed from it continues as the uninterrupted run would have. The file is written with
:func:`mlsp.runtime.atomic.atomic_path` (a kill leaves the previous one); a damaged one (truncated, a
changed byte: zip's CRC-32 of each array, or arrays of other shapes than the network's) is
refused in one line (:class:`mlsp.errors.ResumeError`), never loaded.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ResumeError

FILE = "checkpoint.npz"
STATE = "state.json"


def _arrays(prefix: str, variables) -> dict:
    return {f"{prefix}/{k:05d}": np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in enumerate(variables)}


def save(run_dir: str, state: dict, model, best_weights, optimizers: dict):
    """Write the checkpoint (see the module's docstring) into ``run_dir``."""
    import keras

    arrays = {STATE: np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)}
    arrays.update(_arrays("model", [keras.ops.convert_to_numpy(v) for v in model.variables]))
    arrays.update(_arrays("best", best_weights or []))
    for name, optimizer in optimizers.items():
        arrays.update(_arrays(f"opt_{name}", [keras.ops.convert_to_numpy(v) for v in optimizer.variables]))
    with atomic_path(os.path.join(run_dir, FILE), keep_extension=True) as tmp:
        np.savez(tmp, **arrays)


class Checkpoint:
    """A checkpoint read back and checked: ``state`` and the arrays, by part."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, FILE)
        restart = f"delete {self.path} to train from the start, or train into another --out"
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}  # reading checks each array's CRC-32
            self.state = json.loads(bytes(arrays.pop(STATE)).decode())
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as exc:
            raise ResumeError(f"{self.path}: damaged checkpoint ({type(exc).__name__}: {exc}); {restart}") from None
        self.restart = restart
        self.parts: dict = {}
        for key in sorted(arrays):
            part, _, _ = key.partition("/")
            self.parts.setdefault(part, []).append(arrays[key])

    @staticmethod
    def exists(run_dir: str) -> bool:
        return os.path.isfile(os.path.join(run_dir, FILE))

    def part(self, name: str) -> list:
        return self.parts.get(name, [])

    def assign(self, name: str, variables):
        """Set ``variables`` (Keras variables) to the part's arrays, which must match them one to one."""
        values = self.part(name)
        variables = list(variables)
        shapes = [tuple(v.shape) for v in variables]
        if [tuple(a.shape) for a in values] != shapes:
            raise ResumeError(f"{self.path}: its {name} arrays do not fit this network ({len(values)} arrays for "
                              f"{len(variables)} variables); {self.restart}")
        for variable, value in zip(variables, values):
            variable.assign(value)
