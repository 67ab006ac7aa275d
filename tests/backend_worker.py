"""One side of the backend-agreement tests (tests/test_backends.py).

The same functions run on TensorFlow inside pytest and on PyTorch in a subprocess started by the
tests (`KERAS_BACKEND` unset; the subprocess chooses torch with `mlsp --backend torch`, as a user
would): TensorFlow and PyTorch never share a process. Run as a script, this module does the
jobs of a JSON file and writes what it found next to it:

    python tests/backend_worker.py JOB.json
"""

import json
import os
import sys
import time

import numpy as np

# Keras on PyTorch against TensorFlow, feature for feature: iv3, the paper's smaller net. irv2 on
# PyTorch is tests/test_native.py's (the native engine, which CUDA machines run, against TensorFlow,
# narrow and wide, odd and even sizes); running it here too cost 20 s of every suite run.
NETS = ("iv3",)


def save_random_backbone(net: str, seed: int, path: str):
    """A seeded random backbone's weights in Keras' own file format, which every backend loads
    (the random initialisers themselves differ between backends)."""
    from mlsp.backbone import weights as backbone_weights, nets as backbones

    model, _ = backbone_weights.build_backbone(backbones.get_backbone(net),
                                               backbone_weights.WeightsSource.parse(f"random:{seed}"))
    model.save_weights(path)


def features(net: str, weights: str, views: np.ndarray):
    """(extractor, {"narrow": ..., "wide": ...}) of ``views`` through mlsp's extractor. The wide
    features come from mlsp's pooling layer on the same (folded) backbone's taps, so one backbone
    serves both poolings."""
    import keras

    from mlsp.runtime import backend
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor
    from mlsp.backbone.pooling import MultiLevelPooling

    fx = FeatureExtractor(ExtractConfig(net=net, pooling="narrow", weights=weights))
    taps = fx.model.get_layer("mlsp_pooling").input
    wide = keras.Model(fx.model.input, MultiLevelPooling(grid=5)(taps))
    wide_forward = backend.compile_forward(wide, fx.config.spec.preprocess)
    return fx, {"narrow": fx(views), "wide": wide_forward(views)}


def train_head(head: str, channels, pooling: str, options: dict, x: np.ndarray, y: np.ndarray, out: str):
    """A small head trained for two epochs and saved as .keras; returns its predictions of ``x``."""
    import keras

    from heads.models import build_head
    from mlsp.runtime import backend

    backend.set_random_seed(3)
    model = build_head(head, channels, pooling=pooling, output_bias=float(y.mean()), **options)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    model.save(out)
    return predict(out, x)


def predict(path: str, x: np.ndarray) -> np.ndarray:
    import keras

    import heads.models  # noqa: F401  (registers the heads' layers)

    model = keras.saving.load_model(path)
    return np.asarray(model.predict(x, batch_size=16, verbose=0), dtype=np.float32).reshape(-1)


def main(job_path: str):
    with open(job_path) as handle:
        job = json.load(handle)
    import cli

    # choose the backend the way a user does, before Keras is imported
    cli.main(["--backend", job["backend"], "info", "--json"], standalone_mode=False)
    import keras

    from mlsp.extraction.job import ExtractConfig, extract

    found = {"backend": keras.backend.backend(), "seconds": {}}
    views = np.load(job["views"])
    for net in NETS:
        start = time.monotonic()
        fx, feats = features(net, job["weights"][net], views)
        found["seconds"][net] = round(time.monotonic() - start, 1)
        np.savez(job["out"] + f"-{net}.npz", **feats)
        if net == "iv3":
            result = extract(job["images"], ExtractConfig(net="iv3", weights=job["weights"][net]), job["store"],
                             extractor=fx)
            found["store_images"] = result.images
            found["seconds"]["extract"] = round(time.monotonic() - start, 1) - found["seconds"][net]
    start = time.monotonic()
    for name, spec in job["heads"].items():
        data = np.load(spec["data"])
        np.save(job["out"] + f"-{name}-theirs.npy", predict(spec["model"], data["x"]))
        np.save(job["out"] + f"-{name}-mine.npy",
                train_head(name, spec["channels"], spec["pooling"], spec["options"], data["x"], data["y"],
                           job["out"] + f"-{name}.keras"))
    found["seconds"]["heads"] = round(time.monotonic() - start, 1)
    found["tensorflow_imported"] = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    with open(job["out"] + ".json", "w") as handle:
        json.dump(found, handle)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])
