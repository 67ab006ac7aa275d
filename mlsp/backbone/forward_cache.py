"""A disk cache of built feature extractors, so that a command run on a handful of photos starts fast.

Building an extractor is most of the start-up of `mlsp extract` and `mlsp score` on a few files:
Keras builds the backbone layer by layer (and initialises or loads its weights), the batch norms
are folded (a second copy of the graph), and TensorFlow traces the forward pass. The result is
the same every time for the same net, pooling, weights and precision, so the traced forward pass
(uint8 views -> pooled features, batch norms folded) is saved once, as a TensorFlow SavedModel,
and later runs load it instead (README, "Start-up", has the figures).

- Where: ``$KERAS_HOME/mlsp/forward/`` (default ``~/.keras/mlsp/forward/``), beside Keras' own
  weights cache; one folder per (net, pooling, weights, precision, code, versions), named by a
  hash of that key. Deleting the folder is always safe. ``MLSP_FORWARD_CACHE=0`` turns the cache
  off.
- The key: the weights are identified by the SHA-256 of their file (ImageNet or a file) or by
  ``random:SEED``; the code that builds the model by :func:`code_sha256` (every module of the
  mlsp package: a change to a backbone, a layer or the pooling is a new key even when the
  version string stays); with the versions of Keras and TensorFlow, since each shapes the graph.
- Trust: a SavedModel is a graph of TensorFlow ops, and ops can write files (an entry planted in
  the cache could write into site-packages when run). So an entry is loaded only when the
  SHA-256 of all its files (:func:`mlsp.runtime.trust.tree_sha256`, its metadata included) is the one
  mlsp recorded when it wrote the entry, in ``$KERAS_HOME/mlsp/forward.trusted.json``
  (:class:`mlsp.runtime.trust.TrustIndex`), outside every entry; hashes written beside an entry are never
  believed. Anything else (planted, altered, incomplete, unreadable) is removed and rebuilt,
  with a warning, and never loaded.
- Written under a temporary name and renamed when complete, so concurrent runs and crashes
  never leave a half-written entry under the final name. A cache folder that cannot be written
  (read-only, full) means no cache: the run builds its extractor, as without one.

This is the one TensorFlow-specific piece of extraction's start-up; on another Keras backend the
cache is off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

from . import weights as backbone_weights
from ..store.config import FORWARD_KEYS
from ..runtime.trust import TrustIndex, tree_sha256

log = logging.getLogger(__name__)

FORMAT = 2
META_FILE = "mlsp_forward.json"
ENV_SWITCH = "MLSP_FORWARD_CACHE"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def cache_root() -> str:
    """``$KERAS_HOME/mlsp/forward`` (``~/.keras/mlsp/forward`` by default)."""
    return os.path.join(os.path.dirname(backbone_weights.keras_cache_dir()), "mlsp", "forward")


def trust_index() -> TrustIndex:
    """The hashes of the entries mlsp wrote: ``$KERAS_HOME/mlsp/forward.trusted.json``."""
    return TrustIndex(cache_root() + ".trusted.json")


@functools.lru_cache(maxsize=None)
def code_sha256(package_dir: str = PACKAGE_DIR) -> str:
    """The SHA-256 of the code that builds the forward model: every ``.py`` file of the mlsp
    package (sub-packages included), by relative path and content. Derived from the package
    rather than a list of modules, so a backbone moved to a module of its own is covered too."""
    return tree_sha256(package_dir, suffix=".py")


def enabled() -> bool:
    """Off when ``MLSP_FORWARD_CACHE`` is 0/false/no/off, or when Keras runs on another backend."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    import keras

    return keras.backend.backend() == "tensorflow"


def weights_identity(config) -> str:
    """What identifies the weights of ``config`` (an :class:`mlsp.extraction.job.ExtractConfig`): the
    file's SHA-256, or ``random:SEED``. May download the ImageNet weights (as building would)."""
    source = backbone_weights.WeightsSource.parse(config.weights)
    if source.kind == "random":
        return str(source)
    path = backbone_weights.fetch_imagenet_weights(config.spec) if source.kind == "imagenet" else source.path
    return "sha256:" + backbone_weights.file_sha256(path)


