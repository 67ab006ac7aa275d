"""The backbone registry: name -> everything mlsp needs to know about one ImageNet network.

Adding a backbone is one :func:`register` call with a :class:`BackboneSpec`: the Keras
constructor, the exact tap layers and their channels, the input preprocessing (as data), the
smallest input side and the weights file Keras' own applications download. One parametrised
test (``tests/test_backbones.py``) builds every entry and checks it against the real model.

Tap layers are chosen by exact name. Keras' Inception-v3 also names inner concatenations
``mixed9_0``, ``mixed9_1``, ``mixed10_0`` ..., which a substring match on ``mixed`` would silently
take (that gives 11,584 channels, not the paper's 10,048). Where Keras leaves a block's output
unnamed (ConvNeXt's residual additions are plain ``x + y``, MobileNetV3's last hard-swish an
automatically numbered activation, and automatic names change with every model built in a
process) the tap is written ``after:NAME``: the output of the one operation that reads layer
``NAME``'s output.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Callable

from . import backend
from .errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

AFTER = "after:"  # tap prefix: the output of the single operation that consumes the named layer


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """A backbone's input preprocessing as data: RGB in [0, 255] -> ``x * scale + offset``, per
    channel (R, G, B) or one value for all three. ``name`` is recorded in every store."""

    name: str
    scale: float | tuple = 1.0
    offset: float | tuple = 0.0

    @classmethod
    def mean_std(cls, name: str, mean: tuple, std: tuple) -> "Preprocessing":
        """``(x - mean) / std`` per channel, in the units of the [0, 255] input."""
        return cls(name, tuple(1.0 / s for s in std), tuple(-m / s for m, s in zip(mean, std)))

    def __call__(self, batch):
        """Apply to a (B, H, W, 3) float tensor of any Keras backend (keras.ops only)."""
        import keras
        from keras import ops

        dtype = keras.backend.standardize_dtype(batch.dtype)
        return batch * ops.convert_to_tensor(self.scale, dtype) + ops.convert_to_tensor(self.offset, dtype)

    def layer(self, name: str = "preprocess"):
        """The same map as a stock, serializable Keras layer (for exported models)."""
        import keras

        as_list = (lambda v: list(v) if isinstance(v, tuple) else v)
        return keras.layers.Rescaling(as_list(self.scale), offset=as_list(self.offset), name=name)


# Keras' applications preprocess in one of three ways; each is written once here.
INCEPTION = Preprocessing("inception: x / 127.5 - 1 (RGB)", 1.0 / 127.5, -1.0)  # also MobileNetV3's Rescaling
EFFICIENTNETV2 = Preprocessing("efficientnetv2: x / 128 - 1 (RGB)", 1.0 / 128.0, -1.0)
TORCH_IMAGENET = Preprocessing.mean_std(
    "torch imagenet: (x / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225) (RGB)",
    (0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where to tap it."""

    name: str
    description: str
    constructor: str  # attribute of keras.applications
    taps: tuple  # exact layer names (or ``after:NAME``), in network order: the store's block_names
    channels: tuple  # channels of each tap, same order
    preprocessing: Preprocessing  # applied by mlsp before the net (its name is recorded in stores)
    min_side: int  # smallest input side the network accepts
    weights_file: str  # Keras' notop ImageNet weights file name
    weights_hash: str  # the md5 or sha256 Keras checks the download against (as in keras.applications)
    weights_url: str
    why_taps: str = ""  # why these layers are the blocks
    # keyword arguments of the constructor: the nets that would preprocess inside the model are
    # built without it, since mlsp applies ``preprocessing`` itself (no weights are involved)
    constructor_kwargs: tuple = ()

    @property
    def total_channels(self) -> int:
        return int(sum(self.channels))

    def preprocess(self, batch):
        """This net's ImageNet preprocessing of an RGB batch in [0, 255] (keras.ops, any backend)."""
        return self.preprocessing(batch)

    def build(self):
        """The Keras application without its top, for any input size, with random weights."""
        import keras

        ctor: Callable = getattr(keras.applications, self.constructor)
        return ctor(include_top=False, weights=None, input_shape=(None, None, 3), **dict(self.constructor_kwargs))


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone; a name already taken is an error (a backbone is never replaced in silence)."""
    if spec.name in BACKBONES:
        raise ConfigError(f"backbone {spec.name} is already registered; choose another name")
    if len(spec.taps) != len(spec.channels):
        raise ValueError(f"{spec.name}: {len(spec.taps)} taps but {len(spec.channels)} channel counts")
    if len(set(spec.taps)) != len(spec.taps):
        raise ValueError(f"{spec.name}: a tap is listed twice")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}") from None


def tap_outputs(spec: BackboneSpec, model) -> list:
    """The symbolic output tensors of ``spec``'s taps in ``model`` (built by :meth:`BackboneSpec.build`,
    folded or not), in order; a tap that is not there is a :class:`ConfigError`."""
    names = {layer.name for layer in model.layers}
    outputs, missing = [], []
    for tap in spec.taps:
        name = tap[len(AFTER):] if tap.startswith(AFTER) else tap
        if name not in names:
            missing.append(tap)
            continue
        layer = model.get_layer(name)
        if not tap.startswith(AFTER):
            outputs.append(layer.output)
            continue
        consumers = layer._outbound_nodes
        if len(consumers) != 1:
            raise ConfigError(f"{spec.name}: tap {tap}: {name} has {len(consumers)} consumers, not one")
        outputs.append(consumers[0].output_tensors[0])
    if missing:
        raise ConfigError(f"{spec.name}: layers {missing} not found in Keras' {spec.constructor}")
    return outputs


_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _residual_blocks(prefixes, channels, stem: int) -> tuple[tuple, tuple]:
    """Taps of the inverted-residual nets (EfficientNetV2, MobileNetV3): each block's output is its
    residual sum ``PREFIXadd`` where it has one (same width as its input, stride 1), else its
    last layer, the projection's batch norm ``PREFIXproject_bn`` (a block that widens or strides)."""
    taps, previous = [], stem
    for prefix, c in zip(prefixes, channels):
        taps.append(prefix + ("add" if c == previous else "project_bn"))
        previous = c
    return tuple(taps), tuple(channels)


