"""The Python API: the CLI's commands as functions, with the same names and defaults.

>>> from mlsp import api
>>> store = api.extract("photos/", net="irv2", wide=True, labels="AVA.txt").store
>>> run = api.train(store, head="pool3fc").run_dir
>>> api.evaluate(run)["test"]["srcc"]
>>> api.score(run, images="new_photos/", out="scores.csv")
>>> api.sample("data/sample")            # the whole pipeline on the built-in sample dataset

Every function logs through :mod:`logging` and shows no progress unless ``progress=True`` (a
bar on stderr in a terminal, a log line every few seconds elsewhere) or a progress factory
(:mod:`mlsp.runtime.progress`). Errors are :class:`mlsp.errors.MLSPError` subclasses.

This facade is the top floor: the one module of :mod:`mlsp` that imports :mod:`heads` (stage 2
is built on stage 1, never the other way round).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from .backbone.nets import FLOPS_SIZE
from .errors import ConfigError
from .extraction.job import ExtractConfig
from .runtime.progress import resolve as resolve_progress
from .images.readahead import DECODE_WORKERS
from .store.shards import FLUSH_IMAGES
from .store.format import NARROW, WIDE, pooling_of
from .sample import SAMPLE_IMAGES

log = logging.getLogger(__name__)


def backbones(names: Sequence[str] | None = None, *, flops_at: tuple | None = FLOPS_SIZE) -> list[dict]:
    """``mlsp backbones``: one dict per registered backbone (or per name in ``names``): blocks,
    channels, minimum input side, preprocessing, weights file, and the forward pass's GFLOPs at
    ``flops_at`` = (height, width) (``None``: not counted), as :func:`mlsp.backbone.nets.describe`."""
    from .backbone import nets as registry

    specs = [registry.get_backbone(n) for n in names] if names else registry.BACKBONES.specs()
    return [registry.describe(spec, flops_at) for spec in specs]


def ray_cluster(address: str | None = None, cpus_per_worker: float | None = None,
                gpus_per_worker: float | None = None, decode_threads: int = DECODE_WORKERS):
    """A :class:`mlsp.extraction.cluster.Cluster` for ``--ray ADDRESS`` (a context manager), or, without an
    address, a context giving ``None``: Ray is imported only when asked for. ``decode_threads``:
    each worker's threads decoding images ahead (``--workers``, as on one machine)."""
    if not address:
        import contextlib

        return contextlib.nullcontext(None)
    from .extraction.cluster import Cluster

    return Cluster(address, cpus_per_worker, gpus_per_worker, decode_threads)


def info() -> dict:
    """``mlsp info``: the Keras backend and its version, the devices it sees, the precision
    ``--precision auto`` would choose and why, and where ImageNet weights are cached (and which
    of the registered backbones' weights are already there)."""
    import os

    import keras

    from .runtime import backend
    from .backbone.weights import keras_cache_dir
    from .backbone.nets import BACKBONES
    from .runtime.precision import AUTO, resolve

    described = backend.describe()
    precision, why = resolve(AUTO)
    cache = keras_cache_dir()
    return {
        "backend": described["backend"],
        "backend_version": described["backend_version"],
        "keras": keras.__version__,
        "devices": backend.devices(),
        "precision_auto": precision,
        "precision_auto_why": why,
        "weights_cache": cache,
        "weights_cached": {name: os.path.isfile(os.path.join(cache, BACKBONES[name].weights_file))
                           for name in sorted(BACKBONES)},
    }


