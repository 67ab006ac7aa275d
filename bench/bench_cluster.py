"""Extraction over Ray (`--ray`): images/s with 1 and 2 workers against the one-process
extractor, and what the driver costs per image.

Two measurements, written to ``bench/results/cluster-<time>-cpu.json``:

- **rate**: the same folder of generated JPEGs extracted by ``mlsp.extraction.job.extract`` in this
  process (the one-process extractor, TensorFlow's default threads), then with ``local:1`` (one
  Ray worker with all the cores) and ``local:2`` (two workers of one core each). The model is
  built before the clock starts (each Ray worker builds its own); what is timed is the job:
  images/s of the whole ``extract()`` call, store merge included.
- **driver**: the driver's own cost per image, with workers that send back features of the
  size of irv2 wide (8 views x 5 x 5 x 16,928 float16 = 6.8 MB) without running a model: the
  driver's CPU seconds and wall seconds per image for receiving them through Ray, writing the
  shards and merging the store. One driver keeps up with ``worker seconds per image / driver
  seconds per image`` workers.

    python bench/bench_cluster.py                    # iv3 narrow, 16 images; ~5-10 min on 2 cores
    python bench/bench_cluster.py --net irv2 --pooling wide --images 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

from mlsp.backbone import nets as backbones
from mlsp.store.format import feature_shape  # noqa: E402
from mlsp.extraction.cluster import Cluster  # noqa: E402
from mlsp.extraction.job import POOLINGS, ExtractConfig, FeatureExtractor, extract  # noqa: E402


def make_images(folder: str, n: int, seed: int = 0) -> None:
    """JPEGs of AVA's mean size (about 629x497), smooth random pictures with some noise."""
    import cv2

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        h, w = 480 + int(rng.integers(-40, 40)), 620 + int(rng.integers(-40, 40))
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(folder, f"{k:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


# -- the driver's cost: workers that return features without a model -------------------------


class FakeFeatures:
    """A processor that returns fixed float16 features of a configuration's shape: no model,
    so what is timed on the driver is receiving and writing."""

    def __init__(self, config: ExtractConfig):
        spec = config.spec
        self.config = config
        self.shape = feature_shape(config.pooling, len(config.views), spec.total_channels)
        self.features = np.random.default_rng(0).standard_normal(self.shape).astype(np.float16)

    def info(self) -> dict:
        spec, cfg = self.config.spec, self.config
        return {"net": spec.name, "pooling": cfg.pooling, "grid": POOLINGS[cfg.pooling],
                "block_names": list(spec.taps), "block_channels": [int(c) for c in spec.channels],
                "views": cfg.views, "crop_fraction": 0.875, "weights": {"source": "fake", "sha256": "0"},
                "weights_source": "fake", "weights_sha256": "0", "weights_path": "",
                "preprocessing": spec.preprocessing, "max_side": int(cfg.max_side), "precision": cfg.precision}

    def load_views(self, path):
        return None, (497, 629)

    def process(self, views):
        return self.features


@dataclasses.dataclass(frozen=True)
class FakeRecipe:
    config: ExtractConfig

    def build(self):
        return FakeFeatures(self.config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="iv3", choices=sorted(backbones.BACKBONES))
    parser.add_argument("--pooling", default="narrow", choices=sorted(POOLINGS))
    parser.add_argument("--images", type=int, default=16, help="images for the rate runs")
    parser.add_argument("--driver-images", type=int, default=96, help="images for the driver-cost run")
    parser.add_argument("--workers", default="1,2", help="local:N runs, N in this list")
    parser.add_argument("--skip-rate", action="store_true", help="only the driver's cost")
    args = parser.parse_args()

    record = common.new_record("cluster", vars(args))
    record["notes"].append("shared machine: other work ran on the same 2 cores during this run; machine_busy_cores "
                           "is the whole machine's use (this run included) during a timed job")
    figures = record["figures"]
    work = tempfile.mkdtemp(prefix="mlsp-bench-cluster-")
    config = ExtractConfig(net=args.net, pooling=args.pooling, weights="random:0")

    if not args.skip_rate:
        folder = os.path.join(work, "images")
        make_images(folder, args.images)
        common.log(f"one process: {config.net} {config.pooling}, {args.images} images")
        extractor = FeatureExtractor(config)
        extractor(np.zeros((8, 299, 299, 3), np.uint8))  # traced before the clock
        before = common.proc_stat()
        result, wall, _ = timed(lambda: extract(folder, config, os.path.join(work, "one.h5"), extractor=extractor))
        figures["one_process"] = {"images_per_s": result.new / wall, "seconds": wall,
                                  "machine_busy_cores": _others(before, wall)}
        common.log(f"  {result.new / wall:.3f} images/s")
        del extractor
        for n in [int(v) for v in args.workers.split(",")]:
            with Cluster(f"local:{n}") as cluster:
                runner = cluster.runner(config)
                _, build, _ = timed(runner.info)
                before = common.proc_stat()
                out = os.path.join(work, f"ray{n}.h5")
                result, wall, cpu = timed(lambda: extract(folder, config, out, runner=runner))
                figures[f"local_{n}"] = {"workers": n, "cpus_per_worker": cluster.cpus, "build_s": build,
                                         "images_per_s": result.new / wall, "seconds": wall,
                                         "driver_cpu_s": cpu, "machine_busy_cores": _others(before, wall)}
                common.log(f"local:{n}: {result.new / wall:.3f} images/s (workers built in {build:.1f} s)")

    driver_config = ExtractConfig(net="irv2", pooling="wide", weights="random:0")
    folder = os.path.join(work, "driver")
    os.makedirs(folder, exist_ok=True)
    for k in range(args.driver_images):
        with open(os.path.join(folder, f"{k:05d}.jpg"), "wb") as handle:
            handle.write(b"\xff\xd8")  # never decoded: the fake workers only name a size
    with Cluster("local:2") as cluster:
        runner = cluster.runner(FakeRecipe(driver_config))
        runner.info()
        out = os.path.join(work, "driver.h5")
        result, wall, cpu = timed(lambda: extract(folder, driver_config, out, runner=runner))
        per_image_mb = FakeFeatures(driver_config).features.nbytes / 1e6
        figures["driver"] = {"features_mb_per_image": per_image_mb, "images": result.new, "wall_s": wall,
                             "cpu_s": cpu, "cpu_ms_per_image": 1000 * cpu / result.new,
                             "wall_ms_per_image": 1000 * wall / result.new,
                             "store_gb": os.path.getsize(out) / 1e9}
        common.log(f"driver: {1000 * cpu / result.new:.0f} ms CPU and {1000 * wall / result.new:.0f} ms wall "
                   f"per image of {per_image_mb:.1f} MB")
    path = common.write_record(record)
    common.log(f"wrote {path}")


def _others(before, wall):
    after = common.proc_stat()
    return None if before is None or after is None else round((after[0] - before[0]) / wall, 2)


if __name__ == "__main__":
    main()
