"""The literature's protocol for personalised aesthetics (Ren et al., ICCV 2017), built in.

For each test person, each k and each repeat: draw k of the person's rated images for
adaptation, adapt the generic model on them alone, and compute the SRCC of the generic and of the
personal prediction on the person's *other* rated images. Training raters (everyone in the
ratings file who is not a test rater) may be learned from (the directions of taste); a test
rater's held-out images never are: the adaptation sees only the k drawn images, checked for
every draw. Each draw is seeded by (seed, k, repeat, person), so a rerun gives the same table.

Outputs in the evaluation folder:

- ``evaluation.csv``: one row per person, k and repeat: ``user,k,repeat,n_adapt,n_test,
  srcc_generic,srcc_personal,method`` (the method cross-validation chose for that draw);
- ``summary.json``: per k the mean gain in SRCC over people (each person's mean over the
  repeats), its standard deviation, min and max over people, its spread over repeats, and the
  number of draws each method was chosen for;
- ``gain_per_person.png``: each person's mean gain, per k (as in the PIAA literature).

Rows are appended to ``evaluation.csv.partial`` as they come (one JSON object a line, any id
round-trips); an interrupted evaluation run again with the same settings goes on from there.
Settings that leave no test rater with enough ratings are refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from typing import TYPE_CHECKING, Sequence

import numpy as np

from mlsp.runtime.atomic import atomic_path, write_json
from mlsp.errors import ConfigError, ResumeError
from mlsp.runtime.jsonlines import JsonLines
from mlsp.runtime.progress import ProgressFactory, null_progress

from ..plots import plot_gain_per_person
from .adapt import AUTO, adapt
from .methods import Context
from .ratings import RATING_SCALE, read_user_list

if TYPE_CHECKING:
    from .people import Rated

log = logging.getLogger(__name__)

#: The literature's numbers of adaptation images, and repeats per person.
KS = (10, 100)
REPEATS = 10
#: A person is tested at k only with at least this many other rated images left for the test.
MIN_TEST = 5
COLUMNS = ("user", "k", "repeat", "n_adapt", "n_test", "srcc_generic", "srcc_personal", "method")
EVALUATION_CSV = "evaluation.csv"
SUMMARY_JSON = "summary.json"
GAIN_PLOT = "gain_per_person.png"
SETTINGS_JSON = "evaluation.settings.json"
FLICKR_SPLIT_MISSING = ("FLICKR-AES's split of 173 training and 37 test workers does not come with mlsp (its "
                        "list of test workers is not available here): give the test workers with --users FILE")


def srcc(a, b) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import spearmanr  # here: scipy.stats takes a second to import, every command would pay it

    return float(spearmanr(a, b)[0])


def draw(n: int, k: int, seed: int, repeat: int, user: str) -> tuple[np.ndarray, np.ndarray]:
    """(adaptation, test) positions among a person's n ratings for one repeat; disjoint."""
    rng = np.random.default_rng([seed, k, repeat, zlib.crc32(str(user).encode())])
    order = rng.permutation(n)
    return np.sort(order[:k]), np.sort(order[k:])


def split_users(rated: Rated, users_file: str | None) -> tuple[list[str], list[str]]:
    """(test raters, training raters). ``users_file`` lists the test raters; without it every
    rater is tested and none trains, except for FLICKR-AES, whose split must be given."""
    everyone = rated.ratings.user_names()
    if users_file is None:
        if rated.ratings.format == "flickr-aes":
            raise ConfigError(f"{rated.ratings.path}: {FLICKR_SPLIT_MISSING}")
        return everyone, []
    test = read_user_list(users_file)
    unknown = [u for u in test if u not in set(everyone)]
    if unknown:
        raise ConfigError(f"{users_file}: {len(unknown)} users have no rating of a stored image in "
                          f"{rated.ratings.path}, e.g. {unknown[0]!r}")
    return test, [u for u in everyone if u not in set(test)]


@dataclasses.dataclass
class Settings:
    run: str
    store: str
    ratings: str
    test_users: list
    ks: list
    repeats: int
    method: str
    seed: int
    scale: list


#: How the partial file is written (recorded with its settings: a rerun finding another starts afresh;
#: 2: rows with the method chosen).
PARTIAL_FORMAT = "json-lines/2"