def extract(images: str | Sequence[str], out: str | None = None, *, net: str = ExtractConfig.net,
            wide: bool = pooling_of(ExtractConfig.pooling).wide, augment: bool = ExtractConfig.augment,
            weights: str = ExtractConfig.weights, labels: str | None = None, test_list: str | None = None,
            max_side: int = ExtractConfig.max_side, precision: str = ExtractConfig.precision,
            threads: tuple | None = None, checkpoint_every: int = FLUSH_IMAGES, workers: int = DECODE_WORKERS,
            progress=False, ray: str | None = None, ray_cpus_per_worker: float | None = None,
            ray_gpus_per_worker: float | None = None, **options):
    """``mlsp extract``: features of a folder (recursively) or a list of files into a store.
    ``ray``: an address as for ``--ray`` (``auto``, ``ray://HOST:PORT``, ``local:N``) spreads the
    images over a Ray cluster.

    ``precision`` may be ``auto`` (:func:`mlsp.runtime.precision.resolve`); ``threads`` is
    the backend's ``(intra, inter)`` (:func:`mlsp.runtime.backend.configure_threads`); ``workers``: the
    threads decoding images ahead of the model (each Ray worker's, with ``ray``); ``options`` are
    :func:`mlsp.extraction.job.extract`'s (``val_fraction``, ``seed``, ``dataset``, ...);
    ``checkpoint_every``: images kept in memory before they are saved to a shard (its ``flush_images``).
    Returns :class:`mlsp.extraction.job.ExtractResult`
    (``.store``, ``.images``, ``.errors``, ...)."""
    from .runtime.backend import configure_threads
    from .extraction.job import extract as run

    if threads and not ray:
        configure_threads(*threads)
    config = ExtractConfig(net=net, pooling=pooling_of(wide).name, augment=augment, weights=weights,
                           max_side=max_side, precision=precision)
    if config.weights.startswith("random"):
        log.warning("using a RANDOM backbone (weights %s): features carry no ImageNet knowledge; "
                    "fine for tests and benchmarks, meaningless for aesthetics", config.weights)
    with ray_cluster(ray, ray_cpus_per_worker, ray_gpus_per_worker, workers) as cluster:
        return run(images, config, out, labels=labels, test_list=test_list, workers=workers,
                   progress=resolve_progress(progress), runner=cluster.runner(config) if cluster else None,
                   flush_images=checkpoint_every, **options)


def train(store: str | None = None, *, head: str, out: str | None = None, head_options: dict | None = None,
          memory_budget: int | str | None = None, progress=False, **options):
    """``mlsp train``: ``head_options`` are the head's own (``{"width": 512}``; each head declares
    them in :data:`heads.registry.HEADS`, ``mlsp heads`` lists them); ``options`` are
    :class:`heads.train.config.TrainConfig` fields (target, epochs,
    lr, min_lr, lr_epochs, patience, batch_size, steps_per_epoch, seed, workers); an unknown one
    is an error; lr, min_lr and steps_per_epoch not given are chosen from the store's size
    (:func:`heads.train.schedule.resolve_schedule`). ``memory_budget``: bytes, or a size like
    ``"8GB"``. Returns :class:`heads.train.loop.TrainResult`."""
    from heads.train.config import TrainConfig
    from heads.train.loop import train as run

    config = TrainConfig.from_dict({"head": head, "store": store, "out": out, "head_options": dict(head_options or {}),
                                    "memory_budget": _bytes(memory_budget), **options})
    return run(config, progress=resolve_progress(progress))


def _bytes(size):
    if size is None:
        return None
    from heads.data import parse_bytes

    return parse_bytes(size)


def evaluate(run_dir: str, store: str | None = None, *, out: str | None = None,
             memory_budget: int | str | None = None) -> dict:
    """``mlsp evaluate``: SRCC, PLCC, accuracy, balanced accuracy and n on val and test."""
    from heads.evaluation import evaluate as run

    return run(run_dir, store, out=out, memory_budget=_bytes(memory_budget))


def score(run_dir: str | None = None, *, model: str | None = None, store: str | None = None,
          images: str | Sequence[str] | None = None, out: str | None = None, weights: str | None = None,
          precision: str | None = None, workers: int = DECODE_WORKERS, progress: bool = False,
          allow_unfinished: bool = False, ray: str | None = None, ray_cpus_per_worker: float | None = None,
          ray_gpus_per_worker: float | None = None, users: Sequence[str] = ()):
    """``mlsp score``: a pandas DataFrame (the columns of :mod:`heads.columns`) for every image of ``store``, or of the image
    files ``images`` (then files that could not be used are in ``frame.attrs["errors"]``).
    ``model``: a released model (a catalogue name or the path of its file, :func:`pretrained`)
    in place of a trained run. ``allow_unfinished``: also an interrupted or diverged run.
    ``ray`` (with ``images``): score on a Ray cluster, as for :func:`extract`. ``users``: personal
    model folders of this run (:func:`personalize`), with ``store``: one more column
    ``pred_<user>`` each."""
    from heads.score.scoring import score_images, score_store

    if (run_dir is None) == (model is None):
        raise ConfigError("score() takes either a run folder or model=")
    if (store is None) == (images is None):
        raise ConfigError("score() takes either store= or images=")
    if ray and store is not None:
        raise ConfigError("--ray scores image files (--images); a store is scored on this machine")
    if users and store is None:
        raise ConfigError("personal models (--user) score a store: extract the images into one first")
    if model is not None and (weights is not None or users):
        raise ConfigError("a released model names its own backbone weights and has no personal models; "
                          "--weights and --user are for a run")
    scorer = pretrained(model, precision=precision, progress=progress) if model is not None else None
    if store is not None:
        if scorer is not None:
            return scorer.score_store(store, out, progress=resolve_progress(progress))
        apply = None  # the run's head
        if users:  # one column per person instead, the features read once for all of them
            from heads.personal.people import PersonalScorer

            apply = PersonalScorer(run_dir, list(users), allow_unfinished).columns
        return score_store(run_dir, store, out, progress=resolve_progress(progress),
                           allow_unfinished=allow_unfinished, apply=apply)
    with ray_cluster(ray, ray_cpus_per_worker, ray_gpus_per_worker, workers) as cluster:
        if scorer is not None:
            return scorer.score(images, out, workers=workers, progress=resolve_progress(progress), cluster=cluster)
        frame, errors = score_images(run_dir, images, out, weights=weights, precision=precision, workers=workers,
                                     progress=resolve_progress(progress), allow_unfinished=allow_unfinished,
                                     cluster=cluster)
    frame.attrs["errors"] = errors
    return frame


