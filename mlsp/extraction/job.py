"""Stage 1: images -> MLSP features in a feature store.

:class:`FeatureExtractor` is the model: backbone, taps and pooling, compiled once for inputs of
every size on TensorFlow or PyTorch (:mod:`mlsp.runtime.backend`), so thousands of distinct image sizes
cost one compile. :func:`extract` is the job: find the images, decode them ahead of the model in
worker threads, run the views of one image, or of several images of one size, as one batch
(:func:`run_batched`), write crash-safe shards, and finally merge everything with the labels
into one store (see ``features/README.md``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time
from typing import NamedTuple, Sequence

import numpy as np

from ..backbone import weights as backbone_weights, nets as backbones, folding, native
from ..runtime import backend
from ..images import identity, decode as images
from ..store import read as store
from ..runtime.atomic import describe_os_error, is_write_failure, remove_stale_temporaries
from ..errors import ConfigError, IdentityConflict, ImageDecodeError, NoUsableImages, StoreConfigMismatch, WriteError
from ..runtime.files import NoSpace, StoreLock, file_sha256
from ..runtime.precision import DEFAULT as DEFAULT_PRECISION, check as check_precision, dtype_policy
from ..runtime.precision import resolve_logged as resolve_precision
from ..runtime.progress import ProgressFactory, null_progress
from ..images.readahead import BATCH_WINDOW, DECODE_WORKERS, PREFETCH, LocalRunner
from ..store.shards import FLUSH_IMAGES, FLUSH_SECONDS, ShardWriter
from ..store.write import finalize_store, relabel_store
from ..store.config import CONFIG_KEYS, config_attrs, config_differences, to_attrs
from ..store.format import FEATURES_ROOT, NARROW, POOLINGS, pooling_of

log = logging.getLogger(__name__)

#: Extractor models built in this process, by what determines them (:func:`built_model_key`), so
#: that a process that extracts and then scores, exports or explains with the same backbone (a
#: notebook, ``api`` calls in a script) builds it once: building and folding is seconds. Bounded:
#: an Inception model holds 100-220 MB of weights.
BUILT_MODELS_KEPT = 2
_built_models: collections.OrderedDict = collections.OrderedDict()


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines the features of an image (and so a store's configuration)."""

    net: str = "irv2"
    pooling: str = NARROW.name
    augment: bool = True
    weights: str = "imagenet"
    max_side: int = 1024
    precision: str = DEFAULT_PRECISION  # "auto" is resolved here, once, for this machine

    def __post_init__(self):
        backbones.get_backbone(self.net)
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, received {self.pooling!r}")
        # the one place "auto" becomes a precision (mlsp.runtime.precision.resolve): every extraction,
        # scoring of files, export and saliency configures its backbone through this class
        object.__setattr__(self, "precision", resolve_precision(check_precision(self.precision)))
        if int(self.max_side) < 0:
            raise ConfigError(f"max_side must be >= 0 (0: never resize), received {self.max_side!r}")

    @property
    def spec(self) -> backbones.BackboneSpec:
        return backbones.get_backbone(self.net)

    @property
    def views(self) -> list[str]:
        return images.view_names(self.augment)

    def build(self) -> "FeatureExtractor":
        """The model of this configuration (a recipe for :mod:`mlsp.extraction.cluster`'s workers)."""
        return FeatureExtractor(self)

    def default_store_name(self) -> str:
        name = f"{self.net}_{self.pooling}" + ("" if self.augment else "_noaug")
        if self.precision != DEFAULT_PRECISION:
            name += f"_{self.precision}"
        return name + ".h5"


def built_model_key(config: ExtractConfig, fold_batch_norms: bool) -> tuple:
    """What an extractor model is determined by: the Keras backend, the configuration and the
    weights' identity (``random:SEED``; ImageNet's pinned SHA-256; a file's path and SHA-256, so
    a file rewritten in place is a new model)."""
    source = backbone_weights.WeightsSource.parse(config.weights)
    if source.kind == "file":
        weights = ("file", source.path, file_sha256(source.path))  # the path too: stores record it
    elif source.kind == "imagenet":
        weights = ("imagenet", config.spec.weights_hash)
    else:
        weights = (str(source),)
    return (backend.name(), config.net, config.pooling, config.precision, bool(fold_batch_norms), weights)


