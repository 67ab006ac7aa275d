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


def features(net: str, weights: str, arrays: list, precisions: list) -> dict:
    """{precision: {"narrow"|"wide": one-size features, "narrow_bucketed"|"wide_bucketed": one
    bucketed call}}, from one extractor's plan (a lower precision casts the same weights, as
    Keras' mixed precision policy does)."""
    from mlsp.backbone import native
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor

    fx = FeatureExtractor(ExtractConfig(net=net, pooling="narrow", weights=weights), engine="native")
    assert fx.engine == "native", fx.engine
    plan, preprocessing = fx.native_net.plan, fx.config.spec.preprocessing
    found = {}
    for precision in precisions:
        out = found[precision] = {"bucket_exact_plan": np.array(native.bucket_exact(plan))}
        for name, grid in (("narrow", 1), ("wide", 5)):
            model = native.NativeNet(plan, preprocessing=preprocessing, grid=grid, precision=precision)
            out[name] = np.concatenate([model(a) for a in arrays])
            out[name + "_bucketed"] = model.run_mixed(arrays)
    return found


def keras_fallback(net: str) -> dict:
    """A backbone the native engine cannot run: its extractor's engine and the log lines saying so."""
    import logging

    from mlsp.extraction.job import ExtractConfig, FeatureExtractor

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("mlsp").addHandler(handler)
    try:
        fx = FeatureExtractor(ExtractConfig(net=net, weights="random:0"), engine="native")
    finally:
        logging.getLogger("mlsp").removeHandler(handler)
    return {"engine": fx.engine, "lines": [line for line in lines if "Keras engine" in line]}


def main(job_path: str):
    with open(job_path) as handle:
        job = json.load(handle)
    import cli

    cli.main(["--backend", "torch", "info", "--json"], standalone_mode=False)
    arrays = [np.load(path) for path in job["views"]]
    found = {"seconds": {}}
    for net, weights in job["weights"].items():
        start = time.monotonic()
        for precision, out in features(net, weights, arrays, job["precisions"][net]).items():
            np.savez(job["out"] + f"-{net}-{precision}.npz", **out)
        found["seconds"][net] = round(time.monotonic() - start, 1)
    if job.get("fallback"):
        found["fallback"] = keras_fallback(job["fallback"])
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
