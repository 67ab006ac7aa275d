"""GPU benchmark of mlsp itself on the Keras backend asked for (made for PyTorch on CUDA).

Runs mlsp's own extractor (`mlsp.extraction.job.extract`, grouped batching, decode threads, store
writes) on AVA-like mixed sizes (--images distinct sizes from --min-side to --max-side px,
8 views each) and on a set of one size with the same mean pixel count, for each net:pooling
and precision; and, in the same run:

- the dense matmul rate of each precision on the same device (achieved TFLOP/s of the backbone
  are reported against it);
- the model alone on the decoded views (grouped as extract groups them), and the decode rate
  of the decode threads, to show which one limits;
- the authors' way on the same device: decode in the main thread, then Keras `predict` on one
  view at a time (batch 1), float32;
- pool3fc training on wide irv2-shaped features from memory (samples/s; an AVA epoch of
  235,574 samples projected, against the paper's 10 minutes on a Titan Xp).

    python bench/bench_gpu.py --backend torch              # on the GPU machine (about 5 minutes)
    python bench/bench_gpu.py --backend torch --smoke      # a check of the script, tiny, on a CPU

Writes bench/results/gpu-<UTC time>-<device>.json and prints a summary with the targets of
the GPU benchmark (README, "GPU").
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

from pictures import mixed_sizes, write_set  # noqa: E402

AVA_TRAIN = 235_574  # AVA training images (the paper's split)
TARGETS = {
    "irv2_wide_bfloat16_images_per_s": 40.0,  # all of AVA (255,530) in under 2 hours
    "iv3_narrow_images_per_s": 100.0,
    "x_authors_way": 10.0,
    "mixed_cost": 1.3,  # s per image, mixed sizes / one size
    "pool3fc_epoch_minutes": 10.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch", choices=("tensorflow", "torch"), help="Keras backend (default torch)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and counts: checks the script on a CPU")
    p.add_argument("--configs", default="irv2:wide,iv3:narrow")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--images", type=int, help="images of distinct sizes in the mixed set (default 48; smoke 4)")
    p.add_argument("--min-side", type=int, help="default 300 (smoke 96)")
    p.add_argument("--max-side", type=int, help="default 800 (smoke 140)")
    p.add_argument("--batch-views", type=int, default=64, help="extract's --batch-views (default 64)")
    p.add_argument("--workers", type=int, default=8, help="decode threads (default 8)")
    p.add_argument("--baseline-images", type=int, help="images run the authors' way (default 4; smoke 1)")
    p.add_argument("--train-samples", type=int, help="in-memory wide features for pool3fc (default 1024; smoke 32)")
    p.add_argument("--no-train", action="store_true", help="skip pool3fc training")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON (default bench/results)")
    return p.parse_args(argv)


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


def run_extract(fx, config, folder, store, batch_views, workers) -> dict:
    from mlsp.extraction.job import extract

    sync()
    start = time.perf_counter()
    result = extract(folder, config, store, extractor=fx, batch_views=batch_views, workers=workers)
    sync()
    seconds = time.perf_counter() - start
    return {"images": result.images, "seconds": round(seconds, 3), "images_per_s": round(result.images / seconds, 3)}


def model_alone(fx, decoded: list, batch_views: int) -> float:
    """Seconds of the model alone on already decoded views, grouped as extract groups them."""
    from mlsp.images.readahead import run_batched

    sync()
    start = time.perf_counter()
    for _ in run_batched(fx, iter(decoded), batch_views, window=64):
        pass
    sync()
    return time.perf_counter() - start


def authors_way(config, paths: list) -> float:
    """Seconds per image the authors' way: decode in the main thread, Keras predict per view, batch 1,
    on Keras' model as it is (batch norms not folded)."""
    from mlsp.extraction.job import FeatureExtractor

    import keras

    fx = FeatureExtractor(config, fold_batch_norms=False)
    model, spec = fx.model, fx.config.spec

    def preprocess(batch):
        return keras.ops.convert_to_numpy(spec.preprocess(keras.ops.convert_to_tensor(batch)))

    model.predict(preprocess(np.zeros((1, 160, 160, 3), np.float32)), verbose=0)  # builds predict
    start = time.perf_counter()
    for path in paths:
        views, _ = fx.load_views(path)
        for view in views:
            model.predict(preprocess(view[None].astype(np.float32)), batch_size=1, verbose=0)
    sync()
    return (time.perf_counter() - start) / len(paths)


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