class FeatureExtractor:
    """Backbone + taps + pooling. ``extractor(views)`` maps a (V, h, w, 3) uint8 RGB batch of
    one size to (V, C) (narrow) or (V, 5, 5, C) (wide) float32 features.

    The backbone runs with its batch norms folded into the convolutions (inference only, the
    same function; ``fold_batch_norms=False`` keeps Keras' graph as it is). ``cache=True`` loads
    the traced forward pass from :mod:`mlsp.backbone.forward_cache` when it was built before (and saves it
    when not): the same features, without building the backbone; ``model`` is then built only if
    asked for.

    ``engine`` (default: the process's, :func:`mlsp.backbone.native.chosen_engine`): ``keras`` runs the
    Keras model, ``native`` the same model's weights as PyTorch steps of its own
    (:mod:`mlsp.backbone.native`), ``auto`` native on a CUDA device where the backbone is supported.
    ``buckets`` (default: on a CUDA device): the native engine runs views of different sizes in
    one call, padded to size buckets, where the backbone is bucket-exact (the registry says)."""

    def __init__(self, config: ExtractConfig, fold_batch_norms: bool = True, cache: bool = False,
                 engine: str | None = None, buckets: bool | None = None):
        self.config = config
        self.fold_batch_norms = fold_batch_norms
        self._model = None
        self._native = None
        self.buckets = False
        self.provenance = {**backend.describe(), "engine": "keras"}
        if self._start_native(engine or native.chosen_engine(), buckets):
            return
        key = None
        if cache and fold_batch_norms:
            from ..backbone import forward_cache

            if forward_cache.enabled():
                key = forward_cache.cache_key(config, forward_cache.weights_identity(config))
                loaded = forward_cache.load(key)
                if loaded is not None:
                    self._restored, cached = loaded  # owns the variables
                    # the hash is the entry's (the key holds it); the name and place are this run's
                    self.weights_record = backbone_weights.weights_record(
                        backbone_weights.WeightsSource.parse(config.weights), cached["sha256"])
                    self._forward = backend.Forward(lambda batch: self._restored.forward(batch).numpy(), lambda: 1)
                    return
        self._forward = self._trace_forward()
        if key is not None:
            forward_cache.save(key, self._forward.compiled, self.model.variables, self.weights_record)

    @property
    def model(self):
        """The Keras model: preprocessed views -> pooled features."""
        if self._model is None:
            self._model, self.weights_record = self._build_model()
        return self._model

    def _build_model(self):
        key = built_model_key(self.config, self.fold_batch_norms)
        if key in _built_models:
            _built_models.move_to_end(key)
            log.debug("%s: the model built earlier in this process", self.config.spec.name)
        else:
            _built_models[key] = self._build_new_model()
            while len(_built_models) > BUILT_MODELS_KEPT:
                _built_models.popitem(last=False)
        return _built_models[key]

    def _build_new_model(self):
        import keras

        from ..backbone.pooling import MultiLevelPooling

        config, spec = self.config, self.config.spec
        source = backbone_weights.WeightsSource.parse(config.weights)
        with dtype_policy(config.precision):
            backbone, weights_record = backbone_weights.build_backbone(spec, source)
            if self.fold_batch_norms:
                backbone, folded = folding.fold_batch_norms(backbone)
                log.debug("%s: %d batch norms folded into their convolutions", spec.name, folded)
            taps = backbones.tap_outputs(spec, backbone)
            channels = [int(t.shape[-1]) for t in taps]
            if tuple(channels) != tuple(spec.channels):
                raise ConfigError(f"{spec.name}: tap channels {channels} differ from the registry's {spec.channels}")
            pooled = MultiLevelPooling(grid=pooling_of(config.pooling).grid, name="mlsp_pooling")(taps)
            model = keras.Model(backbone.input, pooled, name=f"mlsp_{spec.name}_{config.pooling}")
        return model, weights_record

    def _start_native(self, engine: str, buckets: bool | None) -> bool:
        """Run on the native engine where ``engine`` asks for it and the backbone allows; whether it does."""
        wanted, why = native.resolve_engine(engine)
        if wanted != "native":
            log.debug("engine keras: %s", why)
            return False
        plan, why = native.plan_or_reason(self.model, self.model.get_layer("mlsp_pooling").input)
        if plan is None:
            log.info("%s runs on the Keras engine: %s", self.config.net, why)
            return False
        on_cuda = backend.devices()[0] != "cpu"
        self.buckets = bool(on_cuda if buckets is None else buckets) and self.config.spec.bucket_exact
        self._native = native.NativeNet(plan, preprocessing=self.config.spec.preprocessing,
                                        grid=pooling_of(self.config.pooling).grid, precision=self.config.precision,
                                        autotune=self.buckets and on_cuda)
        self._forward = backend.Forward(self._native, lambda: 0)
        self.provenance["engine"] = "native"
        log.debug("engine native (%s), %d steps, buckets %s", why, len(plan.steps), self.buckets)
        return True

    @property
    def native_net(self):
        """The :class:`mlsp.backbone.native.NativeNet` running this extractor, or None on the Keras engine."""
        return self._native

    @property
    def engine(self) -> str:
        """``keras`` or ``native``: the engine that runs this extractor."""
        return self.provenance["engine"]

    def batch_key(self, shape: tuple):
        """Views grouped into one call share this key: their shape, or with buckets their bucket."""
        if not self.buckets:
            return tuple(shape)
        return ("bucket",) + native.bucket_of(*shape[1:3])

    def _trace_forward(self) -> backend.Forward:
        return backend.compile_forward(self.model, self.config.spec.preprocess)

    @property
    def tracing_count(self) -> int:
        """How many graphs were traced (TensorFlow: stays 1 whatever the input sizes, and a forward
        pass loaded from the cache is one graph, never traced again; PyTorch runs eagerly: 0)."""
        return self._forward.tracing_count

    def __call__(self, views) -> np.ndarray:
        """Features of a (V, h, w, 3) uint8 batch; with buckets also of a list of batches of
        different sizes (their rows in order)."""
        if self.buckets:
            return self._native.run_mixed(views if isinstance(views, list) else [views])
        if isinstance(views, list):
            return self._forward(np.concatenate(views))
        return self._forward(views)

    def store_attrs(self) -> dict:
        """The store's attributes of this extraction (:func:`mlsp.store.config.to_attrs`)."""
        return to_attrs(self.config, self.weights_record, self.provenance)

    def info(self) -> dict:
        """What a runner reports of its model: the store's attributes."""
        return self.store_attrs()

    def configuration(self) -> dict:
        """What must be the same on every Ray worker (:mod:`mlsp.extraction.cluster`): the store's
        configuration, not its provenance (backend, version, device)."""
        return config_attrs(self.store_attrs())

    def process(self, views: np.ndarray) -> np.ndarray:
        """One image's features as stored (float16)."""
        return self(views).astype(np.float16)

    def load_views(self, path: str) -> tuple[np.ndarray, "ImageFacts"]:
        """Decode one file into its views, and what the store records of it (runs in a worker
        thread, or on a Ray worker: the file is read once, for its pixels and its hash)."""
        raw, status = images.read_file(path)
        img = images.decode_bytes(path, raw, self.config.max_side)
        images.check_size(path, img, self.config.augment, self.config.spec.min_side, self.config.net)
        return images.make_views(img, self.config.augment), ImageFacts(img.shape[:2], identity.of_bytes(raw, status))

    def extract_file(self, path: str) -> np.ndarray:
        views, _ = self.load_views(path)
        return self(views)


