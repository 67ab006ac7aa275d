"""One process: the float32 matmul and mlsp's forward passes (8 views of 4 AVA-like sizes)
interleaved, each timed by wall clock and by this process's CPU seconds; prints one JSON line.

    TF_ENABLE_ONEDNN_OPTS=0|1 [FROZEN=1] [THREADS=intra,inter] [REPS=3] [CFG=iv3:narrow] \
        python bench/onednn_probe.py >> probe.jsonl

Run it alternately with TF_ENABLE_ONEDNN_OPTS=0 and 1 (read once, when TensorFlow starts, so
one process cannot compare both). FROZEN=1 adds the same forward with its variables turned
into constants, so that oneDNN may cache the reordered filters. See FINDINGS.md, "AVX2".
"""
import json
import os
import resource
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import numpy as np
import common
from mlsp.runtime import backend
intra, inter = (int(v) for v in os.environ.get("THREADS", "0,0").split(","))
backend.configure_threads(intra or None, inter or None)
from mlsp.extraction.job import ExtractConfig, FeatureExtractor
from mlsp.images import decode as images
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port as p
net, pooling = os.environ.get("CFG", "iv3:narrow").split(":")
fx = FeatureExtractor(ExtractConfig(net=net, pooling=pooling, weights="random:0"))
variants = {"plain": fx}
if os.environ.get("FROZEN"):
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    cf = fx._forward.compiled.get_concrete_function()
    frozen = convert_variables_to_constants_v2(cf)
    def fz(b):
        out = frozen(tf.constant(b))
        return (out[0] if isinstance(out, (list, tuple)) else out).numpy()
    variants["frozen"] = fz
rng = np.random.default_rng(0)
sizes = [(497,629),(375,500),(333,500),(450,600)]
batches = [images.make_views(rng.integers(0,256,(h,w,3),dtype=np.uint8)) for h,w in sizes]
fc = common.FlopCounter(fx.model)
gf = [fc(b.shape[1], b.shape[2])*8/1e9 for b in batches]
for v in variants.values():
    for b in batches: v(b)
if "frozen" in variants:
    d = np.abs(variants["frozen"](batches[1]) - fx(batches[1])).max(); print("frozen maxdiff", d, file=sys.stderr)
a = tf.random.normal((4096,4096)); bb = tf.random.normal((4096,4096))
@tf.function
def mm(a, b): return tf.reduce_sum(tf.matmul(a, b)[:1,:1])
mm(a,bb); mm(a,bb)
def cpu(): r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
rows = []
def timed(kind, fn, g):
    c0 = cpu(); pr = common.Probe().start(); fn(); t, o = pr.stop(); c = cpu() - c0
    rows.append({"kind": kind, "gflop": g, "wall": t, "cpu": c, "other": o})
for rep in range(int(os.environ.get("REPS", 3))):
    timed("matmul", lambda: mm(a, bb).numpy(), 2*4096**3/1e9)
    for name, v in variants.items():
        for b, g in zip(batches, gf):
            timed(name, lambda: v(b), g)
print(json.dumps({"onednn": p.IsMklEnabled(), "threads": [intra, inter], "rows": rows,
                  "load1": open('/proc/loadavg').read().split()[0]}))
