"""The catalogue of pretrained predictors: a backbone, its pooling and a trained head, as data.

Each entry is a :class:`PretrainedSpec` registered in :data:`PRETRAINED`: the head's weights
file (name, size, sha256, the URLs it is fetched from, in order), how it was trained (backbone,
pooling, head and its options, the test-time views) and the paper's AVA figures for its
configuration. The three built in are the heads the MLSP authors released (subpic/ava-mlsp).

A user's catalogue file (JSON or TOML, the same fields; docs/pretrained.md) adds entries: named
by the environment variable ``MLSP_MODELS`` (several joined with ``os.pathsep``) or given to
:func:`add_catalogue` (``mlsp models --catalogue FILE``). That is how a private mirror, a
team's own heads and the tests add models.

Files are fetched once into the Keras cache folder, ``$KERAS_HOME/mlsp/models/<name>/<file>``
(:func:`local_path`), through :func:`mlsp.runtime.download.download`: size and sha256 checked, broken
downloads resumed, mirrors tried in order. A file is used only while it has the sha256 its
entry pins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

from mlsp.backbone.weights import WeightsSource, keras_cache_dir
from mlsp.runtime.files import file_sha256
from mlsp.backbone.nets import BACKBONES
from mlsp.runtime.download import download, verify
from mlsp.errors import ConfigError, IntegrityError
from mlsp.runtime.progress import resolve as resolve_progress
from mlsp.registry import Registry
from mlsp.store.format import POOLINGS, pooling_of
from mlsp.images.views import VIEW_PROCEDURES

from ..registry import HEADS

log = logging.getLogger(__name__)

CATALOGUE_ENV = "MLSP_MODELS"  # user catalogue files, joined with os.pathsep
WEIGHTS_FORMATS = ("keras2-h5",)  # the authors' Keras 2 HDF5 weights files
PAPER_METRICS = ("srcc", "plcc", "accuracy")  # the paper's figures on AVA's official test set


#: The test-time procedures by name (name, description, n_views, and the views themselves):
#: mlsp.images.views, which scoring and export use.
VIEWS = VIEW_PROCEDURES


@dataclasses.dataclass(frozen=True)
class PretrainedSpec:
    """One pretrained predictor: where its head's weights file comes from and what it expects."""

    name: str  # "ava-mlsp-irv2-wide"
    net: str  # backbone registry name: "irv2"
    pooling: str  # "wide" | "narrow"
    head: str  # head registry name: "pool3fc" | "single3fc"
    head_options: dict  # e.g. {"width": 2048, "kernels": 1024}
    views: str  # test-time procedure (VIEWS): "full" or "crops18"
    file_name: str  # "model_best_weights.h5"
    size: int  # bytes
    sha256: str
    urls: tuple  # tried in order
    source: str  # where it comes from, for people
    paper: dict  # the paper's AVA figures for this configuration, e.g. {"srcc": 0.756, "plcc": 0.757} or {}
    weights_format: str = "keras2-h5"
    backbone_weights: str = "imagenet"  # the backbone's weights for extraction; a test catalogue uses "random:0"


FIELDS = tuple(f.name for f in dataclasses.fields(PretrainedSpec))
REQUIRED = tuple(f.name for f in dataclasses.fields(PretrainedSpec) if f.default is dataclasses.MISSING)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")

PRETRAINED: Registry[PretrainedSpec] = Registry("pretrained model")

_AUTHORS = "subpic/ava-mlsp"
_OSF = "https://osf.io/ubps5/files/"


def _released(name: str, folder: str, pooling: str, head: str, head_options: dict, views: str, size: int,
              sha256: str, paper: dict, trained_on: str) -> PretrainedSpec:
    """An entry for one of the heads the MLSP authors released in their repository (Git LFS)."""
    path = f"models/{folder}/model_best_weights.h5"
    return PretrainedSpec(
        name=name, net="irv2", pooling=pooling, head=head, head_options=head_options, views=views,
        file_name="model_best_weights.h5", size=size, sha256=sha256,
        urls=(f"https://github.com/{_AUTHORS}/raw/master/{path}",
              f"https://media.githubusercontent.com/media/{_AUTHORS}/master/{path}"),
        source=f"the MLSP authors' {_AUTHORS}, {path} (Git LFS), trained on AVA {trained_on}; "
               f"also on OSF, {_OSF} (by hand)",
        paper=paper)