class ImageFacts(NamedTuple):
    """What the store records of an image besides its features: its decoded size (height, width)
    and its file's :class:`mlsp.images.identity.FileIdentity`."""

    size: tuple
    identity: identity.FileIdentity


@dataclasses.dataclass
class ExtractResult:
    store: str
    images: int  # rows in the finished store
    new: int  # images extracted by this call
    errors: list  # every input that could not be used (from this and earlier runs)
    labels_report: dict
    seconds: float
    skipped_existing: int  # inputs already in the store or its partial results


def default_store_path(config: ExtractConfig, dataset: str) -> str:
    """Where a store goes when no path is given: ``features/<dataset>/<config's name>.h5``."""
    return os.path.join(FEATURES_ROOT, dataset, config.default_store_name())


def collect_inputs(inputs: str | Sequence[str]) -> tuple[list[str], list[str], list[tuple[str, str]], str]:
    """(paths, ids, skipped (path, reason), root) for a folder or a list of files.

    A folder, or files, without one usable image raise :class:`ConfigError` (one line), rather
    than making an empty store."""
    if isinstance(inputs, (str, os.PathLike)) and os.path.isdir(inputs):
        root = os.path.abspath(inputs)
        paths, others = images.list_images(root)
        if not paths:
            raise ConfigError(images.no_images_message(str(inputs), others))
        return paths, images.image_ids(paths, root), others, root
    if isinstance(inputs, (str, os.PathLike)) and not os.path.lexists(inputs):
        raise ConfigError(f"{inputs}: no such file or folder")
    files = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    if not files:
        raise ConfigError("no input images given")
    present, skipped = images.check_files(files)
    if not present:
        if len(skipped) == 1:
            raise ConfigError(f"{skipped[0][0]}: {skipped[0][1]}")
        raise ConfigError(images.no_images_message(f"none of the {len(files)} files given can be read", skipped))
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in present])
    paths = sorted(os.path.abspath(p) for p in present)
    return paths, images.image_ids(paths, root), skipped, root


