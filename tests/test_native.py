"""The native engine (mlsp/backbone/native.py): its features equal the Keras model's on TensorFlow, views of
mixed sizes in one bucketed call equal each alone, and ``--engine`` is refused where it cannot run
(every registry entry's ``bucket_exact`` is checked with the other entry checks, tests/test_backbones.py).

The PyTorch side runs in a subprocess (tests/native_worker.py): TensorFlow, which pytest's
process runs, and PyTorch never share a process.
"""

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

import backend_worker
from helpers import torch_worker, write_image
from mlsp.backbone import native
from mlsp.images.readahead import run_batched

NETS = ("iv3", "irv2")
# one array of two views at an odd size, one of one view at an even size (the nets' least side is 75)
SIZES = ((2, 83, 101), (1, 96, 120))
PRECISIONS = {"iv3": ["float32", "bfloat16"], "irv2": ["float32"]}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


# ---- fast: no backbone, no PyTorch ----------------------------------------------------------


def test_area_matrix_is_the_pooling_layers_weights_zero_beyond_the_view():
    from mlsp.backbone.pooling import area_weights

    for length, size in ((7, 5), (13, 5), (3, 5), (9, 1)):
        padded = length + 6
        got = native.area_matrix(length, size, padded)
        want = np.asarray(area_weights(length, size))
        np.testing.assert_allclose(got[:, :length], want, rtol=1e-6, atol=1e-7)
        assert not got[:, length:].any()


def test_same_pads_match_tensorflow():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for size, kernel, stride in ((9, 3, 1), (10, 4, 1), (11, 3, 2), (12, 2, 2)):
        x = rng.normal(size=(1, size, 1, 1)).astype(np.float32)
        k = rng.normal(size=(kernel, 1, 1, 1)).astype(np.float32)
        want = tf.nn.conv2d(x, k, (stride, 1), "SAME").numpy()[0, :, 0, 0]
        before, after = native.same_pads(size, kernel, stride)
        padded = np.pad(x[0, :, 0, 0], (before, after))
        got = [padded[i * stride:i * stride + kernel] @ k[:, 0, 0, 0] for i in range(len(want))]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _tiny(strided_same=False, unknown_after_tap=False, unknown=False):
    import keras

    x = inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same" if strided_same else "valid", name="c1")(x)
    x = keras.layers.Activation("relu", name="a1")(x)
    if unknown:
        x = keras.layers.LayerNormalization(name="ln")(x)
    tap = keras.layers.AveragePooling2D(3, strides=1, padding="same", name="tap")(x)
    y = keras.layers.LayerNormalization(name="after")(tap) if unknown_after_tap else tap
    return keras.Model(inp, y), [tap]


def test_plan_reads_only_what_the_taps_need_and_names_an_unknown_layer():
    model, taps = _tiny(unknown_after_tap=True)
    plan, why = native.plan_or_reason(model, taps)
    assert why == "" and [s.name for s in plan.steps] == ["c1", "a1", "tap"]
    assert native.bucket_exact(plan)
    model, taps = _tiny(unknown=True)
    plan, why = native.plan_or_reason(model, taps)
    assert plan is None and "ln" in why and "LayerNormalization" in why


def test_a_strided_same_operation_is_not_bucket_exact():
    model, taps = _tiny(strided_same=True)
    plan, _ = native.plan_or_reason(model, taps)
    assert plan is not None and not native.bucket_exact(plan)


def test_buckets_are_multiples_of_the_step_and_hold_the_view():
    for h, w in ((75, 75), (96, 97), (600, 799)):
        bh, bw = native.bucket_of(h, w)
        assert bh % native.BUCKET_STEP == 0 and bw % native.BUCKET_STEP == 0
        assert h <= bh < h + native.BUCKET_STEP and w <= bw < w + native.BUCKET_STEP


def test_run_batched_gives_a_bucket_its_arrays_in_order():
    shapes = [(2, 80, 90, 3), (2, 85, 70, 3), (2, 80, 90, 3), (2, 200, 90, 3)]
    decoded = [((f"p{k}", f"i{k}"), (np.full(s, k, np.uint8), k)) for k, s in enumerate(shapes)]
    calls = []

    def extractor(views):
        calls.append(views)
        arrays = views if isinstance(views, list) else [views]
        return np.concatenate([a.reshape(len(a), -1)[:, :1].astype(np.float32) for a in arrays])

    key = (lambda shape: native.bucket_of(*shape[1:3]))
    out = list(run_batched(extractor, decoded, batch_views=6, window=8, key=key))
    assert [item[0] for item, _ in out] == ["p0", "p1", "p2", "p3"]
    for k, (_, (features, facts)) in enumerate(out):
        assert facts == k and (features == k).all() and len(features) == 2
    assert isinstance(calls[0], list) and [a.shape for a in calls[0]] == shapes[:3]


