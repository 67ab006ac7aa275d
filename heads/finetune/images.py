"""The labelled images of a fine-tuning run, their splits and their batches, streamed from files.

The ids, labels and splits are exactly ``mlsp extract``'s (:func:`mlsp.extraction.job.collect_inputs`,
:func:`mlsp.store.labels.assign_splits` with the same test list or fraction, val fraction and seed), so
a fine-tuned run's test split is the test split of the store made from the same folder and
labels, and ``mlsp compare`` can set them side by side.

Training batches: each image decoded in a thread ahead of the model
(:func:`mlsp.images.readahead.decode_ahead`, at most ``prefetch`` decoded images held), resized to a
square of ``resize`` px, cropped at random to ``size`` and flipped at random (NIMA's
augmentation). The order, crops and flips of epoch ``e`` come from ``(seed, e)`` alone, so a run
resumed from a checkpoint sees the batches an uninterrupted one would. Validation, test and
scoring resize the whole image to ``size`` (and score it with its mirror image).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import cv2
import numpy as np

from mlsp.errors import ConfigError, ImageDecodeError
from mlsp.extraction.job import collect_inputs
from mlsp.images.decode import decode_image
from mlsp.store.labels import assign_splits, read_labels, read_test_list
from mlsp.images.readahead import PREFETCH, decode_ahead

from ..evaluation import THRESHOLD
from ..targets import TARGETS, initial_bias, vote_histograms

log = logging.getLogger(__name__)


def square(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` resized to ``side`` x ``side`` (area averaging when shrinking, cubic when enlarging)."""
    h, w = img.shape[:2]
    interpolation = cv2.INTER_AREA if side <= min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(img, (side, side), interpolation=interpolation)


def load_whole(path: str, size: int) -> np.ndarray:
    """One image file as the (size, size, 3) float32 RGB array the network scores."""
    return square(decode_image(path, max_side=2 * size), size).astype(np.float32)


@dataclasses.dataclass
class LabelledImages:
    """Every image of the folder: path, id, MOS, votes and split (``train``, ``val``, ``test``,
    ``unlabeled``), and the files that could not be listed (``skipped``: (path, reason))."""

    paths: list
    ids: list
    mos: np.ndarray
    votes: np.ndarray
    split: np.ndarray
    skipped: list

    @classmethod
    def load(cls, images: str, labels: str, test_list: str | None, *, val_fraction: float, test_fraction: float,
             seed: int) -> "LabelledImages":
        paths, ids, skipped, _ = collect_inputs(images)
        test_ids = read_test_list(test_list) if test_list else None
        mos, votes, split, _ = assign_splits(ids, read_labels(labels), test_ids, val_fraction, seed,
                                             0.0 if test_list else test_fraction)
        return cls(paths, ids, mos, votes, split, skipped)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero((self.split == split) & np.isfinite(self.mos))

    def test_ids(self) -> list:
        return sorted(self.ids[k] for k in self.rows("test"))


@dataclasses.dataclass(frozen=True)
class Target:
    """What the network learns of each image (``name``: mos, distribution or binary) and which
    images it can learn it from."""

    name: str
    delta: float = 0.0

    def labels(self, data: LabelledImages) -> np.ndarray:
        """(n,) MOS, (n, 10) vote histograms or (n, 2) one-hot good/bad; NaN where unknown."""
        if self.name == "mos":
            return data.mos.astype(np.float64)
        if self.name == "distribution":
            return vote_histograms(data.votes)
        high = (data.mos > THRESHOLD).astype(np.float64)
        onehot = np.stack([1.0 - high, high], axis=1)
        onehot[~np.isfinite(data.mos)] = np.nan
        return onehot

    def usable(self, data: LabelledImages, rows: np.ndarray) -> np.ndarray:
        """``rows`` that have this target (votes for a distribution; outside (5 - delta, 5 + delta)
        for binary)."""
        labels = self.labels(data)[rows]
        ok = np.all(np.isfinite(labels.reshape(len(rows), -1)), axis=1)
        if self.name == "binary" and self.delta > 0:
            ok &= np.abs(data.mos[rows] - THRESHOLD) >= self.delta
        return rows[ok]

    def output_bias(self, train_labels: np.ndarray) -> list:
        """The last layer's bias: an untrained network predicts the training mean (or prior)."""
        if self.name != "binary":
            return initial_bias(TARGETS[self.name], train_labels)
        prior = np.clip(np.mean(train_labels, axis=0), 1e-4, 1.0)
        return [float(v) for v in np.log(prior) - np.log(prior).mean()]


