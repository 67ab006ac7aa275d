"""The adaptation methods: a registry of ways to turn a person's ratings into a personal model.

Every method fits one person's ratings, mapped onto the generic scale, from what the generic head
sees of the rated images (:class:`Images`) and returns a fitted model that predicts on that scale:

- ``generic``: the generic prediction scaled and shifted onto the person's ratings (what
  cross-validation falls back to when a person's ratings carry no signal the others can use);
- ``residual``: a linear residual on the generic prediction from the generic head's last hidden
  layer, ridge-regularised toward zero (closed form, in the dual: k ratings cost a k x k solve);
- ``taste``: the same residual restricted to a few directions of taste shared by people, learned
  once from the training raters' own residuals (:func:`learn_taste`); k = 10 ratings can place a
  person in a 4-dimensional space where they could not fit a 256-dimensional residual;
- ``finetune``: the generic head's last layers (:mod:`heads.personal.generic`), trained from the
  generic weights on the person's ratings with early stopping on a held-out part of them;
- ``content``: the residual fitted on the store's features instead of the head's last hidden
  layer, in the store's principal components (:mod:`heads.personal.features`): a head trained for
  the generic MOS discards content people like for reasons of their own, the features keep it;
  the number of components and the penalty are chosen by cross-validation;
- ``content_taste``: ``taste`` in that space, the directions learned from the training raters'
  residuals on the content.

Each spec lists its hyperparameter grid; cross-validation (:mod:`heads.personal.adapt`) picks
among them. A new method is one more :class:`MethodSpec` in :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from mlsp.errors import ConfigError
from mlsp.registry import Registry

log = logging.getLogger(__name__)

#: Directions of shared taste learned from the training raters (at most; fewer with few raters).
TASTE_DIMS = 4
#: The same in the content space (:mod:`heads.personal.features`), where more of a person's taste lies.
CONTENT_TASTE_DIMS = 16
#: The content method's grid: leading principal components used, and ridge penalties.
CONTENT_DIMS = (4, 16, 64)
CONTENT_PENALTIES = (0.3, 3.0, 30.0)
#: The least slope of a person's ratings on the generic prediction (``generic``: positive, so that
#: it ranks as the generic model).
MIN_SLOPE = 1e-3
#: Ridge penalty of each training rater's own residual when learning the directions of taste.
TASTE_RATER_PENALTY = 1.0
#: Fine-tuning: Adam's learning rate, most full-batch steps, steps without improvement on the
#: held-out share of the person's images before stopping, that share, and the least ratings for
#: which cross-validation tries it (two layers are not fine-tuned from 10 ratings; the thesis
#: fine-tuned at k = 100).
FINETUNE_LR = 1e-2
FINETUNE_STEPS = 100
FINETUNE_PATIENCE = 10
FINETUNE_HOLDOUT = 0.2
FINETUNE_MIN_RATINGS = 50


@dataclasses.dataclass
class Images:
    """Rated images as the generic head sees them: store ``rows``, the ``generic`` prediction
    (n,) and the last ``hidden`` layer (n, d), both means over the views; ``tail_source(rows)``
    gives the tail's per-view inputs (n, V, d_tail) when fine-tuning asks for them; ``content``
    (n, D): the images' features in the store's principal components (None: not computed)."""

    rows: np.ndarray
    generic: np.ndarray
    hidden: np.ndarray
    tail_source: Callable | None = None
    tail_cache: np.ndarray | None = dataclasses.field(default=None, repr=False)
    content: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __len__(self):
        return len(self.rows)

    def take(self, index) -> "Images":
        tail = None if self.tail_cache is None else self.tail_cache[index]
        content = None if self.content is None else self.content[index]
        return Images(self.rows[index], self.generic[index], self.hidden[index], self.tail_source, tail, content)

    def content_of(self) -> np.ndarray:
        if self.content is None:
            raise ConfigError("the feature-space methods need the images' content (the store's principal "
                              "components), which was not given")
        return self.content

    def tail_inputs(self) -> np.ndarray:
        if self.tail_cache is None:
            if self.tail_source is None:
                raise ConfigError("fine-tuning needs the generic head's tail inputs, which were not given")
            self.tail_cache = self.tail_source(self.rows)
        return self.tail_cache


@dataclasses.dataclass
class Context:
    """What a method may use besides the person's ratings: the generic head (for fine-tuning),
    the directions of taste (d, q) learned from training raters (None: none), a seed, the
    dimension of the images' content (0: none, the feature-space methods are not tried) and the
    directions of taste in the content space (D, q)."""

    head: object = None  # heads.personal.generic.GenericHead
    taste: np.ndarray | None = None
    seed: int = 0
    content_dims: int = 0
    content_taste: np.ndarray | None = None


@dataclasses.dataclass
class Residual:
    """y = slope * generic + hidden @ w + b, on the generic scale."""

    w: np.ndarray
    b: float
    slope: float = 1.0
    kind = "residual"

    def predict(self, images: Images) -> np.ndarray:
        return self.slope * images.generic + images.hidden.astype(np.float64) @ self.w + self.b

    def state(self) -> dict:
        return {"w": np.asarray(self.w, np.float64), "b": np.float64(self.b), "slope": np.float64(self.slope)}

    @classmethod
    def from_state(cls, state: dict, head=None) -> "Residual":
        return cls(np.asarray(state["w"], np.float64), float(state["b"]), float(state.get("slope", 1.0)))


@dataclasses.dataclass
class Tail:
    """The generic head's tail with a person's weights: y = mean over views of tail(view)."""

    weights: list
    tuner: object  # FineTuner
    kind = "tail"

    def predict(self, images: Images) -> np.ndarray:
        x = images.tail_inputs()
        n, v = x.shape[:2]
        return self.tuner.predict(self.weights, x.reshape(n * v, -1)).reshape(n, v).mean(1)

    def state(self) -> dict:
        return {f"tail_{k}": w for k, w in enumerate(self.weights)}

    @classmethod
    def from_state(cls, state: dict, head=None) -> "Tail":
        tuner = FineTuner.of(head)
        return cls([state[f"tail_{k}"] for k in range(len(tuner.generic))], tuner)


@dataclasses.dataclass
class ContentResidual:
    """y = slope * generic + content[:, :len(w)] @ w + b, on the generic scale (the content: the
    images' features in the store's principal components, :mod:`heads.personal.features`)."""

    w: np.ndarray
    b: float
    slope: float = 1.0
    kind = "content"

    def predict(self, images: Images) -> np.ndarray:
        return self.slope * images.generic + images.content_of()[:, :len(self.w)] @ self.w + self.b

    def state(self) -> dict:
        return {"w": np.asarray(self.w, np.float64), "b": np.float64(self.b), "slope": np.float64(self.slope)}

    @classmethod
    def from_state(cls, state: dict, head=None) -> "ContentResidual":
        return cls(np.asarray(state["w"], np.float64), float(state["b"]), float(state["slope"]))


FITTED = {cls.kind: cls for cls in (Residual, Tail, ContentResidual)}


#: Where a method fits the person: in the generic head's last hidden layer (few candidates, the
#: space the head learned for the generic MOS) or in the store's features (many candidates, and
#: the content the head discards). ``auto`` chooses in this order (:func:`heads.personal.adapt.choose`).
HEAD_SPACE, FEATURE_SPACE = "head", "features"
SPACES = (HEAD_SPACE, FEATURE_SPACE)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One adaptation method: ``fit(images, y, context, **params)`` -> a fitted model, tried with
    each parameter set of ``grid``; ``needs``: what it needs of the context (``"taste"``:
    directions of taste; ``"content"``: the images' content; ``"content_taste"``: directions of
    taste in the content space)."""

    name: str
    fit: Callable
    description: str
    grid: tuple = ({},)
    needs: str = ""
    min_ratings: int = 0  # the least ratings for which ``auto`` tries it
    nested: bool = True  # cross-validated again within each fold when ``auto`` checks its choice
    space: str = HEAD_SPACE  # where it fits: the head's last hidden layer, or the store's features

    def available(self, context: Context) -> bool:
        have = {"": True, "taste": context.taste is not None, "content": context.content_dims > 0,
                "content_taste": context.content_taste is not None}
        return have[self.needs]

    def params(self, context: Context) -> list[dict]:
        """The grid's parameter sets, each number of components or directions capped at what the
        context holds (sets made equal by the cap are tried once)."""
        limits = {"dims": context.content_dims,
                  "directions": 0 if context.content_taste is None else context.content_taste.shape[1]}
        out = []
        for params in self.grid:
            params = {k: min(v, limits[k]) if k in limits else v for k, v in params.items()}
            if params not in out:
                out.append(params)
        return out