def _efficientnetv2(repeats, widths) -> tuple[tuple, tuple]:
    """Blocks ``block{stage}{a, b, ...}_`` of Keras' EfficientNetV2 (stem of 24 channels), then
    ``top_activation``, the last 1x1 convolution (1280)."""
    prefixes, channels = [], []
    for stage, (n, width) in enumerate(zip(repeats, widths), start=1):
        prefixes += [f"block{stage}{chr(ord('a') + k)}_" for k in range(n)]
        channels += [width] * n
    taps, channels = _residual_blocks(prefixes, channels, stem=24)
    return taps + ("top_activation",), channels + (1280,)


def _convnext(name, depths, widths) -> tuple[tuple, tuple]:
    """Blocks ``NAME_stage_{i}_block_{j}`` of Keras' ConvNeXt: the residual sum closing each block,
    which Keras leaves unnamed (``inputs + layer(x)``), so the tap is what follows the block's
    last layer, ``..._identity``."""
    taps, channels = [], []
    for stage, (n, width) in enumerate(zip(depths, widths)):
        taps += [f"{AFTER}{name}_stage_{stage}_block_{k}_identity" for k in range(n)]
        channels += [width] * n
    return tuple(taps), tuple(channels)


register(
    BackboneSpec(
        name="iv3",
        description="Inception-v3: the 11 Inception blocks mixed0..mixed10",
        constructor="InceptionV3",
        taps=tuple(f"mixed{i}" for i in range(11)),
        channels=(256, 288, 288, 768, 768, 768, 768, 768, 1280, 2048, 2048),
        preprocessing=INCEPTION,
        min_side=75,
        weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_hash="bcbd6486424b2319ff4ef7d526e38f63",
        weights_url=_KERAS_WEIGHTS + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        why_taps="the paper's: the output (concatenation) of every Inception module; not the inner "
        "concatenations mixed9_0, mixed9_1, mixed10_0, mixed10_1",
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
        preprocessing=INCEPTION,
        min_side=75,
        weights_file="inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_hash="d19885ff4a710c122648d3b5c3b684e4",
        weights_url=_KERAS_WEIGHTS
        + "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        why_taps="the paper's (the authors' code): every layer named *mixed*, i.e. the reduction "
        "blocks' outputs and each residual block's branch concatenation",
    )
)