def epoch_plan(rows: np.ndarray, seed: int, epoch: int, resize: int, size: int):
    """The order, crop corners and flips of one training epoch, from ``(seed, epoch)`` alone."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rows[rng.permutation(len(rows))]
    corners = rng.integers(0, resize - size + 1, size=(len(rows), 2))
    flips = rng.random(len(rows)) < 0.5
    return order, corners, flips


def train_batches(data: LabelledImages, labels: np.ndarray, rows: np.ndarray, *, seed: int, epoch: int,
                  resize: int, size: int, batch_size: int, steps: int = 0, workers: int = 2) -> Iterator:
    """``(x, y)`` batches of one epoch: (B, size, size, 3) float32 RGB 0..255 and the labels;
    ``steps`` > 0: at most that many batches. An image that cannot be decoded is left out (and
    logged)."""
    order, corners, flips = epoch_plan(rows, seed, epoch, resize, size)
    if steps:
        order = order[: steps * batch_size]

    def load(item):
        path, (y0, x0), flip = item
        img = square(decode_image(path, max_side=2 * resize), resize)[y0:y0 + size, x0:x0 + size]
        return (img[:, ::-1] if flip else img).astype(np.float32)

    items = [((data.paths[r], tuple(corners[k]), bool(flips[k])), r) for k, r in enumerate(order)]
    xs, ys = [], []
    for (_, row), img in decode_ahead(load, items, workers, max(PREFETCH, 2 * batch_size)):
        if isinstance(img, ImageDecodeError):
            log.warning("%s: left out of training: %s", img.path, img.reason)
            continue
        xs.append(img)
        ys.append(labels[row])
        if len(xs) == batch_size:
            yield np.stack(xs), np.asarray(ys, np.float32)
            xs, ys = [], []
    if xs:
        yield np.stack(xs), np.asarray(ys, np.float32)


def n_steps(n_rows: int, batch_size: int, steps: int = 0) -> int:
    full = -(-n_rows // batch_size)
    return min(full, steps) if steps else full


def predict_files(model, paths, size: int, *, batch_size: int, workers: int = 2, mirror: bool = True) -> np.ndarray:
    """The network's output for each file, its mean over the image and its mirror image (``mirror``):
    (n, K); rows of NaN for files that cannot be decoded."""
    out, xs, where = None, [], []

    def flush():
        nonlocal out, xs, where
        batch = np.stack(xs)
        if mirror:
            batch = np.concatenate([batch, batch[:, :, ::-1]])
        pred = np.asarray(model.predict_on_batch(batch), np.float64).reshape(len(batch), -1)
        if mirror:
            pred = (pred[: len(xs)] + pred[len(xs):]) / 2
        if out is None:
            out = np.full((len(paths), pred.shape[1]), np.nan)
        out[where] = pred
        xs, where = [], []

    for (path, k), img in decode_ahead(lambda p: load_whole(p, size), [(p, k) for k, p in enumerate(paths)],
                                       workers, max(PREFETCH, 2 * batch_size)):
        if isinstance(img, ImageDecodeError):
            log.warning("%s: not scored: %s", img.path, img.reason)
            continue
        xs.append(img)
        where.append(k)
        if len(xs) == batch_size:
            flush()
    if xs:
        flush()
    if out is None:
        raise ConfigError("none of the images could be decoded")
    return out
