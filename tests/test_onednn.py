"""oneDNN's convolutions (TF_ENABLE_ONEDNN_OPTS): the CLI (mlsp.runtime.backend.prepare_process) asks TensorFlow for them where the user has
not chosen, and the features stay those of Eigen's convolutions to float32 rounding.

TensorFlow reads the variable once, when it starts, so each setting runs in its own process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys
import numpy as np
import os
from mlsp.runtime.backend import prepare_process
prepare_process()  # as the CLI does
from mlsp.extraction.job import ExtractConfig, FeatureExtractor
from mlsp.images.decode import make_views
from tensorflow.python.util import _pywrap_util_port as port
rng = np.random.default_rng(0)
out = {"env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "onednn": bool(port.IsMklEnabled()), "features": {}}
for pooling in ("narrow",):  # the convolutions differ between the two; the pooling after them does not
    fx = FeatureExtractor(ExtractConfig(net="iv3", pooling=pooling, augment=False, weights="random:0"))
    for h, w in ((150, 200), (181, 143)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out["features"][f"{pooling}-{h}x{w}"] = np.asarray(fx(make_views(img, augment=False)), np.float64).ravel().tolist()
print(json.dumps(out))
"""


def run_worker(setting):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_onednn_is_asked_for_unless_chosen_and_features_agree_to_float32_rounding():
    default, off = run_worker(None), run_worker("0")
    assert default["env"] == "1" and default["onednn"], "the CLI asks TensorFlow for oneDNN"
    assert off["env"] == "0" and not off["onednn"], "the user's own setting is kept"
    assert default["features"].keys() == off["features"].keys()
    for key, a in default["features"].items():
        a, b = np.asarray(a), np.asarray(off["features"][key])
        assert a.shape == b.shape and np.isfinite(a).all()
        # Two summation orders of float32 convolutions, through 11 blocks: relative to each
        # block's scale, far below float16's 2^-11 that the store keeps.
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= 1e-4 * scale, (key, np.abs(a - b).max(), scale)
        assert np.corrcoef(a, b)[0, 1] > 0.999999, key
