"""heads.data: one random stored view per image per epoch, the exact mean over views at test,
memory and streamed reading giving the same data, and the memory budget."""

import numpy as np
import pytest

from heads.data import (MemorySource, StoreSource, TrainBatches, epoch_plan, open_features, parse_bytes,
                        predict_views)
from mlsp.errors import ConfigError
from helpers import write_store
from mlsp.store.read import FeatureStore

N, V = 40, 8


def coded_store(path, pooling="narrow", n=N, n_views=V, channels=(2, 3)):
    """Features that say which image and view they are: every value is 10 * image + view."""
    c = sum(channels)
    code = (10 * np.arange(n)[:, None] + np.arange(n_views)[None, :]).astype(np.float32)
    shape = (n, n_views, c) if pooling == "narrow" else (n, n_views, 5, 5, c)
    features = np.broadcast_to(code.reshape(n, n_views, *([1] * (len(shape) - 2))), shape)
    split = np.array(["train"] * (n - 10) + ["val"] * 5 + ["test"] * 5)
    write_store(path, features, [f"i{k}" for k in range(n)], net="test", pooling=pooling,
                block_names=[f"b{k}" for k in range(len(channels))], block_channels=channels,
                mos=np.linspace(1, 10, n), split=split)
    return path


def decode(x):
    """(image, view) of features made by coded_store."""
    value = np.rint(x.reshape(len(x), -1)[:, 0]).astype(int)
    return value // 10, value % 10


@pytest.fixture(params=["memory", "stream"])
def source(request, tmp_path):
    path = coded_store(str(tmp_path / "s.h5"))
    with FeatureStore(path) as store:
        src = open_features(store, np.arange(N), memory_budget=None if request.param == "memory" else 0)
    assert src.mode == request.param
    yield src
    src.close()


def test_plan_is_one_random_view_per_image_per_epoch():
    seen_views = np.zeros((100, V), int)
    orders = []
    for epoch in range(200):
        plan = epoch_plan(100, V, 32, seed=3, epoch=epoch)
        positions = np.concatenate([p for p, _ in plan])
        views = np.concatenate([v for _, v in plan])
        assert sorted(positions) == list(range(100))  # every image exactly once
        assert [len(p) for p, _ in plan] == [25, 25, 25, 25]  # ceil(100/32) nearly equal batches
        assert views.min() >= 0 and views.max() < V
        seen_views[positions, views] += 1
        orders.append(positions)
    # views are uniform: 200 draws per image, 25 expected per view; orders differ per epoch
    assert seen_views.sum() == 200 * 100
    counts = seen_views.sum(axis=0)
    assert np.all(np.abs(counts - 2500) < 250), counts
    assert (seen_views > 0).mean() > 0.99
    assert len({tuple(o) for o in orders}) == 200
    # a pure function of (seed, epoch)
    a, b = epoch_plan(100, V, 32, 3, 7), epoch_plan(100, V, 32, 3, 7)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    c = epoch_plan(100, V, 32, 4, 7)
    assert not np.array_equal(np.concatenate([p for p, _ in a]), np.concatenate([p for p, _ in c]))


def test_plan_with_steps_per_epoch_makes_several_passes():
    plan = epoch_plan(10, V, 4, seed=0, epoch=0, steps=7)
    positions = np.concatenate([p for p, _ in plan])
    assert [len(p) for p, _ in plan] == [4] * 7
    # 28 samples: two full passes (each image twice) and 8 of a third
    counts = np.bincount(positions, minlength=10)
    assert counts.sum() == 28 and counts.min() >= 2 and counts.max() <= 3
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:20]) == list(range(10))