def pretrained(model: str, *, precision: str | None = None, progress=False):
    """A released model, ready to score (as pyiqa's ``create_metric``): ``model`` is a catalogue
    name (``mlsp models``; fetched and verified once, with a bar if ``progress``) or the path of
    its file. Returns a :class:`heads.score.released.PretrainedModel`:
    ``.score(paths_or_folder)`` (a DataFrame: id, pred (the MOS, 1-10), pred_std, path),
    ``.score_store(store)``, ``.export(out)``."""
    from heads.score.released import open_model

    return open_model(model, precision or ExtractConfig.precision, progress=resolve_progress(progress))


def import_weights(path: str, *, head: str, store: str, out: str | None = None) -> str:
    """``mlsp import-weights``: a run folder with the head of a Keras 2 weights file trained with
    the authors' notebooks (:func:`heads.score.keras2.import_run`); ``store`` names the features it
    takes. Returns the run folder."""
    from heads.score.keras2 import import_run

    return import_run(path, head, store, out)


def export(run_dir: str | None = None, out: str | None = None, *, model: str | None = None,
           weights: str | None = None, precision: str | None = None, allow_unfinished: bool = False,
           progress=False) -> str:
    """``mlsp export``: one .keras model from image batch to MOS; returns its path. ``model``: a
    released model (:func:`pretrained`) in place of a run (default ``out``: ``<name>.keras``;
    ``progress``: a bar while its file is fetched). ``allow_unfinished``: also an interrupted or
    diverged run."""
    from heads.score.export import export as run


    if (run_dir is None) == (model is None):
        raise ConfigError("export() takes either a run folder or model=")
    if model is not None:
        if weights is not None:
            raise ConfigError("a released model names its own backbone weights; --weights is for a run")
        return pretrained(model, precision=precision, progress=progress).export(out)
    return run(run_dir, out, weights=weights, precision=precision, allow_unfinished=allow_unfinished)


def report(source: str, out: str | None = None, *, images: str | None = None, saliency: str | None = None,
           max_photos: int | None = None, progress=False) -> str:
    """``mlsp report``: one self-contained HTML page of a scores file (``mlsp score --out``), a
    run folder or a personalisation evaluation folder (:mod:`heads.report.make`); returns its path.
    ``images``: the folder to find the photos in by id; ``saliency``: a folder of
    :func:`explain` overlays to show beside them; ``max_photos``: thumbnails made and photos per
    page (default :data:`heads.report.build.MAX_PHOTOS`)."""
    from heads.report.make import MAX_PHOTOS, report as run

    return run(source, out, images=images, saliency=saliency, max_photos=max_photos or MAX_PHOTOS,
               progress=resolve_progress(progress))


def explain(images: str | Sequence[str], out: str, *, run: str | None = None, model: str | None = None,
            samples: int | None = None, noise: float | None = None, weights: str | None = None,
            precision: str | None = None, allow_unfinished: bool = False, seed: int = 0, progress=False):
    """``mlsp explain``: SmoothGrad saliency of each photo's predicted score through the whole
    image-to-score model of a trained ``run`` or of a released ``model`` (a catalogue name or the
    path of its file, :func:`pretrained`) (:mod:`heads.report.saliency`), written into ``out`` as
    ``<id>.png`` (an overlay) and ``<id>.npy`` (the map at the photo's size). ``samples`` and
    ``noise``: default SmoothGrad's paper's (:data:`heads.report.saliency.SAMPLES`,
    :data:`heads.report.saliency.NOISE`). Returns ``(explained, errors)``."""
    from heads.report import saliency

    if bool(run) == bool(model):
        raise ConfigError("explain needs one model: a trained run (--run RUN_DIR) or a released model (--model NAME|PATH)")
    if model:
        if weights or allow_unfinished:
            raise ConfigError("weights and allow_unfinished are a run's; a released model brings its own")
        scorer = saliency.PretrainedModelScore(model, precision, progress=resolve_progress(progress))
    else:
        scorer = saliency.RunModel(run, weights, precision, allow_unfinished=allow_unfinished)
    return saliency.explain(images, scorer, out, samples=saliency.SAMPLES if samples is None else samples,
                            noise=saliency.NOISE if noise is None else noise, seed=seed,
                            progress=resolve_progress(progress))


