"""heads: the registry and the four heads (parameter counts from their layer sizes, any layout,
safe_mode round trips, the grid mean of narrow heads on wide stores)."""

import numpy as np
import pytest

from heads.registry import HEADS
from mlsp.errors import ConfigError

# The channel layouts of the two backbones, as the paper gives them (docs/paper.md, "Stage 1: features").
IRV2 = [320] + [128] * 10 + [1088] + [384] * 20 + [2080] + [448] * 10
IV3 = [256, 288, 288, 768, 768, 768, 768, 768, 1280, 2048, 2048]
SMALL = [8, 16, 8]
PAPER_HEADS = ["single1fc", "single3fc", "multi3fc", "pool3fc"]  # the paper's four (docs/paper.md, "Stage 2: heads")
HEAD_NAMES = HEADS.names()  # every registered head: each test over heads covers a new one


# -- parameter counts from layer sizes -------------------------------------------------------
# (total, trainable) of each piece; BN holds gamma, beta (trainable) and moving mean and
# variance (not); the Inception units' BN has no gamma (scale=False), their convs no bias.


def dense(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def bn(n, scale=True):
    return ((4 if scale else 3) * n, (2 if scale else 1) * n)


def three_fc(n_in, x):
    a, b, c = x, max(1, x // 2), max(1, x // 8)
    total = dense(n_in, a) + dense(a, b) + dense(b, c) + dense(c, 1)
    bns = [bn(a), bn(b), bn(c)]
    return total + sum(t for t, _ in bns), total + sum(t for _, t in bns)


def expected_params(head, channels, width=2048, kernels=1024):
    c = sum(channels)
    if head == "single1fc":
        return dense(c, 1), dense(c, 1)
    if head == "single3fc":
        return three_fc(c, width)
    if head == "multi3fc":
        parts = [three_fc(k, k) for k in channels]
        return sum(t for t, _ in parts) + len(channels), sum(t for _, t in parts) + len(channels)
    if head == "pool3fc":
        half, other = kernels // 2, kernels - kernels // 2
        convs = 3 * dense(c, kernels, bias=False) + dense(3 * kernels, half, bias=False) + \
            dense(3 * kernels, other, bias=False)  # 1x1 x3 (from C); 1x3 and 3x1 (from K, 3 taps)
        units = [bn(kernels, False)] * 3 + [bn(half, False), bn(other, False)]
        fc_total, fc_trainable = three_fc(3 * kernels, width)
        return (convs + sum(t for t, _ in units) + fc_total, convs + sum(t for _, t in units) + fc_trainable)
    raise ValueError(head)


def counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return model.count_params(), trainable


def test_layouts_are_the_backbones():
    from mlsp.backbone.nets import BACKBONES

    assert sum(IRV2) == 16928 and len(IRV2) == 43
    assert sum(IV3) == 10048 and len(IV3) == 11
    assert list(BACKBONES["irv2"].channels) == IRV2
    assert list(BACKBONES["iv3"].channels) == IV3


@pytest.mark.parametrize("layout", [IRV2, IV3], ids=["irv2", "iv3"])
@pytest.mark.parametrize("head", HEAD_NAMES)
def test_parameter_count_on_backbone_layouts(head, layout):
    from heads.models import build_head

    model = build_head(head, layout, pooling="wide" if head == "pool3fc" else "narrow")
    assert counts(model) == expected_params(head, layout)


@pytest.mark.parametrize("options", [{"width": 3072}, {"width": 64, "kernels": 32}, {"kernels": 7}])
def test_pool3fc_width_and_kernels(options):
    from heads.models import build_head

    from heads.registry import feature_width, inception_kernels

    model = build_head("pool3fc", SMALL, pooling="wide", **options)
    # options not given follow the features' width (32 channels: width 64, kernels 32)
    defaults = {"width": feature_width(sum(SMALL)), "kernels": inception_kernels(sum(SMALL))}
    assert defaults == {"width": 64, "kernels": 32}
    assert counts(model) == expected_params("pool3fc", SMALL, **{**defaults, **options})
    assert model.get_layer("inception").output.shape[-1] == 3 * options.get("kernels", defaults["kernels"])


def test_multi3fc_has_one_3fc_per_block_and_a_weighted_sum():
    from heads.models import build_head

    model = build_head("multi3fc", [5, 7, 300, 1])
    assert [model.get_layer(f"b{k:02d}_fc0").units for k in range(4)] == [5, 7, 300, 1]
    assert [model.get_layer(f"b{k:02d}_fc2").units for k in range(4)] == [1, 1, 37, 1]
    weights = model.get_layer("weighted_sum").get_weights()
    assert len(weights) == 1 and np.allclose(weights[0], 0.25)  # starts as the mean, learned


@pytest.mark.parametrize("head", HEAD_NAMES)
@pytest.mark.parametrize("layout", [[3], [8, 16, 8], [1, 2, 3, 4, 5]], ids=["1block", "3blocks", "5blocks"])
def test_any_layout_builds_and_predicts(head, layout):
    from heads.models import build_head

    options = {"width": 16, "kernels": 8} if head == "pool3fc" else {"width": 16} if head == "single3fc" else {}
    pooling = "wide" if head == "pool3fc" else "narrow"
    model = build_head(head, layout, pooling=pooling, output_bias=5.5, **options)
    shape = (4, 5, 5, sum(layout)) if pooling == "wide" else (4, sum(layout))
    out = model.predict_on_batch(np.zeros(shape, np.float32))
    assert out.shape == (4, 1)
    if head != "pool3fc":  # zero input, inference mode: the output is the bias (BN stats start at 0/1)
        assert np.allclose(out, 5.5, atol=1e-3)


def test_registry():
    from heads import get_head

    assert HEAD_NAMES[:4] == PAPER_HEADS
    with pytest.raises(ConfigError, match="unknown head 'nope'.*single1fc, single3fc, multi3fc, pool3fc"):
        get_head("nope")
    with pytest.raises(ConfigError, match="does not take kernels"):
        get_head("single3fc").resolve_options({"kernels": 8})
    with pytest.raises(ConfigError, match="does not take width.*no options"):
        get_head("multi3fc").resolve_options({"width": 8})
    with pytest.raises(ConfigError, match="positive integer"):
        get_head("pool3fc").resolve_options({"width": 0})
    assert get_head("pool3fc").resolve_options({"width": 3072}) == {"width": 3072, "kernels": 1024}


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_registry_entry_agrees_with_its_builder(head):
    """The options a head declares are exactly its builder's keyword-only parameters (the
    registry holds their defaults, the builder none), and ``needs_wide`` is what the built head
    does: a wide head refuses narrow features, a narrow one takes them."""
    import inspect

    from heads.models import build_head
    from heads.registry import get_head

    spec = get_head(head)
    params = inspect.signature(spec.resolve_builder()).parameters.values()
    keyword_only = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    assert sorted(keyword_only) == sorted(spec.options)
    assert all(default is inspect.Parameter.empty for default in keyword_only.values())
    small = {k: 8 for k in spec.options}
    if spec.needs_wide:
        with pytest.raises(ConfigError, match="needs wide"):
            build_head(head, SMALL, pooling="narrow", **small)
    else:
        assert build_head(head, SMALL, pooling="narrow", **small).input_shape == (None, sum(SMALL))
    assert build_head(head, SMALL, pooling="wide", **small).input_shape == (None, 5, 5, sum(SMALL))


def test_registry_refuses_a_name_twice():
    from heads.registry import HeadSpec, get_head

    before = get_head("single1fc")
    with pytest.raises(ConfigError, match="'single1fc' is already registered"):
        HEADS.register(HeadSpec("single1fc", before.builder, needs_wide=True, description="again"))
    assert get_head("single1fc") is before


def test_registry_does_not_import_keras():
    import subprocess
    import sys

    code = "import sys, heads; heads.HEADS.specs(); print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_adding_a_head_is_one_entry(monkeypatch):
    from heads.models import build_head
    from heads.registry import HeadSpec

    monkeypatch.setattr(HEADS, "_entries", dict(HEADS._entries))  # the entry goes with the test

    def mean_head(x, block_channels, output_bias=0.0, outputs=1):
        import keras

        return keras.layers.Dense(outputs, bias_initializer=keras.initializers.Constant(output_bias))(x)

    HEADS.register(HeadSpec("test_linear", mean_head, needs_wide=False, description="a test head"))
    assert build_head("test_linear", SMALL).count_params() == 33


def test_pool3fc_needs_wide_features():
    from heads.models import build_head

    with pytest.raises(ConfigError, match="needs wide .* features.*--wide"):
        build_head("pool3fc", SMALL, pooling="narrow")


@pytest.mark.parametrize("head", ["single1fc", "single3fc", "multi3fc"])
def test_narrow_head_on_wide_features_is_the_narrow_head_on_the_grid_mean(head):
    from heads.models import build_head

    narrow = build_head(head, SMALL, output_bias=5.0)
    wide = build_head(head, SMALL, pooling="wide", output_bias=5.0)
    assert counts(narrow) == counts(wide)
    rng = np.random.default_rng(0)
    narrow.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.3 + (1.0 if "variance" in w.path else 0)
                        for w in narrow.weights])
    wide.set_weights(narrow.get_weights())
    x = rng.uniform(0, 2, size=(6, 5, 5, sum(SMALL))).astype(np.float32)
    np.testing.assert_allclose(wide.predict_on_batch(x), narrow.predict_on_batch(x.mean(axis=(1, 2))),
                               rtol=1e-5, atol=1e-5)


