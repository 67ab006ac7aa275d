"""GPU benchmark of mlsp's extraction: today's Keras path against the native engine, in stages.

One command of at most 8 minutes on one H100 or H200 (``--budget`` seconds; each stage stops
when its share is spent and says how many images it ran), its JSON written after every stage:

1. the dense matmul rate of each precision (float32 with TF32 off, bfloat16);
2. >= 200 JPEGs of >= 40 distinct AVA-like sizes (300-800 px a side), decoded by the decode threads;
3. for iv3 narrow and irv2 wide, in bfloat16 and float32: the model alone on the decoded views
   on today's Keras path (one size per call), on the native engine one size per call, bucketed
   (views of one 32 px size bucket in one call: exact, mlsp/backbone/native.py) with the time to warm a
   bucket, and on one size (TFLOP/s against the matmul rate of the precision); then the whole
   process (decode + forward + store write, ``mlsp.extraction.job.extract`` on the native engine) in
   images/s. CUDA graphs per bucket, torch.compile and Keras on JAX are not run (open: docs/speed.md).

    python bench/bench_gpu.py                          # on the GPU machine (<= 8 minutes)
    python bench/bench_gpu.py --device cpu --images 8  # the CPU smoke run the test suite makes

Writes bench/results/gpu-<UTC time>-<device>.json and prints the targets of issue "Extraction at
the GPU's speed" (docs/speed.md, "GPU"). ``--with-training`` adds pool3fc training from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
from pictures import mixed_sizes, write_set  # noqa: E402

AVA_TRAIN = 235_574  # AVA training images (the paper's split)
TARGETS = {
    "irv2_wide_bfloat16_images_per_s": 150.0,  # whole process: AVA in under 30 minutes
    "iv3_narrow_bfloat16_images_per_s": 400.0,
    "irv2_wide_float32_images_per_s": 30.0,  # TF32 off
    "mixed_cost": 1.3,  # s per image, mixed sizes / one size of the same mean pixel count
    "share_of_matmul": 0.25,  # the model alone on one size, of the bfloat16 matmul rate
    "pool3fc_epoch_minutes": 10.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu"),
                   help="cpu: hide any GPU (the smoke run: small images, iv3 narrow float32)")
    p.add_argument("--smoke", action="store_true", help="the same as --device cpu")
    p.add_argument("--configs", help="net:pooling,... (default irv2:wide,iv3:narrow; cpu iv3:narrow)")
    p.add_argument("--precisions", help="default bfloat16,float32 (cpu float32)")
    p.add_argument("--images", type=int, help="JPEGs in the mixed set (default 200)")
    p.add_argument("--sizes", type=int, help="distinct sizes among them (default 40; at most --images)")
    p.add_argument("--min-side", type=int, help="default 300 (cpu 96)")
    p.add_argument("--max-side", type=int, help="default 800 (cpu 144)")
    p.add_argument("--batch-views", type=int, default=64, help="views per call, bucketed (default 64)")
    p.add_argument("--workers", type=int, default=8, help="decode threads (default 8)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 450; cpu 60)")
    p.add_argument("--one-size-seconds", type=float,
                   help="at most this long for the model alone on one size (default 20; cpu 2)")
    p.add_argument("--with-training", action="store_true", help="also pool3fc training from memory")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON (default bench/results)")
    args = p.parse_args(argv)
    cpu = args.smoke or args.device == "cpu"
    args.device = "cpu" if cpu else "auto"
    args.configs = args.configs or ("iv3:narrow" if cpu else "irv2:wide,iv3:narrow")
    args.precisions = args.precisions or ("float32" if cpu else "bfloat16,float32")
    args.images = args.images or 200
    args.sizes = min(args.sizes or 40, args.images)
    # the least view of a CPU run: 0.875 x 96 = 84 px, above the nets' 75
    args.min_side, args.max_side = args.min_side or (96 if cpu else 300), args.max_side or (144 if cpu else 800)
    args.budget = args.budget or (60.0 if cpu else 450.0)
    args.one_size_seconds = args.one_size_seconds or (2.0 if cpu else 20.0)
    return args


class Clock:
    """The run's budget: each stage gets a share of what is left and stops when it is spent."""

    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def share(self, stages_left: int) -> float:
        return max(self.left() / max(1, stages_left), 0.0)


