"""SmoothGrad saliency: which pixels of a photo drive its predicted score.

SmoothGrad (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise") averages the
gradient of the score with respect to the input pixels over ``samples`` copies of the image with
Gaussian noise of standard deviation ``noise`` x (the image's max - min); the paper's defaults
are 50 samples and 10-20% noise (here 15%). The map is the absolute gradient summed over the
colour channels, normalised to a maximum of 1.

The gradient runs through the whole image-to-score model of a run, as ``mlsp export`` builds it
(:func:`heads.score.export.build_scoring_model`: views, backbone, MLSP pooling, head, the mean over the
views), at the image's own resolution (after ``max_side``, as scoring decodes it); the map is
then brought to the photo's own size. What is backend-specific (the gradient itself) is
:func:`mlsp.runtime.backend.input_gradient`; everything here is backend-neutral.

Per photo, ``explain`` writes ``<id>.png`` (the photo with the map over it) and ``<id>.npy`` (the
map, float32, the photo's height x width), ``<id>`` being the photo's id as scoring names it (its
path relative to the folder given, without extension).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Sequence

import numpy as np

from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ConfigError, ImageDecodeError
from mlsp.runtime.progress import ProgressFactory, null_progress

log = logging.getLogger(__name__)

SAMPLES = 50  # SmoothGrad's paper: 50 noisy samples
NOISE = 0.15  # SmoothGrad's paper: noise of 10-20% of the input's range
BATCH = 5  # noisy copies per model call (each is one image's 8 views through the backbone)
OVERLAY_ALPHA = 0.7  # how much of the map covers the photo in the overlay
OVERLAY_PERCENTILE = 99  # the overlay's colours span the map up to this percentile (gradients are spiky)
COLORMAP = "inferno"


def score_function(model) -> Callable:
    """``fn(x)``: the model's predicted MOS per image, one value per sample (a distribution
    head's ``mos`` output; a one-output head's only output)."""
    from keras import ops

    def fn(x):
        y = model(x, training=False)
        if isinstance(y, dict):
            y = y["mos"]
        return ops.reshape(y, (ops.shape(y)[0],))

    return fn


def smoothgrad(fn: Callable, image: np.ndarray, samples: int = SAMPLES, noise: float = NOISE, *,
               batch: int = BATCH, seed: int = 0) -> np.ndarray:
    """The SmoothGrad map of ``fn`` at ``image`` (H, W, 3): (H, W) float32, max 1 (all zeros where
    the score does not depend on the pixels at all)."""
    if samples < 1:
        raise ConfigError(f"SmoothGrad needs at least 1 sample, received {samples}")
    if noise < 0:
        raise ConfigError(f"the noise level must be >= 0, received {noise}")
    from mlsp.runtime.backend import input_gradient

    x = np.asarray(image, np.float32)
    sigma = float(noise) * float(x.max() - x.min())
    rng = np.random.default_rng(seed)
    total = np.zeros(x.shape, np.float64)
    for start in range(0, samples, batch):
        k = min(batch, samples - start)
        noisy = x[None] + rng.normal(0.0, sigma, (k, *x.shape)).astype(np.float32)
        total += input_gradient(fn, noisy).sum(0)
    saliency = np.abs(total / samples).sum(-1)
    peak = float(saliency.max())
    return (saliency / peak if peak > 0 else saliency).astype(np.float32)


def overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The photo (H, W, 3 uint8) under the map (H, W, 0..1) in a colour map, as uint8 RGB: the
    map's colour covers the photo in proportion to the saliency, full from the map's
    :data:`OVERLAY_PERCENTILE` percentile up."""
    from matplotlib import colormaps

    top = float(np.percentile(saliency, OVERLAY_PERCENTILE)) if saliency.size else 0.0
    saliency = np.clip(saliency / top, 0, 1) if top > 0 else saliency
    colours = colormaps[COLORMAP](np.clip(saliency, 0, 1))[..., :3]
    weight = alpha * np.clip(saliency, 0, 1)[..., None]
    gray = np.asarray(image, np.float32).mean(-1, keepdims=True) / 255.0
    mixed = (1 - weight) * (0.35 + 0.65 * gray) + weight * colours
    return np.clip(mixed * 255 + 0.5, 0, 255).astype(np.uint8)