METHODS: Registry[MethodSpec] = Registry("adaptation method")


def _centred(hidden: np.ndarray):
    h = hidden.astype(np.float64)
    mean = h.mean(0)
    return h - mean, mean


def person_slope(generic: np.ndarray, y) -> float:
    """The least-squares slope of the person's ratings on the generic prediction, at least
    :data:`MIN_SLOPE` (1 where the generic prediction does not vary among the images)."""
    g = generic - generic.mean()
    spread = float(g @ g)
    if spread <= 1e-12:
        return 1.0
    return max(float(g @ (np.asarray(y) - np.mean(y))) / spread, MIN_SLOPE)


def fit_generic(images: Images, y, context: Context) -> Residual:
    """The generic prediction scaled and shifted onto the person's ratings (least squares; the
    slope kept positive, so that it ranks the images as the generic model does)."""
    slope = person_slope(images.generic, y)
    return Residual(np.zeros(images.hidden.shape[1]), float(np.mean(y - slope * images.generic)), slope)


def ridge_with_generic(x: np.ndarray, generic: np.ndarray, y, penalty: float) -> tuple[np.ndarray, float, float]:
    """(w, b, slope) of y = slope * generic + x @ w + b, ridge on ``w`` only (the slope is free):
    the generic prediction is partialled out of ``x`` and ``y`` (Frisch-Waugh), the ridge fitted
    on what is left, then the slope on what the ridge leaves."""
    x = np.asarray(x, np.float64)
    xm, gm, ym = x.mean(0), generic.mean(), float(np.mean(y))
    xc, g, yc = x - xm, generic - gm, np.asarray(y, np.float64) - ym
    spread = float(g @ g)
    if spread <= 1e-12:
        w = ridge_dual(xc, yc, penalty)
        return w, float(ym - gm - xm @ w), 1.0
    w = ridge_dual(xc - np.outer(g, g @ xc) / spread, yc - g * (g @ yc) / spread, penalty)
    slope = float(g @ (yc - xc @ w)) / spread
    return w, float(ym - slope * gm - xm @ w), slope