def sync():
    """Wait for the device (asynchronous CUDA launches) before reading a clock."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def matmul_tflops(precision: str, n: int, reps: int) -> float:
    """Dense n x n matmul rate of one precision on the device Keras uses (TF32 off on PyTorch:
    float32 is float32)."""
    import keras
    from keras import ops

    if keras.backend.backend() == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    a = ops.cast(keras.random.normal((n, n), seed=1), precision)
    b = ops.cast(keras.random.normal((n, n), seed=2), precision)
    for _ in range(2):
        ops.convert_to_numpy(ops.sum(ops.matmul(a, b)))
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        c = ops.matmul(a, b)
    ops.convert_to_numpy(ops.sum(c))
    sync()
    return 2.0 * n**3 * reps / (time.perf_counter() - start) / 1e12


def conv_gflop(backbone, height: int, width: int) -> float:
    """2 x multiply-adds of every convolution of ``backbone`` for one (height, width) view."""
    import keras

    convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    probe = keras.Model(backbone.input, [layer.output for layer in convs])
    shapes = probe.compute_output_spec(keras.KerasTensor((1, height, width, 3)))
    total = 0
    for layer, out in zip(convs, shapes):
        kh, kw = layer.kernel_size
        total += 2 * out.shape[1] * out.shape[2] * kh * kw * layer.kernel.shape[2] * layer.filters
    return total / 1e9


def train_pool3fc(samples: int, precision: str, epochs: int = 3) -> dict:
    import keras

    from heads.models import build_head
    from mlsp.backbone import nets as backbones
    from mlsp.runtime import backend

    channels = backbones.get_backbone("irv2").channels
    backend.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (samples, 5, 5, sum(channels))).astype(np.float32)
    y = rng.uniform(2, 8, samples).astype(np.float32)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
    try:
        model = build_head("pool3fc", channels, pooling="wide")
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)  # warm-up
    sync()
    start = time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=0)
    sync()
    rate = samples * epochs / (time.perf_counter() - start)
    return {"samples_per_s": round(rate, 1), "ava_epoch_minutes": round(AVA_TRAIN / rate / 60, 2),
            "samples": samples, "from": "memory"}


def make_set(work: str, args) -> tuple[list, dict]:
    """``args.images`` JPEGs of ``args.sizes`` distinct sizes (``work/mixed``), and the side of the
    square view of the same mean pixel count (the one-size runs): (paths, description)."""
    sizes = mixed_sizes(args.sizes, args.min_side, args.max_side, seed=0)
    every = [sizes[k % len(sizes)] for k in range(args.images)]
    mixed = write_set(os.path.join(work, "mixed"), every, seed=0)
    side = int(round(np.sqrt(np.mean([h * w for h, w in every])) * 0.875))  # a view's side
    return mixed, {"images": len(every), "distinct_sizes": len(sizes), "sides": [args.min_side, args.max_side],
                   "one_size_view": [side, side]}


def timed_calls(fx, decoded: list, batch_views: int, seconds: float, key=None) -> dict:
    """The model alone on decoded images, grouped as extract groups them (by size, or by bucket
    with ``key``), until ``seconds`` are spent: images, seconds, images/s."""
    from mlsp.images.readahead import run_batched

    done = 0
    sync()
    start = time.perf_counter()
    for _ in run_batched(fx, iter(decoded), batch_views, window=64, key=key):
        done += 1
        if time.perf_counter() - start > seconds:
            break
    sync()
    took = time.perf_counter() - start
    return {"images": done, "seconds": round(took, 3), "images_per_s": round(done / took, 3)}


def one_size(fx, side: int, views: int, seconds: float, gflop: float, matmul: float) -> dict:
    """The model alone on one size (``views`` views per call): images/s (8 views an image), TFLOP/s
    and its share of the matmul rate of the precision."""
    batch = np.random.default_rng(0).integers(0, 256, (views, side, side, 3), dtype=np.uint8)
    fx(batch)
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fx(batch)
        calls += 1
        if calls >= 200:
            break
    sync()
    took = time.perf_counter() - start
    tflops = gflop * views * calls / took / 1e3
    return {"side": side, "views_per_call": views, "calls": calls, "images_per_s": round(calls * views / 8 / took, 3),
            "tflops": round(tflops, 3), "share_of_matmul": round(tflops / matmul, 4) if matmul else None}


def whole_process(fx, config, folder: str, store: str, args) -> dict:
    """Decode + forward + store write: ``mlsp.extraction.job.extract`` itself, images/s."""
    from mlsp.extraction.job import extract

    sync()
    start = time.perf_counter()
    result = extract(folder, config, store, extractor=fx, batch_views=args.batch_views, workers=args.workers)
    sync()
    took = time.perf_counter() - start
    return {"images": result.images, "seconds": round(took, 3), "images_per_s": round(result.images / took, 3)}


def writer_rate(work: str, config, shape: tuple, images: int) -> dict:
    """The shard writer alone (HDF5, float16, as extract writes): ``images`` images of features of
    ``shape`` (views, ...), images/s and MB/s; the store's merge afterwards is not counted."""
    from mlsp.store.shards import ShardWriter

    features = np.random.default_rng(0).normal(size=shape).astype(np.float16)
    writer = ShardWriter(os.path.join(work, f"writer-{config.net}-{config.pooling}-{config.precision}.h5"),
                         {"net": config.net}, {"views": config.views, "pooling": config.pooling,
                                               "channels": int(shape[-1])})
    start = time.perf_counter()
    for k in range(images):
        writer.add(f"i{k}", f"i{k}.jpg", (600, 800), features)
    writer.flush()
    took = time.perf_counter() - start
    return {"images": images, "images_per_s": round(images / took, 1),
            "mb_per_s": round(images * features.nbytes / took / 1e6, 1)}


