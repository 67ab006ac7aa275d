"""Peak RSS of ``mlsp extract`` as the number of images grows (issue 13: flat memory).

    python bench/bench_rss.py [--counts 8,72,500] [--side 150] [--out bench/results/]

Runs the real command, ``cli.py extract FILES --net irv2 --wide --weights random:0`` (8 views,
float32), in a fresh process per count, on generated JPEGs of one small size (features are the
same size whatever the image's: 6.5 MiB of float16 per image, irv2 wide, 8 views), and records
each process's VmHWM (its peak RSS since exec) and its RSS after every image
(``peak_rss.run_cli_rss``). Target: the peak grows by less than 5% from the second-largest
count to the largest. RSS does not depend on how busy the machine is; the times do.

Writes ``<out>/rss-<time>-cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
from peak_rss import run_cli_rss  # noqa: E402
from pictures import write_set  # noqa: E402

GROWTH_TARGET = 1.05


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="8,72,500", help="image counts, one fresh process each")
    p.add_argument("--side", type=int, default=150, help="images are SIDE x (SIDE+30) pixels")
    p.add_argument("--net", default="irv2")
    p.add_argument("--pooling", default="wide")
    p.add_argument("--precision", default="float32")
    p.add_argument("--out", default=common.RESULTS_DIR)
    p.add_argument("--workdir", help="where images and stores go (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    record = common.new_record("rss", vars(args))
    work = args.workdir or tempfile.mkdtemp(prefix="mlsp-rss-")
    try:
        paths = write_set(os.path.join(work, "imgs"), [(args.side, args.side + 30)] * max(counts), 0)
        runs = []
        for count in counts:
            store = os.path.join(work, f"rss_{count}.h5")
            common.log(f"{count} images ...")
            run = run_cli_rss(paths[:count], args.net, args.pooling, args.precision, store)
            run.pop("rss_per_image_mib", None)
            runs.append(run)
            common.log(f"{count} images: peak {run['peak_rss_mib']} MiB, {run['wall_s']} s")
            os.remove(store)
        record["figures"]["rss"] = runs
        if len(runs) >= 2:
            growth = runs[-1]["peak_rss_mib"] / runs[-2]["peak_rss_mib"]
            record["targets"].append(common.target(
                f"peak RSS, {counts[-1]} / {counts[-2]} images", round(growth, 4), f"< {GROWTH_TARGET}",
                growth < GROWTH_TARGET))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    path = common.write_record(record, args.out)
    common.log(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