def cache_key(config, identity: str) -> dict:
    import keras
    import tensorflow as tf

    return {"format": FORMAT, **{name: getattr(config, name) for name in FORWARD_KEYS}, "weights": identity,
            "code": code_sha256(), "keras": keras.__version__, "tensorflow": tf.__version__}


def entry_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_root(), f"{key['net']}-{key['pooling']}-{key['precision']}-{digest}")


def _refuse(folder: str, why: str):
    """Remove an entry that cannot be used (where the cache can be written) and forget its hash."""
    log.warning("the cached extractor %s cannot be used (%s); removing it and building again", folder, why)
    shutil.rmtree(folder, ignore_errors=True)
    if not os.path.exists(folder):
        trust_index().record(os.path.basename(folder), None)


def load(key: dict):
    """``(restored, weights_record)`` from the cache, or ``None`` when there is no entry mlsp can
    vouch for; ``restored.forward`` is the forward pass (keep ``restored`` alive while using it: it
    owns the variables). Nothing of an entry is read, let alone run, before its hash is checked
    against the one mlsp recorded when it wrote it."""
    folder = entry_path(key)
    if not os.path.isdir(folder):
        return None
    started = time.perf_counter()
    trusted = trust_index().trusted(os.path.basename(folder))
    try:
        found = tree_sha256(folder)
    except OSError as exc:
        return _refuse(folder, f"unreadable: {exc}")
    if trusted is None:
        return _refuse(folder, "mlsp recorded no hash for it: it was not written by mlsp here")
    if found != trusted:
        return _refuse(folder, "its files differ from the SHA-256 recorded by mlsp when it wrote the entry")
    try:
        with open(os.path.join(folder, META_FILE)) as handle:
            meta = json.load(handle)
        if meta.get("key") != key:
            raise ValueError("its key differs from the one asked for")
        import tensorflow as tf

        restored = tf.saved_model.load(folder)
        restored.forward  # noqa: B018  (an entry without it is not ours)
    except Exception as exc:  # an entry that cannot be used, whatever the cause, is rebuilt
        return _refuse(folder, f"{type(exc).__name__}: {exc}")
    log.info("loaded the built %s extractor from the cache in %.1f s (%s)", key["net"],
             time.perf_counter() - started, folder)
    return restored, meta["weights_record"]


def save(key: dict, forward, variables, weights_record: dict) -> str | None:
    """Write an entry for ``forward`` (a ``tf.function`` over uint8 views, traced or not) and the
    variables it reads; returns its folder, or ``None`` when it could not be written (logged: the
    cache only saves time, its failure never stops a run)."""
    import tensorflow as tf

    folder = entry_path(key)
    started = time.perf_counter()
    tmp = None
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=os.path.dirname(folder))
        module = tf.Module()
        module.forward = forward
        module.weights = list(variables)
        tf.saved_model.save(module, tmp)
        meta = {"key": key, "weights_record": weights_record,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(os.path.join(tmp, META_FILE), "w") as handle:
            json.dump(meta, handle, indent=2)
        # recorded before the entry appears under its name: no moment shows an entry mlsp wrote
        # as one it cannot vouch for; a cache whose index cannot be written keeps no entry
        if not trust_index().record(os.path.basename(folder), tree_sha256(tmp)):
            return None
        try:
            os.rename(tmp, folder)
        except OSError:  # another run wrote the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = None
    except Exception as exc:  # no space, read-only home, ...: the run goes on without the cache
        log.warning("could not cache the built extractor in %s (%s: %s); the run goes on without the cache",
                    folder, type(exc).__name__, exc)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the built %s extractor in %s (%.1f s); later runs load it instead of building it",
             key["net"], folder, time.perf_counter() - started)
    return folder