def test_native_engine_is_refused_on_tensorflow(tmp_path):
    import cli

    write_image(tmp_path / "imgs" / "a.png", 96, 96, seed=0)
    result = CliRunner().invoke(cli.main, ["extract", "--images", str(tmp_path / "imgs"), "--weights", "random:0",
                                           "--net", "iv3", "--engine", "native", "--out", str(tmp_path / "s.h5")])
    assert result.exit_code == 1
    assert "--engine native runs on PyTorch" in result.output and "--backend torch" in result.output
    assert "Traceback" not in result.output
    assert native.chosen_engine() == native.DEFAULT_ENGINE  # the choice was the call's, not the process's
    assert native.resolve_engine("auto") == ("keras", "Keras runs on tensorflow")


# ---- the native forward against TensorFlow (slow: both nets, both sides) --------------------


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (pip install -e '.[torch]')")
    tmp = tmp_path_factory.mktemp("native")
    rng = np.random.default_rng(1)
    views = []
    for k, shape in enumerate(SIZES):
        views.append(str(tmp / f"views{k}.npy"))
        np.save(views[-1], rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    weights = {net: str(tmp / f"{net}.weights.h5") for net in NETS}
    for net in NETS:
        backend_worker.save_random_backbone(net, 0, weights[net])
    write_image(tmp / "imgs" / "a.png", 96, 112, seed=0)
    write_image(tmp / "imgs" / "b.png", 101, 90, seed=1)
    job = {"views": views, "weights": weights, "precisions": PRECISIONS, "out": str(tmp / "torch"),
           "fallback": "mobilenetv3_large",
           "images": str(tmp / "imgs"), "store": str(tmp / "native.h5")}
    (tmp / "job.json").write_text(json.dumps(job))
    with torch_worker("native_worker.py", tmp / "job.json", tmp / "worker.log") as worker:
        tf_side = {net: _tensorflow_features(net, weights[net], [np.load(v) for v in views]) for net in NETS}
    assert worker.returncode == 0, (tmp / "worker.log").read_text()[-3000:]
    torch_side = {(net, p): dict(np.load(tmp / f"torch-{net}-{p}.npz")) for net in NETS for p in PRECISIONS[net]}
    return {"tf": tf_side, "torch": torch_side, "found": json.loads((tmp / "torch.json").read_text())}


def _tensorflow_features(net: str, weights: str, arrays: list) -> dict:
    """Narrow and wide features of each array through mlsp's Keras extractor on TensorFlow."""
    import keras

    from mlsp.extraction.job import ExtractConfig, FeatureExtractor
    from mlsp.backbone.pooling import MultiLevelPooling

    fx = FeatureExtractor(ExtractConfig(net=net, pooling="narrow", weights=weights))
    taps = fx.model.get_layer("mlsp_pooling").input
    both = keras.Model(fx.model.input, [MultiLevelPooling(grid=1)(taps), MultiLevelPooling(grid=5)(taps)])
    outputs = [[keras.ops.convert_to_numpy(o) for o in both(fx.config.spec.preprocess(a.astype("float32")))]
               for a in arrays]
    return {"narrow": np.concatenate([o[0] for o in outputs]), "wide": np.concatenate([o[1] for o in outputs])}


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["narrow", "wide"])
@pytest.mark.parametrize("net", NETS)
def test_native_features_equal_tensorflow(sides, net, pooling):
    want, got = sides["tf"][net][pooling], sides["torch"][(net, "float32")][pooling]
    assert got.shape == want.shape and np.isfinite(got).all() and want.std() > 0
    row = 0
    for shape in SIZES:  # odd and even sizes, each on its own
        part = slice(row, row + shape[0])
        assert rel(want[part], got[part]) <= 1e-4, (net, pooling, shape, rel(want[part], got[part]))
        row += shape[0]


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["narrow", "wide"])
@pytest.mark.parametrize("net", NETS)
def test_bucketed_views_equal_each_alone(sides, net, pooling):
    found = sides["torch"][(net, "float32")]
    assert bool(found["bucket_exact_plan"])
    assert rel(found[pooling], found[pooling + "_bucketed"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["narrow", "wide"])
def test_native_bfloat16_within_the_projects_tolerance(sides, pooling):
    """As tests/test_precision.py: bfloat16 features within 3% of float32's largest."""
    want, got = sides["tf"]["iv3"][pooling], sides["torch"][("iv3", "bfloat16")][pooling]
    assert 1e-4 < rel(want, got) <= 0.03  # bfloat16 really ran, and stayed close
    assert rel(got, sides["torch"][("iv3", "bfloat16")][pooling + "_bucketed"]) <= 0.03


@pytest.mark.slow
def test_an_unknown_layer_keeps_the_keras_path_with_one_log_line(sides):
    fallback = sides["found"]["fallback"]
    assert fallback["engine"] == "keras"
    assert len(fallback["lines"]) == 1 and "mobilenetv3_large runs on the Keras engine" in fallback["lines"][0]


@pytest.mark.slow
def test_store_records_the_native_engine_without_tensorflow(sides):
    assert sides["found"]["store"] == {"engine": "native", "backend": "torch"}
    assert sides["found"]["tensorflow_imported"] == []
