"""Decoding ahead of the model: image files loaded in worker threads while the model runs.

:func:`decode_ahead` is the one place where stage 1 (extraction) and scoring files with a
trained run overlap decoding with computing; :class:`LocalRunner` adds the model to it, for a
job on this machine (:mod:`mlsp.cluster` runs the same on a Ray cluster).
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from typing import Callable, Iterable, Iterator, Sequence

from .errors import ImageDecodeError


def decode_ahead(load: Callable, items: Iterable, workers: int, prefetch: int = 4) -> Iterator:
    """Yield ``(item, load(item[0]) or the ImageDecodeError)`` in input order, decoding up to
    ``prefetch`` items ahead in ``workers`` threads (OpenCV releases the GIL while decoding).
    Memory is bounded by ``prefetch`` decoded images; the order, and so every result, is the
    same as a serial loop's. ``workers <= 0`` decodes in the calling thread."""

    def safe_load(path):
        try:
            return load(path)
        except ImageDecodeError as exc:
            return exc

    if workers <= 0:
        for item in items:
            yield item, safe_load(item[0])
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlsp-decode")
    try:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(safe_load, item[0])))
            if len(pending) >= max(1, prefetch):
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(safe_load, nxt[0])))
            yield item, future.result()
    finally:
        # never wait for a decode that does not return (a stalled network share): an interrupted
        # run must end promptly; what is queued is cancelled, a running decode is abandoned (its
        # thread is named mlsp-decode, so the CLI can tell and exit without waiting for it)
        pool.shutdown(wait=False, cancel_futures=True)


class LocalRunner:
    """Runs a processor (``load_views(path)``, ``process(views)``, ``info()``; e.g. a
    :class:`mlsp.extract.FeatureExtractor`) over images in this process: decoding ``prefetch``
    images ahead in ``workers`` threads, the model in the caller's thread.
    :class:`mlsp.cluster.ClusterRunner` is the same interface over a Ray cluster."""

    def __init__(self, processor, workers: int = 2, prefetch: int = 4):
        self.processor, self.workers, self.prefetch = processor, workers, prefetch

    def info(self) -> dict:
        return self.processor.info()

    def postfix(self) -> dict:
        return {}

    def map(self, items: Sequence[tuple[str, str]]) -> Iterable:
        """Yield ``((path, id), ((height, width), result) or ImageDecodeError)`` in input order."""
        for item, loaded in decode_ahead(self.processor.load_views, items, self.workers, self.prefetch):
            if isinstance(loaded, ImageDecodeError):
                yield item, loaded
            else:
                views, size = loaded
                yield item, (size, self.processor.process(views))
