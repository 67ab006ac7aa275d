"""Wide pooling equals OpenCV's INTER_AREA; narrow pooling is the global mean."""

import cv2
import keras
import numpy as np
import pytest

from mlsp.backbone.pooling import MultiLevelPooling


def cv2_area(x, size=5):
    """Reference: cv2.resize INTER_AREA, one 2-D map (image, channel) at a time."""
    out = np.empty((x.shape[0], size, size, x.shape[-1]), np.float32)
    for b in range(x.shape[0]):
        for c in range(x.shape[-1]):
            out[b, :, :, c] = cv2.resize(np.ascontiguousarray(x[b, :, :, c]), (size, size),
                                         interpolation=cv2.INTER_AREA)
    return out


@pytest.mark.parametrize("shape", [(35, 35), (17, 23), (8, 8), (5, 5), (6, 11), (5, 40), (3, 4), (1, 1), (2, 5)])
def test_wide_equals_cv2_inter_area(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((2,) + shape + (6,)).astype(np.float32)
    got = keras.ops.convert_to_numpy(MultiLevelPooling(grid=5)(x))
    np.testing.assert_allclose(got, cv2_area(x), rtol=1e-5, atol=1e-5)


def test_mixed_case_is_separable_area_mean():
    """One side above 5 and one below: OpenCV changes scheme; we keep the area mean, checked
    here against an explicit computation on the 2x12 map."""
    x = np.arange(2 * 12, dtype=np.float32).reshape(1, 2, 12, 1)
    got = keras.ops.convert_to_numpy(MultiLevelPooling(grid=5)(x))[0, :, :, 0]
    rows = np.repeat(x[0, :, :, 0], 5, axis=0)  # rows upsampled x5 -> 10 rows, area = repeat
    cols = np.repeat(rows, 5, axis=1)  # 10 x 60, now both divisible
    expected = cols.reshape(5, 2, 5, 12).mean(axis=(1, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_narrow_is_global_mean_and_concatenates_blocks():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 9, 7, 4)).astype(np.float32)
    b = rng.standard_normal((3, 4, 3, 5)).astype(np.float32)
    got = keras.ops.convert_to_numpy(MultiLevelPooling(grid=1)([a, b]))
    np.testing.assert_allclose(got, np.concatenate([a.mean((1, 2)), b.mean((1, 2))], -1), rtol=1e-5, atol=1e-6)
    wide = keras.ops.convert_to_numpy(MultiLevelPooling(grid=5)([a, b]))
    assert wide.shape == (3, 5, 5, 9)
    # each block is pooled on its own (9x7 shrinks, 4x3 grows), as OpenCV would, then concatenated
    np.testing.assert_allclose(wide, np.concatenate([cv2_area(a), cv2_area(b)], -1), rtol=1e-5, atol=1e-5)
    # where the map divides evenly into the grid, the mean of the 5x5 grid is the narrow feature
    even = rng.standard_normal((3, 10, 15, 4)).astype(np.float32)
    grid = keras.ops.convert_to_numpy(MultiLevelPooling(grid=5)(even))
    np.testing.assert_allclose(grid.mean((1, 2)), even.mean((1, 2)), rtol=1e-5, atol=1e-6)


def test_layer_saves_and_loads_with_safe_mode(tmp_path):
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, MultiLevelPooling(grid=5)([inp, keras.layers.Conv2D(2, 3)(inp)]))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).standard_normal((1, 13, 17, 3)).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6)


def test_backbone_blocks_pooled_like_cv2(extractors):
    """On the real backbone: every block's activations, pooled by cv2 INTER_AREA and
    concatenated, equal the extractor's wide features."""
    from mlsp.backbone import nets as backbones

    ex = extractors(net="iv3", pooling="wide", augment=False)
    spec = backbones.get_backbone("iv3")
    taps = keras.Model(ex.model.input, [ex.model.get_layer(t).output for t in spec.taps])
    img = np.random.default_rng(1).integers(0, 256, (1, 181, 203, 3), dtype=np.uint8)
    acts = taps(img.astype(np.float32) / 127.5 - 1.0)
    expected = np.concatenate([cv2_area(keras.ops.convert_to_numpy(a)) for a in acts], axis=-1)
    np.testing.assert_allclose(ex(img), expected, rtol=1e-4, atol=1e-5)