def _label_function(labels_file, test_list, val_fraction, seed, report, test_fraction=0.0, previous=None):
    """``ids -> (mos, votes, split)``; ``labels_file`` and ``test_list`` are files, or what a
    store kept of them (:class:`mlsp.store.labels.Labels`, a list of test ids; see :func:`_LabelSources`)."""
    from ..store import labels as labels_mod

    labels = labels_mod.read_labels(labels_file) if isinstance(labels_file, (str, os.PathLike)) else labels_file
    test_ids = labels_mod.read_test_list(test_list) if isinstance(test_list, (str, os.PathLike)) else test_list

    def label_fn(ids):
        mos, votes, split, rep = labels_mod.assign_splits(list(ids), labels, test_ids, val_fraction, seed,
                                                          test_fraction, previous)
        report.update(rep)
        return mos, votes, split

    return label_fn


def extract(
    inputs: str | Sequence[str],
    config: ExtractConfig,
    out: str | None = None,
    *,
    labels: str | None = None,
    test_list: str | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.2,
    seed: int = 0,
    dataset: str | None = None,
    workers: int = DECODE_WORKERS,
    prefetch: int = PREFETCH,
    flush_images: int = FLUSH_IMAGES,
    flush_seconds: float = FLUSH_SECONDS,
    batch_views: int | None = None,
    batch_window: int = BATCH_WINDOW,
    progress: ProgressFactory = null_progress,
    extractor: FeatureExtractor | None = None,
    runner=None,
) -> ExtractResult:
    """Extract features of every image in ``inputs`` (a folder, recursively, or a list of files)
    into the store ``out`` (default ``features/<dataset>/<config.default_store_name()>``).

    Resumable: images already in ``out`` or in its unfinished partial results are skipped, so
    running the same call again after an interruption only processes what is missing, and the
    finished store equals that of an uninterrupted run. A store or partial result made with
    another configuration raises :class:`StoreConfigMismatch`. One writer per store: while this
    runs, ``<out>.lock`` holds its pid and a second extraction into ``out`` raises
    :class:`~mlsp.errors.StoreLocked` at once. A full disk or a read-only target raises
    :class:`~mlsp.errors.WriteError` (finished images kept). Unusable inputs are recorded in
    the store's ``/errors`` and never stop the run. ``progress`` is a progress factory
    (:mod:`mlsp.runtime.progress`).
    Splits: ``test_list`` names the test images; without one, ``test_fraction`` of the labelled
    images are drawn for test by a hash of their id and ``seed`` (:func:`mlsp.store.labels.random_test`:
    an image keeps its split when images are added); ``val_fraction`` of the other labelled
    images go to val. Labels and a test list the store records stay unless new ones are given.
    ``runner`` runs the model (default: a :class:`mlsp.images.readahead.LocalRunner` in this process; a
    :class:`mlsp.extraction.cluster.ClusterRunner` spreads the images over a Ray cluster, the rest is the same).
    ``batch_views``: views per model call; the views of several images of the same size are
    grouped up to this many (looking at most ``batch_window`` decoded images ahead). ``None``:
    :func:`default_batch_views` (one image per call on a CPU, 64 views on a GPU). The store is
    the same whatever the batching.
    """
    started = time.monotonic()
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), received {value!r}")
    paths, ids, skipped, root = collect_inputs(inputs)
    dataset_given = dataset is not None
    dataset = dataset or os.path.basename(root.rstrip(os.sep)) or "dataset"
    out = out or default_store_path(config, dataset)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as exc:
        raise WriteError(os.path.dirname(os.path.abspath(out)), describe_os_error(exc), "nothing was written") from exc
    lock = StoreLock(out).acquire()  # before anything slow: a second writer is refused at once
    try:
        sources = _LabelSources.of(out, labels, test_list)
        report: dict = {}
        # Labels are read before any image, so a malformed file fails at once.
        test_fraction = 0.0 if sources.test_list is not None else float(test_fraction)  # a test list decides
        previous = _previous_splits(out, {"val_fraction": float(val_fraction), "test_fraction": test_fraction,
                                          "seed": int(seed), "test_list": sources.test_list_file})
        label_fn = _label_function(sources.labels, sources.test_list, val_fraction, seed, report, test_fraction,
                                   previous)
        runner = runner or LocalRunner(extractor or FeatureExtractor(config, cache=True), workers, prefetch,
                                       default_batch_views() if batch_views is None else batch_views, batch_window)
        attrs = {**runner.info(), "dataset": dataset, "labels_file": sources.labels_file,
                 "test_list": sources.test_list_file, "val_fraction": float(val_fraction),
                 "test_fraction": test_fraction, "seed": int(seed)}
        return _extract_locked(_Extraction(
            paths=paths, ids=ids, skipped=skipped, root=root, out=out, attrs=attrs, config=config, runner=runner,
            label_fn=label_fn, report=report, flush_images=flush_images, flush_seconds=flush_seconds,
            progress=progress, started=started, lock=lock, dataset_given=dataset_given))
    finally:
        lock.release()


