"""The Python API: the CLI's commands as functions, with the same names and defaults.

>>> from mlsp import api
>>> store = api.extract("photos/", net="irv2", wide=True, labels="AVA.txt").store
>>> run = api.train(store, head="pool3fc").run_dir
>>> api.evaluate(run)["test"]["srcc"]
>>> api.score(run, images="new_photos/", out="scores.csv")

Every function logs through :mod:`logging` and shows no progress unless ``progress=True`` (a
bar on stderr in a terminal, a log line every few seconds elsewhere) or a progress factory
(:mod:`mlsp.progress`). Errors are :class:`mlsp.errors.MLSPError` subclasses.

This facade is the top floor: the one module of :mod:`mlsp` that imports :mod:`heads` (stage 2
is built on stage 1, never the other way round).
"""

from __future__ import annotations

from typing import Sequence

from .progress import resolve as resolve_progress


def backbones(names: Sequence[str] | None = None, *, flops_at: tuple | None = None) -> list[dict]:
    """``mlsp backbones``: one dict per registered backbone (or per name in ``names``): blocks,
    channels, minimum input side, preprocessing, weights file, and the forward pass's GFLOPs at
    ``flops_at`` = (height, width) (default :data:`mlsp.backbones.FLOPS_SIZE`; ``False``: not counted)."""
    from . import backbones as registry

    if flops_at is None:
        flops_at = registry.FLOPS_SIZE
    specs = [registry.get_backbone(n) for n in names] if names else list(registry.BACKBONES.values())
    return [registry.describe(spec, flops_at or None) for spec in specs]


def ray_cluster(address: str | None = None, cpus_per_worker: float | None = None,
                gpus_per_worker: float | None = None):
    """A :class:`mlsp.cluster.Cluster` for ``--ray ADDRESS`` (a context manager), or, without an
    address, a context giving ``None``: Ray is imported only when asked for."""
    if not address:
        import contextlib

        return contextlib.nullcontext(None)
    from .cluster import Cluster

    return Cluster(address, cpus_per_worker, gpus_per_worker)


def info() -> dict:
    """``mlsp info``: the Keras backend and its version, the devices it sees, the precision
    ``--precision auto`` would choose and why, and where ImageNet weights are cached (and which
    of the registered backbones' weights are already there)."""
    import os

    import keras

    from . import backend
    from .backbones import BACKBONES, keras_cache_dir
    from .extract import resolve_precision

    described = backend.describe()
    precision, why = resolve_precision("auto")
    cache = keras_cache_dir()
    return {
        "backend": described["backend"],
        "backend_version": described["backend_version"],
        "keras": keras.__version__,
        "devices": backend.devices(),
        "precision_auto": precision,
        "precision_auto_why": why,
        "weights_cache": cache,
        "weights_cached": {name: os.path.isfile(os.path.join(cache, spec.weights_file))
                           for name, spec in sorted(BACKBONES.items())},
    }


def extract(images: str | Sequence[str], out: str | None = None, *, net: str = "irv2", wide: bool = False,
            augment: bool = True, weights: str = "imagenet", labels: str | None = None,
            test_list: str | None = None, val_fraction: float = 0.05, seed: int = 0, max_side: int = 1024,
            precision: str = "float32", dataset: str | None = None, workers: int = 2,
            checkpoint_every: int = 64, batch_views: int | None = None, batch_window: int = 64,
            progress: bool = False, ray: str | None = None,
            ray_cpus_per_worker: float | None = None, ray_gpus_per_worker: float | None = None):
    """``mlsp extract``: features of a folder (recursively) or a list of files into a store.
    ``ray``: an address as for ``--ray`` (``auto``, ``ray://HOST:PORT``, ``local:N``) spreads the
    images over a Ray cluster. Returns :class:`mlsp.extract.ExtractResult` (``.store``,
    ``.images``, ``.errors``, ...)."""
    from .extract import ExtractConfig, extract as run, resolve_precision

    config = ExtractConfig(net=net, pooling="wide" if wide else "narrow", augment=augment, weights=weights,
                           max_side=max_side, precision=resolve_precision(precision)[0])
    with ray_cluster(ray, ray_cpus_per_worker, ray_gpus_per_worker) as cluster:
        return run(images, config, out, labels=labels, test_list=test_list, val_fraction=val_fraction, seed=seed,
                   dataset=dataset, workers=workers, flush_images=checkpoint_every, batch_views=batch_views,
                   batch_window=batch_window,
                   progress=resolve_progress(progress),
                   runner=cluster.runner(config) if cluster else None)


def train(store: str | None = None, *, head: str, out: str | None = None, width: int | None = None,
          kernels: int | None = None, progress=False, **options):
    """``mlsp train``: ``options`` are :class:`heads.training.TrainConfig` fields (target, epochs,
    lr, min_lr, lr_epochs, patience, batch_size, steps_per_epoch, seed, memory_budget, workers);
    an unknown one is an error; lr, min_lr and steps_per_epoch not given are chosen from the
    store's size (:func:`heads.schedule.resolve_schedule`). Returns :class:`heads.training.TrainResult`."""
    from heads.training import TrainConfig, train as run

    head_options = {k: v for k, v in (("width", width), ("kernels", kernels)) if v is not None}
    config = TrainConfig.from_dict({"head": head, "store": store, "out": out, "head_options": head_options,
                                    **options})
    return run(config, progress=resolve_progress(progress))


def evaluate(run_dir: str, store: str | None = None, *, out: str | None = None) -> dict:
    """``mlsp evaluate``: SRCC, PLCC, accuracy, balanced accuracy and n on val and test."""
    from heads.evaluation import evaluate as run

    return run(run_dir, store, out=out)


def score(run_dir: str, *, store: str | None = None, images: str | Sequence[str] | None = None,
          out: str | None = None, weights: str | None = None, precision: str | None = None,
          workers: int = 2, progress: bool = False, allow_unfinished: bool = False, ray: str | None = None,
          ray_cpus_per_worker: float | None = None, ray_gpus_per_worker: float | None = None):
    """``mlsp score``: a pandas DataFrame (id, pred, pred_std[, pred_opinion_std, p1..p10 for a
    run of the distribution target][, mos, split]) for every image of ``store``, or of the image
    files ``images`` (then files that could not be used are in ``frame.attrs["errors"]``).
    ``allow_unfinished``: also an interrupted or diverged run. ``ray`` (with ``images``): score
    on a Ray cluster, as for :func:`extract`."""
    from heads.score import score_images, score_store

    from .errors import ConfigError

    if (store is None) == (images is None):
        raise ConfigError("score() takes either store= or images=")
    if ray and store is not None:
        raise ConfigError("--ray scores image files (--images); a store is scored on this machine")
    if store is not None:
        return score_store(run_dir, store, out, progress=resolve_progress(progress),
                           allow_unfinished=allow_unfinished)
    with ray_cluster(ray, ray_cpus_per_worker, ray_gpus_per_worker) as cluster:
        frame, errors = score_images(run_dir, images, out, weights=weights, precision=precision, workers=workers,
                                     progress=resolve_progress(progress), allow_unfinished=allow_unfinished,
                                     cluster=cluster)
    frame.attrs["errors"] = errors
    return frame


def export(run_dir: str, out: str | None = None, *, weights: str | None = None,
           precision: str | None = None, allow_unfinished: bool = False) -> str:
    """``mlsp export``: one .keras model from image batch to MOS; returns its path.
    ``allow_unfinished``: also an interrupted or diverged run."""
    from heads.export import export as run

    return run(run_dir, out, weights=weights, precision=precision, allow_unfinished=allow_unfinished)