def ridge_dual(h: np.ndarray, r: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge weights w = h' (h h' + lambda I)^-1 r of centred rows ``h`` (k, d) and residuals ``r``;
    ``penalty`` is relative to the mean squared norm of a row (scale-free)."""
    gram = h @ h.T
    scale = max(float(np.trace(gram)) / max(len(h), 1), 1e-12)
    alpha = np.linalg.solve(gram + penalty * scale * np.eye(len(h)), r)
    return h.T @ alpha


def fit_residual(images: Images, y, context: Context, *, penalty: float) -> Residual:
    """A ridge residual on the generic prediction from the last hidden layer."""
    h, mean = _centred(images.hidden)
    r = y - images.generic
    w = ridge_dual(h, r - r.mean(), penalty)
    return Residual(w, float(r.mean() - mean @ w))


def _within(x: np.ndarray, directions: np.ndarray, images: Images, y, penalty: float) -> tuple[np.ndarray, float]:
    """Ridge weights w = directions @ c of a residual on ``x`` (n, d), and its offset."""
    h, mean = _centred(x)
    z = h @ directions
    r = y - images.generic
    gram = z.T @ z
    scale = max(float(np.trace(gram)) / max(z.shape[1], 1), 1e-12)
    c = np.linalg.solve(gram + penalty * scale * np.eye(z.shape[1]), z.T @ (r - r.mean()))
    w = directions @ c
    return w, float(r.mean() - mean @ w)


def fit_taste(images: Images, y, context: Context, *, penalty: float) -> Residual:
    """A ridge residual within the directions of taste (d, q): w = taste @ c."""
    return Residual(*_within(images.hidden, context.taste, images, y, penalty))


def fit_content(images: Images, y, context: Context, *, dims: int, penalty: float) -> ContentResidual:
    """The person's ratings from the generic prediction (its own slope) and a ridge residual on
    the first ``dims`` principal components of the images' standardised features."""
    return ContentResidual(*ridge_with_generic(images.content_of()[:, :dims], images.generic, y, penalty))


