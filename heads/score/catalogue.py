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
import math
import os
import re

from mlsp.backbone.nets import BACKBONES
from mlsp.backbone.weights import WeightsSource, keras_cache_dir
from mlsp.errors import ConfigError, IntegrityError, LinkRefused
from mlsp.runtime.atomic import describe_os_error, refuse_link
from mlsp.runtime.download import download, verify
from mlsp.runtime.files import file_sha256
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
    check: dict | None = None  # a published prediction to check an install against (CHECK_FIELDS), or None


FIELDS = tuple(f.name for f in dataclasses.fields(PretrainedSpec))
REQUIRED = tuple(f.name for f in dataclasses.fields(PretrainedSpec) if f.default is dataclasses.MISSING)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"https?://[^\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029/\\]")
MAX_SIZE = 1 << 36  # bytes (64 GiB): far above any head; a larger size is a typing error
#: Fields that hold text; each is checked to be a string before anything else looks at it.
TEXT_FIELDS = ("name", "net", "pooling", "head", "views", "file_name", "sha256", "source", "weights_format",
               "backbone_weights")

PRETRAINED: Registry[PretrainedSpec] = Registry("pretrained model")

_AUTHORS = "subpic/ava-mlsp"
_OSF = "https://osf.io/ubps5/files/"


def _released(name: str, folder: str, pooling: str, head: str, head_options: dict, views: str, size: int,
              sha256: str, paper: dict, trained_on: str, check: dict | None = None, mirrors: tuple = (),
              mirrored: str = "") -> PretrainedSpec:
    """An entry for one of the heads the MLSP authors released in their repository (Git LFS);
    ``mirrors``: more URLs of the same file (its sha256 decides), ``mirrored``: who names them."""
    path = f"models/{folder}/model_best_weights.h5"
    return PretrainedSpec(
        name=name, net="irv2", pooling=pooling, head=head, head_options=head_options, views=views,
        file_name="model_best_weights.h5", size=size, sha256=sha256,
        urls=(f"https://github.com/{_AUTHORS}/raw/master/{path}",
              f"https://media.githubusercontent.com/media/{_AUTHORS}/master/{path}", *mirrors),
        source=f"the MLSP authors' {_AUTHORS}, {path} (Git LFS), trained on AVA {trained_on}; "
               f"also on OSF, {_OSF} (by hand){mirrored}",
        paper=paper, check=check)


#: The commit of subpic/ava-mlsp whose predict_mlsp_wide.ipynb printed the wide model's score of
#: images/954013.jpg (AVA's first official test image; in the repository itself, not in Git LFS).
_AUTHORS_COMMIT = "dfb5c19b1e7139b1919ca1c1c766ca154aaad6be"
_SAMPLE = "images/954013.jpg"

#: The authors' own published prediction for the wide model, checked by ``mlsp models --check``.
#: The tolerance of 0.01 comes from what may honestly differ (docs/pretrained.md, "Check an
#: install"): the 7 printed digits (5e-7), mlsp's float16 rounding of the features before the head
#: (their notebook ran float32 end to end) and the float32 sums' order on other versions and CPUs.
AUTHORS_WIDE_CHECK = {
    "photo": "954013.jpg", "photo_size": 302_644,
    "photo_sha256": "568eaf2ac5ae517dad278eec1d219ab7238a39e23a4b4adfe2dbd11f74a5ac6d",
    "photo_urls": [f"https://raw.githubusercontent.com/{_AUTHORS}/{_AUTHORS_COMMIT}/{_SAMPLE}",
                   f"https://github.com/{_AUTHORS}/raw/{_AUTHORS_COMMIT}/{_SAMPLE}"],
    "reference": 6.397093, "tolerance": 0.01,
    "source": f"'predicted image score: 6.397093', printed by the authors' predict_mlsp_wide.ipynb "
              f"({_AUTHORS} at {_AUTHORS_COMMIT[:7]}) for {_SAMPLE}, the whole image at its own size",
}


PRETRAINED.register(_released(
    "ava-mlsp-irv2-wide", "irnv2_mlsp_wide_orig", "wide", "pool3fc", {"width": 2048, "kernels": 1024}, "full",
    255_383_120, "47f9a29caed163d9dea2ed15b75aada4477cdb76bc2eac9c55f21dd3573a7a90",
    {"srcc": 0.752, "plcc": 0.755, "accuracy": 0.8161}, "originals, one view each (no augmentation)",
    mirrors=("https://www.dropbox.com/s/16k0vh1dn7ls0cd/model_best_weights.h5?dl=1",),
    mirrored=", and on the Dropbox mirror their notebook predict_mlsp_wide.ipynb fetches",
    check=AUTHORS_WIDE_CHECK))
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


