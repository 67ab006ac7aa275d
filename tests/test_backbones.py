"""The backbone registry against the real Keras models: exact taps, channel counts, shapes."""

import numpy as np
import pytest

from mlsp import backbones
from mlsp.errors import ConfigError

PAPER = {"iv3": (11, 10048), "irv2": (43, 16928)}


@pytest.mark.parametrize("net", sorted(backbones.BACKBONES))
def test_registry_matches_paper(net):
    spec = backbones.get_backbone(net)
    blocks, channels = PAPER[net]
    assert len(spec.taps) == blocks
    assert spec.total_channels == channels
    assert len(set(spec.taps)) == len(spec.taps)


def test_iv3_taps_exclude_inner_concatenations():
    spec = backbones.get_backbone("iv3")
    assert spec.taps == tuple(f"mixed{i}" for i in range(11))
    assert not any("_" in t for t in spec.taps)


@pytest.mark.parametrize("net", sorted(backbones.BACKBONES))
@pytest.mark.parametrize("pooling", ["narrow", "wide"])
def test_feature_shapes_and_real_channels(extractors, net, pooling):
    ex = extractors(net=net, pooling=pooling, augment=False)
    spec = backbones.get_backbone(net)
    # the real Keras layers have the registered channel counts, in order
    real = [int(ex.model.get_layer(t).output.shape[-1]) for t in spec.taps]
    assert real == list(spec.channels)
    views = np.random.default_rng(0).integers(0, 256, (1, 99, 131, 3), dtype=np.uint8)
    out = ex(views)
    expected = (1, spec.total_channels) if pooling == "narrow" else (1, 5, 5, spec.total_channels)
    assert out.shape == expected
    assert np.isfinite(out.astype(np.float16)).all(), "random-backbone features must be finite in float16"
    attrs = ex.store_attrs()
    assert attrs["block_names"] == list(spec.taps)
    assert sum(attrs["block_channels"]) == spec.total_channels


def test_substring_match_would_be_wrong(extractors):
    """What the exact names protect against: 'mixed' in iv3 also matches mixed9_0 etc."""
    ex = extractors(net="iv3", augment=False)
    names = [layer.name for layer in ex.model.layers if "mixed" in layer.name and "pooling" not in layer.name]
    assert len(names) > 11


def test_weights_source_parsing(tmp_path):
    assert backbones.WeightsSource.parse("imagenet").kind == "imagenet"
    assert backbones.WeightsSource.parse("random").seed == 0
    assert backbones.WeightsSource.parse("random:7").seed == 7
    f = tmp_path / "w.weights.h5"
    f.write_bytes(b"x")
    assert backbones.WeightsSource.parse(str(f)).path == str(f)
    with pytest.raises(ConfigError, match="random:x"):
        backbones.WeightsSource.parse("random:x")
    with pytest.raises(ConfigError, match="nope.h5"):
        backbones.WeightsSource.parse("nope.h5")
    with pytest.raises(ConfigError, match="unknown backbone"):
        backbones.get_backbone("resnet")


def test_imagenet_offline_names_file_and_place(monkeypatch, tmp_path):
    """Offline, --weights imagenet stops with the file name and where to put it (no fallback).
    Real ImageNet weights cannot be tested here: this machine has no internet access."""
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    spec = backbones.get_backbone("iv3")
    with pytest.raises(backbones.WeightsUnavailableError) as info:
        backbones.build_backbone(spec, backbones.WeightsSource.parse("imagenet"))
    message = str(info.value)
    assert spec.weights_file in message
    assert str(tmp_path / "models") in message


@pytest.mark.parametrize("net", sorted(backbones.BACKBONES))
def test_folding_batch_norms_keeps_the_function(net):
    """Every batch norm of both nets follows a convolution and is folded into it; the features
    stay those of Keras' graph to float32 rounding."""
    import keras

    spec = backbones.get_backbone(net)
    model, _ = backbones.build_backbone(spec, backbones.WeightsSource.parse("random:4"))
    # random BN statistics, so that folding has something to do
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    folded, n_folded = backbones.fold_batch_norms(model)
    assert n_folded == n_bn > 90
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert [layer.name for layer in folded.layers[1:]] == [layer.name for layer in model.layers[1:]]
    x = rng.uniform(-1, 1, (2, 97, 113, 3)).astype("float32")
    taps = spec.taps[-1]
    a = keras.ops.convert_to_numpy(keras.Model(model.input, model.get_layer(taps).output)(x))
    b = keras.ops.convert_to_numpy(keras.Model(folded.input, folded.get_layer(taps).output)(x))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
