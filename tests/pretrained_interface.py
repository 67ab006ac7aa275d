"""The catalogue's agreed interface (``heads.pretrained``: PretrainedSpec, PRETRAINED,
get_pretrained, resolve_model) for the tests of scoring with released models, used only where
the catalogue module itself is not in this tree. It resolves local files by their sha256, as
the catalogue does; it fetches nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from mlsp.backbones import file_sha256
from mlsp.errors import ConfigError
from mlsp.registry import Registry


@dataclasses.dataclass(frozen=True)
class PretrainedSpec:
    name: str
    net: str
    pooling: str
    head: str
    head_options: dict
    views: str
    file_name: str
    size: int
    sha256: str
    urls: tuple
    source: str
    paper: dict
    weights_format: str = "keras2-h5"
    backbone_weights: str = "imagenet"


PRETRAINED = Registry("pretrained model")


def get_pretrained(name):
    return PRETRAINED.get(name)


def resolve_model(name_or_path, *, progress=None):
    if os.path.isfile(name_or_path):
        sha = file_sha256(name_or_path)
        return next((s for s in PRETRAINED.specs() if s.sha256 == sha), None), name_or_path
    raise ConfigError(f"{name_or_path}: fetching is not part of this interface; give the file's path")


def catalogue():
    """``heads.pretrained``: the real module, or this interface installed in its place."""
    import heads

    try:
        from heads import pretrained
    except ImportError:
        pretrained = sys.modules[__name__]
        sys.modules["heads.pretrained"] = pretrained
        heads.pretrained = pretrained
    return pretrained
