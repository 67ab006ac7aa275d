"""The PyTorch side of the native engine's tests (tests/test_native.py), run in a subprocess:
TensorFlow (pytest's process) and PyTorch never share one.

    python tests/native_worker.py JOB.json

For each net of the job: the extractor on the native engine (``--engine native``'s), with the
weights file TensorFlow wrote, gives narrow and wide features of each view array of the job, one
size per call, then all of them in one bucketed call; also a store extracted through the CLI
with ``--engine native`` (its engine and backend attributes are reported).
"""

import json
import os
import sys
import time

import numpy as np


def features(net: str, weights: str, arrays: list, precision: str) -> dict:
    """{"narrow"|"wide": one-size features, "narrow_bucketed"|"wide_bucketed": one bucketed call}."""
    from mlsp import native
    from mlsp.extract import ExtractConfig, FeatureExtractor

    fx = FeatureExtractor(ExtractConfig(net=net, pooling="narrow", weights=weights, precision=precision),
                          engine="native")
    assert fx.engine == "native", fx.engine
    wide = native.NativeNet(fx.native_net.plan, preprocessing=fx.config.spec.preprocessing, grid=5,
                            precision=precision)
    out = {}
    for name, model in (("narrow", fx.native_net), ("wide", wide)):
        out[name] = np.concatenate([model(a) for a in arrays])
        out[name + "_bucketed"] = model.run_mixed(arrays)
    out["bucket_exact_plan"] = np.array(native.bucket_exact(fx.native_net.plan))
    return out


def main(job_path: str):
    with open(job_path) as handle:
        job = json.load(handle)
    import cli

    cli.main(["--backend", "torch", "info", "--json"], standalone_mode=False)
    arrays = [np.load(path) for path in job["views"]]
    found = {"seconds": {}}
    for net, weights in job["weights"].items():
        start = time.monotonic()
        for precision in job["precisions"][net]:
            np.savez(job["out"] + f"-{net}-{precision}.npz", **features(net, weights, arrays, precision))
        found["seconds"][net] = round(time.monotonic() - start, 1)
    if job.get("images"):
        cli.main(["extract", "--images", job["images"], "--net", "iv3", "--weights", job["weights"]["iv3"],
                  "--engine", "native", "--out", job["store"]], standalone_mode=False)
        import h5py

        with h5py.File(job["store"], "r") as store:
            found["store"] = {k: str(store.attrs[k]) for k in ("engine", "backend")}
    found["tensorflow_imported"] = sorted(m for m in sys.modules if m.partition(".")[0] == "tensorflow")
    with open(job["out"] + ".json", "w") as handle:
        json.dump(found, handle)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])
