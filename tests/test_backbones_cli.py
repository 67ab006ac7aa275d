"""A new backbone end to end through the CLI (extract wide, train, score), `mlsp backbones`,
and the heads' default sizes following the feature width."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import cli
from heads.registry import get_head
from mlsp.backbone import nets as backbones
from mlsp.sample import build_sample
from mlsp.store.read import FeatureStore


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def test_convnext_tiny_wide_extracts_trains_and_scores(tmp_path):
    info = build_sample(str(tmp_path / "sample"), n_images=12, seed=3, max_side=72)
    store, run = tmp_path / "convnext_tiny_wide.h5", tmp_path / "run"
    res = invoke("extract", "--images", info.images_dir, "--net", "convnext_tiny", "--wide", "--weights", "random:0",
                 "--labels", info.labels_path, "--test-list", info.test_list_path, "--val-fraction", "0.3",
                 "--out", store)
    assert res.exit_code == 0, res.output
    spec = backbones.get_backbone("convnext_tiny")
    with FeatureStore(str(store)) as s:
        assert s.attrs["net"] == "convnext_tiny" and s.attrs["preprocessing"] == spec.preprocessing.name
        assert list(s.block_names) == list(spec.taps) and list(s.block_channels) == list(spec.channels)
        assert s.feature_shape == (5, 5, 6624)
        n = s.n_images
        features = s.load()
    assert n >= 8 and np.isfinite(features).all()
    res = invoke("train", "--store", store, "--head", "pool3fc", "--out", run, "--epochs", "2", "--width", "16",
                 "--kernels", "8", "--batch-size", "4", "--no-progress")
    assert res.exit_code == 0, res.output
    config = json.loads((run / "config.json").read_text())
    assert config["status"] == "finished" and config["head_options"] == {"width": 16, "kernels": 8}
    from_store, from_images = tmp_path / "store.csv", tmp_path / "images.csv"
    assert invoke("score", run, "--store", store, "--out", from_store).exit_code == 0
    res = invoke("score", run, "--images", info.images_dir, "--out", from_images)
    assert res.exit_code == 0, res.output
    a, b = pd.read_csv(from_store), pd.read_csv(from_images)
    merged = a.merge(b[b["pred"].notna()], on="id", suffixes=("_store", "_images"))
    assert len(merged) == n and np.isfinite(merged["pred_store"]).all()
    # scoring new files runs the backbone again: the same numbers as from the float16 store
    np.testing.assert_allclose(merged["pred_images"], merged["pred_store"], rtol=1e-2, atol=1e-2)


# One net of each new family through the CLI besides convnext_tiny (above): effnetv2m and
# convnext_base differ from effnetv2s and convnext_tiny only in their registry data (taps,
# channels), which tests/test_backbones.py checks against Keras' model for every entry.
NEW_FAMILIES = ("effnetv2s", "mobilenetv3_large")


@pytest.mark.parametrize("net", NEW_FAMILIES)
def test_every_new_backbone_family_extracts_trains_and_scores(tmp_path, net):
    """A new registry entry of each family through the CLI on random weights: a narrow store with
    the entry's own layout, a head trained on it, and every stored image scored."""
    info = build_sample(str(tmp_path / "sample"), n_images=10, seed=5, max_side=64)
    store, run, scores = tmp_path / f"{net}.h5", tmp_path / "run", tmp_path / "scores.csv"
    res = invoke("extract", "--images", info.images_dir, "--net", net, "--no-augment", "--weights", "random:0",
                 "--labels", info.labels_path, "--test-list", info.test_list_path, "--val-fraction", "0.3",
                 "--out", store)
    assert res.exit_code == 0, res.output
    spec = backbones.get_backbone(net)
    with FeatureStore(str(store)) as s:
        assert s.attrs["net"] == net and list(s.block_channels) == list(spec.channels)
        assert tuple(s.features.shape[1:]) == (1, spec.total_channels)
        n = s.n_images
    # two steps at the paper's LR: random-weight features are unnormalised, and the automatic
    # schedule's larger LR can overshoot the label range on 6 images (a diverged run, correctly)
    res = invoke("train", "--store", store, "--head", "single1fc", "--out", run, "--epochs", "1",
                 "--steps-per-epoch", "2", "--batch-size", "4", "--lr", "1e-4", "--no-progress")
    assert res.exit_code == 0, res.output
    assert invoke("score", run, "--store", store, "--out", scores).exit_code == 0
    frame = pd.read_csv(scores)
    assert len(frame) == n >= 6 and np.isfinite(frame["pred"]).all()


