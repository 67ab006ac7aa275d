"""The one validator of HDF5 weight files: what a file declares is checked before anything is
read from it, and what is read is checked before it is believed.

A weight file is a user's or a download's, and may be damaged or hostile. Its sha256 names its
own bytes only, so every object is reached through hard links alone: a soft link (dangling or
not), a link into another file, a virtual dataset or one whose data lies in external raw files
could make the tensors come from another file than the one recorded, and are refused. A tensor
is a dataset of floating-point numbers (an integer, bool, complex, string or compound one is
refused) whose declared size fits in the bytes the file really stores for it (a tiny file
declaring 10^12 elements is refused from its header, before any allocation); its values, read
only once its shape is the expected one, are finite, and a batch norm's moving variance is not
negative. List attributes (``layer_names``, ``weight_names``) are 1-D arrays of names, never a
scalar or a plain string (which would be taken apart into its characters).

Each refusal is a :class:`~mlsp.errors.ConfigError` of one line naming the file and the tensor.
"""

from __future__ import annotations

import numpy as np

from mlsp.errors import ConfigError

#: The most a compressed dataset may expand (deflate's limit is about 1032:1): a tensor declaring
#: more bytes than this times what the file stores for it is refused before it is read.
MAX_EXPANSION = 1032
#: Declared elements of all tensors of one file, at most (8x the authors' largest head, 64M).
MAX_ELEMENTS = 512_000_000
#: Tensors whose values may not be negative.
NON_NEGATIVE = ("moving_variance",)


def _link_problem(link, where: str) -> str | None:
    import h5py

    if isinstance(link, h5py.SoftLink):
        return f"{where} is a soft link (to {link.path}); weight files must hold their tensors themselves"
    if isinstance(link, h5py.ExternalLink):
        return (f"{where} is a link into another file ({link.filename}:{link.path}); "
                "weight files must hold their tensors themselves")
    return None


def member(path: str, group, name: str, where: str):
    """``group[name]`` reached through hard links only (``name`` may hold ``/``); None when absent."""
    import h5py

    node = group
    for part in (p for p in name.split("/") if p):
        if not isinstance(node, h5py.Group):
            return None
        link = node.get(part, getlink=True)
        if link is None:
            return None
        problem = _link_problem(link, where)
        if problem:
            raise ConfigError(f"{path}: {problem}")
        node = node[part]
    return node


def name_list(path: str, group, key: str, where: str) -> list[str]:
    """A list attribute as names; Keras splits one over 64 KB into ``key0``, ``key1``, ..."""
    try:
        if key in group.attrs:
            parts = [group.attrs[key]]
        else:
            parts, k = [], 0
            while f"{key}{k}" in group.attrs:
                parts.append(group.attrs[f"{key}{k}"])
                k += 1
    except (OSError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: the attribute {key} of {where} cannot be read ({exc})") from None
    names = []
    for value in parts:  # Keras 2 writes an empty list as an empty float array
        if not (isinstance(value, np.ndarray) and value.ndim == 1 and (value.dtype.kind in "SUO" or not value.size)):
            raise ConfigError(f"{path}: the attribute {key} of {where} is not a list of names "
                              f"(a {getattr(value, 'ndim', 0)}-d {type(value).__name__})")
        for item in value:
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf8")
                except UnicodeDecodeError:
                    raise ConfigError(f"{path}: the attribute {key} of {where} holds a name that is not "
                                      "UTF-8") from None
            if not isinstance(item, str):
                raise ConfigError(f"{path}: the attribute {key} of {where} holds a {type(item).__name__}, not a name")
            names.append(item)
    return names


def check_declared(path: str, where: str, dataset) -> None:
    """A dataset's header: a float tensor whose data is in this file and fits in what it stores."""
    import h5py

    if not isinstance(dataset, h5py.Dataset):
        raise ConfigError(f"{path}: {where} is a {type(dataset).__name__.lower()}, not a tensor")
    kind = dataset.dtype.kind
    if kind in "SUO" or h5py.check_string_dtype(dataset.dtype) is not None:
        raise ConfigError(f"{path}: {where} is a string dataset, not a tensor of numbers")
    if kind != "f":
        what = {"i": "an integer", "u": "an integer", "b": "a bool", "c": "a complex"}.get(kind, "a non-numeric")
        raise ConfigError(f"{path}: {where} is {what} tensor ({dataset.dtype}); weights are floating-point numbers")
    if dataset.shape is None:
        raise ConfigError(f"{path}: {where} is an empty dataset (no shape)")
    if dataset.is_virtual or dataset.external:
        raise ConfigError(f"{path}: {where} takes its data from other files; weight files must hold their tensors "
                          "themselves")
    stored = dataset.id.get_storage_size()
    filtered = dataset.id.get_create_plist().get_nfilters() > 0
    if dataset.nbytes > stored * (MAX_EXPANSION if filtered else 1):
        raise ConfigError(f"{path}: {where} declares {dataset.size:,} elements {dataset.shape} but the file stores "
                          f"{stored:,} bytes of them (damaged or forged)")


def check_total(path: str, datasets) -> None:
    """All tensors together stay within :data:`MAX_ELEMENTS` (checked on their headers)."""
    total = sum(int(np.prod(d.shape, dtype=np.float64)) for d in datasets)
    if total > MAX_ELEMENTS:
        raise ConfigError(f"{path}: declares {total:,} weights, more than any head mlsp builds ({MAX_ELEMENTS:,})")


def read_checked(path: str, where: str, source, tensor: str) -> np.ndarray:
    """The values of ``source`` (a dataset checked by :func:`check_declared`, or an array),
    refused when not finite, or negative where they may not be."""
    try:
        array = np.asarray(source[()])
    except (OSError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: {where} cannot be read ({reason})") from None
    if array.dtype.kind != "f":
        raise ConfigError(f"{path}: {where} is a {array.dtype} tensor; weights are floating-point numbers")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ConfigError(f"{path}: {where} holds {int(bad.sum()):,} NaN or infinite values")
    if tensor in NON_NEGATIVE and (array < 0).any():
        raise ConfigError(f"{path}: {where} holds {int((array < 0).sum()):,} negative values (a {tensor} is not "
                          "negative)")
    return array
