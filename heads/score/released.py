"""A released model of the catalogue (:mod:`heads.score.catalogue`) as an mlsp head: converted once,
scored with its own test-time procedure, exported end to end.

:func:`open_model` takes a catalogue name or the path of a file the user has (found in the
catalogue by its sha256) and gives a :class:`PretrainedModel`. Its Keras 2 file is imported
(:mod:`heads.score.keras2`) once into a ``.keras`` head kept beside it, named by the file's sha256; a
kept conversion is used only when its own sha256 is the one mlsp recorded when writing it
(``<head>.keras.json``), else it is made again. Scoring image files runs the model's view
procedure (:mod:`mlsp.images.views`: ``full`` or ``crops18``) through the same decode-ahead runner as
``mlsp score RUN --images`` (:func:`heads.score.scoring.score_files`); scoring a store takes only a
store of the same net, pooling and views.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from typing import Sequence

from mlsp.runtime.atomic import atomic_path, write_json
from mlsp.runtime.files import file_sha256
from mlsp.backbone.nets import get_backbone
from mlsp.errors import ConfigError, StoreConfigMismatch, WriteError
from mlsp.store.format import pooling_of
from mlsp.extraction.job import ExtractConfig, FeatureExtractor
from mlsp.images.decode import decode_image
from mlsp.runtime.progress import ProgressFactory, null_progress
from mlsp.images.readahead import DECODE_WORKERS, LocalRunner
from mlsp.images.views import get_procedure

from .scoring import HeadScorer, head_columns, score_features, score_files

log = logging.getLogger(__name__)

#: What a kept conversion's record is named after: ``<head>.keras`` + this.
RECORD_SUFFIX = ".json"


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


def _kept(head_path: str, sha256: str) -> bool:
    """A conversion kept earlier is usable: mlsp's record names this source and the file's own hash."""
    record_path = head_path + RECORD_SUFFIX
    if not (os.path.isfile(head_path) and os.path.isfile(record_path)):
        return False
    try:
        with open(record_path) as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s); converting again", record_path, exc)
        return False
    if record.get("source_sha256") != sha256 or record.get("sha256") != file_sha256(head_path):
        log.warning("%s: not the conversion mlsp recorded (%s); converting again", head_path, record_path)
        return False
    return True


def convert(spec, path: str):
    """``(head model, path of its .keras or None)``: the kept conversion of ``path``, or a new one
    (written beside it; where that folder cannot be written, the head is converted in memory, and
    the log says so)."""
    import keras

    from .keras2 import FORMAT, import_head

    if spec.weights_format != FORMAT:
        raise ConfigError(f"{spec.name}: weights format {spec.weights_format!r}; mlsp imports {FORMAT}")
    head_path = converted_path(path, spec.sha256)
    if _kept(head_path, spec.sha256):
        return keras.saving.load_model(head_path, compile=False, safe_mode=True), head_path
    log.info("%s: converting %s's Keras 2 head into %s (once)", path, spec.name, head_path)
    backbone = get_backbone(spec.net)
    model, options = import_head(path, spec.head, backbone.channels, spec.pooling, options=spec.head_options)
    try:
        with atomic_path(head_path, keep_extension=True) as tmp:
            model.save(tmp)
        write_json(head_path + RECORD_SUFFIX, {
            "source": os.path.abspath(path), "source_sha256": spec.sha256, "model": spec.name,
            "head": spec.head, "head_options": options, "sha256": file_sha256(head_path),
            "keras": keras.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    except (OSError, WriteError) as exc:
        log.warning("%s: cannot keep the converted head (%s); it is converted again on every run", head_path, exc)
        return model, None
    return model, head_path


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

    def build(self) -> PretrainedScorer:
        import keras

        model = keras.saving.load_model(self.head_path, compile=False, safe_mode=True)
        extractor = FeatureExtractor(self.config, cache=True)
        return PretrainedScorer(model, extractor, self.name, self.views, file_sha256(self.head_path))


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
        self.head, self.head_path = convert(spec, path)
        self._extractor = extractor

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.config, cache=True)
        return self._extractor

    def scorer(self) -> PretrainedScorer:
        sha = file_sha256(self.head_path) if self.head_path else None
        return PretrainedScorer(self.head, self.extractor, self.spec.name, self.spec.views, sha)

    def score(self, inputs: str | Sequence[str], out: str | None = None, *, workers: int = DECODE_WORKERS,
              progress: ProgressFactory = null_progress, cluster=None):
        """Score image files (a folder or a list) with the model's own views: a pandas DataFrame as
        :func:`heads.score.scoring.score_images` gives (``id``, ``pred``, ``pred_std``, ``path``), the files
        that could not be used in ``frame.attrs["errors"]``. ``cluster``: on its Ray workers."""
        if cluster is not None:
            if self.head_path is None:
                raise ConfigError(f"{self.path}: --ray needs the converted head kept beside it, which could "
                                  "not be written; copy the file to a writable folder")
            runner = cluster.runner(PretrainedRecipe(self.head_path, self.spec.name, self.spec.views, self.config))
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
