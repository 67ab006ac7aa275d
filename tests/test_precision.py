"""Reduced-precision extraction: fidelity against float32, the store attribute, no mixing of
precisions, and decode-ahead giving exactly the serial path's results."""

import numpy as np
import pytest

from helpers import write_image
from mlsp.errors import StoreConfigMismatch
from mlsp.extraction.job import ExtractConfig, extract
from mlsp.runtime.precision import resolve as resolve_precision
from mlsp.images.decode import make_views
from mlsp.store.read import FeatureStore


def cpu_has_bf16():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bfloat16 hardware "
                                "(avx512_bf16/amx_bf16); bfloat16 would be emulated, so it is not tested here")


@needs_bf16
@pytest.mark.parametrize("net", ["iv3", "convnext_tiny", "mobilenetv3_large"])
def test_bfloat16_fidelity(extractors, net):
    """A net of Inception blocks (iv3; irv2 is built of the same convolutions and batch norms, and
    took 20 s of every suite run), one of layer norms (ConvNeXt) and one of depthwise convolutions
    and hard-swish (MobileNetV3): bfloat16 features stay within 3% of float32's."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    import cv2

    views = make_views(cv2.resize(img, (220, 180), interpolation=cv2.INTER_CUBIC))
    ref = extractors(net=net, pooling="wide")(views)
    low = extractors(net=net, pooling="wide", precision="bfloat16")(views)
    assert low.dtype == np.float32 and low.shape == ref.shape
    max_rel = np.abs(low - ref).max() / np.abs(ref).max()
    corr = np.corrcoef(low.ravel(), ref.ravel())[0, 1]
    assert max_rel <= 0.03, max_rel
    assert corr >= 0.9999, corr
    assert not np.array_equal(low, ref), "bfloat16 must really compute in lower precision"


@needs_bf16
def test_auto_picks_bfloat16_on_this_cpu():
    precision, why = resolve_precision("auto")
    assert precision == "bfloat16" and "bf16" in why


@pytest.mark.parametrize("gpus,cpu_flags,expected,because", [
    ([("H100", (9, 0))], "fpu avx2", "bfloat16", "compute capability (9, 0)) computes bfloat16 natively"),
    ([("T4", (7, 5))], "avx512_bf16 amx_bf16", "float32", "compute capability (7, 5)) has no native bfloat16"),
    ([], "fpu avx512f amx_bf16 avx512_bf16", "bfloat16", "in hardware (amx_bf16, avx512_bf16)"),
    ([], "fpu avx2 avx512f", "float32", "has no bfloat16 instructions"),
    ([], None, "float32", "has no bfloat16 instructions"),  # no /proc/cpuinfo
])
def test_auto_precision_on_every_kind_of_hardware(monkeypatch, gpus, cpu_flags, expected, because):
    """Each branch of ``auto``: a recent GPU, an old GPU (whatever the CPU), a CPU with and
    without bfloat16 instructions, a system without /proc/cpuinfo."""
    import builtins
    import io

    import tensorflow as tf

    devices = [tf.config.PhysicalDevice(name=f"/physical_device:GPU:{k}", device_type="GPU") for k in range(len(gpus))]
    details = {d.name: {"device_name": n, "compute_capability": c} for d, (n, c) in zip(devices, gpus)}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: devices if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details[device.name])
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            return real_open(path, *args, **kwargs)
        if cpu_flags is None:
            raise FileNotFoundError(path)
        return io.StringIO(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")

    monkeypatch.setattr(builtins, "open", fake_open)
    precision, why = resolve_precision("auto")
    assert precision == expected and because in why, why


def test_explicit_precision_is_kept():
    assert resolve_precision("float32") == ("float32", "as asked")


def test_precision_recorded_and_never_mixed(tmp_path, image_dir, extractors):
    out = tmp_path / "s.h5"
    bf16 = ExtractConfig(net="iv3", weights="random:0", precision="bfloat16")
    assert bf16.default_store_name() == "iv3_narrow_bfloat16.h5"
    result = extract(str(image_dir), bf16, str(out), extractor=extractors(net="iv3", precision="bfloat16"))
    assert result.new == 6 and result.errors == []
    with FeatureStore(str(out)) as s:
        assert s.attrs["precision"] == "bfloat16"
    write_image(image_dir / "late.png", 100, 100, seed=9)
    with pytest.raises(StoreConfigMismatch, match="precision: store has 'bfloat16', asked for 'float32'"):
        extract(str(image_dir), ExtractConfig(net="iv3", weights="random:0"), str(out), extractor=extractors(net="iv3"))


def test_decode_ahead_equals_serial(tmp_path, image_dir, extractors):
    ex = extractors(net="iv3")
    config = ExtractConfig(net="iv3", weights="random:0")
    serial, overlapped = tmp_path / "serial.h5", tmp_path / "overlap.h5"
    extract(str(image_dir), config, str(serial), extractor=ex, workers=0)
    extract(str(image_dir), config, str(overlapped), extractor=ex, workers=3, prefetch=2)
    with FeatureStore(str(serial)) as a, FeatureStore(str(overlapped)) as b:
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_array_equal(a.load(), b.load())


def test_training_in_bfloat16_learns_and_saves_a_float32_model(tmp_path):
    """`train --precision bfloat16`: mixed precision while training, float32 weights and outputs
    in the saved model, the precision in config.json, and the planted signal learned."""
    import json

    import keras

    from synthetic import write_synthetic_store
    from heads.train.loop import TrainConfig, train

    store = str(tmp_path / "planted.h5")
    write_synthetic_store(store, 600, n_views=2, block_channels=(16, 32, 16), seed=0)
    run = train(TrainConfig(head="single3fc", store=store, out=str(tmp_path / "run"), head_options={"width": 64},
                            epochs=8, steps_per_epoch=30, lr=1e-3, precision="bfloat16"))
    assert run.metrics["test"]["srcc"] >= 0.8, run.metrics  # float32, same settings: 0.855
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["precision"] == "bfloat16" and record["train"]["precision"] == "bfloat16"
    model = keras.saving.load_model(str(tmp_path / "run" / "model.keras"))
    assert model.dtype_policy.name == "float32"
    assert all(w.dtype == "float32" for w in model.weights)
    with pytest.raises(Exception, match="precision"):
        TrainConfig(head="single3fc", precision="float8").validate()


@pytest.mark.parametrize("target", ["mos", "distribution"])
def test_a_mixed_precision_head_gives_float32_outputs(target):
    """Under mixed_bfloat16 the head's hidden layers compute in bfloat16 and its output (the
    softmax of the distribution target) in float32, so the loss is a float32 one."""
    import keras

    from heads.models import build_head

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_head("single3fc", [16, 16], target=target, width=64)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("fc1").compute_dtype == "bfloat16"
    x = np.random.default_rng(0).normal(size=(4, 32)).astype("float32")
    out = model(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    if target == "distribution":
        np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.sum(out, axis=-1)), 1.0, atol=1e-6)
    float32 = build_head("single3fc", [16, 16], target=target, width=64)
    assert [layer.name for layer in float32.layers][-1] == ("target" if target == "distribution" else "out")


def test_one_owner_checks_every_precision_and_restores_the_policy():
    """mlsp.runtime.precision: a backbone's configuration resolves auto once, where it is made (never
    stores auto), a training config may say auto, a misspelt name is one error naming it, and the
    dtype policy is the caller's again after."""
    import keras

    from heads.train.config import TrainConfig
    from mlsp.errors import ConfigError
    from mlsp.runtime.precision import AUTO, CHOICES, DEFAULT, PRECISIONS, check, dtype_policy, resolve

    assert ExtractConfig().precision == DEFAULT == TrainConfig.precision and AUTO in CHOICES
    resolved = ExtractConfig(net="iv3", precision=AUTO).precision
    assert resolved in PRECISIONS and resolved == resolve(AUTO)[0]
    with pytest.raises(ConfigError, match="received 'bf16'"):
        ExtractConfig(net="iv3", precision="bf16")
    TrainConfig(head="single1fc", precision=AUTO).validate()
    with pytest.raises(ConfigError, match="received 'bf16'"):
        check("bf16")
    before = keras.config.dtype_policy().name
    with dtype_policy("bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        assert keras.layers.Dense(2).compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == before


def test_score_and_export_resolve_auto(monkeypatch):
    """The run's extraction at ``auto`` is the machine's precision, as extract's would be."""
    from heads.run import Run
    from mlsp.runtime import precision

    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr("mlsp.runtime.backend.gpu_bfloat16", lambda: None)
    run = Run("r", {"store": {"net": "iv3", "pooling": "narrow", "views": ["full"],
                              "config": {"weights_source": "random:0", "precision": "float32", "max_side": 0}}})
    assert run.extract_config().precision == "float32"
    assert run.extract_config(precision="auto").precision == "bfloat16"