def _type_problem(spec: PretrainedSpec) -> str | None:
    """The first field of a type nothing else may look at (a list where a name is, a size of 10^30)."""
    for field in TEXT_FIELDS:
        value = getattr(spec, field)
        if not isinstance(value, str):
            return f"{field} must be text, received {_shown(value)}"
    if isinstance(spec.size, bool) or not isinstance(spec.size, int) or not 1 <= spec.size <= MAX_SIZE:
        return f"size must be the file's size in bytes (1 to {MAX_SIZE:,}), received {_shown(spec.size)}"
    if not isinstance(spec.urls, tuple):
        return f"urls must be a list of http(s) URLs, received {_shown(spec.urls)}"
    bad = [u for u in spec.urls if not isinstance(u, str) or not _URL.fullmatch(u)]
    if bad:
        return f"urls must be a list of http(s) URLs, received {_shown(bad)} (no spaces or control characters)"
    for field in ("head_options", "paper"):
        if not isinstance(getattr(spec, field), dict):
            return f"{field} must be a table, received {_shown(getattr(spec, field))}"
    return None


def _shown(value, limit: int = 80) -> str:
    """``repr`` of a field's value, cut to ``limit`` characters, for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _problem(spec: PretrainedSpec) -> str | None:
    problem = _type_problem(spec)
    if problem:
        return problem
    if not _NAME.fullmatch(spec.name):
        return "name: letters, digits, '.', '_' and '-' only, starting with a letter or digit"
    if spec.net not in BACKBONES:
        return f"net {spec.net!r} is not a registered backbone ({', '.join(BACKBONES)})"
    if spec.pooling not in POOLINGS:
        return f"pooling {spec.pooling!r} is not one of {', '.join(POOLINGS)}"
    if spec.head not in HEADS:
        return f"head {spec.head!r} is not a registered head ({', '.join(HEADS)})"
    if HEADS[spec.head].needs_wide and not pooling_of(spec.pooling).wide:
        return f"head {spec.head} needs wide features, the entry says pooling {spec.pooling!r}"
    HEADS[spec.head].resolve_options(spec.head_options, BACKBONES[spec.net].total_channels)
    if spec.views not in VIEWS:
        return f"views {spec.views!r} is not one of {', '.join(VIEWS)}"
    if (not spec.file_name or _CONTROL.search(spec.file_name) or spec.file_name.startswith(".")
            or len(spec.file_name.encode("utf-8", "surrogatepass")) > 200):
        return f"file_name {_shown(spec.file_name)} must be a plain file name (no folder, not hidden, no control characters)"
    if not _SHA256.fullmatch(spec.sha256):
        return f"sha256 must be 64 lowercase hex digits, received {_shown(spec.sha256)}"
    if spec.weights_format not in WEIGHTS_FORMATS:
        return f"weights_format {spec.weights_format!r} is not one of {', '.join(WEIGHTS_FORMATS)}"
    WeightsSource.parse(spec.backbone_weights)
    if any(k not in PAPER_METRICS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           for k, v in spec.paper.items()):
        return f"paper must map {', '.join(PAPER_METRICS)} to numbers, received {_shown(spec.paper)}"
    return None if spec.check is None else check_problem(spec.check)


@dataclasses.dataclass(frozen=True)
class PublishedCheck:
    """A catalogue entry's published prediction (its ``check`` table): the photo (file name, size,
    sha256, URLs tried in order), the score its authors published for it, how far an install's
    score may be from it, and where the number comes from."""

    photo: str  # "954013.jpg"
    photo_size: int  # bytes
    photo_sha256: str
    photo_urls: tuple  # tried in order
    reference: float  # the published score
    tolerance: float  # |score - reference| allowed
    source: str  # where the number was published, for people


CHECK_FIELDS = tuple(f.name for f in dataclasses.fields(PublishedCheck))


def check_problem(check) -> str | None:
    """What is wrong with an entry's ``check`` table (one line), or ``None``."""
    if not isinstance(check, dict) or set(check) != set(CHECK_FIELDS):
        found = ", ".join(sorted(map(str, check))) if isinstance(check, dict) else repr(check)
        return f"check must be a table of exactly {', '.join(CHECK_FIELDS)}, received {found or 'nothing'}"
    photo, urls = check["photo"], check["photo_urls"]
    if not isinstance(photo, str) or not photo or _CONTROL.search(photo) or photo.startswith("."):
        return f"check.photo {_shown(photo)} must be a plain file name (no folder, not hidden, no control characters)"
    size = check["photo_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        return f"check.photo_size must be the photo's size in bytes (1 to {MAX_SIZE:,}), received {_shown(size)}"
    if not isinstance(check["photo_sha256"], str) or not _SHA256.fullmatch(check["photo_sha256"]):
        return f"check.photo_sha256 must be 64 lowercase hex digits, received {_shown(check['photo_sha256'])}"
    if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) and _URL.fullmatch(u) for u in urls):
        return f"check.photo_urls must be a list of http(s) URLs, received {_shown(urls)}"
    for key in ("reference", "tolerance"):
        value = check[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"check.{key} must be a number, received {value!r}"
    if not check["tolerance"] > 0:
        return f"check.tolerance must be above 0, received {check['tolerance']!r}"
    if not isinstance(check["source"], str) or not check["source"].strip():
        return "check.source must say where the reference value was published"
    return None


def published_check(spec: PretrainedSpec) -> PublishedCheck | None:
    """``spec``'s published prediction (checked), or ``None`` when its entry has none."""
    if spec.check is None:
        return None
    problem = check_problem(spec.check)
    if problem:
        raise ConfigError(f"pretrained model {spec.name!r}: {problem}")
    values = dict(spec.check)
    values["photo_urls"] = tuple(values["photo_urls"])
    values["reference"], values["tolerance"] = float(values["reference"]), float(values["tolerance"])
    return PublishedCheck(**values)


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
        where = f"{path}: model {k}" + (f" ({_shown(entry['name'])})" if isinstance(entry, dict) and "name" in entry
                                        else "")
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
    except RecursionError:
        raise ConfigError(f"{path}: not a catalogue: its {ext[1:].upper()} is nested too deeply") from None


def _entry(entry, where: str) -> PretrainedSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an entry is a table of fields, received {_shown(entry)}")
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


def cache_problem(spec: PretrainedSpec) -> str | None:
    """Why the cache does not hold ``spec``'s file: ``"not downloaded"``, or what is wrong with
    what is there (a link, another size, another sha256: the whole file is hashed); ``None``
    when it holds the pinned file."""
    path = local_path(spec)
    try:
        refuse_link(os.path.dirname(path))
        refuse_link(path)
        if not os.path.lexists(path):
            return "not downloaded"
        verify(path, size=spec.size, sha256=spec.sha256)
    except (IntegrityError, LinkRefused) as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: {describe_os_error(exc)}"
    return None


def is_cached(spec: PretrainedSpec) -> bool:
    """Whether the cache holds the pinned file of ``spec`` (size and sha256 checked)."""
    return cache_problem(spec) is None


def fetch(spec_or_name, *, progress=None) -> str:
    """The checked local path of a catalogue model's file, downloaded first if needed.

    A file in the cache that fails its check (size, sha256) is never used: it is moved aside to
    ``<file>.rejected`` and downloaded again (where the cache cannot be written, one line says
    what is wrong with it). A link in the cache, the model's folder or its file, is refused
    (:class:`~mlsp.errors.LinkRefused`). Offline, :class:`mlsp.errors.DownloadError` says in one
    line which file (size, sha256), from which URLs, and where to put it."""
    spec = get_pretrained(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    return fetch_file(spec.urls, local_path(spec), size=spec.size, sha256=spec.sha256, progress=progress,
                      advice=", or give that file's path to --model", label=f"{spec.name}'s {spec.file_name}")


def fetch_file(urls, dest: str, *, size: int, sha256: str, label: str, advice: str = "", progress=None) -> str:
    """``dest`` in the cache, checked, downloaded first from ``urls`` if needed (:func:`fetch`'s
    way, for any file an entry pins: a cached copy that fails its check is moved aside to
    ``<dest>.rejected`` and downloaded again; ``label`` and ``advice`` as for
    :func:`mlsp.runtime.download.download`). A link as the file or its folder is refused
    (:class:`~mlsp.errors.LinkRefused`): nothing is written through it."""
    refuse_link(os.path.dirname(dest))
    refuse_link(dest)
    if os.path.isfile(dest):
        try:
            return verify(dest, size=size, sha256=sha256)
        except IntegrityError as exc:
            _reject(dest, exc)
    log.info("%s: fetching %s bytes into %s", label, f"{size:,}", dest)
    return download(urls, dest, size=size, sha256=sha256, progress=resolve_progress(progress), advice=advice,
                    label=label)


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


def _reject(dest: str, exc: IntegrityError) -> None:
    """Move a cached file that failed its check aside (``.rejected``), or say in one line what is
    wrong with it where it cannot be moved (a read-only cache)."""
    try:
        os.replace(dest, dest + ".rejected")
    except OSError as err:
        raise IntegrityError(exc.path, exc.found, exc.expected,
                             advice=f", and it cannot be moved aside ({describe_os_error(err)}): delete it or copy "
                                    "the right file there, or give a good copy's path to --model") from None
    log.warning("%s; moved to %s.rejected, fetching it again", exc, dest)


def describe(spec: PretrainedSpec) -> dict:
    """``mlsp models``' row of ``spec``: its fields, where its file is kept and whether it is there
    (``cached``: size and sha256 checked; ``cache_problem``: what is wrong with a file there), and
    whether the backbone's ImageNet weights are in Keras' cache (``None``: other weights)."""
    row = dataclasses.asdict(spec)
    row["urls"] = list(spec.urls)
    row["views_count"] = VIEWS.get(spec.views).n_views
    row["path"] = local_path(spec)
    problem = cache_problem(spec)
    row["cached"] = problem is None
    row["cache_problem"] = None if problem in (None, "not downloaded") else problem
    backbone = BACKBONES[spec.net]
    row["backbone_weights_file"] = backbone.weights_file
    row["backbone_weights_cached"] = (os.path.isfile(os.path.join(keras_cache_dir(), backbone.weights_file))
                                      if spec.backbone_weights == "imagenet" else None)
    return row
