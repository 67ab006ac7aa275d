"""mlsp.store.labels: AVA.txt and CSV parsing, test lists, id matching and splits."""

import logging

import numpy as np
import pytest

from mlsp.errors import LabelsError
from mlsp.store.labels import Labels, assign_splits, match_ids, read_labels, read_test_list

# Hand-checkable votes: all on 5 -> 5.0; 1 on 1 and 1 on 10 -> 5.5; 3 on 2 and 1 on 6 -> 3.0.
AVA_LINES = [
    "1 953619 0 0 0 0 4 0 0 0 0 0 1 22 1396",
    "2 953958 1 0 0 0 0 0 0 0 0 1 0 0 1396",
    "",
    "3 954184 0 3 0 0 0 1 0 0 0 0 10 14 1396",
]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def ava(tmp_path):
    return write(tmp_path, "AVA.txt", "\n".join(AVA_LINES) + "\n")


def test_ava_parses_with_hand_checked_mos(ava):
    labels = read_labels(ava)
    assert labels.ids == ["953619", "953958", "954184"]
    assert labels.mos.dtype == np.float32 and labels.votes.dtype == np.float32
    np.testing.assert_allclose(labels.mos, [5.0, 5.5, 3.0])
    assert labels.votes.shape == (3, 10)
    assert labels.votes[2].tolist() == [0, 3, 0, 0, 0, 1, 0, 0, 0, 0]
    assert labels.source == str(ava)


def test_lookup_gives_nan_for_unknown_ids(ava):
    mos, votes = read_labels(ava).lookup(["954184", "nope", "953619"])
    assert mos[0] == 3.0 and mos[2] == 5.0 and np.isnan(mos[1])
    assert np.isnan(votes[1]).all() and votes[0].sum() == 4


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ("4 960000 0 0 0 0 4 0 0 0 0 0 1 22", "15"),  # a field missing
        ("4 960000 0 0 0 0 4 0 0 0 0 0 1 22 1396 7", "16"),  # one too many
        ("4 960000 0 0 0 0 4.5 0 0 0 0 0 1 22 1396", "'4.5'"),  # not an integer
        ("4 abc 0 0 0 0 4 0 0 0 0 0 1 22 1396", "'abc'"),  # non-integer id
        ("4 960000 0 0 -2 0 4 0 0 0 0 0 1 22 1396", "negative"),
        ("4 960000 0 0 0 0 0 0 0 0 0 0 1 22 1396", "no votes"),
        # finite as a Python int and in float64, infinite in the store's float32
        (f"4 960000 0 0 0 0 {10**39} 0 0 0 0 0 1 22 1396", "too large for the store"),
        ("4 960000 0 0 0 0 " + " ".join([str(2**127)] * 6) + " 1 22 1396", "too large"),  # the sum
    ],
)
def test_malformed_ava_line_names_file_and_line(tmp_path, bad_line, words):
    path = write(tmp_path, "AVA.txt", "\n".join(AVA_LINES + [bad_line]) + "\n")
    with pytest.raises(LabelsError) as info:
        read_labels(path)
    message = str(info.value)
    assert str(path) in message and "line 5" in message and words in message


def test_duplicate_ava_id_names_both_lines(tmp_path):
    lines = AVA_LINES + ["4 953958 0 0 0 0 4 0 0 0 0 0 1 22 1396"]
    with pytest.raises(LabelsError, match=r"line 5: .*953958.*line 2"):
        read_labels(write(tmp_path, "AVA.txt", "\n".join(lines)))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(LabelsError, match="no labels"):
        read_labels(write(tmp_path, "AVA.txt", "\n\n"))
    with pytest.raises(LabelsError, match="no such file"):
        read_labels(tmp_path / "absent.txt")


def test_csv_with_mos_only_and_file_name_ids(tmp_path):
    path = write(tmp_path, "scores.csv", "Filename,MOS\n12.jpg,4.5\nsub/13.PNG,7\nv1.2,3\n\n14,9.25\n")
    labels = read_labels(path)
    assert labels.ids == ["12", "sub/13", "v1.2", "14"]  # "v1.2" is no file name: kept whole
    np.testing.assert_allclose(labels.mos, [4.5, 7, 3, 9.25])
    assert np.isnan(labels.votes).all()


def test_csv_detected_by_header_without_csv_extension(tmp_path):
    labels = read_labels(write(tmp_path, "labels.txt", "image_id,score\n1,2\n"))
    assert labels.ids == ["1"] and labels.mos[0] == 2


