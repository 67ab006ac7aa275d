"""Label files and the train/val/test split.

Reads the scores that come with a dataset and decides which split every stored image is in:

- :func:`read_labels`: AVA.txt (the AVA distribution's label file) or a CSV with a header, into
  :class:`Labels` (ids, mean opinion score, 10-bin vote counts);
- :func:`read_test_list`: a list of test image ids, one per line (AVA's ``generic_test.jpgl``);
- :func:`assign_splits`: MOS, votes and split (``train``, ``val``, ``test``, ``unlabeled``) for
  the ids of a feature store, and a report of what did not match.

Every malformed input raises :class:`mlsp.errors.LabelsError` with the file and the 1-based
line number. Nothing here prints; messages go to ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from ..errors import ConfigError, LabelsError
from .format import SPLITS

log = logging.getLogger(__name__)

N_BINS = 10
SCORES = np.arange(1, N_BINS + 1, dtype=np.float64)

# Column names accepted in a CSV, matched case-insensitively, in order of preference.
ID_COLUMNS = ("id", "image_id", "image", "filename", "file")
MOS_COLUMNS = ("mos", "score", "mean")
VOTE_COLUMN_SETS = (
    tuple(f"votes_{k}" for k in range(1, N_BINS + 1)),
    tuple(str(k) for k in range(1, N_BINS + 1)),
)
# Extensions removed from ids given as file names ("123.jpg" -> "123"). Only image extensions
# are removed, so an id that merely contains a dot ("img.v2") is kept whole.
IMAGE_EXTENSIONS = frozenset(
    (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
)

AVA_FIELDS = 15  # index, image id, 10 vote counts, 2 semantic tags, challenge id
# The store keeps MOS and vote counts as float32 (features/README.md): labels are checked in it.
STORED_DTYPE = np.float32
MAX_STORED = float(np.finfo(STORED_DTYPE).max)
# A CSV that gives both a MOS and vote counts: the MOS may differ from the votes' mean by rounding
# (a MOS given to whole points), not by more.
MOS_VOTES_TOLERANCE = 0.5


@dataclasses.dataclass
class Labels:
    """Scores of a set of images.

    Attributes:
        ids: image ids, in file order, unique.
        mos: (n,) float32 mean opinion score on 1..10.
        votes: (n, 10) float32 vote counts for the scores 1..10; rows of NaN where the file
            gives no votes.
        source: the file the labels were read from (or any description).
    """

    ids: list[str]
    mos: np.ndarray
    votes: np.ndarray
    source: str = ""
    _index: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.ids = [str(i) for i in self.ids]
        self.mos = np.asarray(self.mos, dtype=np.float32).reshape(-1)
        self.votes = np.asarray(self.votes, dtype=np.float32)
        n = len(self.ids)
        if self.mos.shape != (n,) or self.votes.shape != (n, N_BINS):
            raise ConfigError(
                f"Labels need {n} MOS values and ({n}, {N_BINS}) votes, "
                f"got shapes {self.mos.shape} and {self.votes.shape}"
            )
        self._index = {i: k for k, i in enumerate(self.ids)}
        if len(self._index) != n:
            dup = next(i for i, c in Counter(self.ids).items() if c > 1)
            raise ConfigError(f"Labels ids must be unique; {dup!r} appears more than once")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id) -> bool:
        return image_id in self._index

    def lookup(self, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """MOS (m,) and votes (m, 10) of `ids` (exact matches), NaN for ids not in the labels."""
        ids = list(ids)
        mos = np.full(len(ids), np.nan, dtype=np.float32)
        votes = np.full((len(ids), N_BINS), np.nan, dtype=np.float32)
        for row, image_id in enumerate(ids):
            k = self._index.get(image_id)
            if k is not None:
                mos[row] = self.mos[k]
                votes[row] = self.votes[k]
        return mos, votes


def mos_from_votes(votes) -> np.ndarray:
    """Mean opinion score sum(k * count_k) / sum(count_k) of (..., 10) vote counts."""
    votes = np.asarray(votes, dtype=np.float64)
    return (votes @ SCORES) / votes.sum(axis=-1)


def strip_image_extension(name: str) -> str:
    """``"123.jpg"`` -> ``"123"``; names without an image extension are returned unchanged."""
    root, ext = os.path.splitext(name)
    return root if ext.lower() in IMAGE_EXTENSIONS and root else name


def _read_lines(path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise LabelsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LabelsError(f"{path}: is a folder, expected a label file") from None
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{path}: not a UTF-8 text file ({exc})") from None


def _is_csv(path, lines: Sequence[str]) -> bool:
    if os.path.splitext(str(path))[1].lower() == ".csv":
        return True
    first = next((line for line in lines if line.strip()), "")
    # AVA.txt lines are whitespace-separated integers; a comma means a CSV header.
    return "," in first


def read_labels(path) -> Labels:
    """Read a label file: AVA.txt or a CSV with a header, detected automatically.

    AVA.txt: one line per image, whitespace separated, 15 integers: index, image id, 10 vote
    counts for the scores 1..10, two semantic tag ids, challenge id. MOS is the mean of the
    votes. Blank lines are skipped.

    CSV (extension ``.csv``, or a first line with commas): a header line, then one row per
    image. Columns (case-insensitive): the id in ``id``, ``image_id``, ``image``, ``filename``
    or ``file`` (an image extension such as ``.jpg`` is removed); the MOS in ``mos``, ``score``
    or ``mean``; optionally the vote counts in ``votes_1``..``votes_10`` or ``1``..``10``. With
    votes and no MOS column the MOS is computed from the votes; with both, the given MOS is kept.

    Raises:
        LabelsError: the file is missing or malformed; the message names the file and the
            1-based line number (the CSV header is line 1).
    """
    path = os.fspath(path)
    lines = _read_lines(path)
    if _is_csv(path, lines):
        labels = _read_csv(path)
    else:
        labels = _read_ava(path, lines)
    if len(labels) == 0:
        raise LabelsError(f"{path}: no labels in the file")
    log.info("%s: %d labelled images", path, len(labels))
    return labels


def _read_ava(path: str, lines: Sequence[str]) -> Labels:
    ids: list[str] = []
    votes: list[list[int]] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {lineno}"
        if len(fields) != AVA_FIELDS:
            hint = " (a CSV needs commas and a header line)" if lineno == 1 else ""
            raise LabelsError(
                f"{where}: expected {AVA_FIELDS} whitespace-separated integers (index, image id, "
                f"10 vote counts, 2 tags, challenge), got {len(fields)} fields{hint}"
            )
        try:
            values = [int(v) for v in fields]
        except ValueError:
            bad = next(v for v in fields if not _parses(int, v))
            raise LabelsError(f"{where}: expected integers, got {bad!r}") from None
        counts = values[2:2 + N_BINS]
        if min(counts) < 0:
            raise LabelsError(f"{where}: negative vote count in {counts}")
        check_storable(counts, where)
        if sum(counts) == 0:
            raise LabelsError(f"{where}: image {fields[1]} has no votes (all 10 counts are 0)")
        image_id = fields[1]
        if image_id in first_line:
            raise LabelsError(
                f"{where}: image id {image_id} appears again (first on line {first_line[image_id]})"
            )
        first_line[image_id] = lineno
        ids.append(image_id)
        votes.append(counts)
    votes_arr = np.asarray(votes, dtype=np.float64).reshape(-1, N_BINS)
    return Labels(ids, mos_from_votes(votes_arr), votes_arr, source=path)


def check_storable(counts: Sequence[float], where: str):
    """Vote counts that the store's float32 holds: each one and their sum finite there (a count
    of 1e39 is finite in float64 but infinite once stored). A LabelsError naming ``where``."""
    with np.errstate(over="ignore"):
        too_large = any(c > MAX_STORED for c in counts) or not np.isfinite(
            np.asarray(counts, dtype=np.float64).astype(STORED_DTYPE).sum(dtype=STORED_DTYPE))
    if too_large:
        raise LabelsError(f"{where}: vote counts {list(counts)} are too large for the store (float32: "
                          f"at most {MAX_STORED:.3g} in all)")


def _parses(convert, text: str) -> bool:
    """Whether ``convert(text)`` takes the text (``int``, :func:`_number`, ...)."""
    try:
        convert(text)
    except ValueError:
        return False
    return True


def _find_column(columns: Sequence[str], accepted: Sequence[str]):
    lower = {c.strip().lower(): c for c in reversed(columns)}  # first occurrence wins
    for name in accepted:
        if name in lower:
            return lower[name]
    return None


def _number(text: str) -> float:
    """A float from a cell; NaN for an empty cell; ValueError for anything else non-numeric."""
    text = text.strip()
    if not text:
        return float("nan")
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(text)
    return value


def _read_csv(path: str) -> Labels:
    """Labels from a CSV with a header (see :func:`read_labels`): the frame, its columns, then
    each row's id and scores, checked line by line."""
    df = _read_frame(path)
    columns = _CsvColumns.find(path, [str(c) for c in df.columns])
    ids: list[str] = []
    mos_values: list[float] = []
    vote_rows: list[list[float]] = []
    first_line: dict[str, int] = {}
    used = columns.used
    blank = df.apply(lambda column: column.str.strip() == "").all(axis=1).to_numpy()
    for row, record in enumerate(df[used].itertuples(index=False, name=None)):
        if blank[row]:
            continue  # a blank line
        lineno = row + 2
        cells = dict(zip(used, (str(v) for v in record)))
        where = f"{path}, line {lineno}"
        image_id = cells[columns.id].strip()
        if not image_id:
            raise LabelsError(f"{where}: missing image id in column {columns.id!r}")
        image_id = strip_image_extension(image_id)
        if image_id in first_line:
            raise LabelsError(
                f"{where}: image id {image_id} appears again (first on line {first_line[image_id]})"
            )
        counts = columns.votes_of(cells, where=where, image_id=image_id)
        mos = columns.mos_of(cells, counts, where=where)
        first_line[image_id] = lineno
        ids.append(image_id)
        mos_values.append(mos)
        vote_rows.append(counts)
    votes = np.asarray(vote_rows, dtype=np.float64).reshape(-1, N_BINS)
    return Labels(ids, np.asarray(mos_values), votes, source=path)


