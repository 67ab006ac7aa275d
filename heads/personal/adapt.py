"""Adapting the generic model to one person: scale mapping, the choice of method by
cross-validation on the person's own ratings, and the personal model's files.

The person's scale (1..5 by default) is mapped linearly onto the generic scale (MOS 1..10);
methods fit and predict there, and a personal model maps its prediction back, so it predicts on
the person's own scale.

Choice (``method="auto"``): every available method with every parameter set of its grid is
cross-validated on the person's ratings (fine-tuning from 50 ratings up; K folds, K = min(5, k)),
one space after the other (:data:`heads.personal.methods.SPACES`): first the generic head's last
hidden layer, then the store's features. In each space the candidate of least out-of-fold
squared error replaces the choice so far (at first the generic prediction) only when (1) its
out-of-fold errors beat the choice so far's by more than :data:`FALLBACK_SE` standard errors of
the per-image difference, and (2) so do the nested errors of the choice among that space's
candidates, by more than :data:`NESTED_SE` of that space; else its gain could be luck. The
nested errors (:func:`nested_errors`): for each fold, the candidate that a cross-validation on
the other folds alone chooses, and its error on the fold. The best of many candidates beats the
choice so far on the folds it was chosen on by luck, the more of them the more likely, while the
choice's nested errors do not; but with ten ratings they are noisy (each inner choice sees eight),
so the bar on them grows with the space's candidates: the head's few need only not lose there,
the store's fifteen must win by two standard errors. A named method keeps its own grid's choice.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from mlsp.errors import ConfigError
from mlsp.store.labels import SCORES

from ..columns import user_column
from . import model_file
from .features import find_basis
from .methods import FEATURE_SPACE, HEAD_SPACE, METHODS, SPACES, ContentResidual, Context, Images, MethodSpec, fit
from .model_file import FORMAT_VERSION, MODEL_JSON, MODEL_NPZ  # noqa: F401 (the files' names, here as before)

log = logging.getLogger(__name__)

#: The generic model's scale (MOS 1..10): personal ratings are mapped onto it and back.
GENERIC_SCALE = (float(SCORES[0]), float(SCORES[-1]))
AUTO = "auto"
#: Cross-validation folds (at most: never more than the person's ratings).
FOLDS = 5
#: A space's best candidate replaces the choice so far only when its out-of-fold errors beat the
#: choice so far's by more than this many standard errors of the per-image difference ...
FALLBACK_SE = 2.0
#: ... and the nested errors of the choice among the space's candidates by more than these (0: not
#: worse): the head's space holds a handful of candidates (3 residuals, 3 tastes, fine-tuning),
#: the feature space fifteen, whose best wins by luck far more often. Measured on the suite's planted
#: raters (docs/personal.md, "What gain to expect").
NESTED_SE = {HEAD_SPACE: 0.0, FEATURE_SPACE: 2.0}


def to_generic(scores, scale) -> np.ndarray:
    """Ratings on the person's ``scale`` (low, high) -> the generic scale, linearly."""
    lo, hi = scale
    g0, g1 = GENERIC_SCALE
    return g0 + (np.asarray(scores, np.float64) - lo) * (g1 - g0) / (hi - lo)


def from_generic(values, scale) -> np.ndarray:
    """The inverse of :func:`to_generic`."""
    lo, hi = scale
    g0, g1 = GENERIC_SCALE
    return lo + (np.asarray(values, np.float64) - g0) * (hi - lo) / (g1 - g0)


#: What a method that is not available needs (by its spec's ``needs``).
TRAINING_RATERS = ("there are none (give a ratings file with other raters: --users lists the test ones)")
UNAVAILABLE = {
    "taste": f"directions of taste learned from training raters, and {TRAINING_RATERS}",
    "content_taste": f"directions of taste in the store's features learned from training raters, and {TRAINING_RATERS}",
    "content": "the store's principal components, and its features vary along none",
}


def method_names() -> list[str]:
    """``auto`` and every registered method (the choices of ``--method``)."""
    return [AUTO, *METHODS.names()]


def candidates(method: str, context: Context, n: int) -> list[tuple[MethodSpec, dict]]:
    """(spec, params) pairs that ``method`` chooses among for a person of ``n`` ratings."""
    if method == AUTO:
        specs = [s for s in METHODS.specs() if s.available(context) and n >= s.min_ratings]
    else:
        spec = METHODS.get(method)
        if not spec.available(context):
            raise ConfigError(f"method {method!r} needs {UNAVAILABLE[spec.needs]}")
        specs = [spec]
    return [(spec, params) for spec in specs for params in spec.params(context)]


def folds_of(n: int, seed: int) -> list[np.ndarray]:
    k = min(FOLDS, n)
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def out_of_fold(spec, params, images: Images, y, context: Context, folds) -> np.ndarray:
    """Each image's prediction by the method fitted without its fold."""
    pred = np.empty(len(y))
    for fold in folds:
        keep = np.setdiff1d(np.arange(len(y)), fold)
        pred[fold] = fit(spec, images.take(keep), y[keep], context, params).predict(images.take(fold))
    return pred


@dataclasses.dataclass
class Choice:
    """The method and parameters chosen for a person, and every candidate's CV error."""

    spec: MethodSpec
    params: dict
    cv: list  # [{"method", "params", "mse"}]