def measure(args, clock: Clock, record: dict, path_of, config, decoded: list, work: str, stages_left: int) -> dict:
    """One net:pooling at one precision, stage by stage (the JSON written after each)."""
    from mlsp.extraction.job import FeatureExtractor

    row = {"net": config.net, "pooling": config.pooling, "precision": config.precision}
    record["figures"]["extract"].append(row)
    keras_fx = FeatureExtractor(config, engine="keras")
    per_image = sum(conv_gflop(keras_fx.model, *v.shape[1:3]) * len(v) for _, (v, _) in decoded) / len(decoded)
    row["gflop_per_image"] = round(per_image, 1)
    row["keras_per_size"] = timed_calls(keras_fx, decoded, args.batch_views, clock.share(stages_left * 5))
    path_of(record)
    del keras_fx
    per_size = FeatureExtractor(config, engine="native", buckets=False)
    row["native_per_size"] = timed_calls(per_size, decoded, args.batch_views, clock.share(stages_left * 4))
    path_of(record)
    bucketed = FeatureExtractor(config, engine="native", buckets=True)
    warm = timed_calls(bucketed, decoded, args.batch_views, clock.share(stages_left * 3), key=bucketed.batch_key)
    again = timed_calls(bucketed, decoded[:warm["images"]], args.batch_views, warm["seconds"], key=bucketed.batch_key)
    buckets = len({bucketed.batch_key(v.shape) for _, (v, _) in decoded[:warm["images"]]})
    row["native_bucketed"] = {**again, "first_seen": warm, "buckets": buckets,
                              "warm_s_per_bucket": round(max(warm["seconds"] - again["seconds"], 0) / buckets, 3)}
    row["bucketed_cuda_graphs"] = "not run: CUDA graphs per bucket are not built yet (docs/speed.md)"
    path_of(record)
    side = record["figures"]["set"]["one_size_view"][0]
    gflop = conv_gflop(bucketed.model, side, side)
    seconds = min(args.one_size_seconds, clock.share(stages_left * 2))
    row["model_one_size"] = one_size(bucketed, side, args.batch_views, seconds, gflop,
                                     record["figures"]["matmul_tflops"].get(config.precision))
    row["mixed_cost"] = round(row["model_one_size"]["images_per_s"] / max(row["native_bucketed"]["images_per_s"],
                                                                         1e-9), 3)
    path_of(record)
    store = os.path.join(work, f"{config.net}_{config.pooling}_{config.precision}.h5")
    row["whole_process"] = whole_process(bucketed, config, os.path.join(work, "mixed"), store, args)
    path_of(record)
    row["writer_alone"] = writer_rate(work, config, (len(decoded[0][1][0]), *bucketed(decoded[0][1][0]).shape[1:]),
                                      len(decoded))
    path_of(record)
    common.log(json.dumps(row))
    return row


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before PyTorch starts: no GPU is seen
    from mlsp.runtime import backend

    backend.select("torch")
    import keras

    from mlsp.extraction.job import ExtractConfig

    clock = Clock(args.budget)
    record = common.new_record("gpu", vars(args))
    record["device"] = {"kind": "gpu" if backend.devices()[0] != "cpu" else "cpu", **backend.describe(),
                        "devices": backend.devices()}
    record["versions"]["keras_backend"] = keras.backend.backend()
    figures = record["figures"]
    figures["stages_done"] = []

    def write(rec, stage=None):
        if stage:
            figures["stages_done"].append(stage)
        rec["seconds"] = round(time.perf_counter() - clock.start, 1)
        return common.write_record(rec, args.out)

    precisions = args.precisions.split(",")
    n_mm, reps = (256, 2) if args.device == "cpu" else (8192, 20)
    figures["matmul_tflops"] = {p: round(matmul_tflops(p, n_mm, reps), 2) for p in precisions}
    path = write(record, "matmul")
    work = tempfile.mkdtemp(prefix="mlsp-bench-gpu-")
    mixed, figures["set"] = make_set(work, args)
    figures["extract"] = []
    combos = [(pair, p) for pair in args.configs.split(",") for p in precisions]
    for k, (pair, precision) in enumerate(combos):
        net, pooling = pair.split(":")
        config = ExtractConfig(net=net, pooling=pooling, weights="random:0", precision=precision)
        start = time.perf_counter()
        decoded = decode_all(config, mixed, args.workers)
        figures["set"]["decode_images_per_s"] = round(len(mixed) / (time.perf_counter() - start), 2)
        if clock.left() < min(30.0, 0.1 * args.budget):
            figures["extract"].append({"net": net, "pooling": pooling, "precision": precision,
                                       "skipped": "the time budget was spent"})
            continue
        measure(args, clock, record, write, config, decoded, work, len(combos) - k)
        path = write(record, f"{pair}:{precision}")
    if args.with_training and clock.left() > 60:
        figures["pool3fc"] = {p: train_pool3fc(256 if args.device == "cpu" else 1024, p) for p in precisions}
        path = write(record, "pool3fc")
    record["targets"] = targets(figures)
    path = write(record, "targets")
    for t in record["targets"]:
        print(f"{t['name']}: {t['value']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    print(path)
    return path


def decode_all(config, paths, workers) -> list:
    """Every image decoded into its views by ``workers`` threads, as extract decodes them
    (:meth:`mlsp.extraction.job.FeatureExtractor.load_views`): [(path, (views, size))]."""
    import concurrent.futures

    from mlsp.images import decode as images

    def load(path):
        img = images.decode_bytes(path, images.read_file(path)[0], config.max_side)
        return images.make_views(img, config.augment), img.shape[:2]

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(zip(paths, pool.map(load, paths)))


def targets(figures: dict) -> list:
    """The issue's targets against this run's figures (the whole process for images/s)."""
    goals = {("irv2", "wide", "bfloat16"): TARGETS["irv2_wide_bfloat16_images_per_s"],
             ("iv3", "narrow", "bfloat16"): TARGETS["iv3_narrow_bfloat16_images_per_s"],
             ("irv2", "wide", "float32"): TARGETS["irv2_wide_float32_images_per_s"]}
    out = []
    for row in figures["extract"]:
        if "whole_process" not in row:
            continue
        key = (row["net"], row["pooling"], row["precision"])
        name = " ".join(key)
        if key in goals:
            rate = row["whole_process"]["images_per_s"]
            out.append(common.target(f"{name}: images/s, whole process, mixed sizes", rate, f">= {goals[key]}",
                                     rate >= goals[key], "images/s"))
        out.append(common.target(f"{name}: mixed sizes / one size, s per image", row["mixed_cost"],
                                 f"<= {TARGETS['mixed_cost']}", row["mixed_cost"] <= TARGETS["mixed_cost"]))
        share = row["model_one_size"]["share_of_matmul"]
        if row["precision"] == "bfloat16" and share is not None:
            out.append(common.target(f"{name}: model alone, one size, of the bfloat16 matmul rate", share,
                                     f">= {TARGETS['share_of_matmul']}", share >= TARGETS["share_of_matmul"]))
    for precision, fig in figures.get("pool3fc", {}).items():
        goal = TARGETS["pool3fc_epoch_minutes"]
        out.append(common.target(f"pool3fc {precision}: AVA epoch minutes", fig["ava_epoch_minutes"], f"<= {goal}",
                                 fig["ava_epoch_minutes"] <= goal, "min"))
    return out


if __name__ == "__main__":
    main()