def inspect(store: str, *, check_features: bool = True, progress=False) -> dict:
    """``mlsp inspect``: what a store holds (configuration, sizes, labels, splits, errors), the
    store checked on the way (:func:`mlsp.store.read.describe`; ``check_features=False`` skips
    reading every feature value)."""
    from .store.read import describe

    return describe(store, check_features=check_features, progress=resolve_progress(progress))


def unusable_inputs(store: str) -> list[dict]:
    """Every input a store's extraction could not use: ``[{"id", "path", "reason"}]``."""
    from .store.read import FeatureStore

    with FeatureStore(store) as s:
        return s.errors()


def heads(nets: Sequence[str] | None = None) -> list[dict]:
    """``mlsp heads``: every registered head with its default options and its parameter count on
    the features of each backbone in ``nets`` (default: the paper's two)."""
    from heads.models import build_head
    from heads.registry import HEADS

    from .backbone.nets import BACKBONES, PAPER_BACKBONES

    rows = []
    for spec in HEADS.specs():
        row = {"name": spec.name, "features": WIDE.name if spec.needs_wide else f"{NARROW.name} (or {WIDE.name}: grid mean)",
               "description": spec.description, "options": {}, "params": {}}
        for net in nets or PAPER_BACKBONES:
            backbone = BACKBONES[net]
            row["options"][net] = spec.default_options(backbone.total_channels)
            model = build_head(spec.name, backbone.channels, pooling=pooling_of(spec.needs_wide).name)
            row["params"][net] = model.count_params()
        rows.append(row)
    return rows


def models(names: Sequence[str] | None = None, *, catalogues: Sequence[str] = ()) -> list[dict]:
    """``mlsp models``: one dict per pretrained predictor of the catalogue (or per name in
    ``names``): backbone, pooling, head, test-time views, file size and sha256, URLs, source,
    the paper's AVA figures, where its file is kept and whether it is there (``cached``), and
    whether the backbone's ImageNet weights are in Keras' cache. ``catalogues``: users' catalogue
    files to add (as ``$MLSP_MODELS`` does; docs/pretrained.md)."""
    from heads.score.catalogue import add_catalogue, describe, get_pretrained, list_pretrained

    for path in catalogues:
        add_catalogue(path)
    specs = [get_pretrained(n) for n in names] if names else list_pretrained()
    return [describe(spec) for spec in specs]


def fetch_model(name: str, *, catalogues: Sequence[str] = (), progress=False) -> str:
    """The checked local path of pretrained model ``name``'s file, downloaded into the cache
    first if it is not there (size and sha256 checked, mirrors tried in order, a broken download
    resumed); offline, a :class:`mlsp.errors.DownloadError` says where to put a copy."""
    from heads.score.catalogue import add_catalogue, fetch

    for path in catalogues:
        add_catalogue(path)
    return fetch(name, progress=resolve_progress(progress))


def check_models(names: Sequence[str] | None = None, *, catalogues: Sequence[str] = (), progress=False) -> list:
    """``mlsp models --check``: score the published photo of each model named (default: every
    model whose catalogue entry has a published prediction) as ``mlsp score --model`` does, and
    compare it with the published score. Returns one :class:`heads.score.check.CheckResult`
    per model (``score``, ``reference``, ``difference``, ``passed``); offline, a
    :class:`mlsp.errors.WeightsUnavailableError` names the files needed and where to put them."""
    from heads.score.catalogue import add_catalogue
    from heads.score.check import checkable, run_checks

    for path in catalogues:
        add_catalogue(path)
    return run_checks(checkable(names), progress=resolve_progress(progress))


@dataclasses.dataclass
class SampleResult:
    """What :func:`sample` made: the dataset, the weights used (and why), the store and the run."""

    info: object  # mlsp.sample.SampleInfo
    weights: str
    weights_note: str
    extraction: object  # mlsp.extraction.job.ExtractResult
    training: object | None  # heads.train.loop.TrainResult, or None with train_head=False
    ratings: str | None = None  # with users: the synthetic raters' ratings.csv
    test_users: str | None = None  # with users: their test raters, one per line


