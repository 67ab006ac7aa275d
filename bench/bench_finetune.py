"""Benchmark of end-to-end fine-tuning (``mlsp finetune``), beside the matmul rate of the same run.

    python bench/bench_finetune.py [--nets mobilenet,resnet50] [--images 64] [--size 224] [--out bench/results/]

What it measures: the training images per second of ``mlsp finetune`` (the library call behind
it, :func:`mlsp.api.finetune`) on the sample dataset's photos (``mlsp sample``'s, random backbone
weights, so nothing is downloaded), with the run's own timing (the training batches, not a
phase's first epoch). It runs phase 2 alone (no epoch of phase 1, ``--unfreeze all``): every epoch
trains the whole network, so each training image costs about 3x the forward's FLOPs at
``--size`` (counted from the model), and the achieved GFLOP/s is set against the float32 matmul
rate measured in the same run. This is the fine-tuning figure of README's speed table; MLSP's own
training runs on stored features, thousands of images per second (docs/speed.md).

Writes ``<out>/finetune-<time>-<cpu|gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="mobilenet", help="fine-tuning networks, comma separated (default mobilenet)")
    p.add_argument("--images", type=int, default=64, help="sample photos (default 64)")
    p.add_argument("--size", type=int, default=224, help="crop side (default 224, the seeds')")
    p.add_argument("--epochs", type=int, default=2, help="epochs of phase 2, the whole network (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="default 16")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON (default bench/results)")
    return p.parse_args(argv)


def training_gflop(net: str, size: int) -> float:
    """GFLOP of one training image: the backbone's forward FLOPs at ``size`` (counted from the
    model; the head's are negligible) times 3 (the forward, and the backward's two products per
    layer: the usual estimate for training)."""
    from heads.finetune.nets import NETS

    return 3.0 * common.FlopCounter(NETS.get(net).build())(size, size) / 1e9


def run_net(net: str, data: str, args, work: str) -> dict:
    from mlsp import api

    out = os.path.join(work, f"run-{net}")
    result = api.finetune(os.path.join(data, "images"), labels=os.path.join(data, "AVA.txt"), out=out, net=net,
                          weights="random:0", size=args.size, head_epochs=0, epochs=args.epochs,
                          batch_size=args.batch_size, unfreeze="all")
    with open(os.path.join(result.run_dir, "config.json")) as handle:
        config = json.load(handle)
    timing = config["timing"]
    rate, gflop = timing.get("train_samples_per_second"), training_gflop(net, args.size)
    return {"net": net, "size": args.size, "images": args.images, "timing": timing, "images_per_s": rate,
            "training_gflop_per_image": round(gflop, 2), "gflops": round(rate * gflop, 1) if rate else None}


def main(argv=None):
    args = parse_args(argv)
    record = common.new_record("finetune", vars(args))
    record["device"] = common.device_info()
    common.log("matmul reference (float32)")
    record["figures"]["matmul_float32"] = common.matmul_rate("float32")
    from mlsp.sample import build_sample

    with tempfile.TemporaryDirectory(prefix="mlsp-bench-finetune-") as work:
        data = os.path.join(work, "sample")
        common.log(f"sample photos: {args.images}")
        build_sample(data, n_images=args.images, seed=0)
        rows = []
        for net in args.nets.split(","):
            common.log(f"fine-tuning {net} at {args.size} px, {args.epochs} epochs of the whole network")
            row = run_net(net, data, args, work)
            rows.append(row)
            common.log(f"{net}: {row['images_per_s']} training images/s")
        record["figures"]["finetune"] = rows
    rate = record["figures"]["matmul_float32"]["gflops_median"]
    for row in rows:
        row["share_of_matmul"] = round(row["gflops"] / rate, 3) if row["gflops"] else None
        common.log(f"{row['net']}: {row['gflops']} GFLOP/s, {row['share_of_matmul']} of the float32 matmul "
                   f"({rate} GFLOP/s in this run)")
    path = common.write_record(record, args.out)
    print(path)


if __name__ == "__main__":
    main()
