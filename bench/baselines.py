"""The naive baseline (the authors' way: one view at a time, decode in the main thread) and
mlsp's graph at batch 1."""

from __future__ import annotations

import time

import numpy as np

import common
from common import Phase

from quiet import CLEAN


def run_naive(fx, paths, h5_path, flops_of) -> dict:
    """One view at a time, batch of 1, ``model.predict`` per view; decode in the main thread;
    NumPy preprocessing; features written per image to a preallocated HDF5 dataset (float16)."""
    import h5py

    from mlsp.images import decode as images
    from mlsp.extraction.job import POOLINGS

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
    from mlsp.images import decode as images

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
