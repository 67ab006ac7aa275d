"""The heads' registered Keras layers (``import heads`` registers them when Keras is imported)."""

from __future__ import annotations

from typing import Sequence

import keras


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
