"""Keras backends: PyTorch gives TensorFlow's features, heads move between them, stores record
the backend; grouped batching gives the image-by-image store.

The PyTorch side runs once, in a subprocess (tests/backend_worker.py): TensorFlow and PyTorch
never share a process (together they crash), and that subprocess must not import TensorFlow.
"""

import importlib.util
import json
import logging

import h5py
import numpy as np
import pytest

import backend_worker
from helpers import torch_worker, write_image
from mlsp.errors import ImageDecodeError
from mlsp.extraction.job import ExtractConfig, extract
from mlsp.images.readahead import run_batched

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (pip install -e '.[torch]'); "
                                        "the backend-agreement tests compare it with TensorFlow")
# small heads, one with the registered BlockSplit layer (multi3fc), one with convolutions (pool3fc)
HEADS = {
    "multi3fc": {"channels": [16, 8, 24], "pooling": "narrow", "options": {}},
    "pool3fc": {"channels": [16, 8], "pooling": "wide", "options": {"width": 32, "kernels": 8}},
}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Everything computed once on TensorFlow (here) and once on PyTorch (a subprocess)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (pip install -e '.[torch]')")
    tmp = tmp_path_factory.mktemp("backends")
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (128, 144, 3), dtype=np.uint8)
    views = np.stack([crop, crop[:, ::-1]])
    np.save(tmp / "views.npy", views)
    weights = {net: str(tmp / f"{net}.weights.h5") for net in backend_worker.NETS}
    for net in backend_worker.NETS:
        backend_worker.save_random_backbone(net, 0, weights[net])
    images = tmp / "imgs"
    for k, (h, w) in enumerate([(96, 128), (110, 90)]):
        write_image(images / f"img{k}.png", h, w, seed=k)
    heads = {}
    for name, spec in HEADS.items():
        channels = sum(spec["channels"])
        shape = (64, channels) if spec["pooling"] == "narrow" else (64, 5, 5, channels)
        x, y = rng.normal(size=shape).astype(np.float32), rng.uniform(3, 7, 64).astype(np.float32)
        np.savez(tmp / f"{name}-data.npz", x=x, y=y)
        mine = backend_worker.train_head(name, spec["channels"], spec["pooling"], spec["options"], x, y,
                                         str(tmp / f"{name}.keras"))
        heads[name] = {**spec, "data": str(tmp / f"{name}-data.npz"), "model": str(tmp / f"{name}.keras"),
                       "tf_predictions": mine}
    job = {"backend": "torch", "views": str(tmp / "views.npy"), "weights": weights, "images": str(images),
           "store": str(tmp / "torch_store.h5"), "out": str(tmp / "torch"),
           "heads": {k: {kk: vv for kk, vv in v.items() if kk != "tf_predictions"} for k, v in heads.items()}}
    (tmp / "job.json").write_text(json.dumps(job))
    # PyTorch's side runs while TensorFlow computes its own features here
    with torch_worker("backend_worker.py", tmp / "job.json", tmp / "worker.log", timeout=600) as worker:
        tf_side = {}
        for net in backend_worker.NETS:
            fx, tf_side[net] = backend_worker.features(net, weights[net], views)
            if net == "iv3":
                tf_fx = fx
    assert worker.returncode == 0, (tmp / "worker.log").read_text()[-3000:]
    torch_side = {net: dict(np.load(tmp / f"torch-{net}.npz")) for net in backend_worker.NETS}
    found = json.loads((tmp / "torch.json").read_text())
    return {"tmp": tmp, "tf": tf_side, "torch": torch_side, "found": found, "heads": heads, "images": images,
            "weights": weights, "tf_iv3": tf_fx}


@needs_torch
@pytest.mark.parametrize("pooling", ["narrow", "wide"])
@pytest.mark.parametrize("net", backend_worker.NETS)
def test_torch_features_equal_tensorflow(both, net, pooling):
    a, b = both["tf"][net][pooling].astype(np.float64), both["torch"][net][pooling].astype(np.float64)
    assert a.shape == b.shape
    assert np.isfinite(b).all() and a.std() > 0
    rel = np.abs(a - b).max() / np.abs(a).max()
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert rel <= 1e-3, f"{net} {pooling}: max relative difference {rel:.2e}"
    assert corr >= 0.99999, f"{net} {pooling}: correlation {corr:.7f}"


