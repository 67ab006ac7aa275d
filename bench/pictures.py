"""Generated test pictures: smooth random JPEGs of given sizes, and a mixed set of sizes."""

from __future__ import annotations

import os

import numpy as np


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
