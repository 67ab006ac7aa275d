"""The PyTorch side of the saliency agreement test (tests/test_explain.py): the same tiny model,
the same image and noise, its SmoothGrad map computed on the backend this process runs on
(``KERAS_BACKEND``), written to an .npy file. TensorFlow and PyTorch never share a process.

    KERAS_BACKEND=torch python tests/saliency_worker.py OUT.npy
"""

import sys

import numpy as np

SIZE = 48
REGION = (8, 24, 28, 44)  # top, bottom, left, right: the only pixels the score depends on
SAMPLES = 12


def region_model(size: int = SIZE, region=REGION):
    """A model whose score depends only on ``region`` of the image: the region is cropped, runs
    through a small convolution (fixed, seeded weights, the same on every backend) and a
    sigmoid of its mean."""
    import keras

    top, bottom, left, right = region
    x = keras.Input((size, size, 3))
    crop = keras.layers.Cropping2D(((top, size - bottom), (left, size - right)))(x)
    conv = keras.layers.Conv2D(4, 3, activation="tanh", name="conv")
    pooled = keras.layers.GlobalAveragePooling2D()(conv(crop))
    dense = keras.layers.Dense(1, activation="sigmoid", name="dense")
    model = keras.Model(x, dense(pooled))
    rng = np.random.default_rng(7)
    conv.set_weights([rng.normal(0, 0.02, (3, 3, 3, 4)).astype("float32"), np.zeros(4, "float32")])
    dense.set_weights([rng.normal(0, 1.0, (4, 1)).astype("float32"), np.zeros(1, "float32")])
    return model


def image(size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (size, size, 3)).astype(np.float32)


def saliency() -> np.ndarray:
    from heads.report.saliency import score_function, smoothgrad

    return smoothgrad(score_function(region_model()), image(), SAMPLES, 0.15, seed=0)


if __name__ == "__main__":
    from mlsp.runtime import backend

    assert backend.name() == "torch", backend.name()
    np.save(sys.argv[1], saliency())
    assert "tensorflow" not in sys.modules, "the PyTorch route imported TensorFlow"
