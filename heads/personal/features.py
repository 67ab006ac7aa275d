"""The store's features as a person's taste sees them: pooled, standardised, in the store's
principal components (the *basis*).

A head trained for the generic MOS keeps what predicts the generic MOS and discards content that
people like or dislike for reasons of their own, which is what personal taste is; the store's
features still hold it. The feature-space methods (:mod:`heads.personal.methods`) fit a person
there, in a basis that keeps the fit small and stable:

- *pooled*: an image's features averaged over its views (for wide stores, over the 5 x 5 cells
  of each view as well): one value per channel;
- *standardised*: each channel centred and scaled by its mean and standard deviation over the
  store;
- *principal components*: the top :data:`BASIS_DIMS` right singular vectors of the standardised
  pooled features of the store's images (at most :data:`BASIS_IMAGES` of them, evenly spread
  over the store's rows); an image's *content* is its coordinates along them (unwhitened: the
  ridge penalty then shrinks the minor directions more).

The basis is computed from the store alone (no rating), the same for every person of a store, and
saved once as ``basis-<sha256>.npz`` beside the generic run's model (in :data:`BASIS_FOLDER`;
for a released model, in the personal model's own folder). A personal model records the basis's
SHA-256 (of its arrays) and keeps only its own coefficients; a basis file is used only when its
arrays hash to the recorded value, so a file put there by hand is never believed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os

import numpy as np

from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ConfigError
from mlsp.runtime.progress import ProgressFactory, null_progress
from mlsp.store.read import SLAB_BYTES, FeatureStore

log = logging.getLogger(__name__)

#: Principal components the basis keeps (at most: never more than the images or channels allow).
BASIS_DIMS = 64
#: Store images the basis is computed from: all of a smaller store, else this many evenly spread.
BASIS_IMAGES = 2000
#: The basis's folder beside the generic run's model, and its files' names.
BASIS_FOLDER = "personal-basis"
BASIS_PREFIX = "basis-"
ARRAYS = ("mean", "scale", "components")


def pooled(features: np.ndarray) -> np.ndarray:
    """(n, V, ...) stored features -> (n, C): the mean over the views (and a wide view's cells)."""
    features = np.asarray(features)
    axes = tuple(range(1, features.ndim - 1))
    return features.astype(np.float32).mean(axis=axes) if axes else features.astype(np.float32)


def basis_rows(n_images: int, images: int = BASIS_IMAGES) -> np.ndarray:
    """The store rows a basis is computed from: every row, or ``images`` evenly spread."""
    if n_images <= images:
        return np.arange(n_images)
    return np.unique(np.linspace(0, n_images - 1, images).round().astype(np.int64))


def read_pooled(store: FeatureStore, rows, progress: ProgressFactory = null_progress, desc: str = "basis"):
    """Pooled features (n, C) of the given store rows (read in slabs, sorted, returned in the order asked)."""
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), store.channels), np.float32)
    step = max(1, SLAB_BYTES // store.image_nbytes)
    bar = progress(total=len(rows), desc=desc, unit="img")
    try:
        for start in range(0, len(rows), step):
            at = order[start:start + step]
            out[at] = pooled(store.read(rows[at]))
            bar.update(len(at))
    finally:
        bar.close()
    return out


@dataclasses.dataclass
class Basis:
    """Standardisation (``mean``, ``scale``: (C,)) and principal components (C, D) of a store's
    pooled features."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    @functools.cached_property
    def sha256(self) -> str:
        """The SHA-256 of the arrays (dtype, shape and bytes of each, in a fixed order)."""
        digest = hashlib.sha256()
        for name in ARRAYS:
            array = np.ascontiguousarray(getattr(self, name), np.float32)
            digest.update(f"{name}:{array.dtype.str}:{array.shape}\0".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    @property
    def file_name(self) -> str:
        return f"{BASIS_PREFIX}{self.sha256[:16]}.npz"

    def project(self, pooled_features: np.ndarray) -> np.ndarray:
        """Pooled features (n, C) -> content (n, D): standardised, along the components."""
        x = (np.asarray(pooled_features, np.float32) - self.mean) / self.scale
        return (x @ self.components).astype(np.float64)

    def describe(self) -> dict:
        """What a personal model records of its basis."""
        return {"sha256": self.sha256, "file": self.file_name, "dims": self.dims,
                "channels": int(self.components.shape[0])}

    def save(self, folder: str) -> str:
        """``folder/basis-<sha256>.npz``, written whole; kept as it is when it already holds this basis."""
        path = os.path.join(folder, self.file_name)
        if os.path.isfile(path):
            try:
                load_basis(path, self.sha256)
                return path
            except ConfigError:
                log.warning("%s: does not hold the basis its name says; writing it again", path)
        os.makedirs(folder, exist_ok=True)
        with atomic_path(path, keep_extension=True) as tmp:
            np.savez(tmp, **{name: np.asarray(getattr(self, name), np.float32) for name in ARRAYS})
        return path


def fit_basis(features: np.ndarray, dims: int = BASIS_DIMS) -> Basis:
    """The basis of pooled features (m, C): per-channel standardisation, then the top ``dims``
    principal components (each signed so that its largest entry is positive: the same features
    give the same basis)."""
    x = np.asarray(features, np.float64)
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-6 * max(float(scale.max(initial=0.0)), 1e-30), scale, 1.0)
    z = (x - mean) / scale
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    keep = int(min(dims, len(z) - 1, int((s > s[0] * 1e-6).sum()) if len(s) else 0))
    if keep < 1:
        raise ConfigError(f"the store's features vary along no direction ({len(z)} images): no basis for "
                          "the feature-space methods")
    vt = vt[:keep]
    vt *= np.sign(vt[np.arange(keep), np.abs(vt).argmax(1)])[:, None]
    log.info("basis: %d principal components of %d images' pooled features (%d channels; share of the "
             "variance: %.2f)", keep, len(z), z.shape[1], float((s[:keep] ** 2).sum() / (s ** 2).sum()))
    return Basis(mean.astype(np.float32), scale.astype(np.float32), vt.T.astype(np.float32))


def store_basis(store: FeatureStore, dims: int = BASIS_DIMS, images: int = BASIS_IMAGES,
                progress: ProgressFactory = null_progress) -> Basis:
    """The basis of a store (:func:`basis_rows` of it); None, said in the log, when its features
    vary along no direction (the feature-space methods are then not tried)."""
    try:
        return fit_basis(read_pooled(store, basis_rows(store.n_images, images), progress), dims)
    except ConfigError as exc:
        log.warning("%s: %s", store.path, exc)
        return None


def load_basis(path: str, sha256: str) -> Basis:
    """The basis in ``path``, refused unless its arrays hash to ``sha256``."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            basis = Basis(*(np.asarray(arrays[name], np.float32) for name in ARRAYS))
    except FileNotFoundError:
        raise ConfigError(f"{path}: the personal model's basis is missing; personalise again") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: the basis cannot be read ({exc})") from None
    if basis.sha256 != sha256:
        raise ConfigError(f"{path}: its arrays' sha256 {basis.sha256[:12]}... is not the {sha256[:12]}... the "
                          "personal model records; personalise again")
    return basis


def basis_folders(head, model_dir: str) -> list[str]:
    """Where a personal model's basis is looked for: its own folder, then beside the generic run's model."""
    folders = [model_dir]
    run = getattr(head, "run", None)
    if run is not None:
        folders.append(os.path.join(run.path, BASIS_FOLDER))
    return folders


def basis_home(head, model_dir: str) -> str:
    """Where a new personal model's basis is saved: beside the generic run's model, or (a
    released model's head has no run folder) in the personal model's folder."""
    return basis_folders(head, model_dir)[-1]


def find_basis(meta: dict, head, model_dir: str) -> Basis | None:
    """The basis a personal model's json ``meta`` records (``basis``: ``{"sha256", "file"}``),
    from :func:`basis_folders`; None for a model of a method that needs none."""
    record = meta.get("basis")
    if record is None and meta.get("kind") != "content":
        return None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("sha256", "file")):
        raise ConfigError(f"{os.path.join(model_dir, 'personal.json')}: 'basis' is {json.dumps(record)[:60]}, "
                          "expected the sha256 and file of the store's basis; personalise again")
    name = os.path.basename(record["file"])
    paths = [os.path.join(folder, name) for folder in basis_folders(head, model_dir)]
    found = next((p for p in paths if os.path.isfile(p)), None)
    if found is None:
        raise ConfigError(f"{model_dir}: its basis {name} is in none of {', '.join(paths)}; personalise again")
    return load_basis(found, record["sha256"])
