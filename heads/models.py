"""The four MLSP heads (docs/paper.md, "Stage 2: heads") as Keras functional models.

Every layer is a stock Keras layer except :class:`heads.layers.BlockSplit`, which ``import heads``
registers, so that a saved ``model.keras`` loads under ``safe_mode``; there are no ``Lambda`` layers.

The 3FC block follows the authors' released code (kutils ``fc_layers`` with ``batch_norm=2``):
``Dense(X, relu) -> BN -> Dropout(0.25) -> Dense(X/2, relu) -> BN -> Dropout(0.25) ->
Dense(X/8, relu) -> BN -> Dropout(0.5) -> Dense(1)``, He-normal kernels. The ReLU sits inside
each Dense, before its batch normalisation, as in their code. The reduced Inception module of
Pool-3FC is their ``inception_block``: conv (no bias) + BN (no scale) + ReLU units, as in
Keras' Inception-v3.

Every head takes every target (:mod:`heads.targets`): its last layer has the target's number of
``outputs`` (1 for MOS, 10 for the vote distribution) and :func:`build_head` appends the
target's activation (the softmax of the distribution) as one named layer, ``target``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from mlsp.errors import ConfigError
from mlsp.store.format import NARROW, POOLINGS, WIDE_GRID, pooling_of

from .registry import feature_width, get_head, inception_kernels, register_head
from .targets import DEFAULT_TARGET, TARGETS

if TYPE_CHECKING:
    import keras

DROPOUTS = (0.25, 0.25, 0.5)


def fc_sizes(width: int) -> tuple:
    """Units of the three hidden layers of a 3FC block of width X: X, X/2, X/8 (at least 1)."""
    return (int(width), max(1, int(width) // 2), max(1, int(width) // 8))


def bias_initializer(output_bias):
    """A Constant initializer for the last layer's bias: one value, or one per output."""
    import keras

    if isinstance(output_bias, (list, tuple)):
        output_bias = [float(v) for v in output_bias]
    return keras.initializers.Constant(output_bias)


def three_fc(x, width: int, prefix: str = "", output_bias=0.0, outputs: int = 1):
    """The 3FC block on a (B, D) tensor; returns the (B, outputs) prediction."""
    from keras import layers

    for i, (units, rate) in enumerate(zip(fc_sizes(width), DROPOUTS)):
        x = layers.Dense(units, activation="relu", kernel_initializer="he_normal", name=f"{prefix}fc{i}")(x)
        x = layers.BatchNormalization(name=f"{prefix}bn{i}")(x)
        x = layers.Dropout(rate, name=f"{prefix}dropout{i}")(x)
    return layers.Dense(
        outputs, kernel_initializer="he_normal", bias_initializer=bias_initializer(output_bias),
        name=f"{prefix}out",
    )(x)


@register_head("single1fc", needs_wide=False, description="narrow features -> one Dense(1): a linear model")
def single_1fc(x, block_channels, output_bias=0.0, outputs: int = 1):
    from keras import layers

    return layers.Dense(outputs, bias_initializer=bias_initializer(output_bias), name="out")(x)


@register_head(
    "single3fc", needs_wide=False,
    description="narrow features -> 3FC (X, X/2, X/8, 1); X = width, the paper's 2048 on iv3/irv2, "
    "by default C/5 as a power of two up to 2048 on other features",
    options={"width": feature_width},
    option_help={"width": "X of the 3FC block; default C/5 as a power of two, 2048 on iv3/irv2"})
def single_3fc(x, block_channels, output_bias=0.0, outputs: int = 1, *, width: int):
    return three_fc(x, width, output_bias=output_bias, outputs=outputs)


@register_head(
    "multi3fc", needs_wide=False,
    description="narrow features split into blocks -> one 3FC per block (X = its channels) -> learned weighted sum")
def multi_3fc(x, block_channels, output_bias=0.0, outputs: int = 1):
    """One 3FC per block (X = the block's channels); the prediction is their weighted sum.

    The weights start at 1/B (the mean of the blocks' predictions) and are learned; with several
    outputs, each output is the same weighted sum of the blocks' values for it.
    """
    import keras
    from keras import layers
    from .layers import BlockSplit

    block_channels = [int(c) for c in block_channels]
    parts = BlockSplit(block_channels, name="split_blocks")(x) if len(block_channels) > 1 else [x]
    preds = [three_fc(part, c, prefix=f"b{k:02d}_", output_bias=output_bias, outputs=outputs)
             for k, (part, c) in enumerate(zip(parts, block_channels))]
    if len(preds) == 1:
        return preds[0]
    stacked = layers.Concatenate(name="block_predictions")(preds)  # (B, blocks * outputs), block-major
    if outputs > 1:  # (B, outputs, blocks): the weighted sum runs over the blocks of each output
        stacked = layers.Reshape((len(preds), outputs), name="blocks_by_output")(stacked)
        stacked = layers.Permute((2, 1), name="outputs_by_block")(stacked)
    summed = layers.Dense(
        1, use_bias=False, kernel_initializer=keras.initializers.Constant(1.0 / len(preds)),
        name="weighted_sum",
    )(stacked)
    return layers.Reshape((outputs,), name="outputs")(summed) if outputs > 1 else summed


