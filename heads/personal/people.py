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
from .generic import GenericHead, open_generic
from .methods import Context, Images, learn_taste
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

    def person(self, user: str, least: int = 0) -> tuple[Images, np.ndarray]:
        """A person's rated images and their scores (on the rating scale)."""
        rows, scores = self.ratings.require(user, least) if least else self.ratings.of(user)
        return self.images.take(np.array([self.position[r] for r in rows], np.int64)), scores

    def tail_source(self, rows) -> np.ndarray:
        with self.head.open_store(self.store_path) as store:
            return self.head.tail_inputs(store, rows)

    def taste(self, users: Sequence[str]) -> np.ndarray | None:
        """Directions of taste learned from these (training) raters' ratings."""
        per_rater = []
        for user in users:
            images, scores = self.person(user)
            per_rater.append((images, to_generic(scores, self.ratings.scale)))
        return learn_taste(per_rater)


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
        generic, hidden = head.embed(store, rows, progress)
    rated = Rated(head, store_path, ratings, Images(rows, generic, hidden), {int(r): i for i, r in enumerate(rows)})
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
    context = Context(rated.head, rated.taste(others) if others else None, seed)
    model = adapt(str(user), images, scores, rated.ratings.scale, context, rated.head.describe(), method)
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
        out = {PRED: pred.mean(1), PRED_STD: pred.std(1)}
        for model in self.models:
            out[model.column] = model.predict(images)
        return out
