"""One Keras model from image batch to MOS: views, backbone, pooling and a trained head.

``export(run_dir, out)`` writes a ``.keras`` file that loads with ``safe_mode`` and needs
nothing of mlsp but its registered layers: :class:`ViewCrops` and :class:`ViewMean` here,
:class:`mlsp.pooling.MultiLevelPooling`, and the heads' layers. ``load_exported(path)``
imports them and loads the file.

The model takes a batch of RGB images of one size, values 0..255 (any float or int dtype),
makes the run's views (4 corner crops of 87.5% and their mirror images, or the whole image),
and returns the mean prediction over the views, shape (batch,). It does no decoding and no
resizing: give it images as ``mlsp.images.decode_image(path, max_side)`` returns them, with the
``max_side`` of the run's store (``Run.open(run_dir).extract_config().max_side``, 1024 by
default), which is what ``mlsp score --images`` does.
"""

from __future__ import annotations

import logging
import os

import keras
from keras import ops

from .images import CROP_FRACTION

log = logging.getLogger(__name__)


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
class ViewMean(keras.layers.Layer):
    """(B*V, 1) predictions -> (B,) mean over each image's V views."""

    def __init__(self, n_views: int, **kwargs):
        super().__init__(**kwargs)
        self.n_views = int(n_views)

    def call(self, predictions):
        return ops.mean(ops.reshape(predictions, (-1, self.n_views)), axis=1)

    def get_config(self):
        return {**super().get_config(), "n_views": self.n_views}


def build_scoring_model(run_dir: str, weights: str | None = None, precision: str | None = None):
    """The end-to-end model of a run (see the module's docstring)."""
    from .extract import FeatureExtractor
    from .score import Run

    run = Run.open(run_dir)
    config = run.extract_config(weights, precision)
    extractor = FeatureExtractor(config)
    run.check_weights(extractor.weights_record)
    head = run.load_model()
    crops = ViewCrops(augment=config.augment, name="views")
    images = keras.Input((None, None, 3), name="images")
    x = crops(images)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(x)  # the nets' [-1, 1]
    features = extractor.model(x)
    pred = head(features)
    mos = ViewMean(crops.n_views, name="mean_over_views")(pred)
    name = f"mlsp_{config.net}_{config.pooling}_{run.config['head']}"
    return keras.Model(images, mos, name=name)


def export(run_dir: str, out: str | None = None, *, weights: str | None = None,
           precision: str | None = None) -> str:
    out = out or os.path.join(run_dir, "scoring_model.keras")
    if not out.endswith(".keras"):
        raise ValueError(f"the exported model is a .keras file; received {out!r}")
    model = build_scoring_model(run_dir, weights, precision)
    model.save(out)
    log.info("exported %s (%d parameters) to %s", model.name, model.count_params(), out)
    return out


def load_exported(path: str):
    """Load an exported model with safe_mode, after registering the layers it uses."""
    import heads.models  # noqa: F401

    from . import layers, pooling  # noqa: F401

    return keras.saving.load_model(path, safe_mode=True, compile=False)
