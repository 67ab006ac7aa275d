"""What mixed precision gives a head: samples/s and test SRCC, float32 against bfloat16/float16.

Writes a planted store with irv2's narrow channel layout (tests/synthetic.py: MOS a fixed function
of the features, so SRCC measures how well the head learned), trains the same head with the
same seed at each precision through `heads.train.loop.train` (what `mlsp train --precision`
runs), and reports the training rate (first epoch left out) and the test metrics.

    python bench/train_precision.py --images 3000 --head single3fc --out result.json
    KERAS_BACKEND=torch python bench/train_precision.py ...     # on PyTorch (a GPU when there is one)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IRV2 = [320] + [128] * 10 + [1088] + [384] * 20 + [2080] + [448] * 10


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--head", default="single3fc")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps-per-epoch", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file for the results (default: print only)")
    args = p.parse_args(argv)

    import keras

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from synthetic import write_synthetic_store  # the planted store of the test suite
    from heads.train.loop import TrainConfig, train
    from mlsp.runtime import backend

    work = tempfile.mkdtemp(prefix="mlsp-train-precision-")
    store = os.path.join(work, "planted.h5")
    write_synthetic_store(store, args.images, n_views=args.views, block_channels=IRV2, seed=args.seed, net="irv2")
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count()},
              "versions": {"keras": keras.__version__, **backend.describe()},
              "args": vars(args), "runs": {}}
    for precision in args.precisions.split(","):
        config = TrainConfig(head=args.head, store=store, out=os.path.join(work, precision), epochs=args.epochs,
                             steps_per_epoch=args.steps_per_epoch, lr=args.lr, seed=args.seed, precision=precision)
        run = train(config)
        result["runs"][precision] = {
            "samples_per_s": run.config["timing"]["train_samples_per_second"],
            "test_srcc": round(run.metrics["test"]["srcc"], 4), "test_plcc": round(run.metrics["test"]["plcc"], 4),
            "epochs": len(run.history), "seconds": run.config["timing"]["seconds"],
        }
        print(precision, json.dumps(result["runs"][precision]), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