class Partial:
    """``evaluation.csv.partial``: finished rows appended as they come, one JSON object a line
    (:mod:`mlsp.runtime.jsonlines`: any person's id round-trips), with the settings they were
    made under beside them (a rerun under other settings starts afresh)."""

    def __init__(self, out: str, settings: Settings):
        self.rows = JsonLines(os.path.join(out, EVALUATION_CSV + ".partial"))
        self.path = self.rows.path
        self.settings_path = os.path.join(out, SETTINGS_JSON)
        wanted = {**json.loads(json.dumps(dataclasses.asdict(settings))), "partial_format": PARTIAL_FORMAT}
        have = None
        if os.path.isfile(self.settings_path):
            try:
                with open(self.settings_path, encoding="utf-8") as handle:
                    have = json.load(handle)
            except (ValueError, RecursionError):  # not ours: start afresh
                have = None
        if have != wanted or not self.rows.exists():
            os.makedirs(out, exist_ok=True)
            write_json(self.settings_path, wanted)
            self.rows.start()

    def damaged(self, what: str) -> ResumeError:
        return ResumeError(f"{self.path}: {what}; the draws of an interrupted evaluation cannot be trusted: delete "
                           f"{self.path} to evaluate every draw again")

    def read(self) -> dict:
        """{(user, k, repeat): row} of the rows complete on disk."""
        try:
            lines = self.rows.read()
        except UnicodeDecodeError:
            raise self.damaged("damaged (not text)") from None
        done = {}
        for number, value in lines:
            row = _partial_row(value)
            if row is None:
                raise self.damaged(f"line {number} is not a finished draw (damaged)")
            done[(row["user"], row["k"], row["repeat"])] = row
        return done

    def remove(self):
        self.rows.remove()
        if os.path.exists(self.settings_path):
            os.remove(self.settings_path)

    def append(self, row: dict):
        self.rows.append({c: row[c] for c in COLUMNS})

    def close(self):
        self.rows.close()


_INTEGERS = ("k", "repeat", "n_adapt", "n_test")


def _partial_row(value) -> dict | None:
    """A line of the partial file as its row (every column, of its type), or None."""
    if not isinstance(value, dict) or not set(COLUMNS) <= set(value):
        return None
    if not isinstance(value["user"], str) or not isinstance(value["method"], str):
        return None
    if not all(isinstance(value[c], int) and not isinstance(value[c], bool) for c in _INTEGERS):
        return None
    if not all(isinstance(value[c], (int, float)) and not isinstance(value[c], bool)
               for c in ("srcc_generic", "srcc_personal")):
        return None
    return {c: value[c] for c in COLUMNS}


def evaluate_person(rated: Rated, user: str, k: int, repeat: int, context: Context, method: str,
                    seed: int) -> dict | None:
    """One person, k and repeat: adapt on k drawn images, test on the rest (None: too few ratings)."""
    images, scores = rated.person(user)
    if len(scores) < k + MIN_TEST:
        return None
    adapt_at, test_at = draw(len(scores), k, seed, repeat, user)
    adapt_images, test_images = images.take(adapt_at), images.take(test_at)
    if np.intersect1d(adapt_images.rows, test_images.rows).size:  # a rating is one (user, image) pair
        raise ConfigError(f"{rated.ratings.path}: user {user!r}: an image drawn for adaptation is also a test image")
    context = dataclasses.replace(context, seed=int(zlib.crc32(f"{seed}-{k}-{repeat}-{user}".encode())))
    model = adapt(user, adapt_images, scores[adapt_at], rated.ratings.scale, context, rated.head.describe(), method)
    truth = scores[test_at]
    return {"user": user, "k": k, "repeat": repeat, "n_adapt": len(adapt_at), "n_test": len(test_at),
            "srcc_generic": srcc(test_images.generic, truth), "srcc_personal": srcc(model.predict(test_images), truth),
            "method": model.method}


