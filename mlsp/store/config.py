"""A store's configuration: one table of its root attributes, and what is derived from it.

Each attribute of a store's root (``features/README.md``, "Root attributes") is one row of
:data:`ATTRIBUTES`: its name, type, kind and meaning, and where it is used:

- kind ``configuration``: what makes two extractions produce comparable features; a store is
  only ever extended, or scored against, under the same values (:data:`CONFIG_KEYS`);
- ``layout``: the blocks' names and channels; ``derived``: follows from the configuration;
- ``description``: the dataset, its labels and the writer; ``provenance``: where it ran (the
  backend, its version, the device), never compared; ``format``: the format's version.

``forward``: the attribute shapes the traced forward pass (:mod:`mlsp.backbone.forward_cache`'s key);
``scored``: scoring a store warns when it differs from the run's (:mod:`heads.score.scoring`);
``inspected``: ``mlsp inspect`` lists it among the store's details. :func:`to_attrs` writes an
extraction's attributes, :func:`from_attrs` reads the extraction back; features/README.md's list
is this table (``tests/test_store.py`` checks it). A new attribute is one row here, its value in
:func:`to_attrs`, and its line in features/README.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..images import decode as images
from .format import FORMAT_VERSION, pooling_of

KINDS = ("format", "configuration", "layout", "derived", "description", "provenance")


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One row of features/README.md's root attributes (several names share a row)."""

    names: str | tuple
    type: str
    kind: str
    meaning: str
    forward: bool = False
    scored: bool = False
    inspected: bool = True

    def __post_init__(self):
        if isinstance(self.names, str):
            object.__setattr__(self, "names", (self.names,))
        if self.kind not in KINDS:
            raise ValueError(f"{self.names}: kind {self.kind!r} is not one of {KINDS}")


ATTRIBUTES = (
    Attribute('format_version', 'int', 'format',
              str(FORMAT_VERSION),
              inspected=False),
    Attribute('net', 'str', 'configuration',
              "backbone registry name: `iv3`, `irv2` (the paper's) or any other that `mlsp backbones` lists",
              forward=True, inspected=False),
    Attribute('pooling', 'str', 'configuration',
              '`narrow` (global average per block) or `wide` (area resize to 5x5 per block)',
              forward=True, inspected=False),
    Attribute('block_names', 'list of str', 'layout',
              "the tapped layers, in order: Keras layer names; `after:NAME` is the output of the one operation that reads layer NAME (a block output Keras leaves unnamed: ConvNeXt's residual sums, MobileNetV3's last hard-swish)",
              inspected=False),
    Attribute('block_channels', 'list of int', 'layout',
              'channels of each block; sums to C',
              inspected=False),
    Attribute('grid', 'int', 'derived',
              "cells per side of each view's pooled grid: 1 narrow, 5 wide",
              inspected=False),
    Attribute('views', 'list of str', 'configuration',
              'same as `/views`',
              inspected=False),
    Attribute('weights', 'JSON str', 'description',
              '`{"source": "imagenet" | "random:SEED" | file name, "sha256": ...}`, and `"path"` for a file',
              inspected=False),
    Attribute('weights_source', 'str', 'configuration',
              "where the weights came from, as `weights` says: `imagenet`, `random:SEED` or the file's name"),
    Attribute('weights_sha256', 'str', 'configuration',
              'their SHA-256, as `weights` says',
              scored=True),
    Attribute('weights_path', 'str', 'description',
              'for a weights file, where it was when the store was written (empty otherwise); scoring new images looks for the file there first, and the SHA-256 decides. Not part of the configuration',
              inspected=False),
    Attribute('preprocessing', 'str', 'configuration',
              "the backbone's input preprocessing, from the registry: `inception: x / 127.5 - 1 (RGB)` (iv3, irv2, mobilenetv3_large), `efficientnetv2: x / 128 - 1 (RGB)`, `torch imagenet: (x / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225) (RGB)` (convnext_*)",
              scored=True),
    Attribute('crop_fraction', 'float', 'configuration',
              '0.875 with the 8 corner views, 1.0 for `full`',
              scored=True),
    Attribute('max_side', 'int', 'configuration',
              'images whose longer side exceeded this were resized down to it (INTER_AREA) before cropping; 0 = never',
              scored=True),
    Attribute('decoding', 'str', 'configuration',
              'how files became pixels (`mlsp-decode-2`: JPEGs of at least twice `max_side` decoded at reduced size by libjpeg before the exact resize; EXIF orientation for PNG/WebP with alpha; HEIC/HEIF/AVIF). Absent in version-1 stores'),
    Attribute('precision', 'str', 'configuration',
              'compute precision of the backbone: `float32`, `bfloat16` or `float16` (pooling in float32, storage float16)',
              forward=True, scored=True),
    Attribute('dataset', 'str', 'description',
              'dataset name (kept when a store is extended from another folder, unless `--dataset` is given)'),
    Attribute(('labels_file', 'test_list'), 'str', 'description',
              'label sources, when given'),
    Attribute(('val_fraction', 'seed'), 'float, int', 'description',
              'the random train/val split of labelled non-test images'),
    Attribute('test_fraction', 'float', 'description',
              'without a test list, the share of labelled images drawn for `test` by a hash of each id and '
              '`seed` (an image keeps its split when images are added); 0 with a test list or none. Absent '
              'before version 3'),
    Attribute('labels_without_images', 'int', 'description',
              'labelled ids for which no image was found'),
    Attribute(('mlsp_version', 'created'), 'str', 'description',
              'writer version and UTC time'),
    Attribute(('backend', 'backend_version', 'device'), 'str, optional', 'provenance',
              "provenance of the run that last wrote the store: the Keras backend (`tensorflow` or `torch`), its version, and where the backbone ran (`cpu`, `cuda:0 NVIDIA H100 ...`, `/physical_device:GPU:0 ...`); written over a Ray cluster (`--ray`), the first worker's (workers may differ in these). Not part of the configuration; absent in stores written before they were recorded"),
)


