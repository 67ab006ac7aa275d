"""Ratings read against a store as the generic head sees the rated images; adapting one person
(``mlsp personalize``) and scoring a store for several people at once (``mlsp score --user``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from mlsp.errors import ConfigError
from mlsp.runtime.progress import ProgressFactory, null_progress

from ..columns import PRED, PRED_STD
from .adapt import AUTO, PersonalModel, adapt, load_personal, to_generic
from .features import Basis, basis_home, pooled, store_basis
from .generic import GenericHead, open_generic
from .methods import CONTENT_TASTE_DIMS, Context, Images, content_of, learn_taste
from .ratings import MIN_RATINGS, RATING_SCALE, Ratings, read_ratings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Rated:
    """A ratings file matched to a store, and every rated image as the generic head sees it."""

    head: GenericHead
    store_path: str
    ratings: Ratings
    images: Images  # one entry per distinct rated store row
    position: dict  # store row -> index into images
    basis: Basis | None = None  # the store's principal components (images.content is in them)

    def person(self, user: str, least: int = 0) -> tuple[Images, np.ndarray]:
        """A person's rated images and their scores (on the rating scale)."""
        rows, scores = self.ratings.require(user, least) if least else self.ratings.of(user)
        return self.images.take(np.array([self.position[r] for r in rows], np.int64)), scores

    def tail_source(self, rows) -> np.ndarray:
        with self.head.open_store(self.store_path) as store:
            return self.head.tail_inputs(store, rows)

    def taste(self, users: Sequence[str]) -> np.ndarray | None:
        """Directions of taste learned from these (training) raters' ratings."""
        return learn_taste(self._per_rater(users))

    def _per_rater(self, users: Sequence[str]) -> list:
        per_rater = []
        for user in users:
            images, scores = self.person(user)
            per_rater.append((images, to_generic(scores, self.ratings.scale)))
        return per_rater

    def context(self, training_users: Sequence[str], seed: int) -> Context:
        """What the methods may use: the generic head, the content's dimension, and the
        directions of taste (in the last hidden layer and in the content) learned from these
        training raters (none without them)."""
        per_rater = self._per_rater(training_users) if training_users else []
        taste = learn_taste(per_rater) if per_rater else None
        if self.basis is None:
            return Context(self.head, taste, seed)
        content_taste = learn_taste(per_rater, CONTENT_TASTE_DIMS, space=content_of, slope=True) if per_rater else None
        return Context(self.head, taste, seed, self.basis.dims, content_taste)


def read_rated(run_dir: str, store_path: str, ratings_path: str, *, scale=RATING_SCALE,
               progress: ProgressFactory = null_progress, allow_unfinished: bool = False) -> Rated:
    """Open the run's head, check the store against it, read and match the ratings, and run the
    generic head once over every rated image."""
    head = open_generic(run_dir, allow_unfinished)
    with head.open_store(store_path) as store:
        ratings = read_ratings(ratings_path, store.ids, scale)
        if not len(ratings.rows):
            raise ConfigError(f"{ratings_path}: none of its {ratings.unmatched} ratings is of an image in "
                              f"{store_path}")
        rows = np.unique(ratings.rows)
        basis = store_basis(store, progress=progress)
        generic, hidden, content = head.embed(store, rows, progress, basis)
    rated = Rated(head, store_path, ratings, Images(rows, generic, hidden, content=content),
                  {int(r): i for i, r in enumerate(rows)}, basis)
    rated.images.tail_source = rated.tail_source
    return rated


def personalize(run_dir: str, store_path: str, ratings_path: str, user: str, out: str, *, method: str = AUTO,
                scale=RATING_SCALE, seed: int = 0, progress: ProgressFactory = null_progress,
                allow_unfinished: bool = False) -> PersonalModel:
    """Adapt the run's head to ``user`` from their ratings and save the personal model in ``out``.
    The other raters in the file are the training raters the ``taste`` method learns from."""
    rated = read_rated(run_dir, store_path, ratings_path, scale=scale, progress=progress,
                       allow_unfinished=allow_unfinished)
    images, scores = rated.person(str(user), least=MIN_RATINGS)
    others = [u for u in rated.ratings.user_names() if u != str(user)]
    context = rated.context(others, seed)
    model = adapt(str(user), images, scores, rated.ratings.scale, context, rated.head.describe(), method,
                  rated.basis)
    if model.basis is not None:  # first the shared basis, so that a saved model always has it
        model.basis.save(basis_home(rated.head, out))
    model.save(out)
    return model


class PersonalScorer:
    """The generic head and several personal models, applied to a store's features in one pass:
    the generic ``pred`` and ``pred_std`` and one ``pred_<user>`` column per person, each on the
    person's own scale."""

    def __init__(self, run_dir: str, user_dirs: Sequence[str], allow_unfinished: bool = False):
        self.head = open_generic(run_dir, allow_unfinished)
        self.models = [load_personal(path, self.head) for path in user_dirs]
        columns = [m.column for m in self.models]
        if len(set(columns)) != len(columns):
            raise ConfigError(f"two personal models of the same user among {', '.join(user_dirs)}")

    def columns(self, features: np.ndarray) -> dict:
        pred, hidden, tail = self.head.apply(features)
        images = Images(np.arange(len(pred)), pred.mean(1), hidden.mean(1), tail_cache=tail)
        bases = {m.basis.sha256: m.basis for m in self.models if m.basis is not None}
        features = pooled(features) if bases else None
        content = {sha: basis.project(features) for sha, basis in bases.items()}
        out = {PRED: pred.mean(1), PRED_STD: pred.std(1)}
        for model in self.models:
            seen = images if model.basis is None else dataclasses.replace(images, content=content[model.basis.sha256])
            out[model.column] = model.predict(seen)
        return out
