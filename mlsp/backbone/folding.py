"""Batch-norm folding: an inference copy of a backbone with each batch norm after a convolution
folded into that convolution's kernel and bias (the same function, less work per image)."""

from __future__ import annotations

import functools

from .graph import inbound_nodes, node_inputs, outbound_nodes, producer


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
    :class:`mlsp.backbone.layers.FoldedBatchNorm` (the identity) keeping its name, so the taps are found
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
        if not isinstance(layer, keras.layers.BatchNormalization) or len(inbound_nodes(layer)) != 1:
            continue
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            continue  # only channels-last batch norms match the kernels' last axis
        conv = producer(node_inputs(inbound_nodes(layer)[0])[0])
        if isinstance(conv, convolutions) and len(outbound_nodes(conv)) == 1:
            bn_of_conv[conv.name] = layer
            conv_of_bn[layer.name] = conv
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
