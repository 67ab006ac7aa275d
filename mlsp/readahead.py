"""Decoding ahead of the model: image files loaded in worker threads while the model runs.

:func:`decode_ahead` is the one place where stage 1 (extraction) and scoring files with a
trained run overlap decoding with computing.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from typing import Callable, Iterable, Iterator

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
