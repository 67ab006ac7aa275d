"""mlsp's extraction, instrumented: the timeline of every image (wait on decode, forward, write)
and the forward pass repeated on a quiet machine."""

from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np

import common
from common import Phase

from quiet import CLEAN


class TimedExtractor:
    """Wraps a FeatureExtractor for ``extract(..., extractor=)`` (the processor interface of
    ``mlsp.images.readahead.LocalRunner``: ``info``, ``load_views``, ``process``): records when each
    forward pass starts and ends and how long each decode takes (in whichever thread it runs).
    The cast to float16 of ``process`` falls after the forward pass, into the write."""

    def __init__(self, fx):
        self.fx = fx
        self.config = fx.config
        self.forwards: list = []
        self.decodes: list = []
        self._lock = threading.Lock()

    def info(self):
        return self.fx.info()

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

    def process(self, views):
        return self(views).astype(np.float16)


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
    """Extract ``paths`` into a new store through ``mlsp.extraction.job.extract`` and take its timeline
    apart. Returns (figures, per-image rows)."""
    from mlsp.extraction.job import extract

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
    from mlsp.images import decode as images

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