@needs_torch
def test_torch_route_never_imports_tensorflow(both):
    assert both["found"]["backend"] == "torch"
    assert both["found"]["tensorflow_imported"] == []


@needs_torch
@pytest.mark.parametrize("head", sorted(HEADS))
def test_head_trained_on_one_backend_scores_the_same_on_the_other(both, head):
    out = both["tmp"]
    tf_trained_on_torch = np.load(out / f"torch-{head}-theirs.npy")
    np.testing.assert_allclose(tf_trained_on_torch, both["heads"][head]["tf_predictions"], rtol=1e-4, atol=1e-4)
    torch_trained = np.load(out / f"torch-{head}-mine.npy")
    x = np.load(out / f"{head}-data.npz")["x"]
    np.testing.assert_allclose(backend_worker.predict(str(out / f"torch-{head}.keras"), x), torch_trained,
                               rtol=1e-4, atol=1e-4)


@needs_torch
def test_store_records_backend_and_extends_from_either(both):
    """A store made on PyTorch records it, and TensorFlow may extend it: the backend is provenance."""
    store = both["tmp"] / "torch_store.h5"
    with h5py.File(store, "r") as f:
        assert f.attrs["backend"] == "torch"
        assert f.attrs["backend_version"].startswith("2.")
        assert f.attrs["device"] == "cpu"
        torch_rows = f["features"][...]
    write_image(both["images"] / "img2.png", 100, 100, seed=2)
    config = ExtractConfig(net="iv3", weights=both["weights"]["iv3"])
    result = extract(str(both["images"]), config, str(store), extractor=both["tf_iv3"])
    assert result.images == 3 and result.new == 1
    with h5py.File(store, "r") as f:
        assert f.attrs["backend"] == "tensorflow"  # the backend of the run that last wrote it
        np.testing.assert_array_equal(f["features"][:2], torch_rows)  # kept, not recomputed
    # the images PyTorch extracted, extracted again on TensorFlow: the same features
    redo = extract(str(both["images"]), config, str(both["tmp"] / "tf_store.h5"), extractor=both["tf_iv3"])
    with h5py.File(redo.store, "r") as f:
        a = f["features"][:2].astype(np.float64)
    rel = np.abs(a - torch_rows).max() / np.abs(a).max()
    assert rel <= 1e-3


# --------------------------------------------------------------------------------------------
# Grouped batching (TensorFlow, in this process)
# --------------------------------------------------------------------------------------------


def test_run_batched_groups_by_size_and_keeps_input_order():
    calls = []

    def fake(views):
        calls.append(views.shape)
        return views[:, :1, :1, 0].reshape(len(views), 1).astype(np.float32)

    shapes = [(8, 4, 6), (8, 5, 5), (8, 4, 6), None, (8, 4, 6), (8, 5, 5), (8, 4, 6)]
    decoded = []
    for k, shape in enumerate(shapes):
        if shape is None:
            decoded.append((k, ImageDecodeError(f"{k}.jpg", "broken")))
        else:
            decoded.append((k, (np.full(shape + (3,), k, np.uint8), shape[1:])))
    out = list(run_batched(fake, iter(decoded), batch_views=16, window=4))
    assert [item for item, _ in out] == list(range(len(shapes)))
    for (item, result), shape in zip(out, shapes):
        if shape is None:
            assert isinstance(result, ImageDecodeError)
        else:
            np.testing.assert_array_equal(result[0], np.full((8, 1), item, np.float32))
            assert result[1] == shape[1:]
    # images 0 and 2 together; the window (4) forces 1 alone; then 4 and 6 together; 5 at the end
    assert calls == [(16, 4, 6, 3), (8, 5, 5, 3), (16, 4, 6, 3), (8, 5, 5, 3)]
    # at most one image's views: image by image
    calls.clear()
    list(run_batched(fake, iter(decoded), batch_views=0, window=4))
    assert calls == [s + (3,) for s in shapes if s is not None]


