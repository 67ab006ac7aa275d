"""Progress of long loops, the same way in every stage (extract, train, score).

A stage takes a *progress factory*: ``progress(total=..., desc=..., unit=..., **tqdm_options)``
returning a :class:`Progress`, an object with ``update(n)``, ``set_postfix(**values)`` and
``close()`` (tqdm's own signature, so ``tqdm.tqdm`` itself is a factory). Three are here:

- :func:`null_progress`: shows nothing (the default of every library function);
- :func:`console_progress`: a tqdm bar when stderr is a terminal; otherwise (a log file, CI) a
  :class:`LogProgress`, which logs one line every ``percent`` percent or every ``interval``
  seconds, never a line per update, and a last line when it closes;
- :func:`resolve`: what the API's ``progress=`` argument means (``False``/``None``: nothing,
  ``True``: the console, a callable: that factory).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Protocol

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What a stage calls on the object a progress factory returns."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[..., Progress]


class Closing:
    """``with thing as t:`` calls ``t.close()`` at the end: progress bars (``with factory(...) as
    bar:``), stores, readers and clusters."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NullProgress(Closing):
    """Shows nothing."""

    def __init__(self, total=None, **options):
        self.total = total
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        pass


def null_progress(total=None, **options) -> NullProgress:
    """The progress factory that shows nothing."""
    return NullProgress(total, **options)


class LogProgress(Closing):
    """Progress as log lines, for a stream that is not a terminal.

    A line when the count has advanced ``percent`` percent since the last line (but at most one
    every ``min_interval`` seconds), or when ``interval`` seconds have passed; and one when it
    closes. tqdm's display options (``dynamic_ncols``, ``leave``, ...) are accepted and ignored.
    """

    def __init__(self, total=None, desc: str = "", unit: str = "it", *, percent: float = 10.0,
                 interval: float = 30.0, min_interval: float = 3.0, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic, **display_options):
        self.total = total
        self.desc, self.unit = desc, unit
        self.percent, self.interval, self.min_interval = float(percent), float(interval), float(min_interval)
        self.logger = logger or log
        self.clock = clock
        self.n = 0
        self.postfix: dict = {}
        self.lines = 0
        self._start = self._last_time = clock()
        self._last_n = 0
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        since = now - self._last_time
        advanced = self.total and 100.0 * (self.n - self._last_n) / self.total >= self.percent
        if since >= self.interval or (advanced and since >= self.min_interval):
            self._emit(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = {**dict(ordered_dict or {}), **values}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(self.clock())

    def _emit(self, now: float) -> None:
        self._last_time, self._last_n = now, self.n
        self.lines += 1
        self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc: n/total unit (pct%), rate unit/s, elapsed[, left][, postfix]``."""
        elapsed = (self.clock() if now is None else now) - self._start
        text = f"{self.desc}: " if self.desc else ""
        if self.total:
            text += f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
        else:
            text += f"{self.n} {self.unit}"
        rate = self.n / elapsed if elapsed > 0 else 0.0
        text += f", {rate:.3g} {self.unit}/s, {_duration(elapsed)}"
        if self.total and 0 < rate and self.n < self.total:
            text += f", {_duration((self.total - self.n) / rate)} left"
        if self.postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def console_progress(**options) -> Progress:
    """A tqdm bar on stderr when it is a terminal, else a :class:`LogProgress`."""
    stream = sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return LogProgress(**options)
    from tqdm.auto import tqdm

    options.setdefault("dynamic_ncols", True)
    options.setdefault("smoothing", 0.1)
    return tqdm(**options)


def resolve(progress) -> ProgressFactory:
    """``False``/``None`` -> :func:`null_progress`, ``True`` -> :func:`console_progress`, a factory -> itself."""
    if progress is None or progress is False:
        return null_progress
    if progress is True:
        return console_progress
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a bool or a progress factory, received {progress!r}")