PRETRAINED.register(_released(
    "ava-mlsp-irv2-wide", "irnv2_mlsp_wide_orig", "wide", "pool3fc", {"width": 2048, "kernels": 1024}, "full",
    255_383_120, "47f9a29caed163d9dea2ed15b75aada4477cdb76bc2eac9c55f21dd3573a7a90",
    {"srcc": 0.752, "plcc": 0.755, "accuracy": 0.8161}, "originals, one view each (no augmentation)"))
PRETRAINED.register(_released(
    "ava-mlsp-irv2-narrow", "irnv2_mlsp_narrow_orig", "narrow", "single3fc", {"width": 2048}, "full",
    148_210_528, "0121f3235245df3db37e82fc3e5a84e22aaa731f24b3ffd3ea63d421c2b60102",
    {}, "originals, one view each (no augmentation; the paper reports narrow irv2 with augmentation only)"))
PRETRAINED.register(_released(
    "ava-mlsp-irv2-narrow-aug", "irnv2_mlsp_narrow_orig_aug", "narrow", "single3fc", {"width": 2048}, "crops18",
    148_210_608, "6e069d80b8c31a5e683129bc9ee242707773cec14ab91edaa36ababb94135636",
    {"srcc": 0.743, "plcc": 0.745, "accuracy": 0.8137}, "originals with crop and flip views"))


# --------------------------------------------------------------------------------------------
# The catalogue: built-in entries and users' files
# --------------------------------------------------------------------------------------------


def check(spec: PretrainedSpec) -> None:
    """Raise :class:`ConfigError` (one line) for the first field of ``spec`` that cannot be used."""
    problem = _problem_or_error(spec)
    if problem:
        raise ConfigError(f"pretrained model {spec.name!r}: {problem}")


def _problem(spec: PretrainedSpec) -> str | None:
    if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
        return "name: letters, digits, '.', '_' and '-' only, starting with a letter or digit"
    if spec.net not in BACKBONES:
        return f"net {spec.net!r} is not a registered backbone ({', '.join(BACKBONES)})"
    if spec.pooling not in POOLINGS:
        return f"pooling {spec.pooling!r} is not one of {', '.join(POOLINGS)}"
    if spec.head not in HEADS:
        return f"head {spec.head!r} is not a registered head ({', '.join(HEADS)})"
    if HEADS[spec.head].needs_wide and not pooling_of(spec.pooling).wide:
        return f"head {spec.head} needs wide features, the entry says pooling {spec.pooling!r}"
    if not isinstance(spec.head_options, dict):
        return f"head_options must be a table of options, received {spec.head_options!r}"
    HEADS[spec.head].resolve_options(spec.head_options, BACKBONES[spec.net].total_channels)
    if spec.views not in VIEWS:
        return f"views {spec.views!r} is not one of {', '.join(VIEWS)}"
    if (not isinstance(spec.file_name, str) or os.path.basename(spec.file_name) != spec.file_name
            or spec.file_name.startswith(".") or "/" in spec.file_name):
        return f"file_name {spec.file_name!r} must be a plain file name (no folder, not hidden)"
    if isinstance(spec.size, bool) or not isinstance(spec.size, int) or spec.size < 1:
        return f"size must be the file's size in bytes, received {spec.size!r}"
    if not isinstance(spec.sha256, str) or not _SHA256.fullmatch(spec.sha256):
        return f"sha256 must be 64 lowercase hex digits, received {spec.sha256!r}"
    bad = [u for u in spec.urls if not isinstance(u, str) or not u.startswith(("https://", "http://"))] \
        if isinstance(spec.urls, tuple) else spec.urls
    if bad:
        return f"urls must be a list of http(s) URLs, received {bad!r}"
    if spec.weights_format not in WEIGHTS_FORMATS:
        return f"weights_format {spec.weights_format!r} is not one of {', '.join(WEIGHTS_FORMATS)}"
    WeightsSource.parse(spec.backbone_weights)
    if not isinstance(spec.paper, dict) or any(k not in PAPER_METRICS or isinstance(v, bool)
                                               or not isinstance(v, (int, float)) for k, v in spec.paper.items()):
        return f"paper must map {', '.join(PAPER_METRICS)} to numbers, received {spec.paper!r}"
    return None