def nested_errors(found, images: Images, y, context: Context, folds) -> np.ndarray:
    """Each image's squared error under the choice among ``found`` ((spec, params, out-of-fold
    errors) of every candidate): for each fold, the candidate of least error in a cross-validation
    on the other folds alone, and that candidate's out-of-fold error on the fold (the fit on the
    other folds, which cross-validation made already). A candidate whose spec is not ``nested``
    (fine-tuning: 25 more fits would cost seconds a person) enters the inner choice with its
    out-of-fold errors on the other folds."""
    nested = np.empty(len(y))
    for k, fold in enumerate(folds):
        keep = np.setdiff1d(np.arange(len(y)), fold)
        inner = folds_of(len(keep), context.seed + k + 1)
        sub = images.take(keep)
        scores = [float(((out_of_fold(spec, params, sub, y[keep], context, inner) - y[keep]) ** 2).mean())
                  if spec.nested else float(errors[keep].mean()) for spec, params, errors in found]
        nested[fold] = found[int(np.argmin(scores))][2][fold]
    return nested


def choose(images: Images, y, context: Context, method: str = AUTO) -> Choice:
    """Cross-validate the candidates of ``method`` on the person's ratings; see the module docstring."""
    y = np.asarray(y, np.float64)
    folds = folds_of(len(y), context.seed)
    found = [(spec, params, (out_of_fold(spec, params, images, y, context, folds) - y) ** 2)
             for spec, params in candidates(method, context, len(y))]
    cv = [{"method": s.name, "params": p, "mse": float(e.mean())} for s, p, e in found]
    if method != AUTO:
        spec, params, _ = min(found, key=lambda f: f[2].mean())
        return Choice(spec, params, cv)
    chosen = next(f for f in found if f[0].name == "generic")
    for space in SPACES:  # the head's space first, then the store's features against its choice
        tier = [f for f in found if f[0].space == space and f[0].name != "generic"]
        if not tier:
            continue
        best = min(tier, key=lambda f: f[2].mean())
        if beats(chosen[2] - best[2], FALLBACK_SE) and beats(
                chosen[2] - nested_errors([chosen, *tier], images, y, context, folds), NESTED_SE[space]):
            chosen = best
    return Choice(chosen[0], chosen[1], cv)


def beats(diff: np.ndarray, se: float) -> bool:
    """Whether per-image differences of squared error (the choice so far less the candidate's) show
    the candidate better by more than ``se`` standard errors."""
    return len(diff) >= 2 and diff.mean() > se * diff.std(ddof=1) / np.sqrt(len(diff))


@dataclasses.dataclass
class PersonalModel:
    """One person's model: the chosen method's fitted part, the person's scale, the generic
    model it adapts (by name and SHA-256) and, for the feature-space methods, the store's basis
    (:class:`heads.personal.features.Basis`, recorded by its SHA-256; None for the others)."""

    user: str
    method: str
    params: dict
    fitted: object  # methods.Residual or methods.Tail
    scale: tuple
    generic: dict
    n_ratings: int
    cv: list = dataclasses.field(default_factory=list)
    basis: object = None

    @property
    def column(self) -> str:
        return user_column(self.user)

    def predict_generic_scale(self, images: Images) -> np.ndarray:
        return self.fitted.predict(images)

    def predict(self, images: Images) -> np.ndarray:
        """Predictions on the person's own scale."""
        return from_generic(self.fitted.predict(images), self.scale)

    def save(self, out_dir: str) -> str:
        """``personal.json`` (what, whose, on which generic model) and ``personal.npz`` (the
        fitted arrays), written as one unit (:mod:`.model_file`); a feature-space model's json
        records its basis (:meth:`heads.personal.features.Basis.describe`)."""
        return model_file.write(out_dir, {
            "user": self.user, "method": self.method, "params": self.params, "kind": self.fitted.kind,
            "scale": list(self.scale), "n_ratings": self.n_ratings, "generic": self.generic, "cv": self.cv,
            "basis": self.basis.describe() if self.basis else None},
            self.fitted.state())


def load_personal(path: str, head) -> PersonalModel:
    """A personal model folder, for the generic ``head`` (a :class:`heads.personal.generic.GenericHead`);
    a model of another generic model (its SHA-256 differs) is refused, and so is a damaged one, in
    one line naming the file (:func:`.model_file.read`)."""
    meta, state = model_file.read(path)
    if meta["generic"]["sha256"] != head.sha256:
        generic = "/".join(str(part) for part in (meta["generic"].get("run"), meta["generic"].get("model")) if part)
        raise ConfigError(f"{path}: adapts the generic model {generic} "
                          f"(sha256 {meta['generic']['sha256'][:12]}...), not {head.name}'s "
                          f"(sha256 {head.sha256[:12]}...); personalise again on this run")
    basis = find_basis(meta, head, path)
    fitted = model_file.fitted(meta, state, head, os.path.join(path, MODEL_NPZ), basis.dims if basis else 0)
    return PersonalModel(meta["user"], meta["method"], meta["params"], fitted, tuple(meta["scale"]),
                         meta["generic"], meta["n_ratings"], meta.get("cv", []), basis)


def adapt(user: str, images: Images, scores, scale, context: Context, generic: dict,
          method: str = AUTO, basis=None) -> PersonalModel:
    """A personal model of ``user`` from their ratings ``scores`` (on ``scale``) of ``images``;
    ``basis``: the store's basis the images' content is in (kept when a feature-space method wins)."""
    y = to_generic(scores, scale)
    choice = choose(images, y, context, method)
    fitted = fit(choice.spec, images, y, context, choice.params)
    log.debug("%s: %s%s from %d ratings", user, choice.spec.name,
             "".join(f" {k}={v:g}" for k, v in choice.params.items()), len(y))
    basis = basis if isinstance(fitted, ContentResidual) else None
    return PersonalModel(str(user), choice.spec.name, choice.params, fitted, tuple(scale), generic, len(y), choice.cv,
                         basis)
