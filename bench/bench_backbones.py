"""Speed of every registered backbone: images/s and GFLOP/s of mlsp's forward pass, against the
dense matmul rate measured in the same run, in float32 and bfloat16.

For each backbone and precision one ``FeatureExtractor`` (random weights: the same FLOPs as
ImageNet's, nothing downloaded; narrow pooling; batch norms folded as ``mlsp extract`` runs it)
runs the 8 augmented views of one image of ``--size`` (default 384x512: crops of 336x448) as
one batch (``--no-augment``: the whole image as one view, a shorter run), ``--reps`` times
after one untimed warm-up (the trace). Each repetition records
the CPU cores other processes used meanwhile (``bench/common.py``); the figure kept is the
least disturbed repetition's, and the record says how disturbed it was. The matmul reference
is measured at the start and again at the end; every row is compared with its fastest
repetition. FLOPs are counted from the Keras model (:class:`mlsp.backbone.cost.FlopCounter`).

    python bench/bench_backbones.py                       # every backbone, float32 and bfloat16
    python bench/bench_backbones.py --nets iv3 mobilenetv3_large --precisions float32 --reps 2

Writes ``bench/results/backbones-<time>-<device>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import log  # noqa: E402


def measure(net: str, precision: str, height: int, width: int, reps: int, max_wait: float,
            augment: bool = True) -> dict:
    from mlsp.images import decode as images
    from mlsp.backbone.nets import get_backbone
    from mlsp.backbone.cost import FlopCounter
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor

    spec = get_backbone(net)
    t0 = time.perf_counter()
    fx = FeatureExtractor(ExtractConfig(net=net, pooling="narrow", augment=augment, weights="random:0",
                                        precision=precision))
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    views = images.make_views(img, augment)
    vh, vw = views.shape[1:3]
    gflop = FlopCounter(fx.model)(vh, vw) * len(views) / 1e9
    t0 = time.perf_counter()
    fx(views)
    first_s = time.perf_counter() - t0
    runs = []
    for _ in range(reps):
        common.wait_quiet(max_wait=max_wait)
        probe = common.Probe().start()
        fx(views)
        seconds, other = probe.stop()
        runs.append({"seconds": round(seconds, 4), "other_cores": None if other is None else round(other, 3)})
    best = min(runs, key=lambda r: (r["other_cores"] if r["other_cores"] is not None else 0.0, r["seconds"]))
    row = {
        "net": net, "precision": precision, "blocks": len(spec.taps), "channels": spec.total_channels,
        "image": [height, width], "views": len(views), "view_size": [int(vh), int(vw)],
        "gflop_per_image": round(gflop, 2), "build_s": round(build_s, 1), "first_call_s": round(first_s, 2),
        "runs": runs, "seconds_per_image": best["seconds"], "other_cores": best["other_cores"],
        "images_per_s": round(1.0 / best["seconds"], 3), "gflops": round(gflop / best["seconds"], 1),
    }
    del fx
    gc.collect()
    return row


def markdown(rows: list, matmul: dict, isa: str) -> str:
    lines = ["| backbone | precision | blocks | channels | GFLOP/image | images/s | GFLOP/s | "
             "of matmul | ISA | other cores busy |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        ref = matmul[r["precision"]]["reference_gflops"]
        lines.append(f"| {r['net']} | {r['precision']} | {r['blocks']} | {r['channels']:,} | "
                     f"{r['gflop_per_image']:.1f} | {r['images_per_s']:.2f} | {r['gflops']:.0f} | "
                     f"{r['gflops'] / ref:.0%} | {isa} | {r['other_cores']} |")
    return "\n".join(lines)


def main(argv=None):
    from mlsp.backbone.nets import BACKBONES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(BACKBONES), choices=list(BACKBONES),
                        help="Backbones to measure (default: every registered one).")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", nargs=2, type=int, default=[384, 512], metavar=("HEIGHT", "WIDTH"),
                        help="The image whose 8 views are run (default 384 512).")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="One view, the whole image, instead of the 8 crops (a shorter run).")
    parser.add_argument("--reps", type=int, default=3, help="Timed repetitions per backbone and precision.")
    parser.add_argument("--max-wait", type=float, default=20.0,
                        help="Seconds to wait for a quiet machine before each repetition.")
    parser.add_argument("--out-dir", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)

    record = common.new_record("backbones", vars(args))
    record["device"] = common.device_info()
    started = time.perf_counter()
    matmul = {}
    for precision in args.precisions:
        common.wait_quiet(max_wait=args.max_wait)
        matmul[precision] = common.matmul_rate(precision)
        log(f"matmul {precision}: {matmul[precision]['gflops_median']} GFLOP/s")
    record["reference"] = {"matmul": matmul}
    rows = []
    for net in args.nets:
        for precision in args.precisions:
            row = measure(net, precision, *args.size, args.reps, args.max_wait, args.augment)
            row["of_matmul"] = round(row["gflops"] / matmul[precision]["gflops_median"], 3)  # until the end's
            rows.append(row)
            log(f"{net} {precision}: {row['images_per_s']} images/s, {row['gflops']} GFLOP/s "
                f"({row['of_matmul']:.0%} of matmul, {record['machine']['isa']}), other cores {row['other_cores']}")
    # on a shared machine the start's matmul may be the more disturbed measurement: measure again
    # at the end and compare every row with the fastest matmul repetition seen
    for precision in args.precisions:
        common.wait_quiet(max_wait=args.max_wait)
        again = common.matmul_rate(precision)
        matmul[precision]["gflops_end"] = again["gflops_median"]
        matmul[precision]["reference_gflops"] = max(matmul[precision]["gflops_max"], again["gflops_max"])
    for row in rows:
        row["of_matmul"] = round(row["gflops"] / matmul[row["precision"]]["reference_gflops"], 3)
    record["figures"] = {"backbones": rows}
    record["notes"].append("random weights (same FLOPs as ImageNet's); narrow pooling; the views of one image "
                           f"({'8 crops' if args.augment else 'one: the whole image'}) per call; the least "
                           "disturbed of --reps repetitions")
    record["seconds"] = round(time.perf_counter() - started, 1)
    path = common.write_record(record, args.out_dir)
    print(markdown(rows, matmul, record["machine"]["isa"]))
    log(f"written {path}")


if __name__ == "__main__":
    main()