def make_sets(work: str, n_images: int, lo: int, hi: int) -> tuple[list, dict]:
    """JPEGs of ``n_images`` distinct sizes (``work/mixed``) and as many of one size with the same
    mean pixel count (``work/one``). Returns the mixed set's paths and the sets' description."""
    sizes = mixed_sizes(n_images, lo, hi, seed=0)
    mixed = write_set(os.path.join(work, "mixed"), sizes, seed=0)
    side = int(round(np.sqrt(np.mean([h * w for h, w in sizes]))))
    write_set(os.path.join(work, "one"), [(side, side)] * n_images, seed=1)
    return mixed, {"mixed_sizes": len(set(sizes)), "sides": [lo, hi], "one_size": [side, side], "images": n_images}


def measure_extract(args, work: str, mixed: list, config, matmul: float, authors_paths: list,
                    warmup_side: int) -> tuple[dict, float | None]:
    """One net, pooling and precision: the decode threads' rate, extract on the mixed set (every
    size first seen, then again), on the set of one size, the model alone on the decoded views
    and, on ``authors_paths`` if any, the authors' way. Returns the row and the authors' seconds
    per image (None when not run)."""
    from mlsp.extraction.job import FeatureExtractor

    n_images, net, pooling, precision = len(mixed), config.net, config.pooling, config.precision
    fx = FeatureExtractor(config)
    fx(np.zeros((1, warmup_side, warmup_side, 3), np.uint8))  # first call: allocations, lazy setup
    start = time.perf_counter()
    decoded = decode_all(fx, mixed, args.workers)
    decode_s = time.perf_counter() - start
    gflop = views_gflop(fx, decoded)
    row = {"net": net, "pooling": pooling, "precision": precision, "batch_views": args.batch_views,
           "gflop_per_image": round(gflop / n_images, 1), "decode_images_per_s": round(n_images / decode_s, 2)}

    def timed(folder, name):
        store = os.path.join(work, f"{net}:{pooling}-{precision}-{name}.h5")
        return run_extract(fx, config, os.path.join(work, folder), store, args.batch_views, args.workers)

    first = row["mixed_first_seen"] = timed("mixed", "a")  # every size new to the model
    row["mixed"] = timed("mixed", "b")
    row["one_size"] = timed("one", "c")
    row["mixed_cost"] = round(row["one_size"]["images_per_s"] / first["images_per_s"], 3)
    model_s = model_alone(fx, decoded, args.batch_views)
    row["model_images_per_s"] = round(n_images / model_s, 2)
    row["model_tflops"] = round(gflop / model_s / 1e3, 2)
    row["share_of_matmul"] = round(gflop / model_s / 1e3 / matmul, 3)  # unrounded: a CPU's smoke run is 0.0x TFLOP/s
    authors_s = None
    if authors_paths:
        authors_s = authors_way(config, authors_paths)
        row["authors_way_images_per_s"] = round(1 / authors_s, 3)
    return row, authors_s


def views_gflop(fx, decoded: list) -> float:
    """GFLOP of the convolutions over every decoded image's views (counted once per shape)."""
    per_shape = {}
    for _, (views, _) in decoded:
        if views.shape not in per_shape:
            per_shape[views.shape] = conv_gflop(fx.model, *views.shape[1:3]) * len(views)
    return sum(per_shape[views.shape] for _, (views, _) in decoded)


def measure_config(args, work: str, mixed: list, pair: str, precisions: list, matmul: dict, n_base: int,
                   warmup_side: int) -> list:
    """Every precision of one net:pooling; the authors' way runs at float32 and every row from
    there on is compared with it."""
    import common
    from mlsp.extraction.job import ExtractConfig

    net, pooling = pair.split(":")
    rows, baseline = [], None
    for precision in precisions:
        config = ExtractConfig(net=net, pooling=pooling, weights="random:0", precision=precision)
        row, authors_s = measure_extract(args, work, mixed, config, matmul[precision],
                                         mixed[:n_base] if precision == "float32" else [], warmup_side)
        baseline = authors_s or baseline
        if baseline:
            row["x_authors_way"] = round(row["mixed_first_seen"]["images_per_s"] * baseline, 2)
        rows.append(row)
        common.log(json.dumps(row))
    return rows


