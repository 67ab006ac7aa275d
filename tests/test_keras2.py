"""The Keras 2 importer (heads/keras2.py): the authors' weight files into mlsp's heads, checked
against their computation written in numpy; `mlsp import-weights` as a run folder."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from heads.score.keras2 import import_head, read_weights
from keras2_files import authors_layers, forward, n_params, write_keras2
from synthetic import write_synthetic_store

IRV2_CHANNELS = 16928

# The authors' three released files (subpic/ava-mlsp, models/*/model_best_weights.h5): their
# head, features and parameter count.
RELEASED = [
    ("irnv2_mlsp_wide_orig", "pool3fc", "wide", 63_828_481),
    ("irnv2_mlsp_narrow_orig", "single3fc", "narrow", 37_044_737),
    ("irnv2_mlsp_narrow_orig_aug", "single3fc", "narrow", 37_044_737),
]


def _features(pooling, channels, n=3, seed=1):
    """Non-negative features, as pooled ReLU activations are."""
    shape = (n, 5, 5, channels) if pooling == "wide" else (n, channels)
    return np.abs(np.random.default_rng(seed).normal(0, 1, shape)).astype(np.float32)


def _max_rel_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)))


@pytest.mark.parametrize("name, head, pooling, params", RELEASED, ids=[r[0] for r in RELEASED])
def test_released_layouts_import_and_predict_as_the_authors(tmp_path, name, head, pooling, params):
    """A file of each released model's exact layout (irv2's 16,928 channels, width 2048, 1024
    kernels) is imported tensor by tensor; the head predicts what the authors' architecture
    computes (numpy, float64) to 1e-5."""
    layers = authors_layers(head, IRV2_CHANNELS, 2048, 1024, seed=len(name))
    assert n_params(layers) == params
    path = write_keras2(tmp_path / f"{name}.h5", layers)
    model, options = import_head(str(path), head, [IRV2_CHANNELS], pooling)
    assert model.count_params() == params
    assert options == ({"width": 2048, "kernels": 1024} if head == "pool3fc" else {"width": 2048})
    x = _features(pooling, IRV2_CHANNELS)
    want = forward(head, x, layers)
    got = model.predict(x, verbose=0)[:, 0]
    assert np.ptp(want) > 0.05, "the images get different scores"
    assert _max_rel_diff(got, want) <= 1e-5


@pytest.mark.parametrize("head, pooling", [("single3fc", "narrow"), ("pool3fc", "wide"), ("single3fc", "wide")])
def test_small_heads_of_other_sizes(tmp_path, head, pooling):
    """Sizes are read off the file (a head trained with another fc1_size or block size); a narrow
    head on a wide store takes the mean of the 5x5 grid, as the narrow feature is."""
    channels, width, kernels = 96, 64, 32
    layers = authors_layers(head, channels, width, kernels, seed=3)
    path = write_keras2(tmp_path / "head.h5", layers)
    model, _ = import_head(str(path), head, [32, 64], pooling)
    x = _features(pooling, channels, n=5)
    narrow = x.mean(axis=(1, 2)) if head == "single3fc" and pooling == "wide" else x
    assert _max_rel_diff(model.predict(x, verbose=0)[:, 0], forward(head, narrow, layers)) <= 1e-5


def _drop(layers, layer, tensor):
    return [(n, {k: v for k, v in t.items() if not (n == layer and k == tensor)}) for n, t in layers]


def _reshape(layers, layer, tensor, shape):
    return [(n, {k: (np.zeros(shape) if (n, k) == (layer, tensor) else v) for k, v in t.items()}) for n, t in layers]


@pytest.mark.parametrize("change, named", [
    (lambda ls: _drop(ls, "head_bn1", "gamma"), "missing head_bn1/gamma (16,)"),
    (lambda ls: _drop(ls, "3x3_3x1_conv", "kernel"), "missing 3x3_3x1_conv/kernel (3, 1, 16, 8)"),
    (lambda ls: ls + [("head_fc3", {"kernel": np.ones((8, 4)), "bias": np.ones(4)})],
     "extra head_fc3/kernel, head_fc3/bias"),
    (lambda ls: _reshape(ls, "head_out", "kernel", (4, 2)), "head_out/kernel has shape (4, 2), expected (4, 1)"),
    (lambda ls: _reshape(ls, "branch_pool_bn", "moving_mean", (17,)),
     "branch_pool_bn/moving_mean has shape (17,), expected (16,)"),
])
def test_missing_extra_or_misshapen_tensors_are_refused_by_name(tmp_path, change, named):
    from mlsp.errors import ConfigError

    path = write_keras2(tmp_path / "bad.h5", change(authors_layers("pool3fc", 40, 32, 16, seed=2)))
    with pytest.raises(ConfigError) as err:
        import_head(str(path), "pool3fc", [40], "wide")
    assert str(path) in str(err.value) and named in str(err.value)


def test_a_file_for_other_features_or_not_keras2_is_refused(tmp_path):
    from mlsp.errors import ConfigError

    path = write_keras2(tmp_path / "head.h5", authors_layers("single3fc", 40, 16))
    with pytest.raises(ConfigError, match=r"head_fc0/kernel has shape \(40, 16\), expected \(48, 16\)"):
        import_head(str(path), "single3fc", [48], "narrow")
    with pytest.raises(ConfigError, match="cannot be imported from a Keras 2 file"):
        import_head(str(path), "multi3fc", [40], "narrow")
    other = tmp_path / "other.h5"
    import h5py

    with h5py.File(other, "w") as f:
        f["x"] = np.ones(3)
    with pytest.raises(ConfigError, match="not a Keras 2 weights file"):
        read_weights(str(other))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ConfigError, match="not a readable HDF5 file"):
        read_weights(str(tmp_path / "text.h5"))


def test_import_weights_writes_a_run_that_scores_evaluates_and_refuses(tmp_path):
    """`mlsp import-weights FILE --head pool3fc --store STORE --out RUN`: `mlsp score RUN --store`
    gives the authors' prediction averaged over the stored views; `mlsp evaluate` works."""
    from mlsp.store.read import FeatureStore

    store = str(tmp_path / "wide.h5")
    write_synthetic_store(store, n_images=12, n_views=2, block_channels=(16, 24), pooling="wide", seed=4)
    layers = authors_layers("pool3fc", 40, 32, 16, seed=5)
    weights = write_keras2(tmp_path / "model_best_weights.h5", layers)
    runner = CliRunner()
    run = str(tmp_path / "run")
    res = runner.invoke(cli.main, ["import-weights", str(weights), "--head", "pool3fc", "--store", store,
                                   "--out", run])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["status"] == "finished" and config["head_options"] == {"width": 32, "kernels": 16}
    assert config["imported"]["format"] == "keras2-h5" and len(config["imported"]["sha256"]) == 64
    res = runner.invoke(cli.main, ["score", run, "--store", store, "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    import pandas as pd

    scores = pd.read_csv(tmp_path / "s.csv", dtype={"id": str})
    with FeatureStore(store) as s:
        feats = s.read(np.arange(s.n_images)).astype(np.float32)
    want = forward("pool3fc", feats.reshape(-1, *feats.shape[2:]), layers).reshape(12, 2).mean(1)
    assert _max_rel_diff(scores["pred"], want) <= 1e-5
    res = runner.invoke(cli.main, ["evaluate", run, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["test"]["n"] > 0
    res = runner.invoke(cli.main, ["import-weights", str(weights), "--head", "single3fc", "--store", store,
                                   "--out", str(tmp_path / "run2")])
    assert res.exit_code == 1 and "extra branch_1x1_conv/kernel" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
