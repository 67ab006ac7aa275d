"""Does reading the store keep a narrow head busy? Feed rate against training rate.

Stage 2 reads features per batch straight from the HDF5 store when they do not fit in memory
(heads.data). This measures, on one store:

- ``feed``: training batches per second read by ``TrainBatches`` alone (no model), from memory
  and streamed from the file, with 1 and with several threads reading ahead, and streamed from a
  cold page cache when ``--drop-caches`` may empty it (root on Linux);
- ``train``: samples per second that ``heads.train.loop.train`` reaches (the batches only, first
  epoch left out), from memory and streamed, for each head asked for.

If streamed training reaches the in-memory rate, reading does not starve the head.

    python bench/heads_feeding.py --make 20000 --heads single1fc,single3fc --out result.json
    KERAS_BACKEND=torch python3 bench/heads_feeding.py ...   # where TensorFlow is missing
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

IRV2 = [320] + [128] * 10 + [1088] + [384] * 20 + [2080] + [448] * 10


def make_store(path, n_images, n_views=8, block_channels=IRV2, seed=0):
    """An irv2-shaped narrow store (random features, random MOS; 90/5/5 split)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers import write_store  # the test suite's writer of a whole store from arrays

    rng = np.random.default_rng(seed)
    c = sum(block_channels)
    pattern = rng.uniform(0, 1, size=(257, n_views, c)).astype(np.float16)
    features = np.resize(pattern, (n_images, n_views, c))
    u = rng.uniform(size=n_images)
    split = np.where(u < 0.05, "val", np.where(u < 0.10, "test", "train"))
    write_store(path, features, [f"{i:07d}" for i in range(n_images)], net="irv2", pooling="narrow",
                block_names=[f"b{k}" for k in range(len(block_channels))], block_channels=block_channels,
                mos=rng.uniform(2, 8, n_images), split=split)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def feed_rate(store_path, mode, threads, batch_size=128, epochs=1):
    from heads.data import TrainBatches, open_features
    from mlsp.store.read import FeatureStore

    with FeatureStore(store_path) as store:
        rows = store.split_indices("train")
        mos = store.mos[rows]
        t0 = time.perf_counter()
        source = open_features(store, rows, memory_budget=None if mode == "memory" else 0)
        load = time.perf_counter() - t0
    batches = TrainBatches(source, rows, mos, batch_size=batch_size, seed=0, workers=1)
    samples, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        if threads == 1:
            for i in range(len(batches)):
                samples += len(batches[i][0])
        else:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                for x, _ in pool.map(batches.__getitem__, range(len(batches))):
                    samples += len(x)
        batches.on_epoch_end()
    seconds = time.perf_counter() - t0
    source.close()
    view_bytes = source.view_nbytes
    return {"mode": source.mode, "threads": threads, "samples_per_s": round(samples / seconds, 1),
            "mb_per_s": round(samples * view_bytes / seconds / 1e6, 1), "load_s": round(load, 2),
            "samples": samples}


def train_rate(store_path, head, mode, epochs, workers, out_root):
    from heads.train.loop import TrainConfig, train

    out = os.path.join(out_root, f"{head}-{mode}-{workers}")
    os.makedirs(out_root, exist_ok=True)
    result = train(TrainConfig(head=head, store=store_path, out=out, epochs=epochs, workers=workers,
                               memory_budget=None if mode == "memory" else 0, patience=100, lr_epochs=100))
    timing = result.config["timing"]
    return {"head": head, "mode": result.config["data"]["mode"], "workers": workers,
            "samples_per_s": timing["train_samples_per_second"], "epoch_s": timing["epoch_seconds"],
            "total_s": timing["seconds"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="an existing narrow store")
    parser.add_argument("--make", type=int, default=0, help="make an irv2-shaped store of this many images")
    parser.add_argument("--heads", default="single1fc,single3fc")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", default="1,4", help="reading threads of the feed test")
    parser.add_argument("--workers", default="2", help="TrainBatches workers of the streamed training runs")
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--out", help="JSON result file")
    args = parser.parse_args()

    import keras

    work = tempfile.mkdtemp(prefix="heads-feeding-")
    store = args.store or os.path.join(work, "store.h5")
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args), "python": platform.python_version(),
              "keras": keras.__version__, "backend": keras.backend.backend(), "cpus": os.cpu_count(),
              "machine": platform.platform()}
    if keras.backend.backend() == "torch":
        import torch

        record["torch"] = torch.__version__
        record["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if not args.store:
        t0 = time.perf_counter()
        make_store(store, args.make)
        record["make_s"] = round(time.perf_counter() - t0, 1)
    record["store_gib"] = round(os.path.getsize(store) / 2**30, 2)
    print(json.dumps(record), flush=True)

    record["feed"] = []
    for mode in ("memory", "stream"):
        for threads in [int(t) for t in args.threads.split(",")]:
            record["feed"].append(feed_rate(store, mode, threads))
            print(json.dumps(record["feed"][-1]), flush=True)
    if args.drop_caches:
        for threads in [int(t) for t in args.threads.split(",")]:
            if not drop_caches():
                record["feed"].append({"mode": "stream-cold", "error": "cannot drop the page cache"})
                break
            result = feed_rate(store, "stream", threads)
            result["mode"] = "stream-cold"
            record["feed"].append(result)
            print(json.dumps(result), flush=True)

    record["train"] = []
    workers = [int(w) for w in args.workers.split(",")]
    for head in args.heads.split(","):
        runs = [("memory", 2)] + [("stream", w) for w in workers]
        for mode, w in runs:
            record["train"].append(train_rate(store, head, mode, args.epochs, w, work))
            print(json.dumps(record["train"][-1]), flush=True)
        if args.drop_caches and drop_caches():
            result = train_rate(store, head, "stream", args.epochs, 2, work + "-cold")
            result["mode"] = "stream-cold"
            record["train"].append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
