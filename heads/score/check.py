"""Checking an install against a catalogue model's published prediction (``mlsp models --check``).

A catalogue entry may carry a ``check`` (:class:`heads.score.catalogue.PublishedCheck`): a photo, the
score the model's authors published for it, a tolerance and where the number comes from. The
photo is fetched once into the cache beside the model's file, ``<cache>/<name>/check/<photo>``,
by the same download as the models (:func:`heads.score.catalogue.fetch_file`: size and sha256
pinned, mirrors in order, broken downloads resumed); it is scored exactly as ``mlsp score --model
NAME PHOTO`` scores it (:class:`heads.score.released.PretrainedModel`), and the score is
compared with the published one.

Every file the check needs (the backbone's ImageNet weights, the head, the photo) is fetched
before anything is scored: where one cannot be, :class:`mlsp.errors.WeightsUnavailableError`
says in one line which files are needed, where each goes and why the missing ones are missing.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from mlsp.backbone.weights import fetch_imagenet_weights, keras_cache_dir
from mlsp.backbone.nets import get_backbone
from mlsp.errors import ConfigError, DownloadError, WeightsUnavailableError

from . import catalogue

log = logging.getLogger(__name__)

CHECK_FOLDER = "check"  # the photo's folder beside the model's file in the cache


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One model's score of its published photo beside the published one."""

    name: str
    photo: str  # the photo's path in the cache
    score: float
    reference: float
    tolerance: float
    source: str

    @property
    def difference(self) -> float:
        return self.score - self.reference

    @property
    def passed(self) -> bool:
        return abs(self.difference) <= self.tolerance

    def as_dict(self) -> dict:
        """Its fields, the difference and whether it passed (``mlsp models --check --json``)."""
        return {**dataclasses.asdict(self), "difference": self.difference, "passed": self.passed}

    def summary(self) -> str:
        """One line: the score, the published one, the difference and the verdict."""
        verdict = (f"within {self.tolerance:g}: this install computes the published predictor" if self.passed
                   else f"more than the tolerance {self.tolerance:g}: this install does not compute the published "
                        "predictor (another backbone weights file, decoder or library version?)")
        return (f"{self.name}: {os.path.basename(self.photo)} scores {self.score:.6f}, published {self.reference:.6f} "
                f"({self.source}); difference {self.difference:+.6f}, {verdict}")


def photo_path(spec) -> str:
    """Where the photo of ``spec``'s check is kept: ``<cache>/<name>/check/<photo>``."""
    check = catalogue.published_check(spec)
    return os.path.join(os.path.dirname(catalogue.local_path(spec)), CHECK_FOLDER, check.photo)


def fetch_photo(spec, *, progress=None) -> str:
    """The checked local path of the photo of ``spec``'s check, downloaded first if needed; a
    cached copy that fails its check is moved aside to ``<photo>.rejected`` and fetched again."""
    check = catalogue.published_check(spec)
    return catalogue.fetch_file(check.photo_urls, photo_path(spec), size=check.photo_size,
                                sha256=check.photo_sha256, progress=progress,
                                label=f"{spec.name}'s check photo {check.photo}")


def checkable(names=None) -> list:
    """The entries to check: those named (each must have a published prediction), or every
    entry that has one."""
    if names:
        specs = [catalogue.get_pretrained(name) for name in names]
        without = [s.name for s in specs if s.check is None]
        if without:
            have = [s.name for s in catalogue.list_pretrained() if s.check is not None]
            raise ConfigError(f"{', '.join(without)}: no published prediction to check against in the catalogue "
                              f"(models that have one: {', '.join(have) or 'none'})")
        return specs
    specs = [s for s in catalogue.list_pretrained() if s.check is not None]
    if not specs:
        raise ConfigError("no model of the catalogue has a published prediction to check against")
    return specs


def _attempt(fetch) -> tuple[str | None, str | None]:
    """``(path, None)`` of a fetch that worked, ``(None, why)`` of one that could not download."""
    try:
        return fetch(), None
    except DownloadError as exc:
        return None, "; ".join(exc.failures) or "no URL is known for it"
    except WeightsUnavailableError as exc:  # Keras' download of the ImageNet weights
        return None, str(exc.__cause__ or exc).splitlines()[0]


def _listed(items) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]]))


def _needed(spec, progress) -> tuple[str, str]:
    """Fetch every file the check of ``spec`` needs: ``(photo path, head path)``; where one cannot
    be fetched, one line naming each needed file, where it goes and why a missing one is missing."""
    check = catalogue.published_check(spec)
    photo = (f"the photo {check.photo} ({check.photo_size:,} bytes, sha256 {check.photo_sha256}, from "
             f"{' or '.join(check.photo_urls) or 'no URL'}) at {photo_path(spec)}")
    head = (f"the head {spec.file_name} ({spec.size:,} bytes, sha256 {spec.sha256}, from "
            f"{' or '.join(spec.urls) or 'no URL'}) at {catalogue.local_path(spec)}")
    files = [("photo", photo, lambda: fetch_photo(spec, progress=progress)),
             ("head", head, lambda: catalogue.fetch(spec, progress=progress))]
    if spec.backbone_weights == "imagenet":
        backbone = get_backbone(spec.net)
        weights = (f"the backbone's ImageNet weights {backbone.weights_file} (from {backbone.weights_url}) at "
                   f"{os.path.join(keras_cache_dir(), backbone.weights_file)}")
        files.append(("backbone weights", weights, lambda: fetch_imagenet_weights(backbone)))
    got = {what: _attempt(fetch) for what, _, fetch in files}
    missing = [what for what, (_, why) in got.items() if why]
    if missing:
        said = [text + (f" [missing: {got[what][1]}]" if got[what][1] else " [here]") for what, text, _ in files]
        raise WeightsUnavailableError(
            f"cannot check {spec.name}: the {_listed(missing)} could not be fetched (offline?). The check "
            f"needs {len(files)} files; put them by hand where mlsp looks (each is checked before use): "
            + "; ".join(said))
    return got["photo"][0], got["head"][0]


def run_check(spec_or_name, *, extractor=None, progress=None) -> CheckResult:
    """Score the published photo of a catalogue model as ``mlsp score --model NAME PHOTO`` does
    and compare it with the published score (:class:`CheckResult`; a score out of tolerance is
    no exception: ``result.passed`` says). ``extractor``: the model's backbone, when already built."""
    spec = catalogue.get_pretrained(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    return _check(spec, extractor, progress)[0]


def run_checks(specs, *, progress=None) -> list[CheckResult]:
    """:func:`run_check` of each of ``specs`` in turn, building each backbone configuration once."""
    built, results = {}, []
    for spec in specs:
        result, extractor = _check(spec, built.get((spec.net, spec.pooling, spec.backbone_weights)), progress)
        built[(spec.net, spec.pooling, spec.backbone_weights)] = extractor
        results.append(result)
    return results


def _check(spec, extractor, progress):
    """``(result, the backbone it was scored with)``."""
    from .released import PretrainedModel

    check = catalogue.published_check(spec)
    if check is None:
        raise ConfigError(f"{spec.name}: no published prediction to check against in the catalogue")
    photo, head = _needed(spec, progress)
    model = PretrainedModel(spec, head, extractor=extractor)
    frame = model.score([photo])
    if frame.attrs["errors"] or len(frame) != 1:
        raise ConfigError(f"{photo}: the check's photo could not be scored ({frame.attrs['errors']})")
    result = CheckResult(spec.name, photo, float(frame["pred"].iloc[0]), check.reference, check.tolerance,
                         check.source)
    log.debug("%s", result.summary())
    return result, model.extractor
