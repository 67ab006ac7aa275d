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

Memory is bounded: each forward-and-back call takes at most :data:`PIXELS_PER_CALL` view pixels
(noisy samples times views; a large photo's 8 views are split over several calls, the score being
the mean of the views' scores), so the cost is ``samples`` x the views' pixels / that bound calls.

Per photo, ``explain`` writes ``<id>.mlsp-saliency.png`` (the photo with the map over it) and
``<id>.mlsp-saliency.npy`` (the map, float32, the photo's height x width), ``<id>`` being the
photo's id as scoring names it (its path relative to the folder given, without extension). The
suffix (:data:`mlsp.images.decode.SALIENCY_SUFFIX`) keeps them from ever replacing a photo, and image
listing (:func:`mlsp.images.decode.list_images`) never takes them for photos.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Sequence

import numpy as np

from mlsp.runtime.atomic import atomic_path
from mlsp.errors import ConfigError, ImageDecodeError
from mlsp.images.decode import SALIENCY_SUFFIX
from mlsp.runtime.progress import ProgressFactory, null_progress

log = logging.getLogger(__name__)

SAMPLES = 50  # SmoothGrad's paper: 50 noisy samples
NOISE = 0.15  # SmoothGrad's paper: noise of 10-20% of the input's range
BATCH = 5  # noisy copies per model call at most (each is one image's views through the backbone)
# view pixels through the backbone per forward-and-back call: what bounds explain's memory (iv3 on a
# CPU keeps about 1.3 KB per pixel for the backward pass: some 2 GB per call)
PIXELS_PER_CALL = 1_500_000
OVERLAY_FILE = SALIENCY_SUFFIX + ".png"
MAP_FILE = SALIENCY_SUFFIX + ".npy"
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


def smoothgrad(fn: Callable | Sequence[Callable], image: np.ndarray, samples: int = SAMPLES, noise: float = NOISE,
               *, batch: int = BATCH, seed: int = 0, step: Callable[[], None] | None = None) -> np.ndarray:
    """The SmoothGrad map of ``fn`` at ``image`` (H, W, 3): (H, W) float32, max 1 (all zeros where
    the score does not depend on the pixels at all). ``fn`` may be a list of parts whose sum is
    the score (:class:`ViewChunks`): each batch of ``batch`` noisy samples runs through every
    part, and the gradients add up. ``step()`` is called after every call of a part."""
    if samples < 1:
        raise ConfigError(f"SmoothGrad needs at least 1 sample, received {samples}")
    if noise < 0:
        raise ConfigError(f"the noise level must be >= 0, received {noise}")
    from mlsp.runtime.backend import input_gradient

    parts = [fn] if callable(fn) else list(fn)
    x = np.asarray(image, np.float32)
    sigma = float(noise) * float(x.max() - x.min())
    rng = np.random.default_rng(seed)
    total = np.zeros(x.shape, np.float64)
    for start in range(0, samples, batch):
        k = min(batch, samples - start)
        noisy = x[None] + rng.normal(0.0, sigma, (k, *x.shape)).astype(np.float32)
        for part in parts:
            total += input_gradient(part, noisy).sum(0)
            if step is not None:
                step()
    saliency = np.abs(total / samples).sum(-1)
    peak = float(saliency.max())
    return (saliency / peak if peak > 0 else saliency).astype(np.float32)


class ViewChunks:
    """A scoring model (:func:`heads.export.assemble`: views, backbone, head, the mean over the
    views) split so that no call holds more than ``pixels`` view pixels: the score is the mean of
    the views' scores (a distribution head's MOS is linear in its histogram, which sums to 1 per
    view), so it is the sum of parts, each the views ``start:stop``'s scores / V, and so is its
    gradient. :meth:`plan` gives the parts and the noisy samples per call for an image."""

    def __init__(self, model, pixels: int | None = None):
        from keras.layers import InputLayer

        from mlsp.backbone.layers import PositionCrops, ViewCrops, ViewMean

        from ..layers import HistogramMoments

        self.pixels = PIXELS_PER_CALL if pixels is None else int(pixels)
        self.whole = score_function(model)
        layers = [layer for layer in model.layers if not isinstance(layer, InputLayer)]
        views = [k for k, layer in enumerate(layers) if isinstance(layer, (ViewCrops, PositionCrops))]
        means = [k for k, layer in enumerate(layers) if isinstance(layer, ViewMean)]
        # a chain of layers (no other operation in the graph), as heads.export.assemble builds it
        self.split = (len(views) == 1 and len(means) == 1 and views[0] < means[0]
                      and len(model.operations) == len(model.layers))
        if self.split:
            self.n_views = layers[views[0]].n_views
            self.before, self.between = layers[:views[0] + 1], layers[views[0] + 1:means[0]]
            moments = [layer for layer in layers[means[0]:] if isinstance(layer, HistogramMoments)]
            self.moments = moments[0] if moments else None

    @staticmethod
    def _through(layers, x):
        for layer in layers:
            x = layer(x)
        return x

    def views(self, x):
        """(B, H, W, 3) images -> (B*V, h, w, 3) views."""
        return self._through(self.before, x)

    def per_view(self, v):
        """(B*V, h, w, 3) views -> each view's prediction (a score, or a histogram)."""
        return self._through(self.between, v)

    def view_shape(self, image: np.ndarray) -> tuple[int, int] | None:
        """(h, w) of the image's views; None for a model without views."""
        from keras import ops

        if not self.split:
            return None
        return tuple(int(d) for d in ops.shape(self.views(image[None, :, :, :].astype(np.float32)))[1:3])

    def plan(self, image: np.ndarray, batch: int = BATCH) -> tuple[list[Callable], int]:
        """(the parts, noisy samples per call) for ``image``: calls of at most :attr:`pixels` view
        pixels (one view at least)."""
        shape = self.view_shape(image)
        per_view = shape[0] * shape[1] if shape else image.shape[0] * image.shape[1]
        fits = max(1, self.pixels // max(1, per_view))
        if not self.split:
            return [self.whole], max(1, min(batch, fits))
        if fits >= self.n_views:
            return [self.part(0, self.n_views)], max(1, min(batch, fits // self.n_views))
        return [self.part(a, min(a + fits, self.n_views)) for a in range(0, self.n_views, fits)], 1

    def part(self, start: int, stop: int) -> Callable:
        """``fn(x)``: the sum of the scores of views ``start:stop`` of each image of ``x`` / V."""
        from keras import ops

        n, count = self.n_views, stop - start

        def fn(x):
            v = self.views(x)
            h, w, c = ops.shape(v)[1], ops.shape(v)[2], ops.shape(v)[3]
            v = ops.reshape(ops.reshape(v, (-1, n, h, w, c))[:, start:stop], (-1, h, w, c))
            p = self.per_view(v)
            score = self.moments(p)[0] if self.moments is not None else ops.reshape(p, (-1,))
            return ops.sum(ops.reshape(score, (-1, count)), axis=1) / n

        return fn


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
        config = Run.open(run_dir, allow_unfinished=allow_unfinished).extract_config(weights)
        self.max_side, self.min_side, self.net = config.max_side, config.spec.min_side, config.net
        self.model = differentiable(build_scoring_model(run_dir, weights, precision, allow_unfinished=allow_unfinished))


class PretrainedModelScore:
    """A released model's image-to-score model (:meth:`heads.score.released.PretrainedModel.scoring_model`:
    its own test-time views, backbone, head) and the ``max_side`` its extraction decodes at."""

    def __init__(self, model: str, precision: str | None = None, progress=None):
        from mlsp.runtime.precision import DEFAULT

        from ..score.released import open_model

        opened = open_model(model, precision or DEFAULT, progress=progress)
        self.name = opened.spec.name
        config = opened.config
        self.max_side, self.min_side, self.net = config.max_side, config.spec.min_side, config.net
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
    ``max_side``; ``min_side`` and ``net`` where views smaller than the backbone takes are to be
    refused), written into ``out``. Each photo has its own progress bar (with the time it is
    expected to take) over its forward-and-back calls (:class:`ViewChunks`).
    Returns ``(explained, errors)``: :class:`Explained` per photo, and ``{"id", "path", "reason"}``
    for every file that could not be used (which never stops the others)."""
    from mlsp.extraction.job import collect_inputs

    paths, ids, skipped, _ = collect_inputs(inputs)
    chunks = ViewChunks(scorer.model)
    errors = [{"id": os.path.splitext(os.path.basename(p))[0], "path": p, "reason": r} for p, r in skipped]
    inputs_real = {os.path.realpath(p) for p in paths}
    done = []
    for k, (path, image_id) in enumerate(zip(paths, ids)):
        try:
            done.append(_explain_one(chunks, scorer, path, image_id, out, inputs_real, progress,
                                     dict(samples=samples, noise=noise, batch=batch, seed=seed),
                                     f"explain {k + 1}/{len(paths)}"))
        except ImageDecodeError as exc:
            errors.append({"id": image_id, "path": path, "reason": exc.reason})
    log.info("explained %d photos into %s (%d could not be used)", len(done), out, len(errors))
    return done, errors


def _explain_one(chunks: ViewChunks, scorer, path: str, image_id: str, out: str, inputs_real: set,
                 progress: ProgressFactory, options: dict, desc: str) -> Explained:
    """One photo's map and files; :class:`ImageDecodeError` where the photo cannot be used."""
    from keras import ops

    from mlsp.images.decode import decode_image

    overlay_path, map_path = output_paths(out, image_id)
    for target in (overlay_path, map_path):
        if os.path.realpath(target) in inputs_real:
            raise ImageDecodeError(path, f"its map would be written over the input {target}; choose another --out")
    image = decode_image(path, scorer.max_side)
    _check_views(chunks, scorer, path, image)
    parts, per_call = chunks.plan(image, options["batch"])
    calls = -(-options["samples"] // per_call) * len(parts)
    bar = progress(total=calls, desc=f"{desc} {image_id}", unit="call")
    try:
        saliency = smoothgrad(parts, image, options["samples"], options["noise"], batch=per_call,
                              seed=options["seed"], step=lambda: bar.update(1))
    finally:
        bar.close()
    score = float(ops.convert_to_numpy(chunks.whole(image[None].astype(np.float32)))[0])
    return _write(overlay_path, map_path, image_id, path, image, saliency, score, scorer.max_side)


def output_paths(out: str, image_id: str) -> tuple[str, str]:
    """Where the overlay and the map of the photo ``image_id`` go in ``out``."""
    stem = os.path.join(out, *image_id.split("/"))
    return stem + OVERLAY_FILE, stem + MAP_FILE


def _check_views(chunks: ViewChunks, scorer, path: str, image: np.ndarray):
    """A photo whose views are below the backbone's smallest side is refused, as extraction
    refuses it (:func:`mlsp.images.check_size`'s words), never upscaled."""
    min_side = getattr(scorer, "min_side", 0)
    shape = chunks.view_shape(image) if min_side else None
    if shape is None and min_side:
        shape = image.shape[:2]
    if shape and min(shape) < min_side:
        h, w = image.shape[:2]
        what = "the image" if shape == (h, w) else f"crops of {shape[0]}x{shape[1]}"
        raise ImageDecodeError(path, f"too small: {h}x{w} px, {what} below the {min_side} px per side that "
                                     f"{getattr(scorer, 'net', 'the backbone')} needs")


def _write(overlay_path: str, map_path: str, image_id: str, path: str, image: np.ndarray, saliency: np.ndarray,
           score: float, max_side: int) -> Explained:
    """The overlay and the map at the photo's own size (decoded again at full size only when
    ``max_side`` made the model's input smaller)."""
    from PIL import Image

    from mlsp.images.decode import decode_image

    if max_side and max(image.shape[:2]) >= max_side:
        image = decode_image(path, 0)
    saliency = resize_map(saliency, *image.shape[:2])
    os.makedirs(os.path.dirname(overlay_path) or ".", exist_ok=True)
    with atomic_path(map_path, keep_extension=True) as tmp:
        np.save(tmp, saliency.astype(np.float32))
    with atomic_path(overlay_path, keep_extension=True) as tmp:
        Image.fromarray(overlay(image, saliency)).save(tmp, format="PNG")
    return Explained(image_id, path, score, overlay_path, map_path)
