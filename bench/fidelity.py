"""Fidelity of features of another precision (bfloat16) against float32: per block and overall."""

from __future__ import annotations

import math

import numpy as np


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