def evaluate(run_dir: str, store_path: str, ratings_path: str, out: str, *, users_file: str | None = None,
             ks: Sequence[int] = KS, repeats: int = REPEATS, method: str = AUTO, scale=RATING_SCALE, seed: int = 0,
             progress: ProgressFactory = null_progress, allow_unfinished: bool = False) -> dict:
    """Run the protocol (module docstring); returns the summary (also in ``out/summary.json``)."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 2 or repeats < 1:
        raise ConfigError(f"--k must be at least 2 and --repeats at least 1, received k {ks} and {repeats} repeats")
    from .people import read_rated

    rated = read_rated(run_dir, store_path, ratings_path, scale=scale, progress=progress,
                       allow_unfinished=allow_unfinished)
    test_users, training_users = split_users(rated, users_file)
    if not any(len(rated.ratings.of(user)[1]) >= ks[0] + MIN_TEST for user in test_users):
        raise ConfigError(f"{ratings_path}: no test rater has k + {MIN_TEST} rated images of the store for any k "
                          f"asked ({', '.join(map(str, ks))}); choose a smaller --k")
    context = rated.context(training_users, seed)
    settings = Settings(getattr(run_dir, "name", run_dir), store_path, ratings_path, test_users, ks, repeats, method, seed, list(scale))
    partial = Partial(out, settings)
    done = partial.read()
    bar = progress(total=len(ks) * repeats * len(test_users), desc="personalise", unit="person")
    try:
        for k in ks:
            for repeat in range(repeats):
                for user in test_users:
                    if (user, k, repeat) not in done:
                        row = evaluate_person(rated, user, k, repeat, context, method, seed)
                        if row is not None:
                            partial.append(row)
                    bar.update(1)
    finally:
        bar.close()
        partial.close()
    frame = _finish(out, partial, test_users)
    summary = summarise(frame, ks, len(training_users))
    write_json(os.path.join(out, SUMMARY_JSON), summary)
    plot_gain_per_person(os.path.join(out, GAIN_PLOT), per_person_gain(frame))
    partial.remove()
    return summary


def _finish(out: str, partial: Partial, test_users):
    import pandas as pd

    rows = list(partial.read().values())
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype(
        {"k": int, "repeat": int, "n_adapt": int, "n_test": int, "srcc_generic": float, "srcc_personal": float})
    order = {u: i for i, u in enumerate(test_users)}
    frame = frame.sort_values(["k", "repeat", "user"], key=lambda c: c.map(order) if c.name == "user" else c)
    frame = frame.reset_index(drop=True)
    with atomic_path(os.path.join(out, EVALUATION_CSV), keep_extension=True) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return frame


def per_person_gain(frame):
    """Each person's mean gain in SRCC over the repeats, per k: a DataFrame (k, user, gain, spread)."""
    gain = frame.assign(gain=frame["srcc_personal"] - frame["srcc_generic"]).dropna(subset=["gain"])
    return gain.groupby(["k", "user"], sort=False)["gain"].agg(["mean", "std"]).reset_index()


def summarise(frame, ks, n_training: int) -> dict:
    """``summary.json``'s content, keyed by k; see the module docstring. ``methods_chosen``
    counts the methods cross-validation chose, over every draw of the table."""
    people = per_person_gain(frame)
    summary = {}
    for k in ks:
        at = frame[frame["k"] == k]
        mine = people[people["k"] == k]["mean"].to_numpy()
        if not len(mine):
            log.warning("k = %d: no test person has %d + %d rated images; nothing evaluated", k, k, MIN_TEST)
            continue
        by_repeat = (at["srcc_personal"] - at["srcc_generic"]).groupby(at["repeat"]).mean().to_numpy()
        methods, counts = np.unique(at["method"].astype(str).to_numpy(), return_counts=True)
        summary[str(k)] = {
            "k": k, "people": int(len(mine)), "repeats": int(at["repeat"].nunique()),
            "mean": float(mine.mean()), "std": float(mine.std(ddof=1)) if len(mine) > 1 else 0.0,
            "min": float(mine.min()), "max": float(mine.max()),
            "std_over_repeats": float(by_repeat.std(ddof=1)) if len(by_repeat) > 1 else 0.0,
            "srcc_generic": float(at["srcc_generic"].mean()), "srcc_personal": float(at["srcc_personal"].mean()),
            "methods_chosen": {str(m): int(c) for m, c in zip(methods, counts)},
            "training_raters": n_training,
        }
    return summary