def small_options(spec) -> dict:
    """Small values of every option a head declares (so that the contract test stays fast)."""
    return {key: 8 for key in spec.options}


@pytest.mark.parametrize("target", ["mos", "distribution"])
@pytest.mark.parametrize("head", HEAD_NAMES)
def test_every_head_keeps_the_contract(tmp_path, head, target):
    """Every registered head, with its own options, for every target: builds on the features it
    needs, trains a step with the target's loss (its loss changes), saves, reloads with safe_mode
    (no Lambda layers) and predicts the same as before saving. (The planted-signal learning tests
    train one head of each family: narrow and wide, tests/test_train_cli.py.)"""
    import keras

    from heads.models import build_head
    from heads.targets import TARGETS

    spec, goal = HEADS.get(head), TARGETS.get(target)
    model = build_head(head, SMALL, pooling="wide" if spec.needs_wide else "narrow",
                       output_bias=3.0 if goal.outputs == 1 else [0.0] * goal.outputs, target=target,
                       **small_options(spec))
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(16,) + tuple(model.input_shape[1:])).astype(np.float32)
    if goal.outputs == 1:
        y = rng.uniform(1, 10, 16).astype(np.float32)
    else:  # vote histograms
        y = rng.dirichlet(np.ones(goal.outputs), 16).astype(np.float32)
        assert model.output_shape == (None, goal.outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=goal.resolve_loss())
    before = model.evaluate(x, y, verbose=0)
    model.train_on_batch(x, y)
    assert model.evaluate(x, y, verbose=0) != before
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), rtol=1e-5, atol=1e-6)
    assert not any(type(layer).__name__ == "Lambda" for layer in loaded.layers)


def test_head_options_are_parsed_generically():
    """``--head-option KEY=VALUE``: integers where they read as one, every mistake one error."""
    from heads.registry import options_help, parse_options

    assert parse_options(["width=512", " kernels = 64 "]) == {"width": 512, "kernels": 64}
    for bad, why in (("width", "KEY=VALUE"), ("=3", "KEY=VALUE"), ("width=", "KEY=VALUE")):
        with pytest.raises(ConfigError, match=why):
            parse_options([bad])
    with pytest.raises(ConfigError, match="width given twice"):
        parse_options(["width=8", "width=16"])
    with pytest.raises(ConfigError, match="positive integer, received 'wide'"):
        HEADS.get("single3fc").resolve_options(parse_options(["width=wide"]))
    shown = options_help()
    for spec in HEADS.specs():
        for key, meaning in spec.option_help.items():
            assert f"{key} ({meaning})" in shown
    with pytest.raises(ConfigError, match="need one help text each"):
        type(spec)("x", spec.builder, needs_wide=False, description="", options={"width": 8})