def test_backbones_lists_every_entry():
    res = invoke("backbones", "--no-flops", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("["):])
    assert [r["name"] for r in rows] == list(backbones.BACKBONES)
    for row in rows:
        spec = backbones.get_backbone(row["name"])
        assert (row["blocks"], row["channels"], row["min_side"]) == (len(spec.taps), spec.total_channels,
                                                                      spec.min_side)
        assert row["weights_file"] == spec.weights_file and "gflops" not in row
    text = invoke("backbones", "mobilenetv3_large", "--flops-at", "224", "224").output
    assert "mobilenetv3_large" in text and "GFLOP 224x224" in text and "iv3" not in text


@pytest.mark.parametrize("net,width,kernels", [
    ("iv3", 2048, 1024), ("irv2", 2048, 1024),  # the paper's values, exactly
    ("effnetv2s", 2048, 1024), ("effnetv2m", 2048, 1024), ("convnext_base", 2048, 1024),
    ("convnext_tiny", 1024, 512), ("mobilenetv3_large", 512, 256),
])
def test_head_defaults_follow_the_feature_width(net, width, kernels):
    channels = backbones.get_backbone(net).total_channels
    assert get_head("single3fc").resolve_options(channels=channels) == {"width": width}
    assert get_head("pool3fc").resolve_options(channels=channels) == {"width": width, "kernels": kernels}
    assert get_head("pool3fc").resolve_options({"width": 64}, channels=channels) == {"width": 64, "kernels": kernels}


def test_heads_net_shows_that_backbones_counts():
    res = invoke("heads", "--net", "mobilenetv3_large", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output[res.output.index("["):])}
    assert rows["single1fc"]["params"] == {"mobilenetv3_large": 2168 + 1}
    assert rows["single3fc"]["options"] == {"mobilenetv3_large": {"width": 512}}
    # 3FC of 512, 256, 64 on 2,168 features, with their batch norms (4 values per unit) and the output
    hidden = [2168, 512, 256, 64]
    expected = sum(i * o + o + 4 * o for i, o in zip(hidden, hidden[1:])) + 64 + 1
    assert rows["single3fc"]["params"] == {"mobilenetv3_large": expected}


@pytest.mark.parametrize("net", ["mobilenetv3_large", "convnext_tiny"])
def test_weights_file_of_keras_own_model(tmp_path, net):
    """--weights PATH with a file saved from Keras' own application, which preprocesses inside
    the model as the ImageNet files' models did: it loads into mlsp's backbone (built without that
    layer; mlsp applies the registry's preprocessing) and the features are Keras' own on raw RGB."""
    import keras

    from mlsp.extraction.job import ExtractConfig, FeatureExtractor
    from mlsp.backbone.pooling import MultiLevelPooling

    spec = backbones.get_backbone(net)
    keras.utils.set_random_seed(5)
    ref = getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_shape=(None, None, 3))
    path = tmp_path / f"{net}.h5"
    ref.save(str(path))  # HDF5, the format of Keras' application weight files
    ex = FeatureExtractor(ExtractConfig(net=net, augment=False, weights=str(path)))
    assert ex.weights_record["source"] == path.name
    img = np.random.default_rng(0).integers(0, 256, (1, 61, 83, 3), dtype=np.uint8)
    expected = keras.Model(ref.input, MultiLevelPooling(grid=1)(backbones.tap_outputs(spec, ref)))(
        img.astype("float32"))
    expected = keras.ops.convert_to_numpy(expected)
    np.testing.assert_allclose(ex(img), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
