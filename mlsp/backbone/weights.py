"""A backbone's weights: where they come from (``imagenet``, ``random:SEED`` or a file), Keras' own
download and cache of the ImageNet files, building a registered backbone with them, and the
record of them that every store keeps (source, SHA-256, path)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import TYPE_CHECKING

from ..runtime import backend
from ..runtime.files import file_sha256
from ..errors import ConfigError, WeightsUnavailableError

if TYPE_CHECKING:  # annotations only: the registry imports this module
    from .nets import BackboneSpec


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights come from: ``imagenet``, ``random:SEED`` or a file path."""

    kind: str  # "imagenet" | "random" | "file"
    seed: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> "WeightsSource":
        text = str(text).strip()
        if text == "imagenet":
            return cls("imagenet")
        if text == "random" or text.startswith("random:"):
            seed_text = text.partition(":")[2] or "0"
            try:
                return cls("random", seed=int(seed_text))
            except ValueError:
                raise ConfigError(f"--weights {text!r}: the seed after 'random:' must be an integer") from None
        if not os.path.isfile(text):
            raise ConfigError(
                f"--weights {text!r} is neither 'imagenet', 'random[:SEED]' nor an existing weights file"
            )
        return cls("file", path=os.path.abspath(text))

    def __str__(self) -> str:
        if self.kind == "random":
            return f"random:{self.seed}"
        return self.path if self.kind == "file" else self.kind


def keras_cache_dir() -> str:
    """The folder where Keras keeps downloaded weights ($KERAS_HOME/models, default ~/.keras/models)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def fetch_imagenet_weights(spec: BackboneSpec) -> str:
    """Return the local path of the notop ImageNet weights, downloading through Keras if needed.

    This is Keras' own download and cache (``keras.utils.get_file``, md5-checked), exactly what
    ``keras.applications`` does. Offline, a file placed by hand in :func:`keras_cache_dir`
    under its exact name is used. Nothing falls back to other weights.
    """
    import keras

    try:
        return keras.utils.get_file(
            spec.weights_file,
            spec.weights_url,
            cache_subdir="models",
            file_hash=spec.weights_hash,
        )
    except Exception as exc:  # get_file raises plain Exception subclasses for network and hash errors
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name} could not be loaded ({type(exc).__name__}: {exc}). "
            f"Download {spec.weights_url} on a machine with internet access and copy it to "
            f"{os.path.join(keras_cache_dir(), spec.weights_file)}, or pass its path with --weights PATH. "
            "For tests without pretrained weights use --weights random (features are then meaningless "
            "for aesthetics)."
        ) from exc


def build_backbone(spec: BackboneSpec, weights: WeightsSource):
    """Build the Keras application (no top, any input size) with the given weights.

    Returns ``(model, weights_record)`` where ``weights_record`` is the dict recorded in stores:
    ``{"source": ..., "sha256": ...}``; for random weights the hash is that of the weight values.
    """
    import keras
    import numpy as np

    if weights.kind == "random":
        backend.set_random_seed(weights.seed)
        model = spec.build()
        digest = hashlib.sha256()
        for w in model.weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
        return model, weights_record(weights, digest.hexdigest())

    path = fetch_imagenet_weights(spec) if weights.kind == "imagenet" else weights.path
    model = spec.build()
    try:
        model.load_weights(path)
    except Exception as exc:  # h5py/keras raise many types for a file of the wrong model
        raise WeightsUnavailableError(
            f"{path}: not a weights file of Keras' {spec.constructor}(include_top=False): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return model, weights_record(weights, file_sha256(path))


def weights_record(weights: WeightsSource, sha256: str) -> dict:
    """What stores record of ``weights`` whose values hash to ``sha256``: ``source`` (``imagenet``,
    ``random:SEED`` or the file's name), ``sha256`` and, for a file, ``path`` (where it was;
    scoring looks there first, and the hash decides)."""
    if weights.kind == "file":
        return {"source": os.path.basename(weights.path), "sha256": sha256, "path": weights.path}
    return {"source": str(weights), "sha256": sha256}
