"""Keras 2 HDF5 weight files of the authors' heads, imported into mlsp's own heads.

The authors' released models (subpic/ava-mlsp) and heads trained with their notebooks are
Keras 2 ``save_weights`` files: the root's ``layer_names`` attribute lists the layers, each
layer's group lists its tensors in ``weight_names`` (``head_fc0/kernel:0``, ...). Their layers are
named by kutils: ``fc_layers(name='head', batch_norm=2)`` gives ``head_fc0..2``, ``head_bn0..2``
and ``head_out``; ``inception_block(size=1024)`` gives the ``*_conv`` / ``*_bn`` pairs below.

mlsp's ``single3fc`` and ``pool3fc`` (:mod:`heads.models`) compute what those layers compute:
Dense with its ReLU, then batch norm (Keras' defaults, the same in Keras 2 and 3: epsilon 1e-3),
then dropout (inactive when predicting), a linear last Dense without batch norm; convolutions
without bias and batch norms without scale, 'same' padding, the 3x3 average pool counting only
the pixels inside the image. So importing is placing tensors: every tensor by its layer's name
and its own (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``),
its shape checked, each used exactly once. A file with a missing, extra or misshapen tensor is
refused, naming them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Mapping, Sequence

import numpy as np

from mlsp.runtime.atomic import describe_os_error
from mlsp.errors import ConfigError, WriteError

from .h5_tensors import check_declared, check_total, member, name_list, read_checked

log = logging.getLogger(__name__)

FORMAT = "keras2-h5"


def _fc_layers(prefix: str = "head") -> dict:
    """kutils ``fc_layers(name=prefix, batch_norm=2)`` -> mlsp's :func:`heads.models.three_fc`."""
    names = {f"{prefix}_out": "out"}
    for i in range(3):
        names[f"{prefix}_fc{i}"] = f"fc{i}"
        names[f"{prefix}_bn{i}"] = f"bn{i}"
    return names


def _inception_block() -> dict:
    """kutils ``inception_block`` -> mlsp's :func:`heads.models.reduced_inception`."""
    pairs = {"branch_1x1": "branch1x1", "3x3_1x1": "branch3x3_1x1", "3x3_1x3": "branch3x3_1x3",
             "3x3_3x1": "branch3x3_3x1", "branch_pool": "branch_pool"}
    return {f"{theirs}_{kind}": f"{ours}_{kind}" for theirs, ours in pairs.items() for kind in ("conv", "bn")}


#: The heads a Keras 2 file can be imported into: the authors' layer name -> mlsp's.
LAYER_NAMES: dict[str, dict[str, str]] = {
    "single3fc": _fc_layers(),
    "pool3fc": {**_inception_block(), **_fc_layers()},
}


def _tensors(path: str, handle) -> dict:
    """``{layer: {tensor: dataset}}`` of an open Keras 2 file (or of a whole Keras 2 model file,
    whose weights are under ``model_weights``), every header checked (:mod:`heads.score.h5_tensors`);
    nothing is read yet. Layers without weights are left out."""
    import h5py

    root = handle
    if handle.get("model_weights", getlink=True) is not None:
        root = member(path, handle, "model_weights", "model_weights")
        if not isinstance(root, h5py.Group):
            raise ConfigError(f"{path}: model_weights is not a group of layers")
    layers = name_list(path, root, "layer_names", "the file")
    if not layers:
        raise ConfigError(f"{path}: not a Keras 2 weights file (no layer_names attribute)")
    out: dict[str, dict] = {}
    for layer in layers:
        group = member(path, root, layer, layer)
        if not isinstance(group, h5py.Group):
            raise ConfigError(f"{path}: layer {layer} is listed in layer_names but has no group")
        for name in name_list(path, group, "weight_names", f"layer {layer}"):
            tensor = name.rsplit("/", 1)[-1].split(":", 1)[0]
            if tensor in out.get(layer, {}):
                raise ConfigError(f"{path}: layer {layer} holds two tensors named {tensor}")
            dataset = member(path, group, name, f"{layer}/{name}")
            if dataset is None:
                raise ConfigError(f"{path}: {layer}/{name} is listed in weight_names but not stored")
            check_declared(path, f"{layer}/{name}", dataset)
            out.setdefault(layer, {})[tensor] = dataset
    check_total(path, [d for tensors in out.values() for d in tensors.values()])
    return out


@contextlib.contextmanager
def opened_weights(path: str):
    """The file's tensors as :func:`_tensors` gives them, while the file is open."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"{path}: not a readable HDF5 file ({exc})") from None
    with handle:
        yield _tensors(path, handle)


def read_weights(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {tensor: array}}`` of a Keras 2 weights file, every tensor checked
    (:mod:`heads.score.h5_tensors`); layers without weights are left out."""
    with opened_weights(path) as tensors:
        return {layer: {t: read_checked(path, f"{layer}/{t}", d, t) for t, d in ts.items()}
                for layer, ts in tensors.items()}