def load_catalogue(path) -> list[PretrainedSpec]:
    """The entries of a user's catalogue file (``.json`` or ``.toml``: a list ``models`` of tables
    with :class:`PretrainedSpec`'s fields), each checked; a problem is a :class:`ConfigError`
    naming the file, the entry and the field."""
    path = os.fspath(path)
    data = _read_catalogue(path)
    if not isinstance(data, dict) or set(data) != {"models"} or not isinstance(data["models"], list):
        found = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path}: a catalogue holds one list 'models' of entries; found {found or 'nothing'}")
    specs = []
    for k, entry in enumerate(data["models"], start=1):
        where = f"{path}: model {k}" + (f" ({entry['name']!r})" if isinstance(entry, dict) and "name" in entry else "")
        specs.append(_entry(entry, where))
    return specs


def _read_catalogue(path: str):
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".toml"):
        raise ConfigError(f"{path}: a catalogue file is .json or .toml (docs/pretrained.md)")
    try:
        if ext == ".json":
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError(f"{path}: reading TOML needs Python 3.11 or later; write the catalogue as JSON") from None
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the catalogue: {exc.strerror or exc}") from exc
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: not valid {ext[1:].upper()}: {str(exc).splitlines()[0]}") from exc


def _entry(entry, where: str) -> PretrainedSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an entry is a table of fields, received {entry!r}")
    unknown = sorted(set(entry) - set(FIELDS))
    missing = [f for f in REQUIRED if f not in entry]
    if unknown or missing:
        said = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
        said += [f"missing field(s) {', '.join(missing)}"] if missing else []
        raise ConfigError(f"{where}: {'; '.join(said)} (fields: {', '.join(FIELDS)})")
    values = dict(entry)
    if isinstance(values["urls"], list):
        values["urls"] = tuple(values["urls"])
    if isinstance(values["sha256"], str):
        values["sha256"] = values["sha256"].strip().lower()
    spec = PretrainedSpec(**values)
    problem = _problem_or_error(spec)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return spec


def _problem_or_error(spec: PretrainedSpec) -> str | None:
    try:
        return _problem(spec)
    except ConfigError as exc:
        return str(exc)


_LOADED: dict = {}  # real path of a catalogue file already added -> its entries


def add_catalogue(path) -> list[PretrainedSpec]:
    """Register the entries of a user's catalogue file (read once per process); an entry whose
    name is taken by a different one is an error, the same entry again is not."""
    real = os.path.realpath(os.fspath(path))
    if real in _LOADED:
        return _LOADED[real]
    specs = load_catalogue(path)
    for spec in specs:
        if spec.name in PRETRAINED and PRETRAINED.get(spec.name) == spec:
            continue
        if spec.name in PRETRAINED:
            raise ConfigError(f"{path}: model {spec.name!r} is already in the catalogue with other values; "
                              "give it another name")
        PRETRAINED.register(spec)
    _LOADED[real] = specs
    log.debug("%s: %d pretrained models added", path, len(specs))
    return specs


def add_env_catalogues() -> None:
    """Add the catalogue files named by ``$MLSP_MODELS`` (joined with ``os.pathsep``)."""
    for path in filter(None, os.environ.get(CATALOGUE_ENV, "").split(os.pathsep)):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such catalogue file (named by ${CATALOGUE_ENV})")
        add_catalogue(path)


def get_pretrained(name: str) -> PretrainedSpec:
    """The catalogue's entry ``name`` (the users' catalogues of ``$MLSP_MODELS`` included)."""
    add_env_catalogues()
    return PRETRAINED.get(name)


def list_pretrained() -> list[PretrainedSpec]:
    """Every entry, built-in first, then the users' (``$MLSP_MODELS`` included)."""
    add_env_catalogues()
    return PRETRAINED.specs()


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """Where pretrained models are kept: ``$KERAS_HOME/mlsp/models`` (default ``~/.keras/mlsp/models``)."""
    return os.path.join(os.path.dirname(keras_cache_dir()), "mlsp", "models")