def test_batches_hold_the_planned_view_of_each_image(source):
    train_rows = np.arange(30)
    mos = np.linspace(1, 10, N)
    batches = TrainBatches(source, train_rows, mos[train_rows], batch_size=8, seed=1, workers=1)
    views_by_epoch = []
    for epoch in range(3):
        got = {}
        for i in range(len(batches)):
            x, y = batches[i]
            rows, views = batches.batch_items(i)
            image, view = decode(x)
            assert np.array_equal(image, rows) and np.array_equal(view, views)
            np.testing.assert_allclose(y[:, 0], mos[rows])
            got.update(zip(image, view))
        assert sorted(got) == list(train_rows)  # every training image once per epoch
        views_by_epoch.append([got[k] for k in train_rows])
        batches.on_epoch_end()
    assert len({tuple(views) for views in views_by_epoch}) == 3, "each epoch draws other views"


def test_take_all_views_in_any_order(source):
    rows = np.array([33, 2, 3, 4, 17, 2, 39, 0])  # repeats, runs, any order
    x = source.take(rows)
    assert x.shape == (len(rows), V, 5)
    image, view = decode(x.reshape(len(rows) * V, -1))
    assert np.array_equal(image, np.repeat(rows, V)) and np.array_equal(view, np.tile(np.arange(V), len(rows)))


def test_test_prediction_is_the_exact_mean_over_all_views(tmp_path):
    from heads.models import build_head

    rng = np.random.default_rng(0)
    features = rng.uniform(0, 2, size=(N, V, 16)).astype(np.float16)
    path = str(tmp_path / "r.h5")
    write_store(path, features, [f"i{k}" for k in range(N)], net="test", pooling="narrow", block_names=["a", "b"],
                block_channels=[6, 10], mos=np.full(N, 5.0))
    model = build_head("single3fc", [6, 10], width=32, output_bias=5.0)  # nonlinear
    rows = np.array([5, 0, 39, 12, 13, 14, 2])
    per_view = np.stack([model.predict_on_batch(features[rows, v].astype(np.float32))[:, 0] for v in range(V)], 1)
    expected = per_view.mean(axis=1)
    of_mean = model.predict_on_batch(features[rows].astype(np.float32).mean(axis=1))[:, 0]
    assert np.abs(of_mean - expected).max() > 1e-3  # the mean of predictions, not the prediction of the mean
    with FeatureStore(path) as store:
        for budget in (None, 0):
            src = open_features(store, rows, memory_budget=budget)
            for batch_views in (8, 24, 4096):  # one image per chunk, uneven chunks, one chunk
                got = predict_views(model, src, rows, batch_views=batch_views)
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
            src.close()


def test_grid_reduction_of_wide_features_is_the_narrow_feature(tmp_path):
    rng = np.random.default_rng(2)
    wide = rng.uniform(0, 3, size=(12, 2, 5, 5, 7)).astype(np.float16)
    path = str(tmp_path / "w.h5")
    write_store(path, wide, [f"i{k}" for k in range(12)], net="test", pooling="wide", block_names=["a"],
                block_channels=[7])
    narrow = wide.astype(np.float32).mean(axis=(2, 3))
    with FeatureStore(path) as store:
        for budget in (None, 0):
            src = open_features(store, np.arange(12), reduce_grid=True, memory_budget=budget)
            assert src.view_shape == (7,) and src.dtype == np.float32
            np.testing.assert_allclose(src.take(np.arange(12)), narrow, rtol=1e-6)
            np.testing.assert_allclose(src.take([3, 1], [1, 0]), narrow[[3, 1], [1, 0]], rtol=1e-6)
            src.close()