def sample(root: str = "data/sample", *, n_images: int = SAMPLE_IMAGES, net: str = "iv3", wide: bool = False,
           weights: str = "auto", out: str | None = None, head: str = "single1fc", train_head: bool = True,
           seed: int = 0, users: int = 0, progress=False) -> SampleResult:
    """``mlsp sample``: build the sample dataset in ``root`` (:func:`mlsp.sample.build_sample`),
    extract it into a fresh store (an earlier store of the sample is removed: its images were
    just rebuilt) and, with ``train_head``, train and evaluate ``head`` on it with `mlsp train`'s
    defaults. ``weights="auto"``: ImageNet when Keras can load them, else a random backbone,
    said plainly in the log and in ``weights_note``. ``users``: that many synthetic raters with
    planted personal taste rate every image (``ratings.csv`` and ``test_users.txt`` beside the
    labels, :func:`mlsp.sample.write_sample_ratings`), for ``mlsp personalize``."""
    from .extraction.job import default_store_path, extract as run_extract
    from .sample import build_sample, demo_weights, write_sample_ratings
    from .store.shards import remove_store

    info = build_sample(root, n_images=n_images, seed=seed)
    log.info("sample: %d images in %s, votes in %s", info.n_images, info.images_dir, info.labels_path)
    weights, why = demo_weights(net, weights)
    (log.warning if weights.startswith("random") else log.info)(why)
    config = ExtractConfig(net=net, pooling=pooling_of(wide).name, weights=weights)
    out = out or default_store_path(config, "sample")
    remove_store(out)
    extraction = run_extract(info.images_dir, config, out, labels=info.labels_path, test_list=info.test_list_path,
                             val_fraction=0.2, seed=seed, dataset="sample", progress=resolve_progress(progress))
    rated = (write_sample_ratings(extraction.store, root, users, seed, info.labels_without_images)
             if users else (None, None))
    training = train(extraction.store, head=head, seed=seed, progress=progress) if train_head else None
    return SampleResult(info, weights, why, extraction, training, *rated)



def personalize(run_dir: str | None = None, *, store: str, ratings: str, user: str | None = None, out: str,
                model: str | None = None,
                method: str | None = None, scale: tuple | None = None, seed: int = 0, evaluate: bool = False,
                users: str | None = None, ks: Sequence[int] | None = None, repeats: int | None = None,
                progress=False, allow_unfinished: bool = False):
    """``mlsp personalize``: adapt the run's head (or a released ``model``'s, :func:`pretrained`)
    to ``user`` from their ``ratings`` (FLICKR-AES's
    per-worker file or a ``user,image,score`` CSV) of images in ``store`` and save the personal
    model in ``out`` (returns :class:`heads.personal.PersonalModel`); with ``evaluate``, run the
    literature's protocol instead (k of each test person's ratings to adapt, the rest to test,
    ``repeats`` times; ``users``: a file of the test raters) into the folder ``out`` and return
    its summary per k. ``method``: ``auto`` (cross-validation) or one of
    :data:`heads.personal.METHODS`; ``scale``: the ratings' (low, high). ``None``: the defaults
    of :mod:`heads.personal` (auto, 1..5, k 10 and 100, 10 repeats)."""
    from heads import personal
    from heads.personal import protocol

    if bool(run_dir) == bool(model):
        raise ConfigError("personalize adapts one generic model: a trained run (--run RUN_DIR) or a released "
                          "model (--model NAME|PATH)")
    if model:
        from heads.personal.generic import GenericHead

        run_dir = GenericHead.released(model, progress=resolve_progress(progress))
    options = {"method": method or personal.AUTO, "scale": scale or personal.RATING_SCALE, "seed": seed,
               "progress": resolve_progress(progress), "allow_unfinished": allow_unfinished}
    if evaluate:
        if user is not None:
            raise ConfigError("--evaluate tests every rater of --users (or all); it takes no --user")
        return personal.evaluate(run_dir, store, ratings, out, users_file=users, ks=ks or protocol.KS,
                                 repeats=repeats or protocol.REPEATS, **options)
    if user is None:
        raise ConfigError("personalize needs --user ID (or --evaluate)")
    if users is not None:
        raise ConfigError("--users lists the test raters of --evaluate; adapting one person takes --user")
    return personal.personalize(run_dir, store, ratings, user, out, **options)
