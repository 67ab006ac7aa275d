"""The backbone registry: name -> everything mlsp needs to know about one ImageNet network.

Adding a backbone is one :func:`register` call. Tap layers are chosen by exact name: Keras'
Inception-v3 also names inner concatenations ``mixed9_0``, ``mixed9_1``, ``mixed10_0`` ...,
which a substring match on ``mixed`` would silently take (that gives 11,584 channels, not the
paper's 10,048).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Callable

from .errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where to tap it."""

    name: str
    description: str
    constructor: str  # attribute of keras.applications
    taps: tuple  # exact layer names, in network order
    channels: tuple  # channels of each tap, same order
    preprocessing: str  # name of the preprocessing (recorded in stores)
    min_side: int  # smallest input side the network accepts
    weights_file: str  # Keras' notop ImageNet weights file name
    weights_md5: str  # md5 Keras checks the download against
    weights_url: str

    @property
    def total_channels(self) -> int:
        return int(sum(self.channels))

    def preprocess(self, batch):
        """ImageNet preprocessing of both registered nets: RGB in [0, 255] -> [-1, 1]."""
        return batch / 127.5 - 1.0


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if len(spec.taps) != len(spec.channels):
        raise ValueError(f"{spec.name}: {len(spec.taps)} taps but {len(spec.channels)} channel counts")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}") from None


_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"

register(
    BackboneSpec(
        name="iv3",
        description="Inception-v3: the 11 Inception blocks mixed0..mixed10",
        constructor="InceptionV3",
        taps=tuple(f"mixed{i}" for i in range(11)),
        channels=(256, 288, 288, 768, 768, 768, 768, 768, 1280, 2048, 2048),
        preprocessing="inception: x / 127.5 - 1 (RGB)",
        min_side=75,
        weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_md5="bcbd6486424b2319ff4ef7d526e38f63",
        weights_url=_KERAS_WEIGHTS + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    )
)

register(
    BackboneSpec(
        name="irv2",
        description="InceptionResNet-v2: mixed_5b, 10 block35, mixed_6a, 20 block17, mixed_7a, 10 block8",
        constructor="InceptionResNetV2",
        taps=("mixed_5b",)
        + tuple(f"block35_{i}_mixed" for i in range(1, 11))
        + ("mixed_6a",)
        + tuple(f"block17_{i}_mixed" for i in range(1, 21))
        + ("mixed_7a",)
        + tuple(f"block8_{i}_mixed" for i in range(1, 11)),
        channels=(320,) + (128,) * 10 + (1088,) + (384,) * 20 + (2080,) + (448,) * 10,
        preprocessing="inception: x / 127.5 - 1 (RGB)",
        min_side=75,
        weights_file="inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_md5="d19885ff4a710c122648d3b5c3b684e4",
        weights_url=_KERAS_WEIGHTS
        + "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
    )
)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


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


def file_sha256(path: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
            file_hash=spec.weights_md5,
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

    ctor: Callable = getattr(keras.applications, spec.constructor)
    if weights.kind == "random":
        keras.utils.set_random_seed(weights.seed)
        model = ctor(include_top=False, weights=None, input_shape=(None, None, 3))
        digest = hashlib.sha256()
        for w in model.weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
        return model, {"source": str(weights), "sha256": digest.hexdigest()}

    path = fetch_imagenet_weights(spec) if weights.kind == "imagenet" else weights.path
    model = ctor(include_top=False, weights=None, input_shape=(None, None, 3))
    try:
        model.load_weights(path)
    except Exception as exc:  # h5py/keras raise many types for a file of the wrong model
        raise WeightsUnavailableError(
            f"{path}: not a weights file of Keras' {spec.constructor}(include_top=False): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    source = "imagenet" if weights.kind == "imagenet" else os.path.basename(path)
    record = {"source": source, "sha256": file_sha256(path)}
    if weights.kind == "file":
        record["path"] = path  # where it was; scoring looks there first (the hash decides)
    return model, record


def fold_batch_norms(model):
    """An inference copy of ``model`` with each BatchNormalization that is the only consumer of a
    Conv2D folded into that convolution; returns ``(model, number folded)``.

    With frozen statistics a batch norm is an affine map per channel, so the convolution's
    kernel is scaled by gamma / sqrt(var + eps) and gets the bias beta - mean * scale. Both Inception backbones
    put a batch norm after almost every convolution: folding removes a multiply and an add over
    every activation map (and, under a mixed precision policy, two casts around each batch
    norm) and lets oneDNN fuse convolution, bias and ReLU. The batch norm becomes a registered
    :class:`mlsp.layers.FoldedBatchNorm` (the identity) keeping its name, so the taps are found
    as before. Features agree with the unfolded model to float32 rounding.
    """
    import keras
    import numpy as np

    from .layers import FoldedBatchNorm

    bn_of_conv, conv_of_bn = {}, {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        producer = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
        if isinstance(producer, keras.layers.Conv2D) and len(producer._outbound_nodes) == 1:
            bn_of_conv[producer.name] = layer
            conv_of_bn[layer.name] = producer

    def clone(layer):
        if layer.name in conv_of_bn:
            return FoldedBatchNorm(name=layer.name, dtype=layer.dtype_policy.name)
        config = layer.get_config()
        if layer.name in bn_of_conv:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone)
    as_array = keras.ops.convert_to_numpy
    for layer in model.layers:
        if layer.name in conv_of_bn or not layer.weights:
            continue
        target = folded.get_layer(layer.name)
        bn = bn_of_conv.get(layer.name)
        if bn is None:
            target.set_weights(layer.get_weights())
            continue
        kernel = as_array(layer.kernel).astype(np.float64)
        bias = as_array(layer.bias).astype(np.float64) if layer.use_bias else 0.0
        mean = as_array(bn.moving_mean).astype(np.float64)
        scale = (as_array(bn.gamma).astype(np.float64) if bn.scale else 1.0) / np.sqrt(
            as_array(bn.moving_variance).astype(np.float64) + bn.epsilon)
        beta = as_array(bn.beta).astype(np.float64) if bn.center else 0.0
        target.set_weights([(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)])
    return folded, len(bn_of_conv)