def test_memory_budget_decides_memory_or_stream(tmp_path):
    path = coded_store(str(tmp_path / "s.h5"), pooling="wide")
    with FeatureStore(path) as store:
        need = N * V * 25 * 5 * 2  # float16
        rows = np.arange(N)
        assert isinstance(open_features(store, rows, memory_budget=need), MemorySource)
        assert isinstance(open_features(store, rows, memory_budget=need - 1), StoreSource)
        # a narrow head on a wide store keeps only the grid means: 25 times fewer values, float32
        assert isinstance(open_features(store, rows, reduce_grid=True, memory_budget=N * V * 5 * 4), MemorySource)
        # only the asked-for images count
        assert isinstance(open_features(store, rows[:10], memory_budget=need // 4), MemorySource)


def test_parse_bytes():
    assert parse_bytes("512MB") == 512 * 2**20
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("2g") == 2 * 2**30
    assert parse_bytes("1000") == 1000 == parse_bytes(1000)
    assert parse_bytes("0") == 0
    for bad in ("lots", "5XB", "-1", ""):
        with pytest.raises(ConfigError, match="memory size"):
            parse_bytes(bad)


@pytest.mark.parametrize("pooling", ["narrow", "wide"])
def test_direct_reads_equal_h5py_reads(tmp_path, pooling):
    rng = np.random.default_rng(4)
    shape = (30, 3, 7) if pooling == "narrow" else (30, 3, 5, 5, 7)
    features = rng.normal(size=shape).astype(np.float16)
    path = str(tmp_path / "d.h5")
    write_store(path, features, [f"i{k}" for k in range(30)], net="test", pooling=pooling, block_names=["a"],
                block_channels=[7])
    rows, views = np.array([29, 0, 5, 5, 17]), np.array([2, 0, 1, 2, 0])
    reductions = (False, True) if pooling == "wide" else (False,)
    for reduce in reductions:
        direct, through_h5py = StoreSource(path, reduce, direct=True), StoreSource(path, reduce, direct=False)
        assert direct.direct and not through_h5py.direct
        a, b = direct.take(rows, views), through_h5py.take(rows, views)
        np.testing.assert_array_equal(a, b)
        expected = features[rows, views].astype(np.float32)
        np.testing.assert_allclose(a, expected.mean(axis=(1, 2)) if reduce else expected, rtol=1e-6)
        direct.close()
        through_h5py.close()


def test_direct_reads_fall_back_on_another_layout(tmp_path):
    import h5py

    path = str(tmp_path / "c.h5")
    coded_store(path)
    with h5py.File(path, "r+") as f:  # the same data, compressed and chunked otherwise
        data = f["features"][...]
        del f["features"]
        f.create_dataset("features", data=data, chunks=(4, V, 5), compression="gzip")
    source = StoreSource(path)
    assert not source.direct
    image, view = decode(source.take([3, 9], [1, 7]))
    assert list(image) == [3, 9] and list(view) == [1, 7]
    source.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_keras_fit_draws_new_views_every_epoch(tmp_path, workers):
    """Through model.fit (read-ahead threads or not) every batch served is the planned one, and
    each epoch is a full pass with its own views."""
    import keras

    path = coded_store(str(tmp_path / "s.h5"))
    with FeatureStore(path) as store:
        source = open_features(store, np.arange(N), memory_budget=0)
    served = []

    class Recording(TrainBatches):
        def __getitem__(self, i):
            epoch = self.epoch
            x, y = super().__getitem__(i)
            served.append((epoch, i, decode(x)))
            return x, y

    rows = np.arange(30)
    batches = Recording(source, rows, np.linspace(1, 10, N)[rows], batch_size=10, seed=5, workers=workers)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    model.fit(batches, epochs=3, verbose=0, shuffle=False)
    source.close()
    by_epoch = {}
    for epoch, i, (image, view) in served:
        positions, views = batches.plan(epoch)[i]
        assert np.array_equal(image, rows[positions]) and np.array_equal(view, views)
        by_epoch.setdefault(epoch, {}).update(zip(image.tolist(), view.tolist()))
    # Keras reads a couple of batches ahead of training to learn their shapes; the trained
    # epochs are the three full passes
    full = [views for views in by_epoch.values() if sorted(views) == list(rows)]
    assert len(full) == 3
    assert full[0] != full[1] and full[1] != full[2] and full[0] != full[2], "each epoch draws other views"
