"""Decoding ahead of the model: image files loaded in worker threads while the model runs.

:func:`decode_ahead` is the one place where stage 1 (extraction) and scoring files with a
trained run overlap decoding with computing; :class:`LocalRunner` adds the model to it, for a
job on this machine (:mod:`mlsp.extraction.cluster` runs the same on a Ray cluster), and
:func:`run_batched` groups the decoded views of images of one size into one model call.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ImageDecodeError

#: Threads decoding images ahead of the model: the default of ``mlsp extract`` and ``mlsp score``.
DECODE_WORKERS = 2
#: Decoded images held ahead of the model, image by image.
PREFETCH = 4
#: Decoded images at most held while views of one size are grouped into one model call.
BATCH_WINDOW = 64
#: Seconds between the waking checks of a wait for a decode (see :func:`wait_waking`).
WAKE_SECONDS = 0.25


def wait_waking(wait: Callable, timeout_error: type[BaseException]):
    """``wait()`` (a future's ``result``, a queue's ``get``), waking every :data:`WAKE_SECONDS`
    (``wait(timeout=...)`` raising ``timeout_error`` until it returns). A signal (Ctrl-C, ``kill``)
    is handled in the main thread only when that thread runs Python code; the kernel may deliver it
    to another thread (a backend's pool), and then a wait that never wakes (a decode stalled on a
    network share) would never see it: the process would ignore Ctrl-C."""
    while True:
        try:
            return wait(timeout=WAKE_SECONDS)
        except timeout_error:
            continue


def decode_ahead(load: Callable, items: Iterable, workers: int, prefetch: int = PREFETCH) -> Iterator:
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
            yield item, wait_waking(future.result, concurrent.futures.TimeoutError)
    finally:
        # never wait for a decode that does not return (a stalled network share): an interrupted
        # run must end promptly; what is queued is cancelled, a running decode is abandoned (its
        # thread is named mlsp-decode, so the CLI can tell and exit without waiting for it)
        pool.shutdown(wait=False, cancel_futures=True)


class LocalRunner:
    """Runs a processor (``load_views(path)``, ``process(views)``, ``info()``; e.g. a
    :class:`mlsp.extraction.job.FeatureExtractor`) over images in this process: decoding ``prefetch``
    images ahead in ``workers`` threads, the model in the caller's thread, on the views of one
    image at a time or, with ``batch_views``, of several images of one size grouped into one call
    (:func:`run_batched`, holding at most ``batch_window`` decoded images).
    :class:`mlsp.extraction.cluster.ClusterRunner` is the same interface over a Ray cluster."""

    def __init__(self, processor, workers: int = DECODE_WORKERS, prefetch: int = PREFETCH, batch_views: int = 0,
                 batch_window: int = BATCH_WINDOW):
        self.processor, self.workers, self.prefetch = processor, workers, prefetch
        self.batch_views, self.batch_window = batch_views, batch_window

    def info(self) -> dict:
        return self.processor.info()

    def postfix(self) -> dict:
        return {}

    def map(self, items: Sequence[tuple[str, str]]) -> Iterable:
        """Yield ``((path, id), (facts, result) or ImageDecodeError)`` in input order: ``facts`` is
        what the processor's ``load_views`` returned beside the views (extraction: the image's
        size and file identity, :class:`mlsp.extraction.job.ImageFacts`)."""
        ahead = max(self.prefetch, self.batch_window) if self.batch_views > 0 else self.prefetch
        decoded = decode_ahead(self.processor.load_views, items, self.workers, ahead)
        key = getattr(self.processor, "batch_key", None)
        for item, result in run_batched(self.processor.process, decoded, self.batch_views, self.batch_window, key):
            if isinstance(result, ImageDecodeError):
                yield item, result
            else:
                features, facts = result
                yield item, (facts, features)


def run_batched(extractor: Callable, decoded: Iterable, batch_views: int, window: int,
                key: Callable | None = None) -> Iterable:
    """Features for a stream of decoded images, grouping the views of images of the same size.

    ``decoded`` yields ``(item, (views, facts))`` or ``(item, ImageDecodeError)`` in input order
    (``facts``: whatever ``load_views`` returned beside the views, passed through); this yields
    ``(item, (features, facts))`` or ``(item, ImageDecodeError)`` in the same order.
    Images of one view shape wait (at most ``window`` images held) until their group has
    ``batch_views`` views, then run as one ``extractor(views)`` call; when the window is full,
    the oldest image's group runs as it is. ``batch_views`` at or below one image's views runs
    each image alone (then ``extractor`` may return any object; grouped, an array with one row per
    view). Each view's features depend only on that view, so the result equals an image-by-image
    run. ``key`` (default: the view shape itself) maps a view shape to its group: where views of
    different shapes share a key (the native engine's size buckets), ``extractor`` gets the list
    of their arrays instead of one array.
    """
    pending: deque = deque()  # [item, result, done] in input order
    groups: dict = {}  # group key -> entries waiting, in input order
    key = key or tuple

    def run(group_key):
        entries = groups.pop(group_key)
        per_call = max(1, batch_views // entries[0][1][0].shape[0])
        for start in range(0, len(entries), per_call):
            chunk = entries[start:start + per_call]
            if len(chunk) == 1:  # one image: its result as it is (a processor may return any object)
                entry = chunk[0]
                entry[1], entry[2] = (extractor(entry[1][0]), entry[1][1]), True
                continue
            arrays = [e[1][0] for e in chunk]
            same = all(a.shape == arrays[0].shape for a in arrays)
            features = extractor(np.concatenate(arrays) if same else arrays)
            offset = 0
            for entry in chunk:
                n = entry[1][0].shape[0]
                entry[1] = (features[offset:offset + n], entry[1][1])
                entry[2] = True
                offset += n

    def ready():
        while pending and pending[0][2]:
            item, result, _ = pending.popleft()
            yield item, result

    for item, result in decoded:
        failed = isinstance(result, ImageDecodeError)
        entry = [item, result, failed]
        pending.append(entry)
        if not failed:
            group_key = key(result[0].shape)
            group = groups.setdefault(group_key, [])
            group.append(entry)
            if sum(e[1][0].shape[0] for e in group) >= batch_views:
                run(group_key)
        if len(pending) >= max(1, window) and not pending[0][2]:
            run(key(pending[0][1][0].shape))
        yield from ready()
    while groups:
        run(next(iter(groups)))
    yield from ready()
