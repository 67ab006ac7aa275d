"""The store as a file format: lazy reads, validation of what is opened, and its description."""

import os

import h5py
import numpy as np
import pytest

from mlsp.errors import StoreError
from mlsp.store import FORMAT_VERSION, FeatureStore, describe, find_latest_store, write_store


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
    newer = tmp_path / "sub" / "newer.h5"
    write_store(newer, np.zeros((1, 1, 6), np.float16), ["x"], net="toy", pooling="narrow",
                block_names=["a"], block_channels=[6])
    os.utime(path, (1, 1))
    assert find_latest_store(str(tmp_path)) == str(newer)
    with pytest.raises(StoreError, match="mlsp extract"):
        find_latest_store(str(tmp_path / "empty"))
