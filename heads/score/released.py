"""A released model of the catalogue (:mod:`heads.score.catalogue`) as an mlsp head: converted once,
scored with its own test-time procedure, exported end to end.

:func:`open_model` takes a catalogue name or the path of a file the user has (found in the
catalogue by its sha256) and gives a :class:`PretrainedModel`. Its Keras 2 file is imported
(:mod:`heads.score.keras2`) once into a ``.keras`` head kept beside it, named by the file's sha256; a
kept conversion is used only when its own sha256 is the one mlsp recorded when writing it, in
``$KERAS_HOME/mlsp/converted.trusted.json`` (:class:`mlsp.runtime.trust.TrustIndex`, outside every
model's folder, keyed by the pinned sha256 of the source and the conversion's path), else it is
made again: a head or a record planted beside the file is never believed. Scoring image files
runs the model's view procedure (:mod:`mlsp.images.views`: ``full`` or ``crops18``) through the
same decode-ahead runner as ``mlsp score RUN --images`` (:func:`heads.score.scoring.score_files`);
scoring a store takes only a
store of the same net, pooling and views.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

from mlsp.backbone.nets import get_backbone
from mlsp.backbone.weights import keras_cache_dir
from mlsp.errors import ConfigError, IntegrityError, StoreConfigMismatch, WriteError
from mlsp.extraction.job import ExtractConfig, FeatureExtractor
from mlsp.images.decode import decode_image
from mlsp.images.readahead import DECODE_WORKERS, LocalRunner
from mlsp.images.views import get_procedure
from mlsp.runtime.atomic import atomic_path
from mlsp.runtime.files import file_sha256
from mlsp.runtime.progress import ProgressFactory, null_progress
from mlsp.runtime.trust import TrustIndex
from mlsp.store.format import pooling_of

from .scoring import HeadScorer, head_columns, score_features, score_files

log = logging.getLogger(__name__)


def resolve(model: str, progress=None):
    """``(spec, path)`` of a catalogue name (fetched once, with ``progress``) or a file; a file the
    catalogue does not know is refused."""
    from . import catalogue

    spec, path = catalogue.resolve_model(model, progress=progress)
    if spec is None:
        raise ConfigError(
            f"{path}: not one of the catalogue's models (its sha256 {file_sha256(path)} matches none; "
            "`mlsp models` lists them). For a head of your own trained with the authors' notebooks: "
            f"mlsp import-weights {path} --head single3fc|pool3fc --store STORE --out RUN, then mlsp score RUN")
    return spec, path


def converted_path(path: str, sha256: str) -> str:
    """Where the conversion of the Keras 2 file ``path`` (of that sha256) is kept: beside it."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(path)), f"{stem}.{sha256[:16]}.mlsp.keras")


def conversions() -> TrustIndex:
    """The sha256 of each conversion mlsp wrote: ``$KERAS_HOME/mlsp/converted.trusted.json``."""
    return TrustIndex(os.path.join(os.path.dirname(keras_cache_dir()), "mlsp", "converted.trusted.json"))


def _key(head_path: str, sha256: str) -> str:
    """A conversion's name in :func:`conversions`: its source's pinned sha256 and its own path."""
    return f"{sha256}:{os.path.abspath(head_path)}"


def _kept(head_path: str, sha256: str) -> str | None:
    """The sha256 of the conversion kept at ``head_path`` when it is the one mlsp wrote from the
    file of ``sha256`` (its hash recorded in :func:`conversions`), else ``None``."""
    if not os.path.lexists(head_path):
        return None
    trusted = conversions().trusted(_key(head_path, sha256))
    found = file_sha256(head_path) if trusted and os.path.isfile(head_path) and not os.path.islink(head_path) else None
    if found is None or found != trusted:
        log.warning("%s: not the conversion mlsp recorded (%s); converting again", head_path,
                    "mlsp recorded no hash for it" if trusted is None else "its sha256 differs")
        return None
    return found