def main(argv=None) -> str:
    args = parse_args(argv)
    from mlsp.runtime import backend

    backend.select(args.backend)
    import keras

    import common

    smoke = args.smoke
    n_images = args.images or (4 if smoke else 48)
    lo, hi = args.min_side or (96 if smoke else 300), args.max_side or (140 if smoke else 800)
    n_base = args.baseline_images or (1 if smoke else 4)
    record = common.new_record("gpu", vars(args))
    record["device"] = {"kind": "gpu" if backend.devices()[0] != "cpu" else "cpu", **backend.describe(),
                        "devices": backend.devices()}
    record["versions"]["keras_backend"] = keras.backend.backend()
    figures = record["figures"]
    n_mm, reps = (256, 2) if smoke else (8192, 20)
    precisions = args.precisions.split(",")
    matmul = {p: matmul_tflops(p, n_mm, reps) for p in precisions}
    figures["matmul_tflops"] = {p: round(rate, 2) for p, rate in matmul.items()}
    common.log(f"{record['device']['device']}: matmul TFLOP/s {figures['matmul_tflops']}")

    work = tempfile.mkdtemp(prefix="mlsp-bench-gpu-")
    mixed, figures["sets"] = make_sets(work, n_images, lo, hi)
    runs = figures["extract"] = []
    for pair in args.configs.split(","):
        runs += measure_config(args, work, mixed, pair, precisions, matmul, n_base, lo)
    if not args.no_train:
        samples = args.train_samples or (32 if smoke else 1024)
        figures["pool3fc"] = {p: train_pool3fc(samples, p) for p in precisions}
        common.log(f"pool3fc: {figures['pool3fc']}")
    record["targets"] = targets(figures)
    path = common.write_record(record, args.out)
    for t in record["targets"]:
        print(f"{t['name']}: {t['value']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    print(path)
    return path


def decode_all(fx, paths, workers) -> list:
    """Every image decoded into its views by ``workers`` threads: [(path, (views, size))]."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(zip(paths, pool.map(fx.load_views, paths)))


def targets(figures: dict) -> list:
    import common

    out = []
    for row in figures["extract"]:
        key = f"{row['net']} {row['pooling']} {row['precision']}"
        rate = row["mixed_first_seen"]["images_per_s"]
        if (row["net"], row["pooling"], row["precision"]) == ("irv2", "wide", "bfloat16"):
            goal = TARGETS["irv2_wide_bfloat16_images_per_s"]
            out.append(common.target(f"{key}: images/s, mixed sizes", rate, f">= {goal}", rate >= goal, "images/s"))
        if (row["net"], row["pooling"]) == ("iv3", "narrow"):
            goal = TARGETS["iv3_narrow_images_per_s"]
            out.append(common.target(f"{key}: images/s, mixed sizes", rate, f">= {goal}", rate >= goal, "images/s"))
        if "x_authors_way" in row:
            goal = TARGETS["x_authors_way"]
            out.append(common.target(f"{key}: x the authors' way (float32, batch 1)", row["x_authors_way"],
                                     f">= {goal}", row["x_authors_way"] >= goal))
        goal = TARGETS["mixed_cost"]
        out.append(common.target(f"{key}: mixed sizes / one size, s per image", row["mixed_cost"], f"<= {goal}",
                                 row["mixed_cost"] <= goal))
    for precision, fig in figures.get("pool3fc", {}).items():
        goal = TARGETS["pool3fc_epoch_minutes"]
        out.append(common.target(f"pool3fc {precision}: AVA epoch minutes", fig["ava_epoch_minutes"], f"<= {goal}",
                                 fig["ava_epoch_minutes"] <= goal, "min"))
    return out


if __name__ == "__main__":
    main()
