"""The store as a file format: lazy reads, validation of what is opened, and its description."""

import os
import re

import h5py
import numpy as np
import pytest

from mlsp.errors import StoreError
from helpers import write_store
from mlsp.store.read import FeatureStore, describe, find_latest_store
from mlsp.store.format import FORMAT_VERSION


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((30, 8, 5, 5, 6)).astype(np.float16)
    path = tmp_path / "s.h5"
    write_store(path, features, [f"im{i:02d}" for i in range(30)], net="toy", pooling="wide",
                block_names=["a", "b"], block_channels=[2, 4], mos=np.linspace(1, 10, 30))
    return path, features


def test_reads_any_order_with_repeats_and_single_views(store):
    path, features = store
    with FeatureStore(str(path)) as s:
        assert s.features.chunks == (1, 1, 5, 5, 6), "wide stores read one view per chunk"
        for idx in ([7, 3, 3, 29, 0, 1, 2], list(range(30)), [12], []):
            np.testing.assert_array_equal(s.read(idx), features[idx])
        views = [0, 7, 3]
        np.testing.assert_array_equal(s.read([4, 4, 9], views=views), features[[4, 4, 9], views])
        assert s.views == ["tl", "tl_flip", "tr", "tr_flip", "bl", "bl_flip", "br", "br_flip"]


def test_refuses_newer_format_and_missing_fields(store, tmp_path):
    path, _ = store
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match="newer"):
        FeatureStore(str(path))
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        del f["mos"]
    with pytest.raises(StoreError, match="missing mos"):
        FeatureStore(str(path))
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        FeatureStore(str(tmp_path / "x.h5"))