@dataclasses.dataclass
class _Extraction:
    """One :func:`extract` call once its inputs are found and the store's lock is held."""

    paths: list  # the images, absolute
    ids: list  # their ids
    skipped: list  # (path, reason) of the inputs that are not usable images
    root: str  # the folder the stored paths are relative to
    out: str  # the store
    attrs: dict  # the store's attributes: the extractor's, the dataset's and the label sources
    config: ExtractConfig
    runner: object  # runs the model: map((path, id)) -> ((path, id), result), info(), postfix()
    label_fn: object  # ids -> (mos, votes, split)
    report: dict  # filled by label_fn: what the labels said
    flush_images: int
    flush_seconds: float
    progress: ProgressFactory
    started: float  # time.monotonic() when the call began
    lock: StoreLock
    dataset_given: bool = False  # False: a store being extended keeps its dataset name

    def key(self, path: str) -> str:
        """The path the store records for ``path``: relative to ``root``, with ``/``."""
        return os.path.relpath(path, self.root).replace(os.sep, "/")


def _extract_locked(job: _Extraction) -> ExtractResult:
    """The part of :func:`extract` that holds the store's lock: skip what is done, extract the
    rest into shards, merge them with the labels into the store."""
    out = job.out
    previous, done_paths, stored_ids, stored_files = _done_in_store(job)
    writer = ShardWriter(out, {k: job.attrs[k] for k in CONFIG_KEYS},
                               {"views": job.attrs["views"], "pooling": job.config.pooling,
                                "channels": int(sum(job.attrs["block_channels"]))},
                               flush_images=job.flush_images, flush_seconds=job.flush_seconds)
    kept = (f"finished images are kept in {writer.dir}" + (f" and {out}" if previous else "")
            + "; free space (or fix the folder) and run the same command again")
    for record in writer.read_shards():
        done_paths.update(record.paths)
        done_paths.update(e["path"] for e in record.errors)
        stored_ids.update(zip(record.ids, record.paths))
        stored_files.update(zip(record.paths, record.identities))
    # a file under a stored path must be the one stored, never skipped as done when it is not
    # (they are left out, the others extracted; the extraction then raises IdentityConflict)
    conflicts = identity.conflicts(((p, job.key(p)) for p in job.paths), stored_files)
    if conflicts:
        refused = {c[0] for c in conflicts}
        log.warning("%d files differ from the ones stored under their names in %s: extracting the others",
                    len(refused), out)
        job.paths = [p for p in job.paths if p not in refused]
    # ids unique by construction, also against the images stored before (images.image_ids)
    job.ids = images.image_ids(job.paths, job.root, taken=stored_ids)
    todo = [(p, i) for p, i in zip(job.paths, job.ids) if job.key(p) not in done_paths]
    skipped_existing = len(job.paths) - len(todo)
    if skipped_existing:
        log.info("%d of %d images are already extracted; %d to go", skipped_existing, len(job.paths), len(todo))
    log.info("extracting %d images with %s (%s, %d views, weights %s) into %s", len(todo), job.config.net,
             job.config.pooling, len(job.config.views), job.attrs["weights_source"], out)
    bar = job.progress(total=len(todo), desc="extract", unit="img")
    try:
        with _keeping_finished(writer, kept):
            new = _write_shards(job, writer, todo, done_paths=done_paths, bar=bar)
    finally:
        bar.close()
    _refuse_an_empty_store(job, writer, previous)
    n_rows = _merge(job, writer, previous=previous, kept=kept)
    with store.FeatureStore(out) as s:
        errors = s.errors()
    result = ExtractResult(out, n_rows, new, errors, dict(job.report), time.monotonic() - job.started,
                           skipped_existing)
    log.debug("%s: %d images (%d new), %d unusable inputs, in %.1f s", out, n_rows, new, len(errors), result.seconds)
    if conflicts:
        raise IdentityConflict(out, conflicts, result)
    return result