def convert(spec, path: str):
    """``(head model, path of its .keras or None, its sha256 or None)``: the kept conversion of
    ``path``, or a new one (written beside it, its hash recorded in :func:`conversions`; where
    that cannot be written, the head is converted in memory, and the log says so)."""
    import keras

    from .keras2 import FORMAT, import_head

    if spec.weights_format != FORMAT:
        raise ConfigError(f"{spec.name}: weights format {spec.weights_format!r}; mlsp imports {FORMAT}")
    head_path = converted_path(path, spec.sha256)
    kept = _kept(head_path, spec.sha256)
    if kept:
        return keras.saving.load_model(head_path, compile=False, safe_mode=True), head_path, kept
    log.info("%s: converting %s's Keras 2 head into %s (once)", path, spec.name, head_path)
    backbone = get_backbone(spec.net)
    model, options = import_head(path, spec.head, backbone.channels, spec.pooling, options=spec.head_options)
    index = conversions()
    try:
        index.record(_key(head_path, spec.sha256), None)
        with atomic_path(head_path, keep_extension=True) as tmp:
            model.save(tmp)
            digest = file_sha256(tmp)
    except (OSError, WriteError) as exc:
        log.warning("%s: cannot keep the converted head (%s); it is converted again on every run", head_path, exc)
        return model, None, None
    if not index.record(_key(head_path, spec.sha256), digest):
        log.warning("%s: cannot record the converted head's sha256 in %s; it is converted again on every run",
                    head_path, index.path)
        return model, None, None
    log.debug("%s: %s's head for %s", head_path, spec.name, options)
    return model, head_path, digest


class PretrainedScorer(HeadScorer):
    """A catalogue model's head on its backbone, with its own view procedure (:mod:`mlsp.images.views`)."""

    def __init__(self, model, extractor: FeatureExtractor, name: str, views: str, head_sha256: str | None):
        super().__init__(model, extractor)
        self.name, self.procedure, self.head_sha256 = name, get_procedure(views), head_sha256

    def load_views(self, path: str):
        config = self.extractor.config
        img = decode_image(path, config.max_side)
        self.procedure.check_size(path, img, config.spec.min_side, config.net)
        return self.procedure.make(img), img.shape[:2]

    def info(self) -> dict:
        return {"model": self.name, "views": self.procedure.name, "head_sha256": self.head_sha256,
                "weights": self.extractor.weights_record, "precision": self.extractor.config.precision}

    def configuration(self) -> dict:
        return {"head_sha256": self.head_sha256, "views": self.procedure.name, **self.extractor.configuration()}


@dataclasses.dataclass(frozen=True)
class PretrainedRecipe:
    """How a Ray worker builds a :class:`PretrainedScorer` (the converted head must be readable there)."""

    head_path: str
    name: str
    views: str
    config: ExtractConfig
    head_sha256: str  # what mlsp wrote: a worker loads nothing else

    def build(self) -> PretrainedScorer:
        import keras

        found = file_sha256(self.head_path)
        if found != self.head_sha256:
            raise IntegrityError(self.head_path, f"sha256 {found}", f"sha256 {self.head_sha256}, the head mlsp "
                                 "converted (changed since)")
        model = keras.saving.load_model(self.head_path, compile=False, safe_mode=True)
        extractor = FeatureExtractor(self.config, cache=True)
        return PretrainedScorer(model, extractor, self.name, self.views, found)


