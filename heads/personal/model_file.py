"""A personal model's files: the one writer and the one reader of ``personal.json`` (what, whose,
on which generic model) and ``personal.npz`` (the fitted arrays).

Written as one unit: an old ``personal.json`` is removed first, then ``personal.npz`` and then
``personal.json`` are each written atomically (:mod:`mlsp.runtime.atomic`), the json recording
the npz's SHA-256. A kill or a full disk part way leaves the new model or no model (an npz
without its json), never a json of one person beside the arrays of another; a json and an npz
that were not written together (copied from two folders) are refused by the hash.

Read as a user's file that may be damaged: every key of the json of its type, the scale finite,
the npz a readable archive of finite numbers, its arrays those of the json's kind for this
generic head (tried on a dummy image before any store is read). Every refusal is one line naming
the file and what is wrong (:class:`~mlsp.errors.ConfigError`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib

import numpy as np

from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ConfigError

from .methods import FITTED, Images
from .ratings import check_scale

MODEL_JSON = "personal.json"
MODEL_NPZ = "personal.npz"
#: 2: personal.json records personal.npz's SHA-256 (1: written before it did; read without it).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: personal.json's keys and their JSON types (``cv`` may be absent).
KEYS = {"format_version": int, "user": str, "method": str, "params": dict, "kind": str, "scale": list,
        "n_ratings": int, "generic": dict, "cv": list}
_TYPE_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "a list", float: "a number"}
AGAIN = "run mlsp personalize again"


def check_arrays(where: str, state: dict) -> None:
    """Every array numeric (float, integer or bool) and finite."""
    for name, array in state.items():
        array = np.asarray(array)
        if array.dtype.kind not in "fiub":
            raise ConfigError(f"{where}: the array {name!r} is {array.dtype}, not numbers; {AGAIN}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ConfigError(f"{where}: the array {name!r} holds NaN or infinite values; {AGAIN}")


def write(out_dir: str, meta: dict, state: dict) -> str:
    """``personal.npz`` (``state``) and ``personal.json`` (``meta`` with the format and the npz's
    SHA-256), as one unit (module docstring)."""
    check_arrays(os.path.join(out_dir, MODEL_NPZ), state)
    os.makedirs(out_dir, exist_ok=True)
    json_path, npz_path = os.path.join(out_dir, MODEL_JSON), os.path.join(out_dir, MODEL_NPZ)
    if os.path.lexists(json_path):
        os.remove(json_path)  # from here until the new json is written, the folder holds no model
    with atomic_path(npz_path, keep_extension=True, kept=f"the folder holds no personal model; {AGAIN}") as tmp:
        np.savez(tmp, **state)
        with open(tmp, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    cut = f"the folder holds no usable personal model; {AGAIN}"
    with atomic_path(json_path, kept=cut) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"format_version": FORMAT_VERSION, **meta, "arrays_sha256": digest}, handle, indent=2, default=str)
        handle.write("\n")
    return out_dir


def read(path: str) -> tuple[dict, dict]:
    """``(meta, state)`` of the personal model folder ``path``, checked (module docstring)."""
    meta_path, npz_path = os.path.join(path, MODEL_JSON), os.path.join(path, MODEL_NPZ)
    for need in (meta_path, npz_path):
        if not os.path.lexists(need):
            raise ConfigError(f"{path}: not a personal model ({os.path.basename(need)} is missing)")
    meta = _read_meta(meta_path)
    try:
        with open(npz_path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"{npz_path}: cannot be read ({exc.strerror or exc})") from None
    recorded = meta.get("arrays_sha256")
    if meta["format_version"] >= 2 and recorded != hashlib.sha256(data).hexdigest():
        raise ConfigError(f"{npz_path}: not the arrays {MODEL_JSON} was written with (its SHA-256 differs: "
                          f"a write cut short, or files of two models); {AGAIN}")
    state = _read_arrays(npz_path, data)
    check_arrays(npz_path, state)
    return meta, state


def _read_meta(meta_path: str) -> dict:
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"{meta_path}: cannot be read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested beyond reason
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise ConfigError(f"{meta_path}: not a personal model (not JSON: {reason}); {AGAIN}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{meta_path}: not a personal model (a JSON {type(meta).__name__}, not an object)")
    for key, kind in KEYS.items():
        if key not in meta:
            if key == "cv":
                continue
            raise ConfigError(f"{meta_path}: the key {key!r} is missing; {AGAIN}")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{meta_path}: {key!r} is {json.dumps(value)[:40]}, expected {_TYPE_NAMES[kind]}")
    if meta["format_version"] not in READABLE_VERSIONS:
        raise ConfigError(f"{meta_path}: a personal model of format {meta['format_version']}; this mlsp reads "
                          f"formats {', '.join(map(str, READABLE_VERSIONS))}")
    if meta["kind"] not in FITTED:
        raise ConfigError(f"{meta_path}: kind {meta['kind']!r} is not one mlsp knows ({', '.join(FITTED)})")
    _check_values(meta_path, meta)
    return meta


def _check_values(meta_path: str, meta: dict):
    scale = meta["scale"]
    if len(scale) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale):
        raise ConfigError(f"{meta_path}: 'scale' is {json.dumps(scale)[:40]}, expected [low, high]")
    try:
        check_scale(scale)
    except ConfigError as exc:
        raise ConfigError(f"{meta_path}: {exc}") from None
    if meta["n_ratings"] < 1:
        raise ConfigError(f"{meta_path}: 'n_ratings' is {meta['n_ratings']}, expected a positive count")
    if not isinstance(meta["generic"].get("sha256"), str):
        raise ConfigError(f"{meta_path}: 'generic' names no sha256 of the generic model; {AGAIN}")
    for name, value in meta["params"].items():
        if isinstance(value, float) and not np.isfinite(value):
            raise ConfigError(f"{meta_path}: the parameter {name!r} is {value}; {AGAIN}")
    if meta["format_version"] >= 2 and not isinstance(meta.get("arrays_sha256"), str):
        raise ConfigError(f"{meta_path}: the key 'arrays_sha256' is missing; {AGAIN}")


def _read_arrays(npz_path: str, data: bytes) -> dict:
    if not data:
        raise ConfigError(f"{npz_path}: empty (0 bytes); {AGAIN}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            if not isinstance(arrays, np.lib.npyio.NpzFile):
                raise ConfigError(f"{npz_path}: not an .npz archive of arrays; {AGAIN}")
            return {name: arrays[name] for name in arrays.files}
    except AttributeError:  # a bare .npy array has no context manager
        raise ConfigError(f"{npz_path}: not an .npz archive of arrays; {AGAIN}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{npz_path}: not a readable .npz archive ({reason}); {AGAIN}") from None


def fitted(meta: dict, state: dict, head, npz_path: str, content_dims: int = 0):
    """The fitted part of the json's kind from the arrays, tried on two dummy images: arrays that
    are not that kind's for this head (missing, of other shapes) are refused here, in one line.
    ``content_dims``: the dimension of the images' content (the basis of a feature-space model)."""
    kind = FITTED[meta["kind"]]
    try:
        model = kind.from_state(state, head)
    except KeyError as exc:
        raise ConfigError(f"{npz_path}: lacks the array {exc.args[0]!r} of a {meta['kind']} model; {AGAIN}") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{npz_path}: not the arrays of a {meta['kind']} model ({exc}); {AGAIN}") from None
    tail_width = int(head.tail[0].input.shape[-1])
    dummy = Images(np.arange(2), np.full(2, 5.0), np.zeros((2, head.hidden_dim), np.float32),
                   tail_cache=np.zeros((2, 1, tail_width), np.float32),
                   content=np.zeros((2, content_dims)) if content_dims else None)
    try:
        pred = np.asarray(model.predict(dummy), np.float64)
    except (TypeError, ValueError, IndexError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{npz_path}: its arrays do not fit this generic head ({reason}); {AGAIN}") from None
    if pred.shape != (2,) or not np.isfinite(pred).all():
        raise ConfigError(f"{npz_path}: its arrays do not fit this generic head (a prediction of shape "
                          f"{pred.shape}); {AGAIN}")
    return model
