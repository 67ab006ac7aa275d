"""Where the time of one forward pass goes: TensorFlow's profiler on mlsp's extractor graph,
time per op type, for each backbone, pooling and precision asked for.

    python bench/profile_forward.py [--configs irv2:wide,iv3:narrow] [--precisions float32,bfloat16]
                                    [--size 420x420] [--views 8] [--out bench/results/]

For every op of the traced graph, the profiler records its start and duration on the thread
that ran it (TensorFlow runs independent ops of a graph in parallel, and each heavy op uses
the intra-op threads). Op types are summed over the ops; convolutions get their FLOPs (counted
from the model as in bench_extract.py) and so their own GFLOP/s. Writes
``<out>/profile-<time>-<device>.json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import log  # noqa: E402

SKIP = ("ExecutorState::Process", "ThreadpoolListener", "EagerExecute", "EagerLocalExecute", "KernelAndDeviceFunc",
        "TFE_Py_Execute", "forward", "EagerKernelExecute")


def op_type(name: str) -> str:
    """'model/conv2d_3_1/convolution:_MklNativeConv2D' -> '_MklNativeConv2D'."""
    return name.rsplit(":", 1)[-1] if ":" in name else name


def op_family(kind: str, name: str) -> str:
    k = kind.lower()
    if "conv2d" in k:
        return "convolution"
    if "matmul" in k or "einsum" in k or "batchmatmul" in k:
        return "wide pooling (einsum or matmuls)" if "pooling" in name else "matmul"
    if k in ("cast",) or "cast" in k:
        return "cast (precision)"
    if "fusedbatchnorm" in k:
        return "batch norm (fused)"
    if k in ("mul", "add", "addv2", "sub", "rsqrt", "_mklmul", "_mkladd", "_mkladdv2", "_fusedmkl", "realdiv",
             "squareddifference") or "mul" == k:
        return "elementwise arithmetic (batch norm, scale, residual add)"
    if "relu" in k:
        return "relu"
    if "pool" in k:
        return "max/avg pool (backbone)"
    if "concat" in k:
        return "concat"
    if "mean" in k or "sum" in k:
        return "reduce (pooling)"
    return "other"


def profile(fx, batch, logdir, reps=1) -> dict:
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    fx(batch)
    fx(batch)
    common.wait_quiet()
    t = time.perf_counter()
    fx(batch)
    plain = time.perf_counter() - t
    common.wait_quiet()
    tf.profiler.experimental.start(logdir)
    t = time.perf_counter()
    for _ in range(reps):
        fx(batch)
    profiled = (time.perf_counter() - t) / reps
    tf.profiler.experimental.stop()
    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as handle:
        space.ParseFromString(handle.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    names = {k: v.name for k, v in plane.event_metadata.items()}
    per_type = collections.Counter()
    per_family = collections.Counter()
    count = collections.Counter()
    per_op = collections.Counter()
    for line in plane.lines:
        if line.name == "python":
            continue
        for event in line.events:
            name = names.get(event.metadata_id, "?")
            if name.startswith(SKIP) or ":" not in name:
                continue
            kind = op_type(name)
            seconds = event.duration_ps / 1e12 / reps
            per_type[kind] += seconds
            per_family[op_family(kind, name)] += seconds
            per_op[name] += seconds
            count[kind] += 1
    total = sum(per_type.values())
    return {
        "wall_s": plain,
        "wall_profiled_s": profiled,
        "op_seconds_total": total,
        "by_family": {k: {"s": v, "share": v / total} for k, v in per_family.most_common()},
        "by_type": {k: {"s": v, "share": v / total, "ops": count[k] // reps} for k, v in per_type.most_common()},
        "top_ops": [{"op": k, "s": v} for k, v in per_op.most_common(15)],
    }


class _Runner:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, views):
        return self.fn(views)


def unfolded_extractor(fx, precision):
    """The same extractor with Keras' graph as it is: batch norms not folded."""
    from mlsp.extraction.job import FeatureExtractor

    return FeatureExtractor(fx.config, fold_batch_norms=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="irv2:wide,iv3:narrow")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--size", default="420x420", help="HxW of each view")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--out", default=common.RESULTS_DIR)
    p.add_argument("--unfolded", action="store_true",
                   help="also profile the graph without the batch norms folded into the convolutions")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor

    record = common.new_record("profile", vars(args))
    record["device"] = common.device_info()
    batch = np.random.default_rng(0).integers(0, 256, (args.views, h, w, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="mlsp-prof-") as tmp:
        for spec in args.configs.split(","):
            net, pooling = spec.split(":")
            for precision in args.precisions.split(","):
                fx = FeatureExtractor(ExtractConfig(net=net, pooling=pooling, weights="random:0", precision=precision))
                gflop = common.FlopCounter(fx.model)(h, w) * args.views / 1e9
                variants = [("as is", fx)]
                if args.unfolded:
                    variants.append(("unfolded", unfolded_extractor(fx, precision)))
                for variant, runner in variants:
                    with common.Phase() as phase:
                        prof = profile(runner, batch, os.path.join(tmp, f"{net}{precision}{variant[:2]}"))
                    prof["gflop"] = gflop
                    prof["gflops"] = gflop / prof["wall_s"]
                    conv = prof["by_family"].get("convolution", {}).get("s")
                    prof["conv_gflops_op_time"] = gflop / conv if conv else None
                    prof["phase"] = phase.record()
                    prof["variant"] = variant
                    name = f"{net}_{pooling}_{precision}" + ("" if variant == "as is" else "_unfolded")
                    record["figures"][name] = prof
                    log(f"{name} {args.views}x{h}x{w}: {prof['wall_s']:.3f} s, {prof['gflops']:.0f} GFLOP/s; "
                        f"other processes {phase.record()['other_cores']} cores")
                    for fam, v in list(prof["by_family"].items())[:8]:
                        log(f"    {fam:<58} {v['s']:7.3f} s  {100 * v['share']:5.1f}%")
                del fx, variants
    path = common.write_record(record, args.out)
    log(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