def conv_bn(x, filters: int, rows: int, cols: int, name: str):
    """Conv2D ('same', no bias) -> BN (no scale) -> ReLU, as in Keras' Inception-v3."""
    from keras import layers

    x = layers.Conv2D(filters, (rows, cols), padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(scale=False, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=name)(x)


def reduced_inception(x, kernels: int = 1024):
    """Three columns of ``kernels`` channels each, concatenated: 3 * kernels channels."""
    from keras import layers

    branch1x1 = conv_bn(x, kernels, 1, 1, "branch1x1")
    branch3x3 = conv_bn(x, kernels, 1, 1, "branch3x3_1x1")
    branch3x3 = layers.Concatenate(name="branch3x3")(
        [conv_bn(branch3x3, kernels // 2, 1, 3, "branch3x3_1x3"),
         conv_bn(branch3x3, kernels - kernels // 2, 3, 1, "branch3x3_3x1")]
    )
    branch_pool = layers.AveragePooling2D((3, 3), strides=(1, 1), padding="same", name="branch_pool_avg")(x)
    branch_pool = conv_bn(branch_pool, kernels, 1, 1, "branch_pool")
    return layers.Concatenate(name="inception")([branch1x1, branch3x3, branch_pool])


@register_head(
    "pool3fc", needs_wide=True,
    description="wide 5x5 features -> reduced Inception module (3 columns of `kernels`) -> global average pool -> "
    "3FC (X = width; the paper's figure uses 3072, its code 2048); defaults follow the features as single3fc's "
    "(kernels = width / 2: 1024 on iv3/irv2)",
    options={"width": feature_width, "kernels": inception_kernels},
    option_help={"width": "X of the 3FC block, as single3fc's; the paper's figure shows 3072",
                 "kernels": "kernels per column of the reduced Inception module; default width / 2"})
def pool_3fc(x, block_channels, output_bias=0.0, outputs: int = 1, *, width: int, kernels: int):
    from keras import layers

    x = reduced_inception(x, kernels)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return three_fc(x, width, output_bias=output_bias, outputs=outputs)


def build_head(
    name: str,
    block_channels: Sequence[int],
    *,
    pooling: str = NARROW.name,
    grid: int = WIDE_GRID,
    output_bias=0.0,
    target: str = DEFAULT_TARGET,
    **options,
) -> keras.Model:
    """Build the registered head ``name`` for features with the given channel layout.

    ``pooling`` is the store's: a narrow head on ``"wide"`` features starts with a global
    average over the grid (the mean of the 5x5 grid equals the narrow feature), so the model
    takes what the store holds. ``target`` (:data:`heads.targets.TARGETS`): what the head
    predicts, (B, 1) MOS or (B, 10) a histogram over the scores. ``output_bias`` initialises the
    output bias, one value or one per output (training sets it from the training labels:
    :func:`heads.targets.initial_bias`). ``options`` are the head's own (e.g. ``width``).
    """
    import keras
    from keras import layers

    spec = get_head(name)
    goal = TARGETS.get(target)
    block_channels = [int(c) for c in block_channels]
    opts = spec.resolve_options(options, channels=sum(block_channels))
    if not block_channels or min(block_channels) < 1:
        raise ConfigError(f"block_channels must be positive integers, received {block_channels!r}")
    channels = sum(block_channels)
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    wide = pooling_of(pooling).wide
    if spec.needs_wide and not wide:
        raise ConfigError(
            f"head {name!r} needs wide (5x5) features, but the store is {pooling}; "
            "extract with `mlsp extract --wide`, or choose a narrow head"
        )
    if wide:
        inputs = keras.Input((grid, grid, channels), name="features")
        x = inputs if spec.needs_wide else layers.GlobalAveragePooling2D(name="grid_mean")(inputs)
    else:
        inputs = keras.Input((channels,), name="features")
        x = inputs
    bias = [float(v) for v in output_bias] if isinstance(output_bias, (list, tuple)) else float(output_bias)
    if isinstance(bias, list) and len(bias) == 1:
        bias = bias[0]
    if isinstance(bias, list) and len(bias) != goal.outputs:
        raise ConfigError(f"output_bias has {len(bias)} values; target {goal.name!r} has {goal.outputs} outputs")
    outputs = spec.resolve_builder()(x, block_channels, output_bias=bias, outputs=goal.outputs, **opts)
    mixed = keras.config.dtype_policy().compute_dtype != "float32"
    if goal.activation or mixed:
        # under a mixed-precision policy the output (a softmax above all) and so the loss are
        # computed in float32, as Keras advises; a float32 head is unchanged
        outputs = layers.Activation(goal.activation or "linear", dtype="float32" if mixed else None,
                                    name="target")(outputs)
    return keras.Model(inputs, outputs, name=name)