def test_grouped_batching_gives_the_image_by_image_store(tmp_path, extractors):
    from test_extract import assert_same_store

    images = tmp_path / "imgs"
    for k, (h, w) in enumerate([(96, 128), (100, 90), (96, 128), (96, 128), (100, 90)]):
        write_image(images / f"img{k}.png", h, w, seed=k)
    fx = extractors(net="iv3")
    config = ExtractConfig(net="iv3", weights="random:0")
    sizes = []

    class Counted:  # the extractor, counting the views of each model call
        load_views, info, store_attrs = fx.load_views, fx.info, fx.store_attrs

        def process(self, views):
            sizes.append(len(views))
            return fx.process(views)

    counted = Counted()
    one = extract(str(images), config, str(tmp_path / "one.h5"), extractor=fx, batch_views=0)
    grouped = extract(str(images), config, str(tmp_path / "grouped.h5"), extractor=counted, batch_views=24,
                      batch_window=8)
    assert sorted(sizes) == [16, 24]  # three images of 96x128 in one call, two of 100x90 in another
    # Bit for bit on AVX-512 CPUs; on AVX2 a batch of 24 views is summed in another order than
    # one of 8, and 0.01% of the float16 features land one rounding step apart.
    assert_same_store(one.store, grouped.store, float16_steps=2)


PRIMITIVE = "could not create a primitive descriptor for the convolution forward propagation primitive"


def test_a_batch_onednn_cannot_run_is_run_in_smaller_parts(caplog):
    """oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) was reported to refuse some batches that it
    runs in smaller parts: the forward halves such a batch as far as needed, says so in one log
    line, and gives what one call would have; one view it cannot run is one line (KernelError)."""
    from mlsp.runtime.backend import Forward
    from mlsp.errors import KernelError

    calls = []

    def fn(batch):
        calls.append(len(batch))
        if len(batch) > 3:
            raise RuntimeError(PRIMITIVE + "\nin the first conv's ReLU")
        return batch.reshape(len(batch), -1).mean(1, keepdims=True).astype(np.float32)

    forward = Forward(fn, lambda: 0)
    batch = np.random.default_rng(0).integers(0, 256, (10, 4, 5, 3)).astype(np.uint8)
    with caplog.at_level(logging.WARNING, logger="mlsp.runtime.backend"):
        out = forward(batch)
        forward(batch)
    np.testing.assert_array_equal(out, batch.reshape(10, -1).mean(1, keepdims=True).astype(np.float32))
    assert calls[:7] == [10, 5, 2, 3, 5, 2, 3]
    lines = [r for r in caplog.records if "oneDNN" in r.getMessage()]
    assert len(lines) == 1 and "10 views of 4x5 px" in lines[0].getMessage()
    assert "Traceback" not in caplog.text

    def never(batch):
        raise RuntimeError(PRIMITIVE)

    with pytest.raises(KernelError, match=r"cannot run the model on a 4x5 px view \(could not create a primitive"):
        Forward(never, lambda: 0)(batch)
    other = Forward(lambda batch: (_ for _ in ()).throw(RuntimeError("out of memory")), lambda: 0)
    with pytest.raises(RuntimeError, match="out of memory"):  # other failures are not retried
        other(batch)


@pytest.mark.slow
def test_extraction_carries_on_where_onednn_refuses_a_batch(tmp_path, extractors, monkeypatch, caplog):
    """TensorFlow's own error, injected into the real forward for batches of more than 8 views:
    the store is the one of image-by-image calls, with one log line and no traceback."""
    import tensorflow as tf

    from test_extract import assert_same_store

    images = tmp_path / "imgs"
    for k in range(3):
        write_image(images / f"img{k}.png", 96, 128, seed=k)
    fx = extractors(net="iv3")
    config = ExtractConfig(net="iv3", weights="random:0")
    one = extract(str(images), config, str(tmp_path / "one.h5"), extractor=fx, batch_views=0)
    real = fx._forward._fn

    def refusing(batch):
        if len(batch) > 8:
            raise tf.errors.InternalError(None, None, PRIMITIVE)
        return real(batch)

    monkeypatch.setattr(fx._forward, "_fn", refusing)
    monkeypatch.setattr(fx._forward, "split_said", False)
    with caplog.at_level(logging.WARNING, logger="mlsp.runtime.backend"):
        grouped = extract(str(images), config, str(tmp_path / "grouped.h5"), extractor=fx, batch_views=24)
    assert grouped.new == 3
    assert len([r for r in caplog.records if "oneDNN" in r.getMessage()]) == 1
    assert_same_store(one.store, grouped.store, float16_steps=2)