def names(**where) -> tuple:
    """The attribute names whose rows match ``where`` (e.g. ``kind="configuration"``), in table order."""
    return tuple(n for a in ATTRIBUTES if all(getattr(a, k) == v for k, v in where.items()) for n in a.names)


CONFIG_KEYS = names(kind="configuration")
LAYOUT_KEYS = names(kind="layout")
FORWARD_KEYS = names(forward=True)  # with the weights' identity, the forward cache's key
SCORED_KEYS = names(scored=True)
INSPECTED_KEYS = names(inspected=True)


def to_attrs(config, weights_record: dict, provenance: dict) -> dict:
    """The root attributes an extraction of ``config`` (:class:`mlsp.extraction.job.ExtractConfig`) writes,
    with the backbone's ``weights_record`` and the run's ``provenance`` (backend, version, device)."""
    spec = config.spec
    values = {
        "net": spec.name,
        "pooling": config.pooling,
        "block_names": list(spec.taps),
        "block_channels": [int(c) for c in spec.channels],
        "grid": pooling_of(config.pooling).grid,
        "views": config.views,
        "weights": weights_record,
        "weights_source": weights_record["source"],
        "weights_sha256": weights_record["sha256"],
        "weights_path": weights_record.get("path", ""),
        "preprocessing": spec.preprocessing.name,
        "crop_fraction": images.CROP_FRACTION if config.augment else 1.0,
        "max_side": int(config.max_side),
        "decoding": images.DECODING,
        "precision": config.precision,
        **provenance,
    }
    return {name: values[name] for name in names() if name in values}


def from_attrs(attrs: dict) -> dict:
    """The extraction (:class:`mlsp.extraction.job.ExtractConfig`'s fields but ``weights``, which the
    caller finds again from ``weights_source`` and ``weights_path``) that wrote ``attrs``; a store
    without ``precision`` (an older one) gets the config's default."""
    out = {"net": attrs.get("net"), "pooling": attrs.get("pooling")}
    if attrs.get("views") is not None:
        out["augment"] = list(attrs["views"]) != list(images.view_names(False))
    out["max_side"] = int(attrs.get("max_side") or 0)  # stores before max_side: never resized
    if attrs.get("precision"):
        out["precision"] = attrs["precision"]
    return out


def config_attrs(attrs: dict) -> dict:
    """The configuration among a store's attributes (or :func:`to_attrs`'s): :data:`CONFIG_KEYS`
    and the blocks' names and channels, without provenance."""
    return {key: attrs.get(key) for key in CONFIG_KEYS + LAYOUT_KEYS}


def config_differences(have: dict, want: dict) -> dict:
    """{key: (have, want)} for every configuration key whose values differ."""
    diff = {}
    for key in CONFIG_KEYS:
        a, b = have.get(key), want.get(key)
        if isinstance(a, np.ndarray):
            a = a.tolist()
        if isinstance(b, np.ndarray):
            b = b.tolist()
        if isinstance(a, (list, tuple)):
            a = list(a)
        if isinstance(b, (list, tuple)):
            b = list(b)
        if a != b:
            diff[key] = (a, b)
    return diff
