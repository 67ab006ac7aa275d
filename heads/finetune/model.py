"""The fine-tuned network: an ImageNet backbone (:data:`heads.finetune.nets.NETS`) with a new head,
and the parts each phase trains.

``images (RGB 0..255) -> the net's preprocessing -> backbone -> global average pooling ->
[Dense + ReLU per --fc width] -> [Dropout] -> Dense(outputs) -> the target's activation``:
NIMA's head is dropout and a 10-way softmax; the regression head one unit; the classifiers' a
2-way softmax. Batch normalisation keeps its ImageNet statistics in both phases (the backbone
runs in inference mode, as Keras' fine-tuning guide does: small batches would ruin them).
"""

from __future__ import annotations

import logging

import numpy as np

from mlsp.backbone.weights import WeightsSource, build_backbone
from mlsp.errors import WeightsUnavailableError
from mlsp.runtime.precision import dtype_policy

from .config import ALL, FINETUNE_TARGETS, FinetuneConfig
from .nets import NETS, FinetuneNet

log = logging.getLogger(__name__)
BACKBONE = "backbone"  # the backbone's name inside the model


def check_weights_pinned(spec: FinetuneNet, weights: WeightsSource):
    """ImageNet weights are loaded only through a hash mlsp pins; Keras pins none for some files."""
    if weights.kind == "imagenet" and spec.weights_hash is None:
        raise WeightsUnavailableError(
            f"Keras pins no hash for {spec.name}'s ImageNet weights ({spec.weights_file}), so mlsp does not load "
            f"them unchecked: download {spec.weights_url} and pass the file with --weights PATH (its sha256 is "
            "recorded in the run)")


def load_backbone(spec: FinetuneNet, weights: str):
    """The backbone with its weights (``imagenet``, ``random:SEED`` or a file) and their record."""
    import keras

    source = WeightsSource.parse(weights)
    check_weights_pinned(spec, source)
    backbone, record = build_backbone(spec, source)
    if spec.bgr_weights and source.kind != "random":  # the weights read BGR: take RGB instead
        first = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D))
        kernel, *rest = first.get_weights()
        first.set_weights([kernel[:, :, ::-1, :], *rest])
    backbone.name = BACKBONE
    return backbone, record


def build(config: FinetuneConfig, output_bias, precision: str = "float32"):
    """The whole network (see the module's docstring) at ``precision`` (the last layers stay
    float32), and the record of the backbone's weights."""
    import keras

    spec, target = NETS[config.net], FINETUNE_TARGETS[config.target]
    with dtype_policy(precision):
        backbone, record = load_backbone(spec, config.weights)
        images = keras.Input((None, None, 3), name="images")
        x = spec.preprocessing.layer(name="preprocess")(images)
        x = backbone(x, training=False)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        for k, width in enumerate(config.fc, start=1):
            x = keras.layers.Dense(width, activation="relu", name=f"fc{k}")(x)
        if config.dropout:
            x = keras.layers.Dropout(config.dropout, seed=config.seed, name="dropout")(x)
        x = keras.layers.Dense(target.outputs, name="score", dtype="float32",
                               bias_initializer=keras.initializers.Constant(np.asarray(output_bias, np.float32)))(x)
        if target.activation:
            x = keras.layers.Activation(target.activation, name=target.activation, dtype="float32")(x)
        model = keras.Model(images, x, name=f"finetune_{config.net}_{config.target}")
    return model, record


def backbone_of(model):
    return model.get_layer(BACKBONE)


def set_phase(model, config: FinetuneConfig, phase: int) -> tuple[list, list]:
    """Make phase 1 (the head only) or phase 2 (the head and the unfrozen top of the backbone)
    trainable; returns (head variables, backbone variables) trained in it."""
    import keras

    backbone = backbone_of(model)
    backbone.trainable = phase == 2
    if phase == 2:
        layers = backbone.layers
        if config.unfreeze != ALL:
            blocks = NETS[config.net].blocks
            n = int(config.unfreeze)
            start = 0 if n >= len(blocks) else (
                len(layers) if n == 0 else [layer.name for layer in layers].index(blocks[-n - 1]) + 1)
            for layer in layers[:start]:
                layer.trainable = False
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    backbone_ids = {id(v) for v in backbone.trainable_variables}
    head = [v for v in model.trainable_variables if id(v) not in backbone_ids]
    return head, list(backbone.trainable_variables)


def count(variables) -> int:
    return int(sum(int(np.prod(v.shape)) for v in variables))


def calibrate_batch_norm(backbone, batch: np.ndarray, preprocessing):
    """Random weights come without batch-norm statistics (mean 0, variance 1 would shrink the
    signal to nothing within a few blocks): each batch norm's moving mean and variance are set
    to those of its input on ``batch`` (RGB 0..255), by one forward pass in training mode with
    the moving averages' momentum at 0 (each batch norm then normalises with, and keeps, the
    statistics of its input, as layer-by-layer measuring would give)."""
    import keras

    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    try:
        backbone(preprocessing(keras.ops.convert_to_tensor(batch)), training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