def infer_options(head: str, weights: Mapping[str, Mapping], path: str = "the file") -> dict:
    """The head's options (``width``, ``kernels``) read off the file's shapes (what is not there
    is left to the head's defaults, and the import then names it missing). A size the file's
    tensors together could not hold (the head grows with its square) is refused before any
    head is built."""
    options = {}
    fc0 = weights.get("head_fc0", {}).get("kernel")
    if fc0 is not None and fc0.ndim == 2:
        options["width"] = int(fc0.shape[1])
    conv = weights.get("branch_1x1_conv", {}).get("kernel")
    if head == "pool3fc" and conv is not None and conv.ndim == 4:
        options["kernels"] = int(conv.shape[-1])
    total = sum(int(np.prod(a.shape, dtype=np.float64)) for tensors in weights.values() for a in tensors.values())
    least = {"width": ("head_fc0/kernel", lambda n: n * (n // 2)),
             "kernels": ("branch_1x1_conv/kernel", lambda n: 3 * n * (n // 2))}
    for name, value in options.items():
        tensor, size = least[name]
        if size(value) > total:
            raise ConfigError(f"{path}: {tensor} declares a {head} of {name} {value:,}, which needs more weights "
                              f"than the file's {total:,}")
    return options


def _place(model, head: str, weights: Mapping[str, Mapping], path: str) -> list[str]:
    """Set the model's weights from ``weights`` (datasets or arrays); returns the problems found
    (nothing set if any). Shapes are compared first: a tensor is read only when every shape is
    the expected one, and its values are checked (:func:`heads.score.h5_tensors.read_checked`)."""
    ours_to_theirs = {ours: theirs for theirs, ours in LAYER_NAMES[head].items()}
    problems, used, plan = [], set(), []
    for layer in model.layers:
        if not layer.weights:
            continue
        theirs = ours_to_theirs.get(layer.name)
        if theirs is None:
            raise ConfigError(f"head {head!r}: layer {layer.name} has no counterpart in the authors' layers")
        sources = []
        for variable in layer.weights:
            tensor = variable.name.rsplit("/", 1)[-1]
            source = weights.get(theirs, {}).get(tensor)
            if source is None:
                problems.append(f"missing {theirs}/{tensor} {tuple(variable.shape)}")
                continue
            used.add((theirs, tensor))
            if tuple(source.shape) != tuple(variable.shape):
                problems.append(f"{theirs}/{tensor} has shape {tuple(source.shape)}, expected {tuple(variable.shape)}")
            sources.append((f"{theirs}/{tensor}", source, tensor))
        plan.append((layer, sources))
    extra = [f"{layer}/{tensor}" for layer, tensors in weights.items() for tensor in tensors
             if (layer, tensor) not in used]
    if extra:
        problems.append("extra " + ", ".join(extra))
    if not problems:
        for layer, sources in plan:
            layer.set_weights([read_checked(path, *source) for source in sources])
    return problems


def import_head(path: str, head: str, block_channels: Sequence[int], pooling: str, *,
                options: Mapping | None = None, weights: Mapping | None = None):
    """mlsp's ``head`` for features of ``block_channels`` and ``pooling``, with the tensors of the
    Keras 2 file ``path`` (or ``weights``, as :func:`read_weights` returns them). ``options``:
    the head's options where they must be these (default: read off the file). Returns
    ``(model, options)``."""
    if head not in LAYER_NAMES:
        raise ConfigError(f"head {head!r} cannot be imported from a Keras 2 file; "
                          f"importable: {', '.join(LAYER_NAMES)}")
    if weights is not None:
        return _import(path, head, block_channels, pooling, options, weights)
    with opened_weights(path) as tensors:
        return _import(path, head, block_channels, pooling, options, tensors)


def _import(path: str, head: str, block_channels: Sequence[int], pooling: str, options, weights):
    from ..models import build_head

    chosen = {**infer_options(head, weights, path), **dict(options or {})}
    model = build_head(head, block_channels, pooling=pooling, **chosen)
    problems = _place(model, head, weights, path)
    if problems:
        raise ConfigError(f"{path}: not the authors' {head} for {sum(block_channels):,} channels: "
                          + "; ".join(problems))
    log.info("%s: imported %d tensors into %s (%s, %d parameters)", path,
             sum(len(t) for t in weights.values()), head, chosen, model.count_params())
    return model, chosen


def import_run(path: str, head: str, store_path: str, out: str | None = None) -> str:
    """``mlsp import-weights``: a run folder (:mod:`heads.run`) holding the head of the Keras 2
    file ``path`` for the features of ``store_path`` (which names the feature configuration the
    head takes: net, pooling, views, backbone weights). Scoring, evaluation and export use it as
    a trained run. Returns the run folder."""
    import datetime

    from mlsp.runtime.files import file_sha256
    from mlsp.store.read import FeatureStore

    from ..run import Run, default_run_dir, store_record
    from ..targets import DEFAULT_TARGET
    from ..train.loop import versions

    out = out or default_run_dir(store_path, head)
    Run.refuse_existing(out)
    with FeatureStore(store_path) as store:
        record = store_record(store_path, store)
    model, options = import_head(path, head, record["block_channels"], record["pooling"])
    run = Run(out, {
        "store": record, "head": head, "head_options": options, "target": DEFAULT_TARGET,
        "imported": {"file": os.path.abspath(path), "sha256": file_sha256(path), "format": FORMAT},
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "finished",
    })
    _write_run(run, model)
    log.info("%s: imported into the run %s", path, out)
    return out


def _write_run(run, model):
    """The model, then ``config.json``, which makes the folder a run: a kill or a full disk
    before the end leaves no run (never one ``running``), and the same import then writes it."""
    from mlsp.runtime.atomic import remove_stale_temporaries

    from ..run import CONFIG_FILE

    nothing = "no run was written; run the same import again once the folder can be written"
    try:
        os.makedirs(run.path, exist_ok=True)
    except OSError as exc:
        raise WriteError(run.path, describe_os_error(exc), "no run was written") from exc
    for name in (run.model_path, run.config_path):
        remove_stale_temporaries(name)  # of an import killed while writing
    run.save_model(model, kept=nothing)
    try:
        run.save_config()
    except WriteError as exc:
        os.remove(run.model_path)
        raise WriteError(os.path.join(run.path, CONFIG_FILE), exc.reason, nothing) from exc
