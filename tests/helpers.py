"""Plain helpers of the tests (fixtures are in conftest.py): test data written from scratch.

Import them as ``from helpers import ...`` (pyproject.toml puts tests/ on pytest's path); the
benchmarks put tests/ on ``sys.path`` themselves.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Sequence

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image(path, height, width, seed=0, channels=3, ext=None):
    """A smooth random RGB picture (so JPEG keeps it close) written with OpenCV."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), channels), dtype=np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise RuntimeError(f"could not write {path}")
    return path


def ctrl_c_after(count=None):
    """A progress factory (:mod:`mlsp.runtime.progress`) that presses Ctrl-C once ``count`` items are done
    (``None``: all of them)."""
    from mlsp.runtime.progress import NullProgress

    class CtrlC(NullProgress):
        def update(self, n=1):
            super().update(n)
            if self.n == (self.total if count is None else count):
                raise KeyboardInterrupt

    return CtrlC


def remount(folder, options):
    """Change a mounted tmpfs: ``size=2m``, ``ro``, ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def write_store(
    path: str,
    features: np.ndarray,
    ids: Sequence[str],
    *,
    net: str,
    pooling: str,
    block_names: Sequence[str],
    block_channels: Sequence[int],
    views: Sequence[str] | None = None,
    mos=None,
    votes=None,
    split=None,
    paths=None,
    errors: Sequence[dict] = (),
    attrs: dict | None = None,
):
    """Write a complete store from in-memory arrays (tests, synthetic stores, benchmarks).

    mlsp itself never writes a store this way: extraction streams through
    :class:`mlsp.store.shards.ShardWriter` and :func:`mlsp.store.write.finalize_store`, which write the
    same layout (:func:`mlsp.store.write.create_layout`)."""
    import h5py

    from mlsp.runtime.atomic import AtomicPath
    from mlsp.images.decode import AUGMENTED_VIEWS, FULL_VIEWS
    from mlsp.store.format import as_str_array
    from mlsp.store.write import create_layout, write_errors

    features = np.asarray(features)
    n = features.shape[0]
    n_views = features.shape[1]
    if views is None:
        views = AUGMENTED_VIEWS if n_views == 8 else FULL_VIEWS if n_views == 1 else [f"v{i}" for i in range(n_views)]
    mos = np.full(n, np.nan, np.float32) if mos is None else np.asarray(mos, np.float32)
    votes = np.full((n, 10), np.nan, np.float32) if votes is None else np.asarray(votes, np.float32)
    if split is None:
        split = np.where(np.isfinite(mos), "train", "unlabeled")
    base = dict(attrs or {})
    base.update(net=net, pooling=pooling, block_names=list(block_names),
                block_channels=[int(c) for c in block_channels])
    with AtomicPath(path) as tmp, h5py.File(tmp, "w") as f:
        create_layout(f, n, list(views), pooling, features.shape[-1], base)
        f["features"][...] = features.astype(np.float16)
        f["ids"][...] = as_str_array(ids)
        f["paths"][...] = as_str_array(paths if paths is not None else ids)
        f["sizes"][...] = 0
        f["mos"][...] = mos
        f["votes"][...] = votes
        f["split"][...] = as_str_array(split)
        write_errors(f, errors)


def same_threads_env() -> dict:
    """This process's environment, with the thread counts its TensorFlow runs with (tests/conftest.py
    gives each pytest-xdist worker its share of the cores), for a subprocess whose result must
    equal one computed here bit for bit: a training's sums depend on how many threads add them."""
    from mlsp.runtime.backend import configure_threads

    env = dict(os.environ)
    intra, inter = configure_threads()
    for name, value in (("TF_NUM_INTRAOP_THREADS", intra), ("TF_NUM_INTEROP_THREADS", inter)):
        if value:
            env[name] = str(value)
    return env


def torch_env() -> dict:
    """The environment of a subprocess that runs Keras on PyTorch beside pytest's TensorFlow: this
    checkout on its path, no KERAS_BACKEND of the caller's, and one OpenMP thread (PyTorch's OpenMP
    threads spin while they wait, which on a busy 2-core machine made the same work 10x slower:
    6 s of CPU instead of 0.6 s for one irv2 forward)."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@contextlib.contextmanager
def torch_worker(script: str, job, log, timeout: float = 900):
    """``tests/<script> JOB`` in a subprocess of :func:`torch_env`, its output into the file ``log``
    (a full pipe would stop it while nobody reads), running while the block computes TensorFlow's
    side; waited for at the end of the block (killed if the block fails). Yields the process: its
    ``returncode`` after the block."""
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", script), str(job)], env=torch_env(),
                                  stdout=out, stderr=subprocess.STDOUT)
        try:
            yield worker
            worker.wait(timeout=timeout)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
