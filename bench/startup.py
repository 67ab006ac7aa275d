"""Start-up: where the seconds of a short command go, and what the extractor cache saves.

    python bench/startup.py [--nets iv3,irv2] [--repeats 2]

Every command runs in a fresh process (as a user runs it), with ``KERAS_HOME`` in a temporary
folder so no earlier cache helps; each is timed by wall clock and by the CPU seconds of the
process (user + system, from ``getrusage``), which a busy machine disturbs much less, the more
so with TensorFlow on one thread (``--threads 1``, the default here: idle pool threads spin and
bill CPU seconds when they fight for cores). Then:

- ``mlsp --help`` and ``mlsp inspect STORE``: no TensorFlow at all;
- per net, ``mlsp extract ONE.jpg`` (random weights, as ImageNet weights cost the same):
  ``MLSP_FORWARD_CACHE=0`` (built every time: the state before the cache), the first run with
  the cache (builds and writes the entry), then runs that load it;
- in one process, the phases of building an extractor: importing TensorFlow, building the
  backbone (random weights), folding the batch norms, tracing plus the first forward pass, a
  second forward pass; and loading the cached entry plus its first forward pass.

Writes ``bench/results/startup-<time>-cpu.json``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PHASES = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
net = sys.argv[1]
out, t, c = {}, time.perf_counter(), time.process_time()
def mark(name):
    global t, c
    out[name] = [round(time.perf_counter() - t, 3), round(time.process_time() - c, 3)]
    t, c = time.perf_counter(), time.process_time()
import numpy as np
import tensorflow as tf
import keras
mark("import tensorflow + keras")
threads = int(sys.argv[2])
if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
from mlsp.backbone import weights as backbone_weights, nets as backbones, folding
from mlsp.extraction.job import ExtractConfig, FeatureExtractor
mark("import mlsp.extraction.job")
config = ExtractConfig(net=net, weights="random:0")
spec = config.spec
model, record = backbone_weights.build_backbone(spec, backbone_weights.WeightsSource.parse("random:0"))
mark("build backbone (random weights, hash)")
folding.fold_batch_norms(model)
mark("fold batch norms")
views = np.random.default_rng(0).integers(0, 256, (8, 328, 437, 3), dtype=np.uint8)
fx = FeatureExtractor(config)
mark("FeatureExtractor (build + fold + taps, again)")
fx(views)
mark("trace + first forward (8 views 328x437)")
fx(views)
mark("second forward")
cached = FeatureExtractor(config, cache=True)
mark("cache: write entry (first run only)")
del cached
again = FeatureExtractor(config, cache=True)
mark("cache: load entry")
again(views)
mark("cache: first forward")
print(json.dumps(out))
"""


def timed(cmd, env, cwd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}, proc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="iv3,irv2")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each cached command after the first.")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow's intra- and inter-op threads (mlsp extract --threads N N); 1 keeps a "
                             "busy machine's contention out of the CPU seconds, 0 is TensorFlow's default.")
    args = parser.parse_args()
    record = common.new_record("startup", vars(args))
    record["machine"]["load_average_at_start"] = os.getloadavg()
    figures = record["figures"]
    with tempfile.TemporaryDirectory(prefix="mlsp-startup-") as tmp:
        env = dict(os.environ, KERAS_HOME=os.path.join(tmp, "keras"), TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        mlsp = [sys.executable, "-c", "import cli; cli.main()"]
        import numpy as np
        import cv2

        photo = os.path.join(tmp, "photo.jpg")
        rng = np.random.default_rng(0)
        cv2.imwrite(photo, cv2.resize(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), (640, 480)))
        figures["help"], _ = timed(mlsp + ["--help"], env, tmp)
        common.log(f"mlsp --help: {figures['help']}")
        for net in args.nets.split(","):
            store = os.path.join(tmp, f"{net}.h5")
            base = mlsp + ["extract", photo, "--net", net, "--weights", "random:0", "--threads", str(args.threads),
                           str(args.threads)]
            rows = {}
            off = dict(env, MLSP_FORWARD_CACHE="0")
            rows["no cache (built)"], _ = timed(base + ["--out", store + ".off.h5"], off, tmp)
            common.log(f"{net} no cache: {rows['no cache (built)']}")
            rows["cache, first run (builds, writes)"], _ = timed(base + ["--out", store + ".first.h5"], env, tmp)
            common.log(f"{net} first: {rows['cache, first run (builds, writes)']}")
            for k in range(args.repeats):
                rows[f"cache, run {k + 2} (loads)"], _ = timed(base + ["--out", store + f".{k}.h5"], env, tmp)
                common.log(f"{net} cached: {rows[f'cache, run {k + 2} (loads)']}")
            figures[f"extract one photo, {net}"] = rows
            if "inspect" not in figures:
                figures["inspect"], _ = timed(mlsp + ["inspect", store + ".off.h5"], env, tmp)
            phases_env = dict(env, KERAS_HOME=os.path.join(tmp, "keras-phases"))
            _, proc = timed([sys.executable, "-c", PHASES, net, str(args.threads)], phases_env, tmp)
            figures[f"phases, {net} [wall s, cpu s]"] = json.loads(proc.stdout.strip().splitlines()[-1])
            common.log(f"{net} phases: {figures[f'phases, {net} [wall s, cpu s]']}")
        importtime = subprocess.run([sys.executable, "-X", "importtime", "-c", "import tensorflow, keras"], env=env,
                                    capture_output=True, text=True).stderr.splitlines()
        tops = []
        for line in importtime:
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit():
                tops.append((int(parts[1]), parts[2].rstrip()))
        figures["importtime_top_cumulative_us"] = sorted(tops, reverse=True)[:12]
    record["notes"].append("CPU seconds are the process's user + system time; wall seconds depend on what else "
                           "runs on the machine (see load_average_at_start).")
    print(json.dumps(figures, indent=1))
    print(common.write_record(record))


if __name__ == "__main__":
    main()
