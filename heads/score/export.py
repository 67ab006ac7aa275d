"""One Keras model from image batch to MOS: views, backbone, pooling and a trained head.

``export(run_dir, out)`` writes a ``.keras`` file that loads with
``keras.saving.load_model(path, safe_mode=True)`` after ``import mlsp, heads`` (which register
the layers it uses: :class:`mlsp.backbone.layers.FitMaxSide`, :class:`mlsp.backbone.layers.ViewCrops`, :class:`mlsp.backbone.layers.ViewMean`,
:class:`mlsp.backbone.pooling.MultiLevelPooling` and the heads' layers). ``load_exported(path)`` does
exactly that.

The model takes a batch of RGB images of one size, values 0..255 (any float or int dtype),
makes the run's views (4 corner crops of 87.5% and their mirror images, or the whole image),
and returns the mean prediction over the views, shape (batch,). A run of the ``distribution``
target returns a dict: ``mos`` and ``opinion_std`` (batch,) and ``distribution`` (batch, 10),
the mean histogram over the views (:class:`heads.layers.HistogramMoments` makes the first two).
It applies the ``max_side`` of the run's store (:class:`mlsp.backbone.layers.FitMaxSide`: an image whose
longer side exceeds it is resized down to it, as ``mlsp score --images`` decodes files), so a
large photo gives the score ``mlsp score`` gives, within 8-bit rounding. It does no decoding:
give it RGB pixels (``mlsp.images.decode.decode_image(path)``); a JPEG of twice ``max_side`` or more
is decoded reduced by ``mlsp score`` first, which the model cannot do (scores agree to about 1e-3).
"""

from __future__ import annotations

import logging
import os

import keras

from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ConfigError
from mlsp.extraction.job import FeatureExtractor
from mlsp.backbone.layers import FitMaxSide, ViewCrops, ViewMean

from ..layers import HistogramMoments
from ..run import Run

log = logging.getLogger(__name__)


def build_scoring_model(run_dir: str, weights: str | None = None, precision: str | None = None, *,
                        allow_unfinished: bool = False):
    """The end-to-end model of a run (see the module's docstring); ``allow_unfinished``: also an
    interrupted or diverged run."""
    run = Run.open(run_dir, allow_unfinished=allow_unfinished)
    config = run.extract_config(weights, precision)
    extractor = FeatureExtractor(config)
    run.check_weights(extractor.weights_record)
    name = f"mlsp_{config.net}_{config.pooling}_{run.config['head']}"
    return assemble(extractor, run.load_model(), ViewCrops(augment=config.augment, name="views"), name)


def assemble(extractor: FeatureExtractor, head, crops, name: str):
    """Images -> ``crops`` (a views layer with ``n_views``) -> the net's preprocessing ->
    ``extractor``'s model -> ``head`` -> the mean over each image's views (see the module's docstring)."""
    images = keras.Input((None, None, 3), name="images")
    x = FitMaxSide(extractor.config.max_side, name="fit_max_side")(images)  # as `mlsp score` decodes files
    x = crops(x)
    x = extractor.config.spec.preprocessing.layer(name="preprocess")(x)  # the net's own, from the registry
    features = extractor.model(x)
    pred = head(features)
    mean = ViewMean(crops.n_views, name="mean_over_views")(pred)
    if len(mean.shape) == 1:
        return keras.Model(images, mean, name=name)
    mos, std = HistogramMoments(name="moments")(mean)
    return keras.Model(images, {"mos": mos, "opinion_std": std, "distribution": mean}, name=name)


def export(run_dir: str, out: str | None = None, *, weights: str | None = None,
           precision: str | None = None, allow_unfinished: bool = False) -> str:
    """Write the run's end-to-end model to ``out`` (default ``RUN_DIR/scoring_model.keras``)."""
    out = check_out(out or os.path.join(run_dir, "scoring_model.keras"))
    return save(build_scoring_model(run_dir, weights, precision, allow_unfinished=allow_unfinished), out)


def save(model, out: str) -> str:
    """Write an end-to-end model to ``out`` (a .keras file), whole or not at all."""
    with atomic_path(check_out(out), keep_extension=True) as tmp:  # Keras insists on the .keras extension
        model.save(tmp)
    log.info("exported %s (%d parameters) to %s", model.name, model.count_params(), out)
    return out


def check_out(out: str) -> str:
    """``out``, which must name a .keras file (checked before any model is built)."""
    if not out.endswith(".keras"):
        raise ConfigError(f"{out}: the exported model is a .keras file (Keras' format); give a name ending in .keras")
    return out


def load_exported(path: str):
    """Load an exported model with safe_mode (the layers it uses are registered by ``import mlsp, heads``)."""
    return keras.saving.load_model(path, safe_mode=True, compile=False)
