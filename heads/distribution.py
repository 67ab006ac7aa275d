"""The Keras side of the ``distribution`` target (:mod:`heads.targets`): its loss, registered so
that a model compiled with it loads under ``safe_mode`` (:class:`heads.layers.HistogramMoments`
turns predicted histograms into MOS and opinion standard deviation in an exported model)."""

from __future__ import annotations

import keras
from keras import ops

EPSILON = 1e-12  # keeps the square root differentiable where the CDFs agree


@keras.saving.register_keras_serializable(package="mlsp_heads")
def emd_loss(y_true, y_pred):
    """EMD with r = 2 between (B, 10) histograms, per image: sqrt(mean_k (CDF_true - CDF_pred)^2)
    (NIMA's loss); Keras averages it over the batch."""
    diff = ops.cumsum(ops.cast(y_true, y_pred.dtype), axis=-1) - ops.cumsum(y_pred, axis=-1)
    return ops.sqrt(ops.mean(ops.square(diff), axis=-1) + EPSILON)