def _read_frame(path: str):
    """The CSV as a pandas frame of strings, blank lines kept: row k is line k + 2 of the file."""
    import pandas as pd

    try:
        return pd.read_csv(
            path, dtype=str, keep_default_na=False, skip_blank_lines=False,
            skipinitialspace=True, encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise LabelsError(f"{path}: empty file, expected a CSV header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: not a readable CSV file ({exc})") from None


@dataclasses.dataclass(frozen=True)
class _CsvColumns:
    """The columns of a label CSV that hold the id, the MOS (or None) and the 10 vote counts
    (or None), and the reading of one row's scores from them."""

    id: str
    mos: str | None
    votes: list | None

    @classmethod
    def find(cls, path: str, columns: list[str]) -> "_CsvColumns":
        """The columns among ``columns`` (the header); a header without an id, or without a MOS
        or all 10 vote columns, is a LabelsError on line 1."""
        id_col = _find_column(columns, ID_COLUMNS)
        mos_col = _find_column(columns, MOS_COLUMNS)
        vote_cols = None
        for names in VOTE_COLUMN_SETS:
            found = [_find_column(columns, (n,)) for n in names]
            if all(found):
                vote_cols = found
                break
            if any(found):
                missing = [n for n, c in zip(names, found) if c is None]
                raise LabelsError(
                    f"{path}, line 1: vote columns {', '.join(missing)} are missing "
                    f"(give all ten of {names[0]}..{names[-1]}, or none)"
                )
        if id_col is None or (mos_col is None and vote_cols is None):
            what = "an id column" if id_col is None else "a MOS column (or 10 vote columns)"
            raise LabelsError(
                f"{path}, line 1: no {what}. Columns found: {columns}. Accepted (any case): "
                f"id: {list(ID_COLUMNS)}; MOS: {list(MOS_COLUMNS)}; votes: "
                f"votes_1..votes_10 or 1..10"
            )
        return cls(id_col, mos_col, vote_cols)

    @property
    def used(self) -> list[str]:
        return [self.id] + ([self.mos] if self.mos else []) + (self.votes or [])

    def votes_of(self, cells: dict, *, where: str, image_id: str) -> list[float]:
        """The row's 10 vote counts, NaN where the file gives none (or all 10 are 0 next to a MOS)."""
        counts = [float("nan")] * N_BINS
        if not self.votes:
            return counts
        try:
            counts = [_number(cells[c]) for c in self.votes]
        except ValueError:
            bad = next(cells[c] for c in self.votes if not _parses(_number, cells[c]))
            raise LabelsError(f"{where}: vote count {bad!r} is not a number") from None
        given = [np.isfinite(c) for c in counts]
        if any(given) and not all(given):
            raise LabelsError(f"{where}: some of the 10 vote counts are empty")
        if all(given) and min(counts) < 0:
            raise LabelsError(f"{where}: negative vote count in {counts}")
        if all(given):
            check_storable(counts, where)
        if all(given) and sum(counts) == 0:
            if not self.mos:
                raise LabelsError(f"{where}: image {image_id} has no votes (all 10 counts are 0)")
            counts = [float("nan")] * N_BINS  # no votes; the given MOS stands alone
        return counts

    def mos_of(self, cells: dict, counts: list[float], *, where: str) -> float:
        """The row's MOS: given, or else the mean of its votes (``counts``); in 1..10."""
        if self.mos:
            text = cells[self.mos].strip()
            if not text:
                raise LabelsError(f"{where}: missing MOS in column {self.mos!r}")
            try:
                mos = _number(text)
            except ValueError:
                raise LabelsError(f"{where}: MOS {text!r} is not a number") from None
        else:
            if not np.isfinite(counts[0]):
                raise LabelsError(f"{where}: no votes to compute the MOS from")
            mos = float(mos_from_votes(counts))
        if not 1.0 <= mos <= 10.0:
            raise LabelsError(f"{where}: MOS {mos:g} is outside 1..10")
        if self.mos and np.isfinite(counts[0]):
            mean = float(mos_from_votes(counts))
            if abs(mos - mean) > MOS_VOTES_TOLERANCE:
                raise LabelsError(f"{where}: MOS {mos:g} disagrees with its votes, whose mean is {mean:.2f} "
                                  f"(more than {MOS_VOTES_TOLERANCE:g} apart): is a column shifted?")
        return mos


def read_test_list(path) -> list[str]:
    """Image ids of a test list such as AVA's ``generic_test.jpgl``: one id per line.

    Whitespace around ids and blank lines are ignored, an image extension (``123.jpg``) is
    removed, and repeated ids are kept once, in the order of their first line.

    Raises:
        LabelsError: a missing file, a line with more than one field, or no ids at all.
    """
    path = os.fspath(path)
    ids: dict[str, None] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise LabelsError(
                f"{path}, line {lineno}: expected one image id per line, got {len(fields)} fields"
            )
        ids.setdefault(strip_image_extension(fields[0]), None)
    if not ids:
        raise LabelsError(f"{path}: no image ids in the test list")
    log.info("%s: %d test ids", path, len(ids))
    return list(ids)


def _basename(store_id: str) -> str:
    name = store_id.rsplit("/", 1)[-1]
    return name.rsplit(os.sep, 1)[-1] if os.sep != "/" else name


def match_ids(store_ids: Sequence[str], label_ids) -> list:
    """For each store id, the label id it stands for, or None.

    A store id matches a label id that is equal to it. Failing that, it matches the label id
    equal to its last path component (``sub/953619`` -> ``953619``), provided no other store id
    has that same last component: an ambiguous name matches nothing.
    """
    label_ids = label_ids if isinstance(label_ids, (set, frozenset, dict)) else set(label_ids)
    base_counts = Counter(_basename(s) for s in store_ids)
    matched = []
    for s in store_ids:
        if s in label_ids:
            matched.append(s)
            continue
        base = _basename(s)
        if base != s and base_counts[base] == 1 and base in label_ids:
            matched.append(base)
        else:
            matched.append(None)
    return matched


def _n_val(n: int, val_fraction: float) -> int:
    if n < 2 or val_fraction <= 0:
        return 0
    n_val = int(np.floor(val_fraction * n + 0.5))  # rounded half up
    return min(max(n_val, 1), n - 1)


def random_draw(ids: Sequence[str], seed: int) -> np.ndarray:
    """A number in [0, 1) for each id, from a hash of the seed and the id alone: the same for an
    id whatever other ids there are, so a split drawn with it is kept when images are added."""
    import hashlib

    keys = (hashlib.sha256(f"{int(seed)}\0{i}".encode("utf-8", "surrogateescape")).digest()[:8] for i in ids)
    return np.array([int.from_bytes(k, "big") / 2.0**64 for k in keys], dtype=np.float64)


def random_test(ids: Sequence[str], labelled: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """The random test split of a dataset without a test list: each labelled image whose
    :func:`random_draw` is below ``test_fraction``. Where none is (a handful of images), the one
    with the smallest draw, so that a test split exists; that one may change as images are added."""
    draw = random_draw(ids, seed)
    is_test = labelled & (draw < test_fraction)
    if test_fraction > 0 and not is_test.any() and labelled.sum() >= 3:
        is_test[np.flatnonzero(labelled)[np.argmin(draw[labelled])]] = True
    return is_test


def assign_splits(
    ids: Sequence[str],
    labels: Labels | None,
    test_ids: Iterable[str] | None,
    val_fraction: float = 0.05,
    seed: int = 0,
    test_fraction: float = 0.0,
):
    """MOS, votes and split of every store id, and a report of what did not match.

    Args:
        ids: the store's image ids, in store order: file paths relative to the input folder
            without extension (``953619``, or ``sub/953619`` in nested folders).
        labels: the labels, or None (everything is then ``unlabeled``).
        test_ids: ids of the test split (e.g. from :func:`read_test_list`), or None.
        val_fraction: share of the labelled non-test images that go to ``val``.
        seed: seed of the random splits.
        test_fraction: without `test_ids`, the share of labelled images drawn for ``test``
            (:func:`random_test`); 0: no test split.

    Ids are matched as in :func:`match_ids`: a label or test id matches the store id equal to
    it, or else the one store id whose last path component equals it.

    Splits: ``test`` for a labelled image whose id is in `test_ids` (or, with `test_fraction`,
    drawn by :func:`random_test`); ``unlabeled`` for an image
    without MOS (a test image without a label too, with a warning); the other labelled images
    are split at random into ``train`` and ``val``: round(val_fraction * n) (half up) go to
    ``val``, at least 1 when n >= 2 and at most n - 1. The draw uses
    ``numpy.random.default_rng(seed)`` over the sorted ids, so it depends only on the set of
    ids, the seed and the fraction, never on the order of `ids`.

    Returns:
        (mos, votes, split, report): mos (n,) float32 and votes (n, 10) float32, NaN where
        unknown; split (n,) array of str; report, a dict with ``counts`` (images per split),
        ``labels_without_images``, ``test_ids_without_images``, ``test_ids_without_labels``
        and ``ambiguous_names`` (numbers of ids), and ``examples`` (up to 10 sorted ids of each).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if test_fraction and test_ids:
        raise ConfigError("give a test list or a test fraction, not both")
    ids = [str(i) for i in ids]
    n = len(ids)
    if len(set(ids)) != n:
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ConfigError(f"store ids must be unique; {dup!r} appears more than once")

    matches = _Matches.find(ids, labels, test_ids)
    mos = np.full(n, np.nan, dtype=np.float32)
    votes = np.full((n, N_BINS), np.nan, dtype=np.float32)
    if labels is not None:
        rows = [k for k, key in enumerate(matches.label_keys) if key is not None]
        mos[rows], votes[rows] = labels.lookup([matches.label_keys[k] for k in rows])
    labelled = ~np.isnan(mos)
    is_test = random_test(ids, labelled, test_fraction, seed) if test_fraction else matches.is_test
    split = _draw_splits(ids, labelled=labelled, is_test=is_test, val_fraction=val_fraction, seed=seed)
    report = matches.report(split, labelled)
    _log_report(report)
    return mos, votes, split, report


@dataclasses.dataclass
class _Matches:
    """The label id and the test id each store id matched (:func:`match_ids`; None where none)."""

    ids: list[str]  # the store's
    label_ids: list[str]  # every id of the labels
    test_set: set  # every test id
    label_keys: list
    test_keys: list

    @classmethod
    def find(cls, ids: list[str], labels: Labels | None, test_ids: Iterable[str] | None) -> "_Matches":
        n = len(ids)
        test_set = set(test_ids) if test_ids is not None else set()
        return cls(ids=ids, label_ids=labels.ids if labels is not None else [], test_set=test_set,
                   label_keys=match_ids(ids, labels._index) if labels is not None else [None] * n,
                   test_keys=match_ids(ids, test_set) if test_set else [None] * n)

    @property
    def is_test(self) -> np.ndarray:
        return np.array([k is not None for k in self.test_keys], dtype=bool)

    def report(self, split: np.ndarray, labelled: np.ndarray) -> dict:
        """:func:`assign_splits`' report: images per split and the ids that matched nothing."""
        ids = self.ids
        without_images = sorted(set(self.label_ids) - {key for key in self.label_keys if key is not None})
        tests_without_images = sorted(self.test_set - {key for key in self.test_keys if key is not None})
        tests_without_labels = sorted(ids[k] for k in np.flatnonzero(self.is_test & ~labelled))
        basenames = Counter(_basename(s) for s in ids)
        wanted = set(self.label_ids) | self.test_set
        ambiguous = sorted(
            s for s, lk, tk in zip(ids, self.label_keys, self.test_keys)
            if lk is None and tk is None and _basename(s) in wanted and basenames[_basename(s)] > 1
        )
        return {
            "counts": {name: int(np.sum(split == name)) for name in SPLITS},
            "labels_without_images": len(without_images),
            "test_ids_without_images": len(tests_without_images),
            "test_ids_without_labels": len(tests_without_labels),
            "ambiguous_names": len(ambiguous),
            "examples": {
                "labels_without_images": without_images[:10],
                "test_ids_without_images": tests_without_images[:10],
                "test_ids_without_labels": tests_without_labels[:10],
                "ambiguous_names": ambiguous[:10],
            },
        }


def _draw_splits(ids: list[str], *, labelled: np.ndarray, is_test: np.ndarray, val_fraction: float,
                 seed: int) -> np.ndarray:
    """``test`` for labelled test images, ``unlabeled`` for images without MOS, the other labelled
    images drawn into ``train`` and ``val`` over their sorted ids (:func:`assign_splits`)."""
    split = np.full(len(ids), "unlabeled", dtype="<U9")
    split[labelled & is_test] = "test"
    pool = sorted(ids[k] for k in np.flatnonzero(labelled & ~is_test))
    n_val = _n_val(len(pool), val_fraction)
    val_ids = {pool[k] for k in np.random.default_rng(seed).permutation(len(pool))[:n_val]}
    for k in np.flatnonzero(labelled & ~is_test):
        split[k] = "val" if ids[k] in val_ids else "train"
    return split


def _log_report(report: dict):
    """Warnings for test images without label and for ambiguous names; the splits' sizes."""
    examples = report["examples"]
    if report["test_ids_without_labels"]:
        log.warning(
            "%d test images have no label and are counted as unlabeled, e.g. %s",
            report["test_ids_without_labels"], ", ".join(examples["test_ids_without_labels"][:5]),
        )
    if report["ambiguous_names"]:
        log.warning(
            "%d images match no label because another image in another folder has the same "
            "name, e.g. %s", report["ambiguous_names"], ", ".join(examples["ambiguous_names"][:5]),
        )
    log.info(
        "splits: %s; %d labels without images, %d test ids without images",
        ", ".join(f"{k} {v}" for k, v in report["counts"].items()),
        report["labels_without_images"], report["test_ids_without_images"],
    )
