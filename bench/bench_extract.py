"""Benchmark of stage 1 (feature extraction), in one run, side by side (issues 5 and 7).

    python bench/bench_extract.py [--quick] [--out bench/results/]

What it measures, on generated JPEGs of mixed resolution (random backbone weights, so nothing
is downloaded):

* ``mlsp`` extraction (the library call behind ``mlsp extract``, default settings: decode-ahead
  threads, the 8 views of an image as one batch, one traced graph for every size) against a
  *naive* baseline written the way the authors' code runs: decode in the main thread, one view
  at a time, ``model.predict(x[None])`` per view, the same Keras model (backbone, taps,
  ``MultiLevelPooling``), preprocessing in NumPy, features written to HDF5 per image.
* where mlsp's time goes: waiting on decode, forward pass, write, final merge (from the
  timeline of every image), and the backbone's achieved GFLOP/s (FLOPs counted from the
  model for every input size) against this machine's dense matmul rate of the same precision,
  measured in the same run;
* the cost of mixed resolutions (a set of one resolution with the same pixel count);
* float32 against bfloat16: speed and the fidelity of the features;
* decode-ahead threads against the serial path (``workers=0``);
* peak RSS of the real command (``cli.py extract``) in fresh processes as the number of
  images grows;
* the scale on paper: all of AVA on this machine, and on one data-centre GPU from FLOP counts,
  and the store size of every variant.

Writes ``<out>/extract-<time>-<cpu|gpu>[-quick].json``; ``python bench/report.py`` turns the
newest results into ``bench/RESULTS.md``. Runs unchanged on a GPU machine (the device is
detected and recorded).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import Phase, log  # noqa: E402

TARGETS = {
    "speedup_vs_naive": 3.0,  # images/s of mlsp / naive, mixed resolutions, same precision
    "efficiency": 0.50,  # backbone GFLOP/s / matmul GFLOP/s of the same precision
    "mixed_cost": 1.30,  # time per image, mixed set / one-resolution set of the same pixel count
    "bf16_speedup": 1.60,  # images/s bfloat16 / float32
    "rss_growth": 1.10,  # peak RSS at the most images / at the fewest
}


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def picture(rng, height: int, width: int) -> np.ndarray:
    """A smooth random colour picture with some texture and noise (JPEG sizes near a photo's)."""
    import cv2

    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    fine = rng.normal(0, 1, (max(2, height // 6), max(2, width // 6), 3)).astype(np.float32)
    img += 18 * cv2.resize(fine, (width, height), interpolation=cv2.INTER_LINEAR)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_set(folder: str, sizes: list, seed: int, prefix: str = "img") -> list:
    import cv2

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = os.path.join(folder, f"{prefix}{i:04d}.jpg")
        if not cv2.imwrite(path, picture(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise RuntimeError(f"could not write {path}")
        paths.append(path)
    return paths


def mixed_sizes(n: int, lo: int, hi: int, seed: int) -> list:
    """n distinct (height, width) pairs, each side uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    sizes: list = []
    seen = set()
    while len(sizes) < n:
        hw = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
        if hw not in seen:
            seen.add(hw)
            sizes.append(hw)
    return sizes


# ------------------------------------------------------------------------------------------
# Measuring on a shared machine
# ------------------------------------------------------------------------------------------

CLEAN = {"other_cores": 0.15, "tries": 3, "max_wait": 90.0, "waited_s": 0.0}


def cleanest(label: str, fn, *args, **kwargs):
    """Run a measurement; while it was disturbed beyond repair, run it again (at most
    ``CLEAN['tries']`` times in all) and keep the least disturbed attempt. Disturbed: other
    processes used more than ``CLEAN['other_cores']`` CPU cores meanwhile; beyond repair: the
    measurement has no per-image correction, or too few undisturbed images for one. ``fn``
    returns a dict with a ``phase`` record, or a tuple whose first item is one. The kept result
    gets ``attempts_other_cores``: the other-process load of every attempt."""
    best, best_load, best_rank, loads = None, None, None, []
    for attempt in range(max(1, CLEAN["tries"])):
        waited = common.wait_quiet(CLEAN["max_wait"], CLEAN["other_cores"])
        CLEAN["waited_s"] += waited
        if waited >= CLEAN["max_wait"]:
            log(f"  {label}: the machine stayed busy for {waited:.0f} s; measuring anyway")
        result = fn(*args, **kwargs)
        figures = result[0] if isinstance(result, tuple) else result
        load = figures["phase"].get("other_cores") or 0.0
        loads.append(round(load, 3))
        repaired = figures.get("correction", {}).get("applied", False)
        # a repaired attempt beats any unrepaired one; then the least disturbed
        rank = (0 if repaired or load <= CLEAN["other_cores"] else 1, load)
        if best is None or rank < best_rank:
            best, best_load, best_rank = result, load, rank
        if load <= CLEAN["other_cores"] or repaired:
            break
        if attempt + 1 < CLEAN["tries"]:
            log(f"  {label}: other processes used {load:.2f} cores meanwhile; measuring again")
    figures = best[0] if isinstance(best, tuple) else best
    figures["attempts_other_cores"] = loads
    figures["disturbed"] = best_load > CLEAN["other_cores"] and not figures.get("correction", {}).get("applied", False)
    return best


# ------------------------------------------------------------------------------------------
# Instrumented mlsp extraction
# ------------------------------------------------------------------------------------------


class TimedExtractor:
    """Wraps a FeatureExtractor for ``extract(..., extractor=)``: records when each forward pass
    starts and ends and how long each decode takes (in whichever thread it runs)."""

    def __init__(self, fx):
        self.fx = fx
        self.config = fx.config
        self.forwards: list = []
        self.decodes: list = []
        self._lock = threading.Lock()

    def store_attrs(self):
        return self.fx.store_attrs()

    def load_views(self, path):
        t = time.perf_counter()
        result = self.fx.load_views(path)
        with self._lock:
            self.decodes.append(time.perf_counter() - t)
        return result

    def __call__(self, views):
        probe = common.Probe().start()
        t = time.perf_counter()
        out = self.fx(views)
        t1 = time.perf_counter()
        self.forwards.append((t, t1, tuple(views.shape), probe.stop()[1]))
        return out


class Marks:
    """A tqdm-like progress factory for ``extract(progress=)`` that records when each bar starts,
    each update and the close, and the RSS at each update."""

    def __init__(self):
        self.bars: dict = {}

    def __call__(self, total=None, desc="", unit="", **kwargs):
        marks = self.bars.setdefault(desc, {"start": time.perf_counter(), "updates": [], "rss": [], "close": None})

        class Bar:
            def update(self, n=1):
                marks["updates"].append(time.perf_counter())
                if desc == "extract":
                    marks["rss"].append(common.rss_mib())

            def set_postfix(self, *a, **k):
                pass

            def close(self):
                marks["close"] = time.perf_counter()

        return Bar()


def run_mlsp(fx, paths, store_path, flops_of, workers=2) -> tuple[dict, list]:
    """Extract ``paths`` into a new store through ``mlsp.extract.extract`` and take its timeline
    apart. Returns (figures, per-image rows)."""
    from mlsp.extract import extract

    if os.path.exists(store_path):
        os.remove(store_path)
    timed, marks = TimedExtractor(fx), Marks()
    rss0 = common.rss_mib()
    with Phase() as phase:
        t0 = time.perf_counter()
        result = extract(list(paths), fx.config, store_path, workers=workers, progress=marks, extractor=timed)
        t_end = time.perf_counter()
    assert result.new == len(paths) and not result.errors, (result.new, result.errors)
    loop = marks.bars["extract"]
    merge = marks.bars.get("write store", {"start": loop["close"], "close": loop["close"]})
    rows, previous = [], loop["start"]
    for (f0, f1, shape, other), done, rss in zip(timed.forwards, loop["updates"], loop["rss"]):
        v, h, w = shape[0], shape[1], shape[2]
        rows.append({"views": v, "h": h, "w": w, "gflop": flops_of(h, w) * v / 1e9, "wait_s": f0 - previous,
                     "forward_s": f1 - f0, "write_s": done - f1, "rss_mib": rss, "other_cores": other})
        previous = done
    corr = common.corrected(rows, "forward_s", threshold=CLEAN["other_cores"])
    n = len(rows)
    wall = t_end - t0
    forward = sum(r["forward_s"] for r in rows)
    gflop = sum(r["gflop"] for r in rows)
    split = {
        "setup_s": loop["start"] - t0,
        "wait_decode_s": sum(r["wait_s"] for r in rows),
        "forward_s": forward,
        "write_s": sum(r["write_s"] for r in rows),
        "merge_s": merge["close"] - merge["start"],
    }
    split["other_s"] = wall - sum(split.values())
    wall_corr = wall - forward + corr["corrected_s"]
    figures = {
        "images": n,
        "views_per_image": rows[0]["views"] if rows else None,
        "wall_s": wall,
        "wall_s_corrected": wall_corr,
        "images_per_s_corrected": n / wall_corr,
        "s_per_image_corrected": wall_corr / n,
        "forward_gflops_corrected": gflop / corr["corrected_s"],
        "correction": corr,
        "images_per_s": n / wall,
        "s_per_image": wall / n,
        "gflop": gflop,
        "gflop_per_image": gflop / n,
        "forward_gflops": gflop / forward,
        "end_to_end_gflops": gflop / wall,
        "time_split_s": split,
        "time_share": {k.replace("_s", ""): v / wall for k, v in split.items()},
        "decode_s_per_image_in_threads": statistics.mean(timed.decodes) if timed.decodes else None,
        "workers": workers,
        "traces": fx.tracing_count,
        "rss_mib_start": rss0,
        "rss_mib_max_during": max(loop["rss"]) if loop["rss"] else None,
        "rss_mib_end": common.rss_mib(),
        "phase": phase.record(),
    }
    return figures, rows


def subset_seconds(figures: dict, rows: list, k: int, corrected: bool = True) -> float:
    """mlsp's seconds for the first k images of a run: their own wait + forward + write, plus
    their share (k/n) of the run's fixed costs (setup, merge); forward times corrected for
    other processes' load unless ``corrected`` is false."""
    fixed = figures["time_split_s"]["setup_s"] + figures["time_split_s"]["merge_s"] + figures["time_split_s"]["other_s"]
    key = "forward_s_corr" if corrected else "forward_s"
    own = sum(r["wait_s"] + r[key] + r["write_s"] for r in rows[:k])
    return own + fixed * k / len(rows)


def repeat_forward(fx, paths, rows) -> dict:
    """Forward passes of images whose sizes the process has already seen, against their first
    pass in the mixed run: what a new input size costs beyond its FLOPs (e.g. oneDNN creating
    kernels for a new shape)."""
    from mlsp import images

    again = []
    with Phase() as phase:
        for path, row in zip(paths, rows):
            views = images.make_views(images.decode_image(path, fx.config.max_side), fx.config.augment)
            probe = common.Probe().start()
            fx(views)
            wall, other = probe.stop()
            again.append({"forward_s": wall, "gflop": row["gflop"], "other_cores": other})
    corr = common.corrected(again, "forward_s", threshold=CLEAN["other_cores"])
    # compare only images clean in both passes
    pairs = [(r["forward_s"], a["forward_s"]) for r, a in zip(rows, again)
             if (r["other_cores"] or 0) <= CLEAN["other_cores"] and (a["other_cores"] or 0) <= CLEAN["other_cores"]]
    first = sum(r["forward_s_corr"] for r in rows[: len(paths)])
    return {"images": len(paths), "first_s": first, "repeat_s": corr["corrected_s"],
            "first_over_repeat": first / corr["corrected_s"], "clean_pairs": len(pairs),
            "first_over_repeat_clean_pairs": (sum(p[0] for p in pairs) / sum(p[1] for p in pairs)) if pairs else None,
            "per_image_first": [r["forward_s"] for r in rows[: len(paths)]], "per_image_repeat": again,
            "phase": phase.record()}


# ------------------------------------------------------------------------------------------
# The naive baseline (the authors' way) and mlsp's graph at batch 1
# ------------------------------------------------------------------------------------------


def run_naive(fx, paths, h5_path, flops_of) -> dict:
    """One view at a time, batch of 1, ``model.predict`` per view; decode in the main thread;
    NumPy preprocessing; features written per image to a preallocated HDF5 dataset (float16)."""
    import h5py

    from mlsp import images
    from mlsp.extract import POOLINGS

    cfg = fx.config
    model = fx.model
    grid = POOLINGS[cfg.pooling]
    channels = cfg.spec.total_channels
    n_views = len(cfg.views)
    shape = (len(paths), n_views, channels) if grid == 1 else (len(paths), n_views, grid, grid, channels)
    # The predict function is made before timing, as mlsp's graph is traced before timing. Keras 3
    # traces it for the first size, retraces once for the second with the shape relaxed to
    # (None, None, None, 3), and then serves every size from that trace: warm it past both.
    model.predict(np.zeros((1, 299, 299, 3), np.float32), verbose=0)
    model.predict(np.zeros((1, 301, 303, 3), np.float32), verbose=0)
    traces_before = model.predict_function.experimental_get_tracing_count()
    rss0 = common.rss_mib()
    per_image, gflop = [], 0.0
    with Phase() as phase, h5py.File(h5_path, "w") as f:
        ds = f.create_dataset("features", shape, dtype="float16")
        t0 = time.perf_counter()
        for i, path in enumerate(paths):
            a = time.perf_counter()
            img = images.decode_image(path, cfg.max_side)
            views = images.make_views(img, cfg.augment)
            b = time.perf_counter()
            probe = common.Probe().start()
            feats = []
            for k in range(len(views)):
                x = views[k].astype(np.float32) / 127.5 - 1.0  # the backbone's preprocess_input
                feats.append(model.predict(x[None], verbose=0)[0])
            other = probe.stop()[1]
            c = time.perf_counter()
            ds[i] = np.stack(feats).astype(np.float16)
            d = time.perf_counter()
            g = flops_of(*views.shape[1:3]) * len(views) / 1e9
            gflop += g
            per_image.append({"h": int(views.shape[1]), "w": int(views.shape[2]), "gflop": g, "decode_s": b - a,
                              "predict_s": c - b, "write_s": d - c, "other_cores": other})
        wall = time.perf_counter() - t0
    predict = sum(r["predict_s"] for r in per_image)
    corr = common.corrected(per_image, "predict_s", threshold=CLEAN["other_cores"])
    wall_corr = wall - predict + corr["corrected_s"]
    return {
        "images": len(paths),
        "wall_s": wall,
        "images_per_s": len(paths) / wall,
        "s_per_image": wall / len(paths),
        "wall_s_corrected": wall_corr,
        "images_per_s_corrected": len(paths) / wall_corr,
        "s_per_image_corrected": wall_corr / len(paths),
        "forward_gflops_corrected": gflop / corr["corrected_s"],
        "correction": corr,
        "gflop": gflop,
        "predict_s": predict,
        "decode_s": sum(r["decode_s"] for r in per_image),
        "write_s": sum(r["write_s"] for r in per_image),
        "forward_gflops": gflop / predict,
        "end_to_end_gflops": gflop / wall,
        "predict_traces_during_run": model.predict_function.experimental_get_tracing_count() - traces_before,
        "rss_mib_start": rss0,
        "rss_mib_end": common.rss_mib(),
        "per_image": per_image,
        "phase": phase.record(),
    }


def run_graph_batch1(fx, paths, flops_of) -> dict:
    """mlsp's traced graph, but one view per call: separates the gain of batching the 8 views
    from the gain of a traced graph over ``model.predict`` (decode in the main thread)."""
    from mlsp import images

    cfg = fx.config
    rows = []
    with Phase() as phase:
        t0 = time.perf_counter()
        for path in paths:
            views = images.make_views(images.decode_image(path, cfg.max_side), cfg.augment)
            probe = common.Probe().start()
            for k in range(len(views)):
                fx(views[k : k + 1])
            wall_i, other = probe.stop()
            rows.append({"forward_s": wall_i, "gflop": flops_of(*views.shape[1:3]) * len(views) / 1e9,
                         "other_cores": other})
        wall = time.perf_counter() - t0
    forward = sum(r["forward_s"] for r in rows)
    gflop = sum(r["gflop"] for r in rows)
    corr = common.corrected(rows, "forward_s", threshold=CLEAN["other_cores"])
    wall_corr = wall - forward + corr["corrected_s"]
    return {"images": len(paths), "wall_s": wall, "images_per_s": len(paths) / wall, "forward_s": forward,
            "wall_s_corrected": wall_corr, "images_per_s_corrected": len(paths) / wall_corr,
            "forward_gflops_corrected": gflop / corr["corrected_s"], "correction": corr,
            "forward_gflops": gflop / forward, "gflop": gflop, "phase": phase.record()}


# ------------------------------------------------------------------------------------------
# Fidelity of bfloat16 features
# ------------------------------------------------------------------------------------------


def fidelity(reference_store: str, other_store: str, block_names, block_channels) -> dict:
    """bfloat16 (other) against float32 (reference) features of the same images, from the two
    stores (both float16 on disk, which rounds both the same way, 2^-11 relative).

    max_rel = max |a - b| / max |a| (a: float32 features, b: bfloat16; maxima over all images,
    views, cells and channels of the block, or of everything for ``overall``); pearson: the
    correlation of all values of a and b; mean_rel = mean |a - b| / mean |a|."""
    import h5py

    edges = np.cumsum([0] + list(block_channels))
    nb = len(block_channels)
    acc = {k: np.zeros(nb + 1) for k in ("n", "sa", "sb", "saa", "sbb", "sab", "maxd", "maxa", "sd", "sabs")}
    with h5py.File(reference_store, "r") as fa, h5py.File(other_store, "r") as fb:
        assert fa["ids"][:].tolist() == fb["ids"][:].tolist()
        for i in range(fa["features"].shape[0]):
            a = fa["features"][i].astype(np.float64)
            b = fb["features"][i].astype(np.float64)
            for j in range(nb + 1):
                if j < nb:
                    x, y = a[..., edges[j] : edges[j + 1]], b[..., edges[j] : edges[j + 1]]
                else:
                    x, y = a, b
                d = np.abs(x - y)
                acc["n"][j] += x.size
                acc["sa"][j] += x.sum()
                acc["sb"][j] += y.sum()
                acc["saa"][j] += (x * x).sum()
                acc["sbb"][j] += (y * y).sum()
                acc["sab"][j] += (x * y).sum()
                acc["maxd"][j] = max(acc["maxd"][j], d.max())
                acc["maxa"][j] = max(acc["maxa"][j], np.abs(x).max())
                acc["sd"][j] += d.sum()
                acc["sabs"][j] += np.abs(x).sum()

    def stats(j):
        n = acc["n"][j]
        cov = acc["sab"][j] / n - acc["sa"][j] * acc["sb"][j] / n**2
        va = acc["saa"][j] / n - (acc["sa"][j] / n) ** 2
        vb = acc["sbb"][j] / n - (acc["sb"][j] / n) ** 2
        return {
            "max_rel": acc["maxd"][j] / acc["maxa"][j] if acc["maxa"][j] else 0.0,
            "mean_rel": acc["sd"][j] / acc["sabs"][j] if acc["sabs"][j] else 0.0,
            "pearson": cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 1.0,
        }

    blocks = {name: stats(j) for j, name in enumerate(block_names)}
    worst_rel = max(blocks, key=lambda k: blocks[k]["max_rel"])
    worst_r = min(blocks, key=lambda k: blocks[k]["pearson"])
    return {
        "overall": stats(nb),
        "worst_block_max_rel": {"block": worst_rel, **blocks[worst_rel]},
        "worst_block_pearson": {"block": worst_r, **blocks[worst_r]},
        "blocks": blocks,
        "definition": "max_rel = max|a-b| / max|a| over all stored values (a float32, b bfloat16 features, "
                      "same random weights, same images; per block: over that block's channels); "
                      "mean_rel = mean|a-b| / mean|a|; pearson = correlation of all values",
    }


# ------------------------------------------------------------------------------------------
# Peak RSS of the real command, in fresh processes
# ------------------------------------------------------------------------------------------


CLI_CHILD = """
import json, sys, time
sys.path[:0] = [{root!r}, {here!r}]
import cli, common
marks = []

def progress(total=None, desc="", unit="", **kwargs):
    # the command's progress bar, replaced by one that notes the RSS at each step
    marks.append((desc + ":open", time.perf_counter(), common.rss_mib()))

    class Bar:
        def update(self, n=1):
            marks.append((desc, time.perf_counter(), common.rss_mib()))

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            marks.append((desc + ":close", time.perf_counter(), common.rss_mib()))

    return Bar()

cli.tqdm_progress = cli.console_progress = progress  # (console_progress: the current name)
try:
    cli.main(sys.argv[2:], standalone_mode=False)
finally:
    # VmHWM: the peak RSS of this process image since exec (ru_maxrss would also count the
    # parent's memory that the child shared between fork and exec)
    hwm = None
    try:
        with open("/proc/self/status") as handle:
            hwm = next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        pass
    with open(sys.argv[1], "w") as handle:
        json.dump(dict(marks=marks, vm_hwm_mib=hwm), handle)
"""


def run_cli_rss(paths, net, pooling, precision, store) -> dict:
    """The real command, ``cli.py extract FILES... --weights random:0``, in a fresh process (its
    progress bar swapped for one that samples the RSS after every image). Peak RSS: the child's
    VmHWM at exit (its peak since exec; wait4's ru_maxrss is not used as the peak, since on Linux
    it also counts the parent's pages the child shared between fork and exec), and the RSS
    during the extraction loop."""
    marks_path = store + ".marks.json"
    code = CLI_CHILD.format(root=common.ROOT, here=HERE)
    cmd = [sys.executable, "-c", code, marks_path, "extract", *paths, "--net", net,
           "--wide" if pooling == "wide" else "--narrow", "--weights", "random:0", "--precision", precision,
           "--out", store]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=common.ROOT)
    # read the pipes in threads and reap the child with wait4, whose rusage is that child's alone
    stdout_data: list = []
    stderr_data: list = []

    def drain(stream, sink):
        for line in iter(stream.readline, b""):
            sink.append(line)

    threads = [threading.Thread(target=drain, args=(proc.stdout, stdout_data), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, stderr_data), daemon=True)]
    for th in threads:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    for th in threads:
        th.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"cli.py extract ... failed ({proc.returncode}):\n"
                           + b"".join(stderr_data[-20:]).decode(errors="replace"))
    maxrss = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 1024
    out = {"images": len(paths), "peak_rss_mib": None, "wall_s": round(wall, 2),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "ru_maxrss_wait4_mib": round(maxrss, 1)}
    try:
        with open(marks_path) as handle:
            data = json.load(handle)
        os.remove(marks_path)
        marks = data["marks"]
        if data.get("vm_hwm_mib") is not None:
            out["peak_rss_mib"] = round(data["vm_hwm_mib"], 1)
        loop = [m[2] for m in marks if m[0] == "extract"]
        merge = [m[2] for m in marks if m[0].startswith("write store")]
        out.update(rss_first_image_mib=round(loop[0], 1), rss_loop_max_mib=round(max(loop), 1),
                   rss_loop_end_mib=round(loop[-1], 1), rss_merge_max_mib=round(max(merge), 1) if merge else None,
                   rss_per_image_mib=[round(v, 1) for v in loop])
    except (OSError, ValueError, IndexError, KeyError):
        pass
    if out["peak_rss_mib"] is None:  # no /proc (macOS): the best there is
        out["peak_rss_mib"] = round(maxrss, 1)
    return out


# ------------------------------------------------------------------------------------------
# Scale on paper
# ------------------------------------------------------------------------------------------


def scale_on_paper(measured: dict, flop_counters: dict, decode_s_per_image: float | None, device: dict,
                   gpu_util: float = 0.10) -> dict:
    """All of AVA: store sizes of every variant; extraction time on this machine from the
    measured end-to-end GFLOP/s; on one H100 from FLOP counts."""
    from mlsp import backbones, images

    n = common.AVA["images"]
    h, w = common.AVA["mean_height"], common.AVA["mean_width"]
    ch, cw = images.crop_size(h, w)
    gpu = common.GPU_SPECS["H100 SXM"]
    gpu_cores = 16
    out = {"ava_images": n, "ava_mean_size": [h, w], "variants": [], "assumptions": [
        f"AVA: {n} images of mean size {h}x{w} (PAPER.md); FLOPs of the mean-size image stand for the mean "
        "FLOPs (FLOPs grow about linearly with pixels)",
        "this machine: total FLOPs / end-to-end GFLOP/s measured here on the mixed set (decode wait, write "
        "and merge included) for that backbone and precision; the pooling measured for that backbone stands "
        "for both (pooling is a negligible share of the FLOPs; wide stores write 25x more bytes)",
        f"GPU: one H100 SXM, dense peaks {gpu['bfloat16_tflops']} TFLOP/s bfloat16, {gpu['tf32_tflops']} "
        f"TF32 (TensorFlow's default for float32 convolutions on Ampere and newer), {gpu['float32_tflops']} "
        f"float32 without tensor cores ({gpu['source']}); 'bound' = at peak, 'estimate' = at an assumed "
        f"{gpu_util:.0%} of peak (--gpu-util): framework-level (TensorFlow/Keras) inference of Inception nets at "
        "batch 8 on odd image sizes is far from the dense peak; a GPU run of this script measures it",
        f"GPU decode: JPEG decoding and cropping on the host CPU, {gpu_cores} cores, at the per-image decode "
        "time measured here (single thread): the GPU estimate is the larger of compute and decode",
    ]}
    decode_total = decode_s_per_image * n / gpu_cores if decode_s_per_image else None
    for net in ("iv3", "irv2"):
        spec = backbones.get_backbone(net)
        counter = flop_counters.get(net)
        for views in (1, 8):
            if counter is None:
                continue
            gflop_img = (counter(ch, cw) * 8 if views == 8 else counter(h, w)) / 1e9
            total_pflop = gflop_img * n / 1e6
            for pooling in ("narrow", "wide"):
                cells = 1 if pooling == "narrow" else 25
                store_bytes = n * views * cells * spec.total_channels * 2
                row = {"net": net, "views": views, "pooling": pooling, "gflop_per_image": round(gflop_img, 1),
                       "total_pflop": round(total_pflop, 2), "store_bytes": store_bytes,
                       "store_gb": round(store_bytes / 1e9, 1)}
                for precision in ("float32", "bfloat16"):
                    rate = measured.get((net, precision))
                    if rate:
                        row[f"this_machine_{precision}_hours"] = round(total_pflop * 1e6 / rate / 3600, 1)
                for precision, peak in (("bfloat16", gpu["bfloat16_tflops"]), ("tf32", gpu["tf32_tflops"])):
                    bound = total_pflop * 1e3 / peak
                    est = bound / gpu_util
                    if decode_total:
                        est = max(est, decode_total)
                    row[f"h100_{precision}_bound_min"] = round(bound / 60, 1)
                    row[f"h100_{precision}_estimate_min"] = round(est / 60, 1)
                out["variants"].append(row)
    if decode_total:
        out["h100_host_decode_min"] = round(decode_total / 60, 1)
    out["measured_end_to_end_gflops"] = {f"{k[0]}/{k[1]}": round(v, 1) for k, v in measured.items()}
    out["note_on_device"] = f"figures measured on {device.get('kind')}: {device.get('name')}"
    return out


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def measure_reference(record: dict, precisions, only_if_unclean: bool = False):
    """Measure the matmul reference of each precision; keep the best measurement so far (the
    most undisturbed repetitions, then the highest rate). Called at the start, between the
    backbones and at the end while a precision has no clean measurement yet."""
    ref = record["reference"]["matmul"]
    for precision in precisions:
        have = ref.get(precision)
        if only_if_unclean and have and have["clean_reps"] >= 3:
            continue
        mm = cleanest(f"matmul {precision}", common.matmul_rate, precision)
        mm["measured_at_s"] = round(time.perf_counter() - T0, 1)
        better = have is None or (min(mm["clean_reps"], 3), mm["gflops_median"]) > (min(have["clean_reps"], 3),
                                                                                     have["gflops_median"])
        if better:
            if have is not None:
                mm["earlier"] = [{k: have[k] for k in ("gflops_median", "clean_reps", "measured_at_s")}] + have.get(
                    "earlier", [])
            ref[precision] = mm
        else:
            have.setdefault("earlier", []).append({k: mm[k] for k in ("gflops_median", "clean_reps", "measured_at_s")})
        log(f"matmul 4096 {precision}: {mm['gflops_median']} GFLOP/s (max {mm['gflops_max']}), {mm['clean_reps']}/"
            f"{len(mm['gflops_all'])} repetitions undisturbed; reference now {ref[precision]['gflops_median']}")


def add_efficiency(record: dict):
    """Efficiencies against the final (best) matmul reference of the same precision."""
    ref = record["reference"]["matmul"]
    for res in record["figures"]["extract"].values():
        for precision, pr in res["precisions"].items():
            mm = ref[precision]["gflops_median"]
            for part in ("mixed", "uniform"):
                if part in pr:
                    fig = pr[part]
                    fig["efficiency"] = fig["forward_gflops_corrected"] / mm
                    fig["efficiency_raw"] = fig["forward_gflops"] / mm
                    fig["end_to_end_efficiency"] = fig["gflop"] / fig["wall_s_corrected"] / mm


T0 = time.perf_counter()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few, small images: a smoke check of the whole run (~2 min)")
    p.add_argument("--out", default=common.RESULTS_DIR, help="folder for the results JSON (default bench/results/)")
    p.add_argument("--configs", default="irv2:wide,iv3:narrow", help="net:pooling pairs (default irv2:wide,iv3:narrow)")
    p.add_argument("--precisions", default="float32,bfloat16", help="compute precisions to compare")
    p.add_argument("--images", type=int, help="images in the mixed set (default 40; quick 6)")
    p.add_argument("--min-side", type=int, help="smallest side in the mixed set (default 300)")
    p.add_argument("--max-side", type=int, help="largest side in the mixed set (default 800; quick 460)")
    p.add_argument("--naive-images", type=int, help="first images of the mixed set run by the naive baseline "
                   "(default 12; quick 3)")
    p.add_argument("--serial-images", type=int, help="first images run again with workers=0 (default 10; quick 3)")
    p.add_argument("--rss-counts", help="image counts of the fresh-process RSS runs (default 8,24,72; quick 2,6)")
    p.add_argument("--rss-config", default="irv2:wide", help="net:pooling of the RSS runs (the largest features)")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS runs")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-util", type=float, default=0.10, help="share of an H100's dense peak assumed for the "
                   "on-paper GPU estimate (default 0.10)")
    p.add_argument("--tries", type=int, default=3, help="measure a step up to this many times while other "
                   "processes disturb it beyond repair (default 3; a step with enough undisturbed images is "
                   "corrected image by image instead)")
    p.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for a quiet machine before "
                   "each measurement (default 30)")
    p.add_argument("--clean-cores", type=float, default=0.15, help="a step is disturbed when other processes used "
                   "more than this many CPU cores meanwhile (default 0.15)")
    p.add_argument("--workdir", help="where images and stores go (default: a temporary folder, removed)")
    p.add_argument("--no-report", action="store_true", help="do not print the summary table")
    args = p.parse_args(argv)
    quick = args.quick
    args.images = args.images or (6 if quick else 40)
    args.min_side = args.min_side or 300
    args.max_side = args.max_side or (460 if quick else 800)
    args.naive_images = min(args.images, args.naive_images or (3 if quick else 12))
    args.serial_images = min(args.images, args.serial_images or (3 if quick else 10))
    args.rss_counts = [int(c) for c in (args.rss_counts or ("2,6" if quick else "8,24,72")).split(",")]
    args.configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    args.precisions = args.precisions.split(",")
    return args


def main(argv=None) -> str:
    global T0
    T0 = time.perf_counter()
    args = parse_args(argv)
    CLEAN.update(other_cores=args.clean_cores, tries=args.tries, max_wait=args.max_wait)
    started = time.perf_counter()
    record = common.new_record("extract", {k: v for k, v in vars(args).items()})
    log(f"mlsp extraction benchmark ({'quick' if args.quick else 'full'}): {record['machine']['cpu_model']}, "
        f"{record['machine']['usable_cpus']} CPUs")

    import keras  # noqa: F401
    import tensorflow as tf  # noqa: F401

    from mlsp import images
    from mlsp.extract import ExtractConfig, FeatureExtractor

    for gpu in tf.config.list_physical_devices("GPU"):
        # take GPU memory as needed, so that the fresh `cli.py extract` processes of the RSS runs get some
        tf.config.experimental.set_memory_growth(gpu, True)
    device = common.device_info()
    record["device"] = device
    log(f"device: {device['kind']} {device['name']}")

    # 1. the reference: dense matmul of each precision, in this process, default threads
    record["reference"] = {"matmul": {}}
    measure_reference(record, args.precisions)

    work = args.workdir or tempfile.mkdtemp(prefix="mlsp-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        # 2. images: a mixed set, a set of one resolution with the same pixel count, a set for RSS
        sizes = mixed_sizes(args.images, args.min_side, args.max_side, args.seed)
        mixed = write_set(os.path.join(work, "mixed"), sizes, args.seed)
        mean_px = float(np.mean([h * w for h, w in sizes]))
        side = int(round(math.sqrt(mean_px)))
        uniform = write_set(os.path.join(work, "uniform"), [(side, side)] * args.images, args.seed + 1)
        rss_n = max(args.rss_counts) if not args.no_rss else 0
        rss_set = write_set(os.path.join(work, "rss"), [(args.min_side, args.min_side + 60)] * rss_n, args.seed + 2)
        sets = {
            "mixed": {"images": len(mixed), "distinct_sizes": len(set(sizes)), "side_range": [min(min(s) for s in sizes),
                      max(max(s) for s in sizes)], "mean_pixels": mean_px,
                      "mean_jpeg_kib": float(np.mean([os.path.getsize(p) for p in mixed]) / 1024)},
            "uniform": {"images": len(uniform), "size": [side, side], "mean_pixels": side * side},
            "rss": {"images": len(rss_set), "size": [args.min_side, args.min_side + 60]},
        }
        record["figures"]["sets"] = sets
        log(f"images: {len(mixed)} mixed ({len(set(sizes))} sizes, {sets['mixed']['side_range']} px), "
            f"{len(uniform)} of {side}x{side}, {len(rss_set)} for RSS, in {work}")

        # 3. decoding alone (main thread): the host-side cost per image
        with Phase() as ph:
            for p in mixed:
                images.make_views(images.decode_image(p, 1024), True)
        record["figures"]["decode"] = {"s_per_image": ph.wall / len(mixed), "what": "decode_image + make_views "
                                       "(8 views), serial, main thread, mixed set", "phase": ph.record()}
        log(f"decode + views: {1000 * ph.wall / len(mixed):.1f} ms per image")

        results: dict = {}
        fidelity_out: dict = {}
        flop_counters: dict = {}
        for net, pooling in args.configs:
            key = f"{net}_{pooling}"
            res = results[key] = {"net": net, "pooling": pooling, "precisions": {}}
            stores = {}
            for precision in args.precisions:
                cfg = ExtractConfig(net=net, pooling=pooling, weights="random:0", precision=precision)
                with Phase() as ph_build:
                    fx = FeatureExtractor(cfg)
                with Phase() as ph_trace:
                    fx(np.zeros((8, 160, 160, 3), np.uint8))
                counter = flop_counters.setdefault(net, common.FlopCounter(fx.model))
                flops_of = counter
                pr: dict = {"build_s": ph_build.wall, "first_trace_s": ph_trace.wall,
                            "gflop_299": counter(299, 299) / 1e9}
                res["precisions"][precision] = pr
                mm = record["reference"]["matmul"][precision]["gflops_median"]

                # mixed set, default settings (the measurement that counts)
                store = os.path.join(work, f"{key}_{precision}.h5")
                fig, rows = cleanest(f"{key} {precision} mixed", run_mlsp, fx, mixed, store, flops_of)
                fig["end_to_end_gflops_corrected"] = fig["gflop"] / fig["wall_s_corrected"]
                pr["mixed"] = fig
                pr["mixed_per_image"] = rows
                stores[precision] = store
                log(f"{key} {precision} mixed: {fig['images_per_s_corrected']:.3f} img/s ({fig['images_per_s']:.3f} "
                    f"as measured), forward {fig['forward_gflops_corrected']:.0f} GFLOP/s = "
                    f"{100 * fig['forward_gflops_corrected'] / mm:.0f}% of matmul so far; wait {fig['time_share']['wait_decode']:.1%}, write {fig['time_share']['write']:.1%}, "
                    f"merge {fig['time_share']['merge']:.1%}; other processes {fig['phase']['other_cores']} cores, "
                    f"{fig['correction']['clean_steps']}/{fig['images']} images undisturbed")

                # a new size against a size seen before, same images
                k = args.serial_images
                rep = cleanest(f"{key} {precision} repeat", repeat_forward, fx, mixed[:k], rows)
                pr["new_shape_cost"] = rep
                log(f"{key} {precision} forward of {k} sizes first seen / seen before: {rep['first_over_repeat']:.3f}")

                # decode-ahead threads against the serial path, on the first images
                k = args.serial_images
                fig0, _ = cleanest(f"{key} {precision} workers=0", run_mlsp, fx, mixed[:k],
                                   os.path.join(work, "serial.h5"), flops_of, workers=0)
                threaded_s = subset_seconds(fig, rows, k)
                pr["serial_decode"] = {
                    "images": k, "workers0": fig0, "workers0_s": fig0["wall_s_corrected"],
                    "threaded_s_same_images": threaded_s,
                    "threaded_over_serial_speed": fig0["wall_s_corrected"] / threaded_s,
                    "wait_share_threaded": sum(r["wait_s"] for r in rows[:k]) / threaded_s,
                    "wait_share_serial": fig0["time_share"]["wait_decode"],
                }
                os.remove(os.path.join(work, "serial.h5"))
                log(f"{key} {precision} workers=0 on {k} images: {fig0['wall_s_corrected']:.1f} s vs {threaded_s:.1f} s with "
                    f"decode-ahead; waits on decode {pr['serial_decode']['wait_share_serial']:.1%} vs "
                    f"{pr['serial_decode']['wait_share_threaded']:.1%}")

                if precision == args.precisions[0]:
                    # one resolution, same pixel count
                    figu, _ = cleanest(f"{key} {precision} one resolution", run_mlsp, fx, uniform,
                                       os.path.join(work, "uniform.h5"), flops_of)
                    os.remove(os.path.join(work, "uniform.h5"))
                    pr["uniform"] = figu
                    pr["mixed_cost"] = {
                        "per_image": fig["s_per_image_corrected"] / figu["s_per_image_corrected"],
                        "per_gflop": (fig["wall_s_corrected"] / fig["gflop"]) / (figu["wall_s_corrected"] / figu["gflop"]),
                        "forward_per_gflop": figu["forward_gflops_corrected"] / fig["forward_gflops_corrected"],
                        "per_image_as_measured": fig["s_per_image"] / figu["s_per_image"],
                    }
                    log(f"{key} {precision} one resolution: {figu['images_per_s_corrected']:.3f} img/s; mixed cost "
                        f"{pr['mixed_cost']['per_image']:.2f} per image, {pr['mixed_cost']['per_gflop']:.2f} per GFLOP")

                    if not args.no_naive:
                        k = args.naive_images
                        # the authors' model: Keras' graph as built, batch norms not folded
                        if "fold_batch_norms" in inspect.signature(FeatureExtractor).parameters:
                            naive_fx = FeatureExtractor(cfg, fold_batch_norms=False)
                            naive_model = "Keras model as built (batch norms not folded), same pooling layer"
                        else:
                            naive_fx = fx
                            naive_model = "mlsp's Keras model (this mlsp does not fold batch norms)"
                        nv = cleanest(f"{key} {precision} naive", run_naive, naive_fx, mixed[:k],
                                      os.path.join(work, "naive.h5"), flops_of)
                        nv["model"] = naive_model
                        os.remove(os.path.join(work, "naive.h5"))
                        del naive_fx
                        b1 = cleanest(f"{key} {precision} graph batch 1", run_graph_batch1, fx, mixed[:k], flops_of)
                        mlsp_s = subset_seconds(fig, rows, k)
                        pr["naive"] = nv
                        pr["graph_batch1"] = b1
                        pr["vs_naive"] = {
                            "images": k,
                            "naive_s": nv["wall_s_corrected"],
                            "mlsp_s_same_images": mlsp_s,
                            "speedup": nv["wall_s_corrected"] / mlsp_s,
                            "speedup_as_measured": nv["wall_s"] / subset_seconds(fig, rows, k, corrected=False),
                            "graph_batch1_s": b1["wall_s_corrected"],
                            "gain_graph_over_predict": nv["wall_s_corrected"] / b1["wall_s_corrected"],
                            "gain_batch_and_threads": b1["wall_s_corrected"] / mlsp_s,
                        }
                        log(f"{key} {precision} naive on {k} images: {nv['images_per_s_corrected']:.3f} img/s "
                            f"({nv['predict_traces_during_run']} retraces); mlsp is {pr['vs_naive']['speedup']:.2f}x "
                            f"(graph at batch 1: {pr['vs_naive']['gain_graph_over_predict']:.2f}x over predict)")
                del fx
                gc.collect()

            # precision comparison
            if len(args.precisions) > 1:
                base, other = args.precisions[0], args.precisions[1]
                a, b = res["precisions"][base]["mixed"], res["precisions"][other]["mixed"]
                res["precision_speedup"] = {f"{other}_over_{base}": a["wall_s_corrected"] / b["wall_s_corrected"],
                                            "forward_only": b["forward_gflops_corrected"] / a["forward_gflops_corrected"],
                                            "as_measured": a["wall_s"] / b["wall_s"]}
                from mlsp.backbones import get_backbone

                spec = get_backbone(net)
                fidelity_out[key] = fidelity(stores[base], stores[other], spec.taps, spec.channels)
                res["fidelity"] = fidelity_out[key]
                ov = fidelity_out[key]["overall"]
                log(f"{key} {other} over {base}: {res['precision_speedup'][f'{other}_over_{base}']:.2f}x; "
                    f"max_rel {ov['max_rel']:.4f}, pearson {ov['pearson']:.6f}")
            for s in stores.values():
                os.remove(s)
            measure_reference(record, args.precisions, only_if_unclean=True)
        record["figures"]["extract"] = results

        # 4. peak RSS of the command in fresh processes
        if not args.no_rss:
            net, pooling = args.rss_config.split(":")
            precision = args.precisions[-1]
            rss_runs = []
            for count in args.rss_counts:
                store = os.path.join(work, f"rss_{count}.h5")
                r = run_cli_rss(rss_set[:count], net, pooling, precision, store)
                os.remove(store)
                rss_runs.append(r)
                log(f"cli.py extract {net} {pooling} {precision} on {count} images: peak RSS {r['peak_rss_mib']} MiB, "
                    f"during the loop {r.get('rss_first_image_mib')} -> max {r.get('rss_loop_max_mib')} MiB "
                    f"({r['wall_s']} s)")
            record["figures"]["rss"] = {
                "config": {"net": net, "pooling": pooling, "precision": precision, "views": 8,
                           "image_size": sets["rss"]["size"], "checkpoint_every": 64, "flush_seconds": 30},
                "runs": rss_runs,
                "growth": rss_runs[-1]["peak_rss_mib"] / rss_runs[0]["peak_rss_mib"],
                "loop_growth": (rss_runs[-1]["rss_loop_max_mib"] / rss_runs[0]["rss_loop_max_mib"]
                                if "rss_loop_max_mib" in rss_runs[0] and "rss_loop_max_mib" in rss_runs[-1] else None),
                "feature_mib_per_image": 8 * (25 if pooling == "wide" else 1)
                * sum(__import__("mlsp.backbones", fromlist=["x"]).get_backbone(net).channels) * 2 / 2**20,
            }

        # 5. scale on paper
        measured = {}
        for key, res in results.items():
            for precision, pr in res["precisions"].items():
                measured[(res["net"], precision)] = pr["mixed"]["end_to_end_gflops_corrected"]
        record["figures"]["scale"] = scale_on_paper(measured, flop_counters, record["figures"]["decode"]["s_per_image"],
                                                    device, args.gpu_util)
        measure_reference(record, args.precisions, only_if_unclean=True)
        add_efficiency(record)
        record["targets"] = evaluate_targets(record)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    record["seconds"] = time.perf_counter() - started
    record["figures"]["waited_for_quiet_s"] = CLEAN["waited_s"]
    path = common.write_record(record, args.out)
    log(f"done in {record['seconds']:.0f} s: {path}")
    if not args.no_report:
        import report

        print(report.render_targets(record))
    return path


def evaluate_targets(record: dict) -> list:
    out = []
    matmul = record["reference"]["matmul"]
    for key, res in record["figures"]["extract"].items():
        precisions = list(res["precisions"])
        base = precisions[0]
        pr = res["precisions"][base]
        if "vs_naive" in pr:
            v = pr["vs_naive"]
            out.append(common.target(f"{key}: mlsp / naive, images/s, mixed, {base}", round(v["speedup"], 2),
                                     f">= {TARGETS['speedup_vs_naive']}", v["speedup"] >= TARGETS["speedup_vs_naive"],
                                     "x", f"{v['images']} images; graph vs predict {v['gain_graph_over_predict']:.2f}x, "
                                     f"batching+threads {v['gain_batch_and_threads']:.2f}x"))
            for other in precisions[1:]:
                o = res["precisions"][other]
                s = v["naive_s"] / subset_seconds(o["mixed"], o["mixed_per_image"], v["images"])
                o["vs_naive_float32"] = s
                out.append(common.target(f"{key}: mlsp {other} / naive {base}, images/s, mixed", round(s, 2),
                                         f">= {TARGETS['speedup_vs_naive']}", s >= TARGETS["speedup_vs_naive"], "x",
                                         "mlsp at the precision this CPU computes natively, naive as the authors ran"))
        for precision, p in res["precisions"].items():
            e = p["mixed"]["efficiency"]
            out.append(common.target(f"{key}: backbone GFLOP/s / matmul {precision}", round(e, 3),
                                     f">= {TARGETS['efficiency']}", e >= TARGETS["efficiency"], "",
                                     f"{p['mixed']['forward_gflops_corrected']:.0f} of {matmul[precision]['gflops_median']:.0f} "
                                     "GFLOP/s (forward passes only)"))
        if "mixed_cost" in pr:
            c = pr["mixed_cost"]["per_image"]
            out.append(common.target(f"{key}: mixed / one resolution, s per image, {base}", round(c, 3),
                                     f"<= {TARGETS['mixed_cost']}", c <= TARGETS["mixed_cost"], "",
                                     f"per GFLOP {pr['mixed_cost']['per_gflop']:.3f}"))
        if "precision_speedup" in res:
            name, s = next(iter(res["precision_speedup"].items()))
            out.append(common.target(f"{key}: {name}, images/s, mixed", round(s, 2), f">= {TARGETS['bf16_speedup']}",
                                     s >= TARGETS["bf16_speedup"], "x",
                                     f"forward only {res['precision_speedup']['forward_only']:.2f}x"))
            ov = res["fidelity"]["overall"]
            out.append(common.target(f"{key}: bfloat16 fidelity (max_rel overall, pearson)",
                                     [round(ov["max_rel"], 4), round(ov["pearson"], 6)], "max_rel <= 0.03, r >= 0.9999",
                                     ov["max_rel"] <= 0.03 and ov["pearson"] >= 0.9999, "",
                                     "the bounds tests/test_precision.py holds"))
    rss = record["figures"].get("rss")
    if rss:
        g = rss["growth"]
        out.append(common.target(f"peak RSS, {rss['runs'][-1]['images']} / {rss['runs'][0]['images']} images",
                                 round(g, 3), f"<= {TARGETS['rss_growth']}", g <= TARGETS["rss_growth"], "x",
                                 ", ".join(f"{r['images']}: {r['peak_rss_mib']:.0f} MiB" for r in rss["runs"])
                                 + " (VmHWM of the whole process: model build and first trace included)"))
        g = rss.get("loop_growth")
        if g is not None:
            out.append(common.target(f"RSS during the extraction loop, max, {rss['runs'][-1]['images']} / "
                                     f"{rss['runs'][0]['images']} images", round(g, 3), f"<= {TARGETS['rss_growth']}",
                                     g <= TARGETS["rss_growth"], "x",
                                     ", ".join(f"{r['images']}: {r['rss_first_image_mib']:.0f} -> "
                                               f"{r['rss_loop_max_mib']:.0f} MiB" for r in rss["runs"])))
    return out


if __name__ == "__main__":
    main()
