"""The backbone registry against the real Keras models: exact taps, channel counts, shapes."""

import numpy as np
import pytest

from mlsp.backbone import weights as backbone_weights, nets as backbones, cost, folding
from mlsp.errors import ConfigError

PAPER = {"iv3": (11, 10048), "irv2": (43, 16928)}


@pytest.mark.parametrize("net", sorted(PAPER))
def test_registry_matches_paper(net):
    spec = backbones.get_backbone(net)
    blocks, channels = PAPER[net]
    assert len(spec.taps) == blocks
    assert spec.total_channels == channels
    assert len(set(spec.taps)) == len(spec.taps)


def test_registry_refuses_a_name_twice():
    import dataclasses

    before = backbones.get_backbone("iv3")
    with pytest.raises(ConfigError, match="'iv3' is already registered"):
        backbones.BACKBONES.register(dataclasses.replace(before, description="another iv3"))
    assert backbones.get_backbone("iv3") is before


def test_iv3_taps_exclude_inner_concatenations():
    spec = backbones.get_backbone("iv3")
    assert spec.taps == tuple(f"mixed{i}" for i in range(11))
    assert not any("_" in t for t in spec.taps)


@pytest.fixture(scope="module")
def built():
    """Each backbone built once for the module (random weights, random batch-norm statistics, so
    that folding has something to do), with its folded copy: ``built(net) -> (model, folded, n)``."""
    import keras

    cache = {}

    def get(net):
        if net not in cache:
            spec = backbones.get_backbone(net)
            model, _ = backbone_weights.build_backbone(spec, backbone_weights.WeightsSource.parse("random:4"))
            rng = np.random.default_rng(0)
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    n = layer.moving_mean.shape[0]
                    layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
                    layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            cache[net] = (model, *folding.fold_batch_norms(model))
        return cache[net]

    return get


@pytest.mark.parametrize("net", sorted(backbones.BACKBONES))
def test_registry_entry_matches_the_real_model(built, net):
    """As timm tests every model: the registered taps exist in Keras' model with the registered
    channels; narrow features have the registered width and wide ones 5x5 at the minimum side
    and at a second size, through the registered preprocessing; both poolings agree (the mean
    of the 5x5 grid is the narrow feature)."""
    import keras

    from mlsp.backbone.pooling import MultiLevelPooling

    spec = backbones.get_backbone(net)
    _, folded, _ = built(net)
    taps = backbones.tap_outputs(spec, folded)
    assert [int(t.shape[-1]) for t in taps] == list(spec.channels)
    both = keras.Model(folded.input, [MultiLevelPooling(grid=1)(taps), MultiLevelPooling(grid=5)(taps)])
    rng = np.random.default_rng(1)
    for h, w in [(spec.min_side, spec.min_side), (spec.min_side + 13, 2 * spec.min_side + 5)]:
        x = spec.preprocess(rng.integers(0, 256, (1, h, w, 3)).astype("float32"))
        a, b = (keras.ops.convert_to_numpy(t) for t in both(x))
        assert a.shape == (1, spec.total_channels), (h, w)
        assert b.shape == (1, 5, 5, spec.total_channels), (h, w)
        assert np.isfinite(a.astype(np.float16)).all() and np.isfinite(b.astype(np.float16)).all()
        np.testing.assert_allclose(b.mean(axis=(1, 2)), a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_blocks_of_the_new_backbones():
    """The counts the README and `mlsp backbones` state (the test above checks them against Keras)."""
    expected = {"effnetv2s": (41, 7824), "effnetv2m": (58, 13608), "convnext_tiny": (18, 6624),
                "convnext_base": (36, 18048), "mobilenetv3_large": (16, 2168)}
    for net, (blocks, channels) in expected.items():
        spec = backbones.get_backbone(net)
        assert (len(spec.taps), spec.total_channels) == (blocks, channels), net
        assert spec.why_taps and spec.min_side == 32


def test_substring_match_would_be_wrong(extractors):
    """What the exact names protect against: 'mixed' in iv3 also matches mixed9_0 etc."""
    ex = extractors(net="iv3", augment=False)
    names = [layer.name for layer in ex.model.layers if "mixed" in layer.name and "pooling" not in layer.name]
    assert len(names) > 11


def test_weights_source_parsing(tmp_path):
    assert backbone_weights.WeightsSource.parse("imagenet").kind == "imagenet"
    assert backbone_weights.WeightsSource.parse("random").seed == 0
    assert backbone_weights.WeightsSource.parse("random:7").seed == 7
    f = tmp_path / "w.weights.h5"
    f.write_bytes(b"x")
    assert backbone_weights.WeightsSource.parse(str(f)).path == str(f)
    with pytest.raises(ConfigError, match="random:x"):
        backbone_weights.WeightsSource.parse("random:x")
    with pytest.raises(ConfigError, match="nope.h5"):
        backbone_weights.WeightsSource.parse("nope.h5")
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
    with pytest.raises(backbone_weights.WeightsUnavailableError) as info:
        backbone_weights.build_backbone(spec, backbone_weights.WeightsSource.parse("imagenet"))
    message = str(info.value)
    assert spec.weights_file in message
    assert str(tmp_path / "models") in message


@pytest.mark.parametrize("net", sorted(backbones.BACKBONES))
def test_folding_batch_norms_keeps_the_function(built, net):
    """Every batch norm after a convolution (Conv2D or depthwise) is folded into it; ConvNeXt has
    layer norms only, which stay, and its grouped 7x7 convolutions become depthwise ones; every
    tap stays that of Keras' graph to float32 rounding."""
    import keras

    spec = backbones.get_backbone(net)
    model, folded, n_folded = built(net)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert n_folded == n_bn
    if spec.constructor.startswith("ConvNeXt"):
        assert n_bn == 0  # layer norms only
    else:
        assert n_bn > 40
    grouped = [layer.name for layer in model.layers if getattr(layer, "groups", 1) > 1]
    if n_bn == 0 and not grouped:
        assert folded is model
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    # depthwise convolutions written as grouped ones (ConvNeXt) run as DepthwiseConv2D
    assert all(isinstance(folded.get_layer(name), keras.layers.DepthwiseConv2D) for name in grouped)
    assert [layer.name for layer in folded.layers[1:]] == [layer.name for layer in model.layers[1:]]
    side = max(spec.min_side, 75)
    x = np.random.default_rng(0).uniform(-1, 1, (2, side + 3, side + 17, 3)).astype("float32")
    a = keras.Model(model.input, backbones.tap_outputs(spec, model))(x)
    b = keras.Model(folded.input, backbones.tap_outputs(spec, folded))(x)
    for name, p, q in zip(spec.taps, a, b):
        p, q = keras.ops.convert_to_numpy(p), keras.ops.convert_to_numpy(q)
        np.testing.assert_allclose(q, p, rtol=1e-4, atol=1e-4 * np.abs(p).max(), err_msg=name)


@pytest.mark.parametrize("net,published_gmacs", [("mobilenetv3_large", 0.2145), ("convnext_tiny", 4.47)])
def test_flop_count_matches_published_figures(built, net, published_gmacs):
    """The counted FLOPs at 224x224 against the papers' multiply-adds (MobileNetV3-Large: 217 M
    with a 2.5 M classifier that the taps do not need; ConvNeXt-T: 4.47 G): 2 FLOPs per MAC."""
    import keras

    spec = backbones.get_backbone(net)
    model, _, _ = built(net)
    counter = cost.FlopCounter(keras.Model(model.input, backbones.tap_outputs(spec, model)))
    assert counter(224, 224) / 2e9 == pytest.approx(published_gmacs, rel=0.03)