def fit_content_taste(images: Images, y, context: Context, *, directions: int, penalty: float) -> ContentResidual:
    """The same within the first ``directions`` directions of taste in the content space: w = taste @ c."""
    taste = context.content_taste[:, :directions]
    z = images.content_of()[:, :len(taste)] @ taste
    c, b, slope = ridge_with_generic(z, images.generic, y, penalty)
    return ContentResidual(taste @ c, b, slope)


def hidden_of(images: Images) -> np.ndarray:
    return images.hidden


def content_of(images: Images) -> np.ndarray:
    return images.content_of()


def learn_taste(per_rater, dims: int = TASTE_DIMS, penalty: float = TASTE_RATER_PENALTY,
                space: Callable = hidden_of, slope: bool = False) -> np.ndarray | None:
    """Directions of shared taste (d, q) from training raters: each rater's ridge residual
    (``per_rater``: (images, y) pairs) on ``space(images)`` (the last hidden layer, or
    :func:`content_of`; ``slope``: with the rater's own slope on the generic prediction, as the
    feature-space methods fit it) as one row, the top right singular vectors of them all. None
    with fewer than 2 raters."""
    rows = []
    for images, y in per_rater:
        if len(images) < 2:
            continue
        if slope:
            w = ridge_with_generic(space(images), images.generic, y, penalty)[0]
        else:
            h, _ = _centred(space(images))
            r = y - images.generic
            w = ridge_dual(h, r - r.mean(), penalty)
        norm = np.linalg.norm(w)
        if norm > 0:
            rows.append(w / norm)
    if len(rows) < 2:
        return None
    _, s, vt = np.linalg.svd(np.stack(rows), full_matrices=False)
    q = int(min(dims, len(rows) - 1, vt.shape[0]))
    log.info("taste (%s): %d directions from %d training raters (share of their residuals: %.2f)",
             space.__name__.removesuffix("_of"), q, len(rows), float((s[:q] ** 2).sum() / (s ** 2).sum()))
    return vt[:q].T.copy()


def build_tail(head):
    """A fresh Keras model of the generic head's tail, with the generic weights; its batch
    normalisations frozen (in inference mode: a person's 10 images are no batch statistics)."""
    import keras

    inputs = keras.Input((int(head.tail[0].input.shape[-1]),), name="tail_input")
    x = inputs
    for layer in head.tail:
        copy = layer.__class__.from_config(layer.get_config())
        x = copy(x)
        copy.set_weights(layer.get_weights())
        if isinstance(copy, keras.layers.BatchNormalization):
            copy.trainable = False
    return keras.Model(inputs, x, name="personal_tail")


