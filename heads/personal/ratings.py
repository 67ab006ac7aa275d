"""Ratings per person: who rated which image how, matched to a feature store's images.

Two formats, told apart by their header (columns matched case-insensitively, spaces around
names and values ignored):

- FLICKR-AES's own ``FLICKR-AES_image_labeled_by_each_worker.csv``: ``worker, imagePair, score``;
- a plain CSV ``user,image,score``.

Image names are matched to the store's ids as labels are (:func:`mlsp.store.labels.match_ids`, an
image extension removed by :func:`mlsp.store.labels.strip_image_extension`). Every rating whose image
is not in the store is counted and reported. Scores outside the rating scale, missing values
and a (user, image) pair rated twice are one-line :class:`mlsp.errors.LabelsError` naming the
file and the line.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from mlsp.errors import ConfigError, LabelsError
from mlsp.store.labels import match_ids, strip_image_extension

log = logging.getLogger(__name__)

#: The scale people rate on (FLICKR-AES: 1..5); ``--scale`` changes it.
RATING_SCALE = (1.0, 5.0)
#: Column sets of the formats read: (user, image, score).
FORMATS = {
    "flickr-aes": ("worker", "imagepair", "score"),
    "csv": ("user", "image", "score"),
}
#: A person needs at least this many ratings of stored images to be adapted to.
MIN_RATINGS = 5


@dataclasses.dataclass
class Ratings:
    """Ratings of stored images: one entry per rating, in file order.

    ``rows`` are store rows; ``unmatched`` counts the ratings whose image is not in the store
    (per user in ``unmatched_by_user``); ``format`` is a key of :data:`FORMATS`."""

    path: str
    format: str
    users: np.ndarray  # (n,) str
    images: np.ndarray  # (n,) str, the store's ids
    rows: np.ndarray  # (n,) int64 store rows
    scores: np.ndarray  # (n,) float64 on the rating scale
    scale: tuple
    unmatched: int = 0
    unmatched_by_user: dict = dataclasses.field(default_factory=dict)

    def user_names(self) -> list[str]:
        """Every user with at least one matched rating, sorted."""
        return sorted(set(self.users.tolist()))

    def of(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, scores) of one user's matched ratings, in file order."""
        mask = self.users == str(user)
        return self.rows[mask], self.scores[mask]

    def require(self, user: str, least: int = MIN_RATINGS) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`of` a user who has at least ``least`` matched ratings; else a one-line error."""
        user = str(user)
        rows, scores = self.of(user)
        if len(rows) >= least:
            return rows, scores
        unmatched = self.unmatched_by_user.get(user, 0)
        if not len(rows) and not unmatched:
            raise ConfigError(f"{self.path}: no user {user!r} (users: {_some(self.user_names())})")
        raise ConfigError(f"{self.path}: user {user!r} has {len(rows)} ratings of images in the store "
                          f"({unmatched} more of images not in it); adapting needs at least {least}")


def _some(names, limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def read_table(path: str):
    """The file as a pandas DataFrame of strings with the columns ``user``, ``image``, ``score``
    and its format's name; a missing column is a one-line error."""
    import pandas as pd

    if not os.path.isfile(path):
        raise LabelsError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str, skipinitialspace=True, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise LabelsError(f"{path}: not a ratings CSV ({str(exc).splitlines()[0]})") from None
    names = {str(c).strip().lower(): c for c in frame.columns}
    for name, columns in FORMATS.items():
        if all(c in names for c in columns):
            picked = frame[[names[c] for c in columns]].copy()
            picked.columns = ["user", "image", "score"]
            return picked.apply(lambda col: col.str.strip()), name
    expected = " or ".join(", ".join(c) for c in FORMATS.values())
    raise LabelsError(f"{path}: expected the columns {expected}; the header has {', '.join(map(str, frame.columns))}")


def _checked_scores(path: str, frame, scale) -> np.ndarray:
    """The scores as floats; an empty or non-numeric one, or one outside ``scale``, is an error."""
    import pandas as pd

    scores = pd.to_numeric(frame["score"], errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(scores) | (frame["user"] == "").to_numpy() | (frame["image"] == "").to_numpy())
    if len(bad):
        row = frame.iloc[bad[0]]
        raise LabelsError(f"{path}, line {bad[0] + 2}: expected a user, an image and a numeric score, "
                          f"received {row['user']!r}, {row['image']!r}, {row['score']!r}")
    lo, hi = scale
    outside = np.flatnonzero((scores < lo) | (scores > hi))
    if len(outside):
        raise LabelsError(f"{path}, line {outside[0] + 2}: score {scores[outside[0]]:g} is outside the rating "
                          f"scale {lo:g}..{hi:g} ({len(outside)} such ratings; another scale: --scale LOW HIGH)")
    return scores


def check_scale(scale) -> tuple:
    """``(low, high)`` as finite floats, low below high (an infinite or NaN end is refused)."""
    lo, hi = (float(v) for v in scale)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ConfigError(f"a rating scale runs from a lower to a higher finite score, received {lo:g}..{hi:g}")
    return lo, hi


def read_ratings(path: str, store_ids, scale=RATING_SCALE) -> Ratings:
    """Read a ratings file (see the module docstring) and match its images to ``store_ids``."""
    path = os.fspath(path)
    scale = check_scale(scale)
    frame, name = read_table(path)
    if not len(frame):
        raise LabelsError(f"{path}: no ratings in the file")
    scores = _checked_scores(path, frame, scale)
    images = [strip_image_extension(i) for i in frame["image"]]
    users = np.array(frame["user"].tolist(), dtype=str)
    pairs = frame.assign(image=images).duplicated(["user", "image"], keep=False).to_numpy()
    if pairs.any():
        lines = (np.flatnonzero(pairs)[:2] + 2).tolist()
        raise LabelsError(f"{path}, lines {lines[0]} and {lines[1]}: user {str(users[lines[0] - 2])!r} rated image "
                          f"{images[lines[0] - 2]!r} twice ({int(pairs.sum())} ratings are repeats); "
                          "keep one rating per user and image")
    store_ids = [str(i) for i in store_ids]
    row_of = {key: row for row, key in enumerate(match_ids(store_ids, set(images))) if key is not None}
    rows = np.array([row_of.get(i, -1) for i in images], np.int64)
    found = rows >= 0
    missed = dict(zip(*np.unique(users[~found], return_counts=True))) if (~found).any() else {}
    ratings = Ratings(path, name, users[found], np.array(store_ids, dtype=object)[rows[found]].astype(str),
                      rows[found], scores[found], scale, int((~found).sum()),
                      {str(k): int(v) for k, v in missed.items()})
    log.info("%s: %d ratings by %d users of %d stored images (%s format)", path, len(rows), len(set(users)),
             len(set(rows[found].tolist())), name)
    if ratings.unmatched:
        log.warning("%s: %d of %d ratings are of images not in the store, left out (by %d users)", path,
                    ratings.unmatched, len(rows), len(missed))
    return ratings


def read_user_list(path: str) -> list[str]:
    """Users, one per line (``--users``); blank lines and ``#`` comments are skipped. Lines end at
    ``\n`` alone (an id may hold any other character, such as U+2028 or ``\x1c``); spaces and tabs
    around an id are not part of it."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            lines = handle.read().split("\n")
    except OSError as exc:
        raise LabelsError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    users = [line.split("#", 1)[0].strip(" \t\r\f\v") for line in lines]
    users = list(dict.fromkeys(u for u in users if u))
    if not users:
        raise LabelsError(f"{path}: no users in the file (one per line)")
    return users
