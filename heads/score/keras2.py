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

import logging
import os
from typing import Mapping, Sequence

import numpy as np

from mlsp.errors import ConfigError

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


def _attr_names(group, key: str) -> list[str]:
    """A Keras 2 list attribute; Keras splits one over 64 KB into ``key0``, ``key1``, ..."""
    if key in group.attrs:
        values = list(group.attrs[key])
    else:
        values, k = [], 0
        while f"{key}{k}" in group.attrs:
            values += list(group.attrs[f"{key}{k}"])
            k += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_weights(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {tensor: array}}`` of a Keras 2 weights file (or of a whole Keras 2 model file,
    whose weights are under ``model_weights``); layers without weights are left out."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"{path}: not a readable HDF5 file ({exc})") from None
    with handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        layers = _attr_names(root, "layer_names")
        if not layers:
            raise ConfigError(f"{path}: not a Keras 2 weights file (no layer_names attribute)")
        out: dict[str, dict[str, np.ndarray]] = {}
        for layer in layers:
            if layer not in root:
                raise ConfigError(f"{path}: layer {layer} is listed in layer_names but has no group")
            for name in _attr_names(root[layer], "weight_names"):
                tensor = name.rsplit("/", 1)[-1].split(":", 1)[0]
                if tensor in out.get(layer, {}):
                    raise ConfigError(f"{path}: layer {layer} holds two tensors named {tensor}")
                if name not in root[layer]:
                    raise ConfigError(f"{path}: {layer}/{name} is listed in weight_names but not stored")
                out.setdefault(layer, {})[tensor] = np.asarray(root[layer][name][()])
    return out


def infer_options(head: str, weights: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """The head's options (``width``, ``kernels``) read off the file's shapes (what is not there
    is left to the head's defaults, and the import then names it missing)."""
    options = {}
    fc0 = weights.get("head_fc0", {}).get("kernel")
    if fc0 is not None and fc0.ndim == 2:
        options["width"] = int(fc0.shape[1])
    conv = weights.get("branch_1x1_conv", {}).get("kernel")
    if head == "pool3fc" and conv is not None and conv.ndim == 4:
        options["kernels"] = int(conv.shape[-1])
    return options


def _place(model, head: str, weights: Mapping[str, Mapping[str, np.ndarray]]) -> list[str]:
    """Set the model's weights from ``weights``; returns the problems found (nothing set if any)."""
    ours_to_theirs = {ours: theirs for theirs, ours in LAYER_NAMES[head].items()}
    problems, used, plan = [], set(), []
    for layer in model.layers:
        if not layer.weights:
            continue
        theirs = ours_to_theirs.get(layer.name)
        if theirs is None:
            raise ConfigError(f"head {head!r}: layer {layer.name} has no counterpart in the authors' layers")
        values = []
        for variable in layer.weights:
            tensor = variable.name.rsplit("/", 1)[-1]
            array = weights.get(theirs, {}).get(tensor)
            if array is None:
                problems.append(f"missing {theirs}/{tensor} {tuple(variable.shape)}")
                continue
            used.add((theirs, tensor))
            if tuple(array.shape) != tuple(variable.shape):
                problems.append(f"{theirs}/{tensor} has shape {tuple(array.shape)}, expected {tuple(variable.shape)}")
            values.append(array)
        plan.append((layer, values))
    extra = [f"{layer}/{tensor}" for layer, tensors in weights.items() for tensor in tensors
             if (layer, tensor) not in used]
    if extra:
        problems.append("extra " + ", ".join(extra))
    if not problems:
        for layer, values in plan:
            layer.set_weights(values)
    return problems


def import_head(path: str, head: str, block_channels: Sequence[int], pooling: str, *,
                options: Mapping | None = None, weights: Mapping | None = None):
    """mlsp's ``head`` for features of ``block_channels`` and ``pooling``, with the tensors of the
    Keras 2 file ``path`` (or ``weights``, as :func:`read_weights` returns them). ``options``:
    the head's options where they must be these (default: read off the file). Returns
    ``(model, options)``."""
    from ..models import build_head

    if head not in LAYER_NAMES:
        raise ConfigError(f"head {head!r} cannot be imported from a Keras 2 file; "
                          f"importable: {', '.join(LAYER_NAMES)}")
    weights = read_weights(path) if weights is None else weights
    chosen = {**infer_options(head, weights), **dict(options or {})}
    model = build_head(head, block_channels, pooling=pooling, **chosen)
    problems = _place(model, head, weights)
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
    run = Run.create(out, {
        "store": record, "head": head, "head_options": options, "target": DEFAULT_TARGET,
        "imported": {"file": os.path.abspath(path), "sha256": file_sha256(path), "format": FORMAT},
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
    })
    run.save_model(model)
    run.save_config(status="finished")
    log.info("%s: imported into the run %s", path, out)
    return out