def random_weights_advice(diff: dict, source: str, have_backend=None, want_backend=None) -> str | None:
    """Why ``random:SEED`` weights hash differently where only their hash differs: each Keras
    backend draws them with its own generator. None for any other difference."""
    if set(diff) != {"weights_sha256"} or not str(source).startswith("random"):
        return None
    backends = f" (made on {have_backend}, now on {want_backend})" if have_backend and want_backend and \
        str(have_backend) != str(want_backend) else ""
    return (f"{source} weights are drawn by each Keras backend's own random generator: the same seed gives other "
            f"weights on another backend{backends}. Use the backend it was made with (--backend), or another --out.")


def _done_in_store(job: _Extraction) -> tuple[str | None, set, dict, dict]:
    """(the existing store, or None; the paths it holds, images and errors; its ids, each with
    its path; its images' file identities by path); a store made with another configuration is
    a StoreConfigMismatch. Clears the temporaries a crash left."""
    previous = None
    done_paths, stored_ids, stored_files = set(), {}, {}
    if os.path.exists(job.out):
        with store.FeatureStore(job.out, check_labels=False) as existing:  # --labels may repair them
            diff = config_differences(existing.attrs, job.attrs)
            if diff:
                raise StoreConfigMismatch(job.out, diff, advice=random_weights_advice(
                    diff, job.attrs["weights_source"], existing.attrs.get("backend"), job.attrs.get("backend")))
            done_paths = set(existing.paths.tolist())
            done_paths.update(e["path"] for e in existing.errors())
            stored_ids = dict(zip(existing.ids.tolist(), existing.paths.tolist()))
            stored_files = existing.identities()
            if not job.dataset_given and existing.attrs.get("dataset"):
                job.attrs["dataset"] = existing.attrs["dataset"]
        previous = job.out
    if not job.lock.read_only:
        remove_stale_temporaries(job.out)
    return previous, done_paths, stored_ids, stored_files


