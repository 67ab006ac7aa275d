"""Multi-level spatial pooling: one registered, serializable Keras layer (no ``Lambda``).

``MultiLevelPooling(grid=1)`` is the paper's *narrow* pooling (global average per block),
``MultiLevelPooling(grid=5)`` its *wide* pooling (each block resized to 5x5 by area
interpolation). Both are computed the same way: the area-weighted mean of the input cells that
each output cell covers, separably along height and width, as two small matrix products built
from the map's run-time size. So one traced graph serves every input resolution.

Equality with OpenCV: when both sides of a block's map are >= the grid (downscaling, the normal
case) or both are <= the grid (upscaling, a tiny image), the result equals
``cv2.resize(map, (5, 5), interpolation=cv2.INTER_AREA)``; both then take the area overlap of
the output cell with the input cells. When one side is larger and the other smaller than the
grid (a map of, say, 2x12 from a long, thin panorama), OpenCV switches to another scheme; this
layer stays with the area mean along both axes. Pooling runs in float32 whatever the compute
precision of the backbone.
"""

from __future__ import annotations

import keras
from keras import ops


def area_weights(length, size):
    """(size, length) matrix whose row i averages the cells that output cell i covers.

    ``length`` may be a symbolic (run-time) integer. Output cell i covers [i, i+1) * length/size
    in input coordinates; its weight on input cell j is the overlap with [j, j+1) divided by the
    cell width length/size, so each row sums to 1.
    """
    length_f = ops.cast(length, "float32")
    scale = length_f / float(size)
    lo = ops.expand_dims(ops.arange(size, dtype="float32") * scale, 1)
    hi = lo + scale
    j = ops.expand_dims(ops.cast(ops.arange(length), "float32"), 0)
    overlap = ops.maximum(ops.minimum(hi, j + 1.0) - ops.maximum(lo, j), 0.0)
    return overlap / scale


@keras.saving.register_keras_serializable(package="mlsp")
class MultiLevelPooling(keras.layers.Layer):
    """Pool each of several (B, H_k, W_k, C_k) maps to (grid, grid) and concatenate channels.

    Output: (B, C) for ``grid=1`` (narrow), (B, grid, grid, C) for ``grid > 1`` (wide),
    with C = sum of C_k, in float32.
    """

    def __init__(self, grid: int = 1, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        grid = int(grid)
        if grid < 1:
            raise ValueError(f"grid must be a positive integer, received {grid!r}")
        self.grid = grid

    def pool_one(self, x):
        x = ops.cast(x, "float32")
        if self.grid == 1:
            return ops.mean(x, axis=(1, 2))
        # two broadcast matrix products, columns then rows; an einsum would transpose each map
        shape = ops.shape(x)
        rows = area_weights(shape[1], self.grid)  # (g, H)
        cols = area_weights(shape[2], self.grid)  # (g, W)
        y = ops.matmul(cols[None, None], x)  # (B, H, g, C)
        y = ops.reshape(y, (shape[0], shape[1], self.grid * shape[3]))
        z = ops.matmul(rows[None], y)  # (B, g, g*C)
        return ops.reshape(z, (shape[0], self.grid, self.grid, shape[3]))

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        return ops.concatenate([self.pool_one(x) for x in inputs], axis=-1)

    def compute_output_shape(self, input_shape):
        if not isinstance(input_shape, list) or (input_shape and isinstance(input_shape[0], int)):
            input_shape = [input_shape]
        channels = sum(s[-1] for s in input_shape)
        batch = input_shape[0][0]
        if self.grid == 1:
            return (batch, channels)
        return (batch, self.grid, self.grid, channels)

    def get_config(self):
        config = super().get_config()
        config["grid"] = self.grid
        return config