_S_TAPS, _S_CHANNELS = _efficientnetv2((2, 4, 4, 6, 9, 15), (24, 48, 64, 128, 160, 256))
register(
    BackboneSpec(
        name="effnetv2s",
        description="EfficientNetV2-S: 40 (Fused-)MBConv blocks in 6 stages + the last 1x1 conv",
        constructor="EfficientNetV2S",
        taps=_S_TAPS,
        channels=_S_CHANNELS,
        preprocessing=EFFICIENTNETV2,
        min_side=32,
        weights_file="efficientnetv2-s_notop.h5",
        weights_hash="af0682fb74e8c54910f2d4393339c070",
        weights_url=_KERAS_WEIGHTS + "efficientnet_v2/efficientnetv2-s_notop.h5",
        why_taps="every block's output: its residual sum blockNx_add, or, for the first block of a "
        "stage (no residual: it widens or strides), its projection blockNa_project_bn; then "
        "top_activation, the 1x1 conv whose global average the ImageNet classifier reads",
        constructor_kwargs=(("include_preprocessing", False),),
    )
)

_M_TAPS, _M_CHANNELS = _efficientnetv2((3, 5, 5, 7, 14, 18, 5), (24, 48, 80, 160, 176, 304, 512))
register(
    BackboneSpec(
        name="effnetv2m",
        description="EfficientNetV2-M: 57 (Fused-)MBConv blocks in 7 stages + the last 1x1 conv",
        constructor="EfficientNetV2M",
        taps=_M_TAPS,
        channels=_M_CHANNELS,
        preprocessing=EFFICIENTNETV2,
        min_side=32,
        weights_file="efficientnetv2-m_notop.h5",
        weights_hash="1b8dc055df72dde80d614482840fe342",
        weights_url=_KERAS_WEIGHTS + "efficientnet_v2/efficientnetv2-m_notop.h5",
        why_taps="as effnetv2s: each block's residual sum (or projection where a stage starts), "
        "then top_activation",
        constructor_kwargs=(("include_preprocessing", False),),
    )
)

