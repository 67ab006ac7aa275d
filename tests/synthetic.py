"""Synthetic feature stores with a planted signal: MOS is a fixed function of the features.

For checking that stage 2 learns (tests, a quick look at a head) without images or a backbone.
Each image has a base feature vector; each stored view is the base plus view noise; a wide view
adds zero-mean spatial noise over its 5x5 grid, so the mean of the grid is the narrow view.
The MOS is ``5.5 + 2 tanh(s) + 0.3 s``, a monotone nonlinear function of a fixed linear
projection ``s`` of the mean of the views (standardised), plus Gaussian noise, clipped to
[1, 10]. Monotone, so that a linear head (Single-1FC) can rank the images as well as any.

With ``votes=N`` each image also gets a histogram of N votes over the scores 1..10, drawn from a
discretised normal centred on that (noisy) MOS whose spread is another fixed function of the
features: ``1.3 + 0.5 tanh(t)`` for a second, independent projection ``t``
(:func:`planted_spread`). The stored MOS is then the mean of the votes, as in AVA.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mlsp.store.labels import SCORES, mos_from_votes
from helpers import write_store


def planted_mos(mean_features: np.ndarray, seed: int = 0) -> np.ndarray:
    """The noise-free MOS of images whose mean (narrow) features are ``mean_features`` (n, C)."""
    rng = np.random.default_rng([seed, 1])
    w = rng.normal(size=mean_features.shape[1])
    s = (mean_features - 0.5) @ w
    s = s / (0.5 / np.sqrt(3) * np.linalg.norm(w))  # unit variance for U(0, 1) bases
    return 5.5 + 2.0 * np.tanh(s) + 0.3 * s


def planted_spread(mean_features: np.ndarray, seed: int = 0) -> np.ndarray:
    """The noise-free spread (std of the normal the votes are drawn from) of images with these features."""
    rng = np.random.default_rng([seed, 2])
    w = rng.normal(size=mean_features.shape[1])
    t = (mean_features - 0.5) @ w / (0.5 / np.sqrt(3) * np.linalg.norm(w))
    return 1.3 + 0.5 * np.tanh(t)


def draw_votes(rng: np.random.Generator, centre: np.ndarray, spread: np.ndarray, n_votes: int) -> np.ndarray:
    """(n, 10) vote counts: ``n_votes`` draws from a normal discretised over the scores 1..10."""
    logits = -((SCORES[None, :] - np.asarray(centre)[:, None]) ** 2) / (2 * np.asarray(spread)[:, None] ** 2)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(n_votes, row) for row in p]).astype(np.float32)


def write_synthetic_store(
    path: str,
    n_images: int = 1000,
    *,
    n_views: int = 8,
    block_channels: Sequence[int] = (16, 32, 16),
    pooling: str = "narrow",
    noise: float = 0.1,
    view_noise: float = 0.05,
    splits: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    net: str = "synthetic",
    votes: int = 0,
) -> dict:
    """Write a store of ``n_images`` images with a planted signal; returns its arrays.

    ``splits``: fractions of train, val and test (in that order, at random). ``votes``: votes per
    image (0: the store has MOS only). Returns ``{"mos", "clean_mos", "split", "mean_features"}``
    and, with votes, ``"votes"`` and ``"clean_spread"``.
    """
    rng = np.random.default_rng(seed)
    channels = int(sum(block_channels))
    base = rng.uniform(0.0, 1.0, size=(n_images, channels)).astype(np.float32)
    views = base[:, None, :] + view_noise * rng.normal(size=(n_images, n_views, channels)).astype(np.float32)
    views = np.maximum(views, 0.0)
    features = views
    if pooling == "wide":
        spatial = rng.normal(size=(n_images, n_views, 5, 5, channels)).astype(np.float32) * 0.2
        spatial -= spatial.mean(axis=(2, 3), keepdims=True)
        features = views[:, :, None, None, :] + spatial
    mean_features = features.astype(np.float16).astype(np.float32)
    mean_features = mean_features.mean(axis=(1, 2, 3)) if pooling == "wide" else mean_features.mean(axis=1)
    clean = planted_mos(mean_features, seed)
    mos = np.clip(clean + noise * rng.normal(size=n_images), 1.0, 10.0).astype(np.float32)
    edges = np.cumsum(splits) / np.sum(splits)
    u = rng.permutation(n_images) / n_images
    split = np.where(u < edges[0], "train", np.where(u < edges[1], "val", "test"))
    out = {"mos": mos, "clean_mos": clean, "split": split, "mean_features": mean_features}
    counts = None
    if votes:
        spread = planted_spread(mean_features, seed)
        counts = draw_votes(np.random.default_rng([seed, 3]), mos, spread, int(votes))
        mos = out["mos"] = mos_from_votes(counts).astype(np.float32)
        out.update(votes=counts, clean_spread=spread)
    write_store(
        path, features, [f"img{i:06d}" for i in range(n_images)], net=net, pooling=pooling,
        block_names=[f"block{k}" for k in range(len(block_channels))], block_channels=block_channels,
        mos=mos, votes=counts, split=split, attrs={"dataset": "synthetic", "seed": seed},
    )
    return out



def write_content_store(path: str, n_images: int = 1000, *, factors: int = 16, channels: int = 32, n_views: int = 2,
                        noise: float = 0.3, seed: int = 0) -> dict:
    """A store whose content varies along ``factors`` latent factors (each image's features a fixed
    linear mix of its factors plus noise, all positive as pooled activations are), its MOS along
    one direction of them (``5.5 + 1.5 q`` plus noise, clipped to [1, 10]): what a generic head
    learns, while the other directions are content only people's own taste cares about. Splits
    70/15/15. Returns ``{"mos", "factors", "quality", "mean_features", "ids"}`` (``quality``: q)."""
    rng = np.random.default_rng([seed, 31])
    latent = rng.normal(size=(n_images, factors))
    mix = rng.normal(size=(factors, channels)) / np.sqrt(factors)
    base = latent @ mix + noise * rng.normal(size=(n_images, channels))
    features = (3.0 + base[:, None, :] + 0.05 * rng.normal(size=(n_images, n_views, channels))).astype(np.float32)
    direction = rng.normal(size=factors)
    quality = latent @ (direction / np.linalg.norm(direction))
    mos = np.clip(5.5 + 1.5 * quality + 0.2 * rng.normal(size=n_images), 1.0, 10.0).astype(np.float32)
    order = rng.permutation(n_images) / n_images
    split = np.where(order < 0.7, "train", np.where(order < 0.85, "val", "test"))
    ids = [f"img{i:06d}" for i in range(n_images)]
    half = channels // 2
    write_store(path, features, ids, net="synthetic", pooling="narrow", block_names=["block0", "block1"],
                block_channels=[half, channels - half], mos=mos, split=split,
                attrs={"dataset": "synthetic-content", "seed": seed})
    mean_features = features.astype(np.float16).astype(np.float32).mean(axis=1)
    return {"mos": mos, "factors": latent, "quality": quality, "mean_features": mean_features, "ids": ids}