def test_describe_and_latest(store, tmp_path):
    path, _ = store
    info = describe(str(path))
    assert info["images"] == 30 and info["channels"] == 6 and info["pooling"] == "wide"
    assert info["splits"]["train"] == 30 and info["labelled"] == 30
    assert "decoding" not in info  # a store written before the format had it
    from mlsp.images.decode import DECODING

    with h5py.File(path, "r+") as f:
        f.attrs["decoding"] = DECODING
    assert describe(str(path))["decoding"] == DECODING  # part of the configuration: inspect shows it
    newer = tmp_path / "sub" / "newer.h5"
    write_store(newer, np.zeros((1, 1, 6), np.float16), ["x"], net="toy", pooling="narrow",
                block_names=["a"], block_channels=[6])
    os.utime(path, (1, 1))
    assert find_latest_store(str(tmp_path)) == str(newer)
    with pytest.raises(StoreError, match="mlsp extract"):
        find_latest_store(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# Validated reads: a damaged store is named, with its image, never read as numbers
# --------------------------------------------------------------------------------------------


def damage(path, **edits):
    with h5py.File(path, "r+") as f:
        for key, fn in edits.items():
            fn(f)


def test_non_finite_features_are_named_with_the_image(store):
    path, features = store
    damage(path, features=lambda f: f["features"].__setitem__((17, 3, 2, 2, 1), np.nan))
    with FeatureStore(str(path)) as s:  # opening is cheap and does not read features
        s.read([0, 5, 16])
        with pytest.raises(StoreError, match=r"s\.h5: image im17 \(row 17\) has features that are not finite"):
            s.read([2, 17])
        with pytest.raises(StoreError, match="image im17"):
            s.read([17], views=[3])
        with pytest.raises(StoreError, match="image im17"):
            s.check_features(block_bytes=3 * features[0].nbytes)  # several blocks
        s.check_features(rows=[0, 1, 16, 18, 29])
        with pytest.raises(StoreError, match="image im17"):
            s.load()
    info = describe(str(path), check_features=True)
    assert "image im17" in info["features_check"]
    from mlsp.store.read import FeatureReader

    for direct in (True, False):  # positional reads, and h5py's where the layout does not allow them
        with FeatureReader(str(path), direct=direct) as reader:
            assert reader.direct == direct
            reader.read_views([16, 18], [3, 3])
            with pytest.raises(StoreError, match=r"image im17 \(row 17\) has features that are not finite"):
                reader.read_views([16, 17], [0, 3])


def test_bad_labels_unequal_lengths_and_flipped_metadata_are_one_line_errors(store, tmp_path):
    path, _ = store
    damage(path, mos=lambda f: f["mos"].__setitem__(4, -1.5e22))
    with pytest.raises(StoreError, match=r"s\.h5: image im04 has MOS -1\.5e\+22, outside 1\.\.10"):
        FeatureStore(str(path))
    damage(path, mos=lambda f: f["mos"].__setitem__(4, np.inf))
    with pytest.raises(StoreError, match="image im04 has MOS inf"):
        FeatureStore(str(path))
    damage(path, mos=lambda f: f["mos"].__setitem__(4, np.nan))  # NaN: no label, fine
    FeatureStore(str(path)).close()

    def shorter(f):
        mos = f["mos"][:-1]
        del f["mos"]
        f["mos"] = mos

    damage(path, mos=shorter)
    with pytest.raises(StoreError, match=r"datasets of unequal length \(features 30, ids 30, paths 30, sizes 30, "
                                         r"mos 29, votes 30, split 30\)"):
        FeatureStore(str(path))
    # bytes flipped in the file's metadata (the superblock and the root group's header)
    for offset in (0, 48, 96, 176):
        broken = tmp_path / f"flipped{offset}.h5"
        data = bytearray(path.read_bytes())
        data[offset:offset + 8] = bytes(b ^ 0xFF for b in data[offset:offset + 8])
        broken.write_bytes(bytes(data))
        with pytest.raises(StoreError, match=rf"flipped{offset}\.h5: "):
            with FeatureStore(str(broken)) as s:
                s.check_features()


def trained_synthetic(tmp_path, n, n_views):
    """A synthetic narrow store of ``n`` images and a single1fc run (one epoch) trained on it,
    through the CLI: (store, run folder, CliRunner)."""
    from click.testing import CliRunner

    import cli
    from synthetic import write_synthetic_store

    path = tmp_path / "s.h5"
    write_synthetic_store(str(path), n, n_views=n_views, block_channels=(8, 8), pooling="narrow", seed=0)
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(cli.main, ["train", "--store", str(path), "--head", "single1fc", "--out", str(run),
                                   "--epochs", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    return path, run, runner


def test_inspect_train_and_score_refuse_a_damaged_store(tmp_path):
    """NaN features: inspect names the image; train and score stop with one line instead of
    writing NaN predictions."""
    import cli

    path, run, runner = trained_synthetic(tmp_path, 300, n_views=2)
    with h5py.File(path, "r+") as f:
        bad_id = f["ids"][123].decode()
        f["features"][123, 1, 5] = np.inf
    res = runner.invoke(cli.main, ["inspect", str(path)])
    assert res.exit_code == 1 and f"image {bad_id} (row 123)" in res.output.splitlines()[-1]
    assert runner.invoke(cli.main, ["inspect", "--quick", str(path)]).exit_code == 0
    for memory in ("0", "1GB"):  # streamed from the store, or loaded into memory
        res = runner.invoke(cli.main, ["train", "--store", str(path), "--head", "single1fc", "--out",
                                       str(tmp_path / f"run{memory}"), "--epochs", "1", "--no-progress",
                                       "--memory-budget", memory])
        assert res.exit_code == 1, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
        assert errors == [line for line in errors if line.startswith(f"Error: {path}: image {bad_id} (row 123)")]
        assert len(errors) == 1 and "Traceback" not in res.output
        assert not (tmp_path / f"run{memory}" / "predictions.csv").exists()
    res = runner.invoke(cli.main, ["score", str(run), "--store", str(path), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 1 and f"image {bad_id}" in res.output and not (tmp_path / "p.csv").exists()
    assert "Traceback" not in res.output


def test_inspect_through_the_cli(store, tmp_path):
    """`mlsp inspect` prints what describe() finds, as a table or JSON, and lists unusable inputs."""
    import json

    from click.testing import CliRunner

    import cli

    path, features = store
    with h5py.File(path, "r+") as f:  # two inputs the extraction could not use
        del f["errors"]
        g = f.create_group("errors")
        for key, values in (("id", ["bad1", "bad2"]), ("path", ["a/bad1.jpg", "bad2.png"]),
                            ("reason", ["empty file", "too small: 40x30"])):
            g.create_dataset(key, data=np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8"))
    res = CliRunner().invoke(cli.main, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info == json.loads(json.dumps(describe(str(path), check_features=True), default=str))
    assert info["features_check"] == "ok"
    assert (info["net"], info["pooling"], info["images"], info["channels"], info["errors"]) == ("toy", "wide", 30, 6, 2)
    assert info["features_shape"] == list(features.shape) and info["splits"]["train"] == 30
    res = CliRunner().invoke(cli.main, ["inspect", str(path), "--errors"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[-2:] == ["a/bad1.jpg\tempty file", "bad2.png\ttoo small: 40x30"]
    table = dict(line.split(None, 1) for line in lines[:-2])
    assert table["images"] == "30" and table["net"] == "toy" and table["errors"] == "2"
    missing = CliRunner().invoke(cli.main, ["inspect", str(tmp_path / "none.h5")])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_consecutive_runs():
    from mlsp.store.read import consecutive_runs

    rows = [0, 1, 2, 2, 3, 7, 9, 10, 11, 12, 13]
    assert consecutive_runs(rows) == [(0, 5), (5, 6), (6, 11)]
    assert consecutive_runs(rows, max_rows=2) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 8), (8, 10), (10, 11)]
    assert consecutive_runs([]) == []


def test_feature_reader_reads_what_the_store_holds(store):
    from mlsp.store.read import FeatureReader

    path, features = store
    with FeatureReader(str(path)) as reader:
        assert reader.direct, "the store's own layout allows positional reads"
        rows = np.array([29, 3, 4, 4, 5, 0])
        got = np.empty((len(rows),) + features.shape[1:], features.dtype)
        for positions, block in reader.image_runs(rows, max_bytes=2 * reader.image_nbytes):
            assert len(positions) <= 2
            got[positions] = block
        np.testing.assert_array_equal(got, features[rows])
        views = np.array([7, 0, 3, 3, 1, 6])
        np.testing.assert_array_equal(reader.read_views(rows, views), features[rows, views])


def test_features_readme_lists_the_attribute_table():
    """features/README.md's root attributes are mlsp.store.config's table, row for row (names,
    type, meaning), and its configuration paragraph names exactly the configuration's keys."""
    import re

    from mlsp.store.config import ATTRIBUTES, CONFIG_KEYS

    text = open(os.path.join(os.path.dirname(__file__), "..", "features", "README.md")).read()
    section = text.split("## Root attributes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = [tuple(c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]) for row in rows]
    table = [(", ".join(f"`{n}`" for n in a.names), a.type, a.meaning) for a in ATTRIBUTES]
    assert documented == table
    paragraph = re.search(r"The configuration of a store is (.*?): extraction", text, re.S).group(1)
    assert tuple(re.findall(r"`([^`]+)`", paragraph)) == CONFIG_KEYS


def test_store_config_round_trip_and_what_derives_from_it(tmp_path, monkeypatch):
    """to_attrs writes every row of the table an extraction knows; from_attrs gives back the
    extraction; the forward cache's key and the scoring checks are the table's."""
    from mlsp.backbone import forward_cache
    from mlsp.extraction.job import ExtractConfig
    from mlsp.store.config import (ATTRIBUTES, CONFIG_KEYS, FORWARD_KEYS, SCORED_KEYS, config_attrs,
                                   from_attrs, names, to_attrs)

    record = {"source": "random:3", "sha256": "ab" * 32}
    for config in (ExtractConfig(net="iv3", pooling="wide", augment=False, weights="random:3", max_side=0,
                                 precision="bfloat16"),
                   ExtractConfig(net="irv2")):
        attrs = to_attrs(config, record, {"backend": "tensorflow", "backend_version": "x", "device": "cpu"})
        written = set(attrs)
        assert written == set(names()) - set(names(kind="format")) - set(names(kind="description")) | {
            "weights", "weights_path"}
        assert set(CONFIG_KEYS) <= written and attrs["crop_fraction"] == (0.875 if config.augment else 1.0)
        back = ExtractConfig(weights=config.weights, **from_attrs(attrs))
        assert back == config
        assert set(config_attrs(attrs)) == set(CONFIG_KEYS) | {"block_names", "block_channels"}
    assert {a.kind for a in ATTRIBUTES if set(a.names) & set(FORWARD_KEYS)} == {"configuration"}
    assert set(SCORED_KEYS) <= set(CONFIG_KEYS)
    import sys
    import types

    fake_tf = types.SimpleNamespace(__version__="t")
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    key = forward_cache.cache_key(ExtractConfig(net="iv3", precision="float16", weights="random:0"), "random:0")
    assert {k: key[k] for k in FORWARD_KEYS} == {"net": "iv3", "pooling": "narrow", "precision": "float16"}


EDITS = {  # what a store edited by hand (or by another tool) could hold, and how it is named
    "duplicated ids": (lambda f: f["ids"].__setitem__(3, f["ids"][2]), r"image id 'im02' appears more than once"),
    "a split named bogus": (lambda f: f["split"].__setitem__(5, "bogus"), r"unknown split 'bogus'"),
    "reordered views": (lambda f: f["views"].__setitem__(slice(0, 2), ["tl_flip", "tl"]),
                        r"views \['tl_flip', 'tl', .*not in the format's order"),
    "negative sizes": (lambda f: f["sizes"].__setitem__(7, [-3, 100]), r"image im07 has a negative size \[-3, 100\]"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_store_is_refused_by_readers_and_inspect(store, edit):
    from click.testing import CliRunner

    import cli

    path, _ = store
    fn, words = EDITS[edit]
    damage(path, edit=fn)
    with pytest.raises(StoreError, match=r"s\.h5: " + words):
        FeatureStore(str(path))
    res = CliRunner().invoke(cli.main, ["inspect", "--quick", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert re.search(words, res.output.splitlines()[-1]) and "the store is damaged" in res.output


def test_train_and_score_refuse_an_edited_store(tmp_path):
    import cli

    path, run, runner = trained_synthetic(tmp_path, 200, n_views=1)
    damage(path, split=lambda f: f["split"].__setitem__(9, "bogus"), ids=lambda f: f["ids"].__setitem__(4, "x"))
    for args in (["train", "--store", str(path), "--head", "single1fc", "--out", str(tmp_path / "run2"),
                  "--epochs", "1", "--no-progress"],
                 ["score", str(run), "--store", str(path), "--out", str(tmp_path / "p.csv")]):
        res = runner.invoke(cli.main, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert res.output.splitlines()[-1].startswith(f"Error: {path}: unknown split 'bogus'")
    assert not (tmp_path / "p.csv").exists()