def _refuse_an_empty_store(job: _Extraction, writer: ShardWriter, previous: str | None):
    """Raise :class:`NoUsableImages` (listing every input and why) rather than write a store
    without one image; the partial folder, which holds only those reasons, goes."""
    if previous is not None:
        return
    records = writer.read_shards()
    if any(record.ids for record in records):
        return
    errors = sorted((e for record in records for e in record.errors), key=lambda e: e["path"])
    writer.remove()
    raise NoUsableImages(job.root, errors)


#: Why an image whose features do not fit the store's float16 is listed instead of stored.
OVERFLOW_REASON = ("its features exceed float16's range (65504), the store's type: are the backbone's "
                   "weights an ImageNet network's?")


def _write_shards(job: _Extraction, writer: ShardWriter, todo: list, *, done_paths: set, bar) -> int:
    """Record the unusable inputs not yet recorded, then extract ``todo`` through the runner into
    ``writer``'s shards; the number of images extracted."""
    for path, reason in job.skipped:
        key = job.key(path)
        if key not in done_paths:
            writer.add_error(os.path.splitext(os.path.basename(path))[0], key, reason)
    new = n_errors = 0
    for (path, image_id), result in job.runner.map(todo):
        if isinstance(result, ImageDecodeError):
            writer.add_error(image_id, job.key(path), result.reason)
            n_errors += 1
            log.debug("skipped %s: %s", path, result.reason)
        elif not np.isfinite(result[1]).all():  # the store would refuse to read it back
            writer.add_error(image_id, job.key(path), OVERFLOW_REASON)
            n_errors += 1
            log.warning("skipped %s: %s", path, OVERFLOW_REASON)
        else:
            facts, features = result
            writer.add(image_id, job.key(path), facts.size, features, facts.identity)
            new += 1
        bar.update(1)
        postfix = {**job.runner.postfix(), **({"errors": n_errors} if n_errors else {})}
        if postfix:
            bar.set_postfix(postfix, refresh=False)
    writer.flush()
    return new


@contextlib.contextmanager
def _keeping_finished(writer: ShardWriter, kept: str):
    """Whatever stops the extraction, the finished shards stay for the next run to resume from; a
    full disk or a folder that cannot be written is a WriteError saying so (``kept``)."""
    try:
        yield
    except NoSpace as exc:
        # checked before HDF5 wrote anything: the open shard is intact and its completion fits
        # in the margin kept free
        at_risk, dropped = writer.open_images, ""
        try:
            writer.flush()
        except WriteError:  # the open shard was dropped; the earlier ones are kept
            dropped = _dropped(at_risk)
        raise WriteError(exc.filename or writer.dir, describe_os_error(exc), kept + dropped) from exc
    except WriteError as exc:
        dropped = _dropped(writer.discard())  # the disk is full or gone: completing the open shard would fail too
        raise WriteError(exc.path, exc.reason, kept + dropped) from exc
    except Exception as exc:
        if not is_write_failure(exc):
            writer.flush()
            raise
        dropped = _dropped(writer.discard())
        raise WriteError(getattr(exc, "filename", None) or writer.dir, describe_os_error(exc), kept + dropped) from exc
    except BaseException:
        # Ctrl-C, SIGTERM or any failure: keep what is finished; the next run resumes from here.
        writer.flush()
        raise


def _dropped(images: int) -> str:
    """What a message adds when the disk filled inside HDF5 and the open shard was dropped."""
    if not images:
        return ""
    one = images == 1
    return (f" (the {images} image{'' if one else 's'} of the unfinished checkpoint could not be kept: "
            f"the next run extracts {'it' if one else 'them'} again)")


