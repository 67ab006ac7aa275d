"""A disk cache of built feature extractors, so that a command run on a handful of photos starts fast.

Building an extractor is most of the start-up of `mlsp extract` and `mlsp score` on a few files:
Keras builds the backbone layer by layer (and initialises or loads its weights), the batch norms
are folded (a second copy of the graph), and TensorFlow traces the forward pass. The result is
the same every time for the same net, pooling, weights and precision, so the traced forward pass
(uint8 views -> pooled features, batch norms folded) is saved once, as a TensorFlow SavedModel,
and later runs load it instead (README, "Start-up", has the figures).

- Where: ``$KERAS_HOME/mlsp/forward/`` (default ``~/.keras/mlsp/forward/``), beside Keras' own
  weights cache; one folder per (net, pooling, weights, precision, versions), named by a hash of
  that key. Deleting the folder is always safe. ``MLSP_FORWARD_CACHE=0`` turns the cache off.
- The key: the weights are identified by the SHA-256 of their file (ImageNet or a file) or by
  ``random:SEED``; with the versions of mlsp, Keras and TensorFlow, since each shapes the graph.
- Safe loading: a SavedModel is a graph of TensorFlow ops; loading it runs no Python code from
  the file. Every file of an entry is checked against the SHA-256 recorded when it was written;
  an entry that is incomplete, altered or unreadable is removed and rebuilt, with a warning.
- Written under a temporary name and renamed when complete, so concurrent runs and crashes
  never leave a half-written entry under the final name.

This is the one TensorFlow-specific piece of extraction's start-up; on another Keras backend the
cache is off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

from . import __version__, backbone_weights
from .store_config import FORWARD_KEYS

log = logging.getLogger(__name__)

FORMAT = 1
META_FILE = "mlsp_forward.json"
ENV_SWITCH = "MLSP_FORWARD_CACHE"


def cache_root() -> str:
    """``$KERAS_HOME/mlsp/forward`` (``~/.keras/mlsp/forward`` by default)."""
    return os.path.join(os.path.dirname(backbone_weights.keras_cache_dir()), "mlsp", "forward")


def enabled() -> bool:
    """Off when ``MLSP_FORWARD_CACHE`` is 0/false/no/off, or when Keras runs on another backend."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    import keras

    return keras.backend.backend() == "tensorflow"


def weights_identity(config) -> str:
    """What identifies the weights of ``config`` (an :class:`mlsp.extract.ExtractConfig`): the
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
            "mlsp": __version__, "keras": keras.__version__, "tensorflow": tf.__version__}


def entry_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_root(), f"{key['net']}-{key['pooling']}-{key['precision']}-{digest}")


def _files(folder: str) -> dict:
    """Every file of an entry but the metadata: relative path -> SHA-256."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, folder)
            if rel != META_FILE:
                out[rel] = backbone_weights.file_sha256(path)
    return out


def load(key: dict):
    """``(restored, weights_record)`` from the cache, or ``None`` when there is no valid entry;
    ``restored.forward`` is the forward pass (keep ``restored`` alive while using it: it owns
    the variables)."""
    folder = entry_path(key)
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isfile(meta_path):
        return None
    started = time.perf_counter()
    try:
        with open(meta_path) as handle:
            meta = json.load(handle)
        if meta.get("key") != key:
            raise ValueError("its key differs from the one asked for")
        found = _files(folder)
        if found != meta.get("files"):
            raise ValueError("its files differ from the SHA-256 recorded when it was written")
        import tensorflow as tf

        restored = tf.saved_model.load(folder)
        restored.forward  # noqa: B018  (an entry without it is not ours)
    except Exception as exc:  # an entry that cannot be used, whatever the cause, is rebuilt
        log.warning("the cached extractor %s cannot be used (%s: %s); removing it and building again",
                    folder, type(exc).__name__, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
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
        meta = {"key": key, "files": _files(tmp), "weights_record": weights_record,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(os.path.join(tmp, META_FILE), "w") as handle:
            json.dump(meta, handle, indent=2)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run wrote the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = None
    except Exception as exc:  # no space, read-only home, ...: the run goes on without the cache
        log.warning("could not cache the built extractor in %s (%s: %s); the next run builds it again",
                    folder, type(exc).__name__, exc)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the built %s extractor in %s (%.1f s); later runs load it instead of building it",
             key["net"], folder, time.perf_counter() - started)
    return folder