class FineTuner:
    """One copy of a generic head's tail with its optimizer and compiled training step, reused
    for every person (each fit starts again from the generic weights and a fresh optimizer)."""

    def __init__(self, head, lr: float = FINETUNE_LR):
        import keras

        from mlsp.runtime.backend import compile_step

        self.model = build_tail(head)
        self.generic = self.model.get_weights()
        self.variables = self.model.trainable_variables
        self.optimizer = keras.optimizers.Adam(lr)
        self.optimizer.build(self.variables)
        self.train_step = compile_step(self._train_step)
        self.held_loss = compile_step(self._loss)

    @classmethod
    def of(cls, head) -> "FineTuner":
        """The head's fine-tuner, made on first use."""
        if getattr(head, "fine_tuner", None) is None:
            head.fine_tuner = cls(head)
        return head.fine_tuner

    def _loss(self, x, y, training=False):
        import keras

        return keras.ops.mean((self.model(x, training=training) - y) ** 2)

    def _train_step(self, x, y):
        from mlsp.runtime.backend import loss_and_gradients

        loss, grads = loss_and_gradients(lambda: self._loss(x, y, training=True), self.variables)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        return loss

    def fit(self, x, y, held_x, held_y) -> list:
        """Weights from the generic ones, trained on (x, y), the best on (held_x, held_y)."""
        import keras

        self.model.set_weights(self.generic)
        for variable in self.optimizer.variables:  # step count and moments; the learning rate stays
            if variable.name != "learning_rate":
                variable.assign(keras.ops.zeros_like(variable))
        x, y, held_x, held_y = (keras.ops.convert_to_tensor(a) for a in (x, y, held_x, held_y))
        best, best_weights, waited = np.inf, self.generic, 0
        for _ in range(FINETUNE_STEPS):
            self.train_step(x, y)
            loss = float(self.held_loss(held_x, held_y))
            if loss < best:
                best, best_weights, waited = loss, self.model.get_weights(), 0
            elif (waited := waited + 1) >= FINETUNE_PATIENCE:
                break
        return best_weights

    def predict(self, weights, x) -> np.ndarray:
        self.model.set_weights(weights)
        return np.asarray(self.model.predict_on_batch(x), np.float64)[:, 0]


def fit_finetune(images: Images, y, context: Context) -> Tail:
    """The generic head's last layers trained from the generic weights (Adam, full batch, MSE on
    every view of the person's images), stopped when the loss on a held-out share of the images
    has not improved for :data:`FINETUNE_PATIENCE` steps; the best weights on it are kept."""
    from mlsp.runtime.backend import set_random_seed

    set_random_seed(int(context.seed))
    tuner = FineTuner.of(context.head)
    x = images.tail_inputs()
    n, v = x.shape[:2]
    held = np.random.default_rng(context.seed).permutation(n)[: int(round(FINETUNE_HOLDOUT * n))]
    if n < 5:
        held = np.array([], np.int64)
    train = np.setdiff1d(np.arange(n), held)
    held = held if len(held) else train

    def flat(index):
        return x[index].reshape(len(index) * v, -1), np.repeat(np.asarray(y, np.float32)[index], v)[:, None]

    return Tail(tuner.fit(*flat(train), *flat(held)), tuner)


for _spec in (
    MethodSpec("generic", fit_generic, "the generic prediction scaled and shifted onto the person's ratings"),
    MethodSpec("residual", fit_residual, "ridge residual on the generic prediction from the head's last hidden layer",
               grid=tuple({"penalty": p} for p in (0.3, 3.0, 30.0))),
    MethodSpec("taste", fit_taste, "ridge residual within directions of taste learned from the training raters",
               grid=tuple({"penalty": p} for p in (0.1, 1.0, 10.0)), needs="taste"),
    MethodSpec("finetune", fit_finetune, "the head's last layers fine-tuned from the generic weights, early stopping",
               min_ratings=FINETUNE_MIN_RATINGS, nested=False),
    MethodSpec("content", fit_content, "the generic prediction (own slope) plus a ridge residual on the store's "
               "standardised features, in their leading principal components", needs="content", space=FEATURE_SPACE,
               grid=tuple({"dims": d, "penalty": p} for d in CONTENT_DIMS for p in CONTENT_PENALTIES)),
    MethodSpec("content_taste", fit_content_taste, "the same within directions of taste in the store's features "
               "learned from the training raters", needs="content_taste", space=FEATURE_SPACE,
               grid=tuple({"directions": q, "penalty": p} for q in (TASTE_DIMS, CONTENT_TASTE_DIMS)
                          for p in (0.1, 1.0, 10.0))),
):
    METHODS.register(_spec)


def fit(spec: MethodSpec, images: Images, y, context: Context, params: dict):
    """Fit one method with one parameter set."""
    return spec.fit(images, np.asarray(y, np.float64), context, **params)
