"""The backbone registry: name -> everything mlsp needs to know about one ImageNet network.

Adding a backbone is one ``BACKBONES.register`` call with a :class:`BackboneSpec`: the Keras
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
import logging
from typing import Callable

from ..errors import ConfigError
from .graph import node_outputs, outbound_nodes
from ..registry import Registry

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

    def __post_init__(self):
        if len(self.taps) != len(self.channels):
            raise ConfigError(f"{self.name}: {len(self.taps)} taps but {len(self.channels)} channel counts")
        if len(set(self.taps)) != len(self.taps):
            raise ConfigError(f"{self.name}: a tap is listed twice")

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


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
get_backbone = BACKBONES.get  # the name most callers know


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
        consumers = outbound_nodes(layer)
        if len(consumers) != 1:
            raise ConfigError(f"{spec.name}: tap {tap}: {name} has {len(consumers)} consumers, not one")
        outputs.append(node_outputs(consumers[0])[0])
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


BACKBONES.register(
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

BACKBONES.register(
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
BACKBONES.register(
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
BACKBONES.register(
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
BACKBONES.register(
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
BACKBONES.register(
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
BACKBONES.register(
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

        from .cost import FlopCounter

        model = spec.build()
        counter = FlopCounter(keras.Model(model.input, tap_outputs(spec, model)))
        row["flops_at"] = [int(flops_at[0]), int(flops_at[1])]
        row["gflops"] = round(counter(*flops_at) / 1e9, 2)
    return row
