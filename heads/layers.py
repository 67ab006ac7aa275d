"""The heads' registered Keras layers (``import heads`` registers them when Keras is imported)."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from mlsp.store.labels import N_BINS


@keras.saving.register_keras_serializable(package="mlsp_heads")
class BlockSplit(keras.layers.Layer):
    """Split concatenated narrow features (B, C) back into their blocks: a list of (B, C_k)."""

    def __init__(self, channels: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.channels = [int(c) for c in channels]
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be positive integers, received {channels!r}")

    def call(self, inputs):
        out, start = [], 0
        for c in self.channels:
            out.append(inputs[:, start : start + c])
            start += c
        return out

    def compute_output_shape(self, input_shape):
        return [(input_shape[0], c) for c in self.channels]

    def get_config(self):
        config = super().get_config()
        config["channels"] = list(self.channels)
        return config


@keras.saving.register_keras_serializable(package="mlsp_heads")
class HistogramMoments(keras.layers.Layer):
    """(B, 10) histograms over the scores 1..10 -> their mean (MOS) and standard deviation, (B,) each."""

    def call(self, p):
        scores = ops.cast(ops.arange(1, N_BINS + 1), p.dtype)
        p = p / ops.sum(p, axis=-1, keepdims=True)
        mean = ops.sum(p * scores, axis=-1)
        var = ops.sum(p * ops.square(scores), axis=-1) - ops.square(mean)
        return [mean, ops.sqrt(ops.maximum(var, 0.0))]

    def compute_output_shape(self, input_shape):
        return [(input_shape[0],), (input_shape[0],)]
