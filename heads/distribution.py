"""The Keras side of the ``distribution`` target (:mod:`heads.targets`): its loss and a layer that
turns predicted histograms into MOS and opinion standard deviation. Both are registered, so models
and exported models that use them load under ``safe_mode``."""

from __future__ import annotations

import keras
from keras import ops

from mlsp.labels import N_BINS

EPSILON = 1e-12  # keeps the square root differentiable where the CDFs agree


@keras.saving.register_keras_serializable(package="mlsp_heads")
def emd_loss(y_true, y_pred):
    """EMD with r = 2 between (B, 10) histograms, per image: sqrt(mean_k (CDF_true - CDF_pred)^2)
    (NIMA's loss); Keras averages it over the batch."""
    diff = ops.cumsum(ops.cast(y_true, y_pred.dtype), axis=-1) - ops.cumsum(y_pred, axis=-1)
    return ops.sqrt(ops.mean(ops.square(diff), axis=-1) + EPSILON)


@keras.saving.register_keras_serializable(package="mlsp_heads")
class HistogramMoments(keras.layers.Layer):
    """(B, 10) histograms over the scores 1..10 -> (B, 2): their mean (MOS) and standard deviation."""

    def call(self, p):
        scores = ops.cast(ops.arange(1, N_BINS + 1), p.dtype)
        p = p / ops.sum(p, axis=-1, keepdims=True)
        mean = ops.sum(p * scores, axis=-1)
        var = ops.sum(p * ops.square(scores), axis=-1) - ops.square(mean)
        return ops.stack([mean, ops.sqrt(ops.maximum(var, 0.0))], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2)
