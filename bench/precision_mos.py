"""How much a trained head's predictions move when its features are computed at another precision.

Scores the images of a run's store twice: from the store (as extracted, normally float32) and
from the image files at ``--precision`` (bfloat16 by default), and reports the largest and the
mean absolute change of the predicted MOS.

    python bench/precision_mos.py RUN_DIR IMAGES_DIR [--precision bfloat16]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heads.run import Run
from heads.score.scoring import score_images, score_store  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("images")
    parser.add_argument("--precision", default="bfloat16")
    args = parser.parse_args()
    run = Run.open(args.run_dir)
    stored = score_store(args.run_dir, run.store_info["path"]).set_index("id")
    fresh, errors = score_images(args.run_dir, args.images, precision=args.precision)
    fresh = fresh.set_index("id")
    change = (fresh["pred"] - stored.loc[fresh.index, "pred"]).abs()
    print(json.dumps({
        "run": args.run_dir, "head": run.config["head"], "store_precision": run.store_info["config"]["precision"],
        "precision": args.precision, "images": int(len(change)), "max_abs_mos_change": float(change.max()),
        "mean_abs_mos_change": float(change.mean()),
        "pred_range": [float(stored["pred"].min()), float(stored["pred"].max())], "errors": len(errors),
    }, indent=1))


if __name__ == "__main__":
    main()