def test_csv_votes_without_mos_compute_the_mean(tmp_path):
    header = "id," + ",".join(f"votes_{k}" for k in range(1, 11))
    path = write(tmp_path, "v.csv", header + "\na,0,0,0,0,4,0,0,0,0,0\nb,1,0,0,0,0,0,0,0,0,1\n")
    labels = read_labels(path)
    np.testing.assert_allclose(labels.mos, [5.0, 5.5])
    assert labels.votes[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]


def test_csv_votes_and_mos_keep_the_given_mos(tmp_path):
    header = "file,mean," + ",".join(str(k) for k in range(1, 11))
    labels = read_labels(write(tmp_path, "v.csv", header + "\nx.jpg,5.4,0,0,0,0,4,0,0,0,0,0\n"))
    assert labels.ids == ["x"] and labels.mos[0] == np.float32(5.4) and labels.votes[0, 4] == 4


def test_csv_mos_that_disagrees_with_its_votes_names_file_and_line(tmp_path):
    header = "id,mos," + ",".join(f"votes_{k}" for k in range(1, 11))
    path = write(tmp_path, "v.csv", header + "\na,5.2,0,0,0,0,4,0,0,0,0,0\nb,9,0,7,0,0,0,0,0,0,0,0\n")
    with pytest.raises(LabelsError, match=r"v\.csv, line 3: MOS 9 disagrees with its votes, whose mean is 2\.00"):
        read_labels(path)


@pytest.mark.parametrize(
    "rows, line, words",
    [
        ("1,5\n2,good\n", 3, "not a number"),
        ("1,5\n2,0.5\n", 3, "outside 1..10"),
        ("1,5\n2,11\n", 3, "outside 1..10"),
        ("1,5\n,6\n", 3, "missing image id"),
        ("1,5\n2,\n", 3, "missing MOS"),
        ("1,5\n1.jpg,6\n", 3, "first on line 2"),
        ("1,5\n2,1e39\n", 3, "outside 1..10"),
    ],
)
def test_malformed_csv_rows_name_file_and_line(tmp_path, rows, line, words):
    path = write(tmp_path, "s.csv", "id,mos\n" + rows)
    with pytest.raises(LabelsError) as info:
        read_labels(path)
    assert str(path) in str(info.value) and f"line {line}" in str(info.value)
    assert words in str(info.value)


def test_csv_without_needed_columns_lists_found_and_accepted(tmp_path):
    path = write(tmp_path, "s.csv", "name,rating\n1,5\n")
    with pytest.raises(LabelsError) as info:
        read_labels(path)
    message = str(info.value)
    assert "'name'" in message and "'rating'" in message
    assert "image_id" in message and "filename" in message and "mos" in message


def test_csv_with_some_vote_columns_is_refused(tmp_path):
    path = write(tmp_path, "s.csv", "id,votes_1,votes_2\n1,3,4\n")
    with pytest.raises(LabelsError, match="votes_3"):
        read_labels(path)


def test_read_test_list(tmp_path):
    path = write(tmp_path, "generic_test.jpgl", " 953619 \n\n953958.jpg\n953619\n954184\n")
    assert read_test_list(path) == ["953619", "953958", "954184"]
    with pytest.raises(LabelsError, match="line 2"):
        read_test_list(write(tmp_path, "bad.jpgl", "1\n2 3\n"))


def make_labels(ids, seed=1):
    rng = np.random.default_rng(seed)
    votes = rng.integers(0, 20, size=(len(ids), 10)).astype(float) + 1
    mos = (votes @ np.arange(1, 11)) / votes.sum(1)
    return Labels(list(ids), mos, votes, source="test")


def test_splits_are_deterministic_and_order_independent():
    ids = [str(100000 + k) for k in range(200)]
    labels = make_labels(ids[:180] + ["999999"])
    test_ids = ids[:30] + ids[190:195]
    mos, votes, split, report = assign_splits(ids, labels, test_ids, val_fraction=0.1, seed=3)
    assert report["counts"] == {"train": 135, "val": 15, "test": 30, "unlabeled": 20}
    assert report["labels_without_images"] == 1
    assert report["examples"]["labels_without_images"] == ["999999"]
    assert report["test_ids_without_labels"] == 5
    assert report["test_ids_without_images"] == 0
    assert np.isnan(mos[split == "unlabeled"]).all()
    assert not np.isnan(mos[split != "unlabeled"]).any()
    np.testing.assert_array_equal(mos[:180], labels.mos[:180])

    order = np.random.default_rng(7).permutation(len(ids))
    shuffled = [ids[k] for k in order]
    _, _, split2, _ = assign_splits(shuffled, labels, test_ids, val_fraction=0.1, seed=3)
    assert dict(zip(shuffled, split2)) == dict(zip(ids, split))

    _, _, again, _ = assign_splits(ids, labels, test_ids, val_fraction=0.1, seed=3)
    np.testing.assert_array_equal(again, split)
    _, _, other, _ = assign_splits(ids, labels, test_ids, val_fraction=0.1, seed=4)
    assert not np.array_equal(other, split)