def local_path(spec: PretrainedSpec) -> str:
    """Where the checked file of ``spec`` lives in the cache: ``cache_dir()/<name>/<file_name>``."""
    return os.path.join(cache_dir(), spec.name, spec.file_name)


def is_cached(spec: PretrainedSpec) -> bool:
    """Whether the file is in the cache with its size (its sha256 is checked each time it is used)."""
    path = local_path(spec)
    return os.path.isfile(path) and os.path.getsize(path) == spec.size


def fetch(spec_or_name, *, progress=None) -> str:
    """The checked local path of a catalogue model's file, downloaded first if needed.

    A file in the cache that fails its check (size, sha256) is never used: it is moved aside to
    ``<file>.rejected`` and downloaded again. Offline, :class:`mlsp.errors.DownloadError` says in
    one line which file (size, sha256), from which URLs, and where to put it."""
    spec = get_pretrained(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    dest = local_path(spec)
    if os.path.isfile(dest):
        try:
            return verify(dest, size=spec.size, sha256=spec.sha256)
        except IntegrityError as exc:
            os.replace(dest, dest + ".rejected")
            log.warning("%s; moved to %s.rejected, fetching it again", exc, dest)
    log.info("%s: fetching %s (%s bytes) into %s", spec.name, spec.file_name, f"{spec.size:,}", dest)
    return download(spec.urls, dest, size=spec.size, sha256=spec.sha256, progress=resolve_progress(progress),
                    advice=", or give that file's path to --model", label=f"{spec.name}'s {spec.file_name}")


def resolve_model(name_or_path, *, progress=None) -> tuple[PretrainedSpec | None, str]:
    """A catalogue name -> (its entry, its fetched and checked file; ``progress`` as for
    :func:`fetch`); a path to a file -> (the entry whose sha256 it has, or ``None`` for a file of
    no entry, the path). A file that looks like a catalogue file (its name or size) but has none
    of their hashes is refused (:class:`IntegrityError`): a truncated or corrupt copy is never used."""
    text = os.fspath(name_or_path)
    specs = list_pretrained()
    if text in PRETRAINED:
        spec = PRETRAINED.get(text)
        return spec, fetch(spec, progress=progress)
    if not os.path.isfile(text):
        raise ConfigError(f"model {text!r} is neither a pretrained model ({', '.join(PRETRAINED)}) nor a file")
    digest = file_sha256(text)
    for spec in specs:
        if spec.sha256 == digest:
            log.info("%s is %s's file (sha256 checked)", text, spec.name)
            return spec, text
    size, name = os.path.getsize(text), os.path.basename(text)
    alike = [s for s in specs if s.file_name == name or s.size == size]
    if alike:
        expected = "; ".join(f"{s.name}: {s.size:,} bytes, sha256 {s.sha256}" for s in alike)
        raise IntegrityError(text, f"{size:,} bytes, sha256 {digest}", f"one of the catalogue's files ({expected})",
                             advice=" (a truncated or corrupt download? Download it again. A head of your own: "
                                    "import it with `mlsp import-weights`, or add it to a catalogue file with its "
                                    f"own sha256, ${CATALOGUE_ENV}, docs/pretrained.md)")
    return None, text


def describe(spec: PretrainedSpec) -> dict:
    """``mlsp models``' row of ``spec``: its fields, where its file is kept and whether it is there,
    and whether the backbone's ImageNet weights are in Keras' cache (``None``: other weights)."""
    row = dataclasses.asdict(spec)
    row["urls"] = list(spec.urls)
    row["views_count"] = VIEWS.get(spec.views).n_views
    row["path"] = local_path(spec)
    row["cached"] = is_cached(spec)
    backbone = BACKBONES[spec.net]
    row["backbone_weights_file"] = backbone.weights_file
    row["backbone_weights_cached"] = (os.path.isfile(os.path.join(keras_cache_dir(), backbone.weights_file))
                                      if spec.backbone_weights == "imagenet" else None)
    return row
