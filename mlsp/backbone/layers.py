"""Small registered Keras layers of stage 1 (see also :mod:`mlsp.backbone.pooling`).

:class:`FoldedBatchNorm` stands in for a batch norm folded into its convolution;
:class:`FitMaxSide` resizes as decoding does, :class:`ViewCrops` and :class:`ViewMean` make an
image's views inside a model and average the predictions over them (the exported end-to-end
model, :mod:`heads.score.export`); :class:`PositionCrops` makes a pretrained model's test-time views
(:mod:`mlsp.images.views`). ``import mlsp``
registers every layer here as soon as Keras is imported, so saved models load with
``keras.saving.load_model(path, safe_mode=True)``.
"""

import keras
from keras import ops

from ..runtime import backend
from ..images.decode import CROP_FRACTION


@keras.saving.register_keras_serializable(package="mlsp")
class FoldedBatchNorm(keras.layers.Layer):
    """What remains of a batch norm folded into the convolution before it: the identity.

    It keeps the batch norm's name and call signature (``training``, ``mask``), so a model
    rebuilt with :func:`mlsp.backbone.folding.fold_batch_norms` has the same layer names and graph."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="mlsp")
class FitMaxSide(keras.layers.Layer):
    """(B, H, W, 3) images -> the same, resized so that the longer side is ``max_side`` (area
    averaging, rounded to 8-bit values) where it is longer, as ``mlsp.images.decode.decode_image(path,
    max_side)`` does before the views are cut; smaller images pass unchanged. ``max_side=0``:
    never resize."""

    def __init__(self, max_side: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.max_side = int(max_side)

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        if not self.max_side:
            return images
        shape = ops.shape(images)
        h, w = ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")
        scale = ops.minimum(1.0, self.max_side / ops.maximum(h, w))  # 1: the same size, area resize is exact
        size = [ops.maximum(1, ops.cast(ops.round(side * scale), "int32")) for side in (h, w)]
        out = backend.resize_area(images, size)
        return ops.clip(ops.round(out), 0, 255)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, None, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "max_side": self.max_side}


@keras.saving.register_keras_serializable(package="mlsp")
class ViewCrops(keras.layers.Layer):
    """(B, H, W, 3) -> (B*V, h, w, 3): each image's views, image by image, in the store's order
    (tl, tl_flip, tr, tr_flip, bl, bl_flip, br, br_flip), or the image itself (``augment=False``)."""

    def __init__(self, augment: bool = True, fraction: float = CROP_FRACTION, **kwargs):
        super().__init__(**kwargs)
        self.augment = bool(augment)
        self.fraction = float(fraction)

    @property
    def n_views(self) -> int:
        return 8 if self.augment else 1

    def call(self, images):
        if not self.augment:
            return images
        shape = ops.shape(images)
        h, w = shape[1], shape[2]
        ch = ops.cast(ops.floor(self.fraction * ops.cast(h, "float32")), "int32")
        cw = ops.cast(ops.floor(self.fraction * ops.cast(w, "float32")), "int32")
        views = []
        for y0, x0 in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
            crop = ops.slice(images, [0, y0, x0, 0], [shape[0], ch, cw, shape[3]])
            views += [crop, ops.flip(crop, axis=2)]
        stacked = ops.stack(views, axis=1)  # (B, 8, ch, cw, 3)
        return ops.reshape(stacked, (-1, ch, cw, shape[3]))

    def get_config(self):
        return {**super().get_config(), "augment": self.augment, "fraction": self.fraction}


@keras.saving.register_keras_serializable(package="mlsp")
class PositionCrops(keras.layers.Layer):
    """(B, H, W, 3) -> (B*V, h, w, 3): the views of a :class:`mlsp.images.views.ViewProcedure` (its
    ``fraction``, ``positions`` and ``flips``), image by image, in its order; the same crops as
    :meth:`mlsp.images.views.ViewProcedure.make` (:func:`mlsp.images.views.crop_origin`)."""

    def __init__(self, fraction: float, positions, flips, **kwargs):
        super().__init__(**kwargs)
        self.fraction = float(fraction)
        self.positions = [[float(y), float(x)] for y, x in positions]
        self.flips = [bool(f) for f in flips]

    @property
    def n_views(self) -> int:
        return len(self.positions) * len(self.flips)

    def _side(self, size):
        if self.fraction >= 1:
            return size
        return ops.cast(ops.floor(self.fraction * ops.cast(size, "float32")), "int32")

    @staticmethod
    def _origin(size, crop, position):
        start = ops.floor(ops.cast(size, "float32") * position - ops.cast(crop // 2, "float32"))
        return ops.clip(ops.cast(start, "int32"), 0, size - crop)

    def call(self, images):
        shape = ops.shape(images)
        h, w = shape[1], shape[2]
        ch, cw = self._side(h), self._side(w)
        views = []
        for py, px in self.positions:
            crop = ops.slice(images, [0, self._origin(h, ch, py), self._origin(w, cw, px), 0],
                             [shape[0], ch, cw, shape[3]])
            views += [ops.flip(crop, axis=2) if flip else crop for flip in self.flips]
        stacked = ops.stack(views, axis=1)  # (B, V, ch, cw, 3)
        return ops.reshape(stacked, (-1, ch, cw, shape[3]))

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction, "positions": self.positions,
                "flips": self.flips}


@keras.saving.register_keras_serializable(package="mlsp")
class ViewMean(keras.layers.Layer):
    """(B*V, 1) predictions -> (B,) mean over each image's V views; (B*V, K) -> (B, K)."""

    def __init__(self, n_views: int, **kwargs):
        super().__init__(**kwargs)
        self.n_views = int(n_views)

    def call(self, predictions):
        k = predictions.shape[-1] or 1
        mean = ops.mean(ops.reshape(predictions, (-1, self.n_views, k)), axis=1)
        return mean[:, 0] if k == 1 else mean

    def compute_output_shape(self, input_shape):
        k = input_shape[-1] or 1
        return (None,) if k == 1 else (None, k)

    def get_config(self):
        return {**super().get_config(), "n_views": self.n_views}