_T_TAPS, _T_CHANNELS = _convnext("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768))
register(
    BackboneSpec(
        name="convnext_tiny",
        description="ConvNeXt-T: 18 ConvNeXt blocks in 4 stages",
        constructor="ConvNeXtTiny",
        taps=_T_TAPS,
        channels=_T_CHANNELS,
        preprocessing=TORCH_IMAGENET,
        min_side=32,
        weights_file="convnext_tiny_notop.h5",
        weights_hash="d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
        weights_url=_KERAS_WEIGHTS + "convnext/convnext_tiny_notop.h5",
        why_taps="every block's output, the residual sum closing it (unnamed in Keras: the operation "
        "after ..._identity); the downsampling layers between stages and the final layer norm "
        "are not blocks. 32 px is the least input: the stem and three downsamplings divide by 32 "
        "without padding",
        constructor_kwargs=(("include_preprocessing", False),),
    )
)

_B_TAPS, _B_CHANNELS = _convnext("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024))
register(
    BackboneSpec(
        name="convnext_base",
        description="ConvNeXt-B: 36 ConvNeXt blocks in 4 stages",
        constructor="ConvNeXtBase",
        taps=_B_TAPS,
        channels=_B_CHANNELS,
        preprocessing=TORCH_IMAGENET,
        min_side=32,
        weights_file="convnext_base_notop.h5",
        weights_hash="40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
        weights_url=_KERAS_WEIGHTS + "convnext/convnext_base_notop.h5",
        why_taps="as convnext_tiny: the residual sum closing every block",
        constructor_kwargs=(("include_preprocessing", False),),
    )
)

_L_TAPS, _L_CHANNELS = _residual_blocks(
    ("expanded_conv_",) + tuple(f"expanded_conv_{k}_" for k in range(1, 15)),
    (16, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 160, 160, 160), stem=16)
register(
    BackboneSpec(
        name="mobilenetv3_large",
        description="MobileNetV3-Large: 15 inverted-residual blocks + the last 1x1 conv",
        constructor="MobileNetV3Large",
        taps=_L_TAPS + (f"{AFTER}conv_1_bn",),
        channels=_L_CHANNELS + (960,),
        preprocessing=INCEPTION,
        min_side=32,
        weights_file="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        weights_hash="07fb09a5933dd0c8eaafa16978110389",
        weights_url=_KERAS_WEIGHTS + "mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        why_taps="every block's output: its residual sum expanded_conv_K_add, or its projection "
        "expanded_conv_K_project_bn where it widens or strides; then the hard-swish after conv_1_bn "
        "(unnamed in Keras), the 1x1 conv the ImageNet classifier pools",
        constructor_kwargs=(("include_preprocessing", False),),
    )
)


PAPER_BACKBONES = ("iv3", "irv2")  # the two the paper reports results for
FLOPS_SIZE = (384, 512)  # (height, width) at which `mlsp backbones` counts FLOPs: a typical 4:3 photo


def describe(spec: BackboneSpec, flops_at: tuple | None = FLOPS_SIZE) -> dict:
    """What `mlsp backbones` lists about ``spec``. With ``flops_at`` = (height, width), the
    forward pass's FLOPs up to the last tap are counted on the real Keras model (built with
    random weights: seconds for the larger nets)."""
    row = {
        "name": spec.name,
        "description": spec.description,
        "blocks": len(spec.taps),
        "channels": spec.total_channels,
        "min_side": spec.min_side,
        "preprocessing": spec.preprocessing.name,
        "weights_file": spec.weights_file,
        "weights_url": spec.weights_url,
        "why_taps": spec.why_taps,
        "paper": spec.name in PAPER_BACKBONES,
    }
    if flops_at is not None:
        import keras

        model = spec.build()
        counter = FlopCounter(keras.Model(model.input, tap_outputs(spec, model)))
        row["flops_at"] = [int(flops_at[0]), int(flops_at[1])]
        row["gflops"] = round(counter(*flops_at) / 1e9, 2)
    return row


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


def fold_batch_norms(model):
    """An inference copy of ``model`` with each BatchNormalization that is the only consumer of a
    Conv2D or DepthwiseConv2D folded into that convolution; returns ``(model, number folded)``.

    With frozen statistics a batch norm is an affine map per channel, so the convolution's
    kernel is scaled by gamma / sqrt(var + eps) per output channel and gets the bias
    beta - mean * scale (a depthwise kernel (h, w, C, M) has output channel c * M + m). The
    Inception nets, EfficientNetV2 and MobileNetV3 put a batch norm after almost every
    convolution: folding removes a multiply and an add over every activation map (and, under
    a mixed precision policy, two casts around each batch norm) and lets oneDNN fuse
    convolution, bias and activation. The batch norm becomes a registered
    :class:`mlsp.layers.FoldedBatchNorm` (the identity) keeping its name, so the taps are found
    as before. Only that pattern is folded: a batch norm after anything else stays, and layer
    norms (ConvNeXt) normalise over each position's channels at run time, which no kernel can
    absorb. The same copy runs Conv2D layers that are depthwise convolutions written as grouped
    ones (ConvNeXt's, one channel per group) as DepthwiseConv2D, the same function TensorFlow
    computes about 10x faster on CPU (see :func:`_grouped_depthwise`). A net with nothing to
    fold or rewrite is returned as it is. Features agree with the unfolded model to float32
    rounding.

    The steps: find the pairs (:func:`_conv_batch_norm_pairs`), clone the model with the
    layers changed (:func:`_folding_clone`), then give the copy its weights
    (:func:`_folded_weights`).
    """
    import keras

    bn_of_conv, conv_of_bn = _conv_batch_norm_pairs(model)
    depthwise = {layer.name for layer in model.layers if _grouped_depthwise(layer)}
    if not bn_of_conv and not depthwise:
        return model, 0
    folded = keras.models.clone_model(model, clone_function=functools.partial(
        _folding_clone, bn_of_conv=bn_of_conv, conv_of_bn=conv_of_bn, depthwise=depthwise))
    for layer in model.layers:
        if layer.name in conv_of_bn or not layer.weights:
            continue
        folded.get_layer(layer.name).set_weights(
            _folded_weights(layer, bn_of_conv.get(layer.name), depthwise=layer.name in depthwise))
    return folded, len(bn_of_conv)


def _conv_batch_norm_pairs(model) -> tuple[dict, dict]:
    """(convolution name -> its batch norm, batch norm name -> its convolution) for every
    channels-last BatchNormalization that is the only consumer of a Conv2D or DepthwiseConv2D."""
    import keras

    convolutions = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    bn_of_conv, conv_of_bn = {}, {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            continue  # only channels-last batch norms match the kernels' last axis
        producer = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
        if isinstance(producer, convolutions) and len(producer._outbound_nodes) == 1:
            bn_of_conv[producer.name] = layer
            conv_of_bn[layer.name] = producer
    return bn_of_conv, conv_of_bn


def _folding_clone(layer, *, bn_of_conv: dict, conv_of_bn: dict, depthwise: set):
    """``layer`` as the folded copy has it (the ``clone_function`` of ``keras.models.clone_model``):
    a folded batch norm becomes the identity, its convolution gets a bias, a grouped depthwise
    convolution becomes a DepthwiseConv2D."""
    import keras

    from .layers import FoldedBatchNorm

    if layer.name in conv_of_bn:
        return FoldedBatchNorm(name=layer.name, dtype=layer.dtype_policy.name)
    config = layer.get_config()
    if layer.name in bn_of_conv:
        config["use_bias"] = True
    if layer.name in depthwise:
        return keras.layers.DepthwiseConv2D(
            layer.kernel_size, strides=layer.strides, padding=layer.padding, depth_multiplier=1,
            data_format=layer.data_format, dilation_rate=layer.dilation_rate, activation=layer.activation,
            use_bias=config["use_bias"], name=layer.name, dtype=layer.dtype_policy.name)
    return layer.__class__.from_config(config)


def _folded_weights(layer, bn, *, depthwise: bool) -> list:
    """The weights of ``layer``'s folded copy: its own, with the batch norm ``bn`` (or None)
    folded into kernel and bias, and a grouped depthwise kernel (h, w, 1, C) turned (h, w, C, 1)."""
    import keras
    import numpy as np

    if bn is None:
        weights = layer.get_weights()
        if depthwise:  # (h, w, 1, C) -> (h, w, C, 1)
            weights[0] = np.transpose(weights[0], (0, 1, 3, 2))
        return weights
    as_array = keras.ops.convert_to_numpy
    kernel = as_array(layer.kernel).astype(np.float64)
    bias = as_array(layer.bias).astype(np.float64) if layer.use_bias else 0.0
    mean = as_array(bn.moving_mean).astype(np.float64)
    scale = (as_array(bn.gamma).astype(np.float64) if bn.scale else 1.0) / np.sqrt(
        as_array(bn.moving_variance).astype(np.float64) + bn.epsilon)
    beta = as_array(bn.beta).astype(np.float64) if bn.center else 0.0
    per_kernel = scale.reshape(kernel.shape[2:]) if isinstance(layer, keras.layers.DepthwiseConv2D) else scale
    kernel = kernel * per_kernel
    if depthwise:
        kernel = np.transpose(kernel, (0, 1, 3, 2))
    return [kernel.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def _grouped_depthwise(layer) -> bool:
    """A Conv2D with one input channel per group and one filter per group: a depthwise
    convolution in disguise (ConvNeXt's 7x7), which TensorFlow runs about 10x slower on CPU
    than the same DepthwiseConv2D (measured: 1.43 s against 0.12 s on 84x112x96, 2 cores)."""
    import keras

    if type(layer) is not keras.layers.Conv2D or getattr(layer, "groups", 1) <= 1:
        return False
    return layer.groups == layer.filters == int(layer.input.shape[-1]) and layer.data_format == "channels_last"


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------


class FlopCounter:
    """FLOPs of one forward pass of a functional Keras model at any input size, counted from the
    model: 2 * H_out * W_out * K_h * K_w * C_in / groups * C_out for every Conv2D, 2 * H_out *
    W_out * K_h * K_w * C * multiplier for every DepthwiseConv2D, 2 * in * out per position for
    every Dense; nested models (ConvNeXt's stem and downsampling blocks) are counted through.
    Batch and layer norms, activations, additions and pooling are not counted (they are
    memory-bound, a few % of the arithmetic). Shapes are propagated through the layer graph with
    each operation's ``compute_output_shape`` (operations without one keep their first input's
    shape), which takes milliseconds, so every distinct image size can be counted."""

    def __init__(self, model):
        self.model = model
        self._cache: dict = {}

    def __call__(self, height: int, width: int) -> int:
        key = (int(height), int(width))
        if key not in self._cache:
            shape = (1, key[0], key[1], int(self.model.inputs[0].shape[-1]))
            self._cache[key] = int(count_flops(self.model, shape))
        return self._cache[key]


def count_flops(model, input_shape: tuple) -> int:
    """FLOPs of ``model`` (functional or Sequential) on an input of ``input_shape``; see :class:`FlopCounter`."""
    import keras

    if isinstance(model, keras.Sequential):
        total, shape = 0, tuple(input_shape)
        for layer in model.layers:
            out = tuple(layer.compute_output_shape(shape))
            total += _layer_flops(layer, shape, out)
            shape = out
        return total
    shapes = {id(model.inputs[0]): tuple(input_shape)}
    total = 0
    for operation in model.operations:
        for node in operation._inbound_nodes:
            inputs = node.input_tensors
            if not inputs or any(id(t) not in shapes for t in inputs):
                continue
            in_shapes = [shapes[id(t)] for t in inputs]
            arg = in_shapes[0] if len(in_shapes) == 1 else in_shapes
            try:
                out = operation.compute_output_shape(arg)
            except Exception:  # ops without a shape rule (irv2's CustomScaleLayer, x + y): shape-preserving
                out = in_shapes[0]
            outputs = node.output_tensors
            out_list = [out] if len(outputs) == 1 else list(out)
            for tensor, shape in zip(outputs, out_list):
                shapes[id(tensor)] = tuple(shape)
            total += _layer_flops(operation, in_shapes[0], tuple(out_list[0]))
    return total


def _layer_flops(layer, in_shape: tuple, out_shape: tuple) -> int:
    import keras

    if isinstance(layer, keras.Model):
        return count_flops(layer, in_shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2 * out_shape[1] * out_shape[2] * kh * kw * out_shape[-1]
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        groups = getattr(layer, "groups", 1)
        return 2 * out_shape[1] * out_shape[2] * kh * kw * (in_shape[-1] // groups) * layer.filters
    if isinstance(layer, keras.layers.Dense):
        positions = 1
        for d in out_shape[1:-1]:
            positions *= d
        return 2 * positions * in_shape[-1] * layer.units
    return 0