@pytest.mark.parametrize(
    "n, fraction, expected",
    [(100, 0.05, 5), (10, 0.05, 1), (2, 0.01, 1), (1, 0.5, 0), (20, 0.0, 0), (40, 0.1, 4), (3, 0.9, 2)],
)
def test_val_count(n, fraction, expected):
    ids = [f"im{k}" for k in range(n)]
    _, _, split, report = assign_splits(ids, make_labels(ids), None, val_fraction=fraction)
    assert report["counts"]["val"] == expected == int(np.sum(split == "val"))
    assert report["counts"]["train"] == n - expected


def test_no_labels_means_all_unlabeled():
    mos, votes, split, report = assign_splits(["a", "b"], None, None)
    assert split.tolist() == ["unlabeled", "unlabeled"] and np.isnan(mos).all()
    assert np.isnan(votes).all() and report["labels_without_images"] == 0


def test_test_ids_without_labels_warn(caplog):
    labels = make_labels(["a", "b", "c"])
    with caplog.at_level(logging.WARNING, logger="mlsp.store.labels"):
        _, _, split, report = assign_splits(["a", "b", "c", "d"], labels, ["a", "d", "zz"])
    assert split.tolist()[0] == "test" and split.tolist()[3] == "unlabeled"
    assert report["test_ids_without_labels"] == 1 and report["test_ids_without_images"] == 1
    assert "no label" in caplog.text


def test_basename_matching_only_when_unique():
    store = ["sub/1", "x/2", "y/2", "3", "deep/er/3", "4"]
    assert match_ids(store, {"1", "2", "3", "4"}) == ["1", None, None, "3", None, "4"]
    labels = make_labels(["1", "2", "3", "4"])
    mos, _, split, report = assign_splits(store, labels, ["1"])
    assert split[0] == "test" and mos[0] == labels.mos[0]
    assert np.isnan(mos[[1, 2, 4]]).all()
    assert report["labels_without_images"] == 1  # "2": two candidates, neither taken
    assert report["ambiguous_names"] == 3


def test_bad_arguments():
    from mlsp.errors import ConfigError

    with pytest.raises(ConfigError):
        assign_splits(["a", "a"], None, None)
    with pytest.raises(ConfigError):
        assign_splits(["a"], None, None, val_fraction=1.0)


def test_csv_vote_count_beyond_float32_names_file_and_line(tmp_path):
    header = "id," + ",".join(f"votes_{k}" for k in range(1, 11))
    path = write(tmp_path, "v.csv", header + "\na,0,0,0,0,4,0,0,0,0,0\nb,0,0,0,0,1e39,0,0,0,0,0\n")
    with pytest.raises(LabelsError, match=r"v\.csv, line 3: vote counts .* too large for the store"):
        read_labels(path)


def test_random_test_split_is_kept_when_images_are_added():
    from mlsp.store.labels import random_test

    ids = [f"photo_{k:04d}" for k in range(400)]
    labels = make_labels(ids)
    _, _, split, report = assign_splits(ids[:300], labels, None, val_fraction=0.1, seed=5, test_fraction=0.2)
    assert 40 <= report["counts"]["test"] <= 80  # 60 expected: a draw, not a count
    _, _, more, _ = assign_splits(ids, labels, None, val_fraction=0.1, seed=5, test_fraction=0.2)
    assert ((more[:300] == "test") == (split == "test")).all(), "an image kept in test or out of it"
    assert ((more == "test") == random_test(ids, np.ones(400, bool), 0.2, 5)).all()
    _, _, order, _ = assign_splits(ids[::-1], labels, None, val_fraction=0.1, seed=5, test_fraction=0.2)
    assert ((order[::-1] == "test") == (more == "test")).all()
    _, _, other, _ = assign_splits(ids, labels, None, val_fraction=0.1, seed=6, test_fraction=0.2)
    assert ((other == "test") != (more == "test")).any()
    # only labelled images are drawn; a handful of them still gets a test image
    _, _, few, _ = assign_splits(ids[:3] + ["nolabel"], make_labels(ids[:3]), None, seed=0, test_fraction=0.01)
    assert few.tolist().count("test") == 1 and few[3] == "unlabeled"
    with pytest.raises(Exception, match="not both"):
        assign_splits(ids, labels, ids[:5], test_fraction=0.2)
