"""mlsp's extractor on TensorFlow and on PyTorch, on this machine: seconds per image (8 views).

Each backend runs in its own process (they must not share one). Reports wall time and the
process's CPU time per image, the load average before and after (on a shared machine wall
time alone misleads), and the features' agreement with the same weights.

    python bench/compare_backends.py --nets iv3,irv2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(backend: str, net: str, weights: str, reps: int, size: tuple, out: str):
    """Runs in the child process: build mlsp's extractor on ``backend``, time ``reps`` calls."""
    sys.path.insert(0, ROOT)
    from mlsp.runtime import backend as mlsp_backend

    mlsp_backend.select(backend)
    import numpy as np

    from mlsp.backbone import weights as backbone_weights, nets as backbones
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor
    from mlsp.images.decode import make_views

    if not os.path.exists(weights):
        model, _ = backbone_weights.build_backbone(backbones.get_backbone(net),
                                                   backbone_weights.WeightsSource.parse("random:0"))
        model.save_weights(weights)
    fx = FeatureExtractor(ExtractConfig(net=net, weights=weights))
    rng = np.random.default_rng(0)
    views = make_views(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    first = fx(views)
    wall, cpu = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fx(views)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    np.save(out + ".npy", first)
    with open(out + ".json", "w") as handle:
        json.dump({"backend": backend, **mlsp_backend.describe(), "wall_s": wall, "cpu_s": cpu,
                   "threads": _threads(backend)}, handle)


def _threads(backend):
    if backend == "torch":
        import torch

        return torch.get_num_threads()
    return os.cpu_count()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="iv3")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--size", default="400x500", help="image size HxW (8 views of 87.5%% of it)")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    if args.child:
        backend, net, weights, reps, out = args.child
        return measure(backend, net, weights, int(reps), size, out)
    import numpy as np

    work = tempfile.mkdtemp(prefix="mlsp-backends-")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_before": os.getloadavg()}, "size": size, "runs": {}}
    for net in args.nets.split(","):
        weights = os.path.join(work, f"{net}.weights.h5")
        found = {}
        for backend in ("tensorflow", "torch"):  # tensorflow first: it writes the weights file
            out = os.path.join(work, f"{net}-{backend}")
            env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
            subprocess.run([sys.executable, os.path.abspath(__file__), "--size", args.size, "--child", backend, net,
                            weights, str(args.reps), out], check=True, env=env)
            with open(out + ".json") as handle:
                found[backend] = json.load(handle)
            found[backend]["features"] = np.load(out + ".npy").astype(np.float64)
        a, b = found["tensorflow"].pop("features"), found["torch"].pop("features")
        for rec in found.values():
            rec["s_per_image_wall"] = round(min(rec["wall_s"]), 3)
            rec["s_per_image_cpu"] = round(min(rec["cpu_s"]), 3)
        result["runs"][net] = {**found, "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
                               "correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                               "torch_over_tensorflow_wall": round(found["torch"]["s_per_image_wall"]
                                                                   / found["tensorflow"]["s_per_image_wall"], 2)}
        print(net, json.dumps(result["runs"][net]), flush=True)
    result["machine"]["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