def _merge(job: _Extraction, writer: ShardWriter, *, previous: str | None, kept: str) -> int:
    """Merge the shards and ``previous`` with the labels into the store (only relabel it when
    nothing is new); its number of rows."""
    labelled = _with_report(job.label_fn, job.attrs, job.report)
    try:
        if writer.shard_paths() or previous is None:
            n_rows, _ = finalize_store(job.out, writer.dir, job.attrs, labelled, previous=previous,
                                             progress=job.progress)
        else:  # nothing new: only the labels may have changed
            writer.remove()
            label_attrs = ("labels_file", "test_list", "val_fraction", "test_fraction", "seed",
                           "labels_without_images", "dataset")
            n_rows = relabel_store(job.out, labelled, job.attrs, label_attrs)
    except WriteError:
        raise
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        raise WriteError(getattr(exc, "filename", None) or job.out, describe_os_error(exc), kept) from exc
    return n_rows


def _with_report(label_fn, attrs, report):
    def fn(ids):
        mos, votes, split = label_fn(ids)
        attrs["labels_without_images"] = int(report.get("labels_without_images", 0))
        return mos, votes, split

    return fn


@dataclasses.dataclass
class _LabelSources:
    """Where an extraction's labels and test split come from: the files given, else the ones the
    store records. Labels already in the store stay unless new ones are given: a recorded file
    that no longer exists is replaced by what the store holds (its labelled rows, its test split)."""

    labels: object  # a labels file, a mlsp.store.labels.Labels (the store's own), or None
    test_list: object  # a test list file, a list of test ids (the store's own), or None
    labels_file: str  # what the store records as its sources ("" for none)
    test_list_file: str

    @classmethod
    def of(cls, out: str, labels: str | None, test_list: str | None) -> "_LabelSources":
        given = cls(labels, test_list, os.path.abspath(labels) if labels else "",
                    os.path.abspath(test_list) if test_list else "")
        if not os.path.exists(out) or (labels is not None and test_list is not None):
            return given
        with store.FeatureStore(out, check_labels=False) as s:  # new labels may be what repairs them
            if labels is None and s.attrs.get("labels_file"):
                given.labels = given.labels_file = s.attrs["labels_file"]
                if not os.path.isfile(given.labels):
                    given.labels = _kept_labels(s)
            if test_list is None and s.attrs.get("test_list"):
                given.test_list = given.test_list_file = s.attrs["test_list"]
                if not os.path.isfile(given.test_list):
                    given.test_list = s.ids[s.split == "test"].tolist()
        for what, value, recorded, asked in (("labels file", given.labels, given.labels_file, labels),
                                             ("test list", given.test_list, given.test_list_file, test_list)):
            if asked is not None or not recorded:
                continue
            if isinstance(value, str):
                log.info("using the %s recorded in %s: %s", what, out, value)
            else:
                log.warning("%s was made with the %s %s, which no longer exists: the store keeps its labels and "
                            "test split (images added now stay unlabeled; give --labels to label them)",
                            out, what, recorded)
        return given


def _previous_splits(out: str, drawn: dict) -> dict | None:
    """The splits (id -> split) of the store at ``out``, where its splits were drawn as now
    (``drawn``: the same seed, fractions and test list), so that a grown store keeps every image's
    split (:func:`mlsp.store.labels.assign_splits`); None for a new store or another draw."""
    if not os.path.exists(out):
        return None
    with store.FeatureStore(out, check_labels=False) as s:
        if any(s.attrs.get(k) != v for k, v in drawn.items()):
            return None
        return dict(zip(s.ids.tolist(), (str(v) for v in s.split)))


def _kept_labels(s: store.FeatureStore):
    """The labels a store holds, as :class:`mlsp.store.labels.Labels` (its labelled rows)."""
    from ..store.labels import Labels

    rows = np.flatnonzero(np.isfinite(s.mos))
    return Labels(s.ids[rows].tolist(), s.mos[rows], s.votes[rows], source=s.path)


def default_batch_views() -> int:
    """Views per model call when not asked: 64 on a GPU (the 8 views of one photo underfeed it),
    0 on a CPU, i.e. one image per call (measured no faster in bigger batches on 2 cores)."""
    return 64 if backend.devices()[0] != "cpu" else 0