def resize_map(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
    """The map brought to (height, width) (bilinear), still max 1."""
    import cv2

    if saliency.shape == (height, width):
        return saliency
    return cv2.resize(saliency, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclasses.dataclass
class Explained:
    """One photo explained: its id and path, its predicted score, and the files written."""

    id: str
    path: str
    score: float
    overlay: str
    map: str


class RunModel:
    """A run's image-to-score model (:func:`heads.score.export.build_scoring_model`) and the
    ``max_side`` its store decoded images at."""

    def __init__(self, run_dir: str, weights: str | None = None, precision: str | None = None,
                 allow_unfinished: bool = False):
        from ..score.export import build_scoring_model
        from ..run import Run

        self.name = run_dir
        self.max_side = Run.open(run_dir, allow_unfinished=allow_unfinished).extract_config(weights).max_side
        self.model = differentiable(build_scoring_model(run_dir, weights, precision, allow_unfinished=allow_unfinished))


class PretrainedModelScore:
    """A released model's image-to-score model (:meth:`heads.score.released.PretrainedModel.scoring_model`:
    its own test-time views, backbone, head) and the ``max_side`` its extraction decodes at."""

    def __init__(self, model: str, precision: str | None = None, progress=None):
        from mlsp.runtime.precision import DEFAULT

        from ..score.released import open_model

        opened = open_model(model, precision or DEFAULT, progress=progress)
        self.name = opened.spec.name
        self.max_side = opened.config.max_side
        self.model = differentiable(opened.scoring_model())


def differentiable(model):
    """The scoring model from its views on: its first step, the resize to ``max_side``
    (:class:`mlsp.backbone.layers.FitMaxSide`), rounds to 8-bit values, which has no gradient. Photos are
    decoded at ``max_side`` already (as scoring decodes them), where that step does nothing else."""
    import keras

    from mlsp.backbone.layers import FitMaxSide

    fits = [layer for layer in model.layers if isinstance(layer, FitMaxSide)]
    if not fits:
        return model
    return keras.Model(fits[0].output, model.output, name=model.name)


def explain(inputs: str | Sequence[str], scorer, out: str, *, samples: int = SAMPLES, noise: float = NOISE,
            batch: int = BATCH, seed: int = 0, progress: ProgressFactory = null_progress):
    """SmoothGrad maps of image files (a folder, recursively, or a list) through ``scorer`` (a
    :class:`RunModel`, a :class:`PretrainedModelScore`, or anything with ``model`` and
    ``max_side``), written into ``out``.
    Returns ``(explained, errors)``: :class:`Explained` per photo, and ``{"id", "path", "reason"}``
    for every file that could not be used (which never stops the others)."""
    from keras import ops

    from mlsp.extraction.job import collect_inputs
    from mlsp.images.decode import decode_image

    paths, ids, skipped, _ = collect_inputs(inputs)
    fn = score_function(scorer.model)
    errors = [{"id": os.path.splitext(os.path.basename(p))[0], "path": p, "reason": r} for p, r in skipped]
    done = []
    bar = progress(total=len(paths), desc="explain", unit="img")
    try:
        for path, image_id in zip(paths, ids):
            try:
                image = decode_image(path, scorer.max_side)
                saliency = smoothgrad(fn, image, samples, noise, batch=batch, seed=seed)
                score = float(ops.convert_to_numpy(fn(image[None].astype(np.float32)))[0])
                done.append(_write(out, image_id, path, image, saliency, score, scorer.max_side))
            except ImageDecodeError as exc:
                errors.append({"id": image_id, "path": path, "reason": exc.reason})
            bar.update(1)
    finally:
        bar.close()
    log.info("explained %d photos into %s (%d could not be used)", len(done), out, len(errors))
    return done, errors


def _write(out: str, image_id: str, path: str, image: np.ndarray, saliency: np.ndarray, score: float,
           max_side: int) -> Explained:
    """``<id>.png`` and ``<id>.npy`` at the photo's own size (decoded again at full size only
    when ``max_side`` made the model's input smaller)."""
    from PIL import Image

    from mlsp.images.decode import decode_image

    if max_side and max(image.shape[:2]) >= max_side:
        image = decode_image(path, 0)
    saliency = resize_map(saliency, *image.shape[:2])
    stem = os.path.join(out, *image_id.split("/"))
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with atomic_path(stem + ".npy", keep_extension=True) as tmp:
        np.save(tmp, saliency.astype(np.float32))
    with atomic_path(stem + ".png", keep_extension=True) as tmp:
        Image.fromarray(overlay(image, saliency)).save(tmp, format="PNG")
    return Explained(image_id, path, score, stem + ".png", stem + ".npy")