class PretrainedModel:
    """A released model, ready to score: ``spec`` (its catalogue entry), ``path`` (its verified
    file), ``head`` (the converted Keras head) and ``procedure`` (its test-time views)."""

    def __init__(self, spec, path: str, precision: str = ExtractConfig.precision,
                 extractor: FeatureExtractor | None = None):
        self.spec, self.path = spec, path
        self.procedure = get_procedure(spec.views)
        self.config = ExtractConfig(net=spec.net, pooling=spec.pooling, augment=False,
                                    weights=spec.backbone_weights, precision=precision)
        if self.config.weights.startswith("random"):
            log.warning("%s: a RANDOM backbone (weights %s): its scores say nothing about aesthetics",
                        spec.name, self.config.weights)
        if extractor is not None and extractor.config != self.config:
            raise ConfigError(f"{spec.name}: the extractor given is not this model's ({extractor.config})")
        self.head, self.head_path, self.head_sha256 = convert(spec, path)
        self._extractor = extractor

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.config, cache=True)
        return self._extractor

    def scorer(self) -> PretrainedScorer:
        return PretrainedScorer(self.head, self.extractor, self.spec.name, self.spec.views, self.head_sha256)

    def score(self, inputs: str | Sequence[str], out: str | None = None, *, workers: int = DECODE_WORKERS,
              progress: ProgressFactory = null_progress, cluster=None):
        """Score image files (a folder or a list) with the model's own views: a pandas DataFrame as
        :func:`heads.score.scoring.score_images` gives (``id``, ``pred``, ``pred_std``, ``path``), the files
        that could not be used in ``frame.attrs["errors"]``. ``cluster``: on its Ray workers."""
        if cluster is not None:
            if self.head_path is None:
                raise ConfigError(f"{self.path}: --ray needs the converted head kept beside it, which could "
                                  "not be written; copy the file to a writable folder")
            runner = cluster.runner(PretrainedRecipe(self.head_path, self.spec.name, self.spec.views, self.config,
                                                     self.head_sha256))
        else:
            runner = LocalRunner(self.scorer(), workers)
        frame, errors = score_files(runner, inputs, out, progress=progress)
        frame.attrs["errors"] = errors
        return frame

    def check_store(self, store):
        """A store holds this model's features: its net, pooling, blocks, backbone weights and views."""
        backbone = get_backbone(self.spec.net)
        want = {"net": self.spec.net, "pooling": self.spec.pooling, "block_channels": list(backbone.channels),
                "weights_source": self.spec.backbone_weights, "views": list(self.procedure.store_views or ())}
        have = {"net": store.net, "pooling": store.pooling, "block_channels": list(store.block_channels),
                "weights_source": store.attrs.get("weights_source"), "views": list(store.views)}
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if not diff:
            return
        if self.procedure.store_views is None:
            advice = (f"Model {self.spec.name} averages {self.procedure.description}, which no store holds: "
                      f"score the images (mlsp score --model {self.spec.name} --images DIR).")
        else:
            wide = pooling_of(self.spec.pooling).flag
            advice = (f"Model {self.spec.name} takes {self.procedure.description}: extract with mlsp extract "
                      f"--net {self.spec.net} {wide} --no-augment --weights {self.spec.backbone_weights}, "
                      "or score the images (--images DIR).")
        raise StoreConfigMismatch(store.path, diff, advice=advice)

    def score_store(self, store_path: str, out: str | None = None, *,
                    progress: ProgressFactory = null_progress):
        """Score every image of a store of this model's features (:meth:`check_store`)."""
        return score_features(head_columns(self.head), store_path, out, check=self.check_store, progress=progress)

    def scoring_model(self):
        """The end-to-end Keras model: images -> the model's views -> backbone -> head -> mean MOS."""
        from mlsp.backbone.layers import PositionCrops

        from .export import assemble

        p = self.procedure
        crops = PositionCrops(p.fraction, p.positions, p.flips, name="views")
        return assemble(self.extractor, self.head, crops, f"mlsp_{self.spec.name}")

    def export(self, out: str | None = None) -> str:
        """Write :meth:`scoring_model` to ``out`` (default ``<name>.keras`` here)."""
        from .export import check_out, save

        out = check_out(out or f"{self.spec.name}.keras")
        return save(self.scoring_model(), out)


def open_model(model: str, precision: str = ExtractConfig.precision,
               extractor: FeatureExtractor | None = None, progress=None) -> PretrainedModel:
    """The catalogue model ``model`` (a name, or the path of its file), fetched (with a
    ``progress`` bar) and verified by :func:`heads.score.catalogue.resolve_model`, converted once;
    ``extractor``: its backbone, when already built."""
    spec, path = resolve(model, progress)
    return PretrainedModel(spec, path, precision, extractor)
