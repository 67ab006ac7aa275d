"""Files fetched once from a list of URLs, checked against a pinned size and sha256, and kept.

:func:`download` tries the URLs in order (a mirror after a source that fails) and streams the
file into a partial file beside the destination (``.NAME.part``). A connection that breaks
mid-file is resumed where it stopped with an HTTP ``Range`` request, within the same call up to
``retries`` times, and by the next call after that (the partial file stays). Only a file whose
size and sha256 are the pinned ones is moved into place (``os.replace``, fsync'ed), so a
truncated, corrupt or wrong file never appears under the final name; one that fails its check
is deleted. When no URL gives a valid copy, :class:`~mlsp.errors.DownloadError` says in one
line what each URL did, the file's size and sha256, the URLs and where to put a copy fetched
by hand (an offline machine).

:func:`verify` checks any file against a size and sha256 (:class:`~mlsp.errors.IntegrityError`).
Files mlsp writes into a cache itself, with no pinned hash, are vouched for by
:mod:`mlsp.runtime.trust` instead.

What a source sends is bounded: never more than the pinned size (with or without a
``Content-Length``), a source slower than ``min_rate`` bytes/s over ``timeout`` seconds counts as
a broken connection (resumed, as a stall is), and each source has an overall ``deadline`` (by
default :data:`DEADLINE` plus the time the file takes at :data:`DEADLINE_RATE`). Bytes are
written as they arrive, so what came before a stall is kept for the resumption. Malformed
headers (``Content-Length``, ``Content-Range``) and redirect loops fail that source in one line.

The partial file is opened once, refusing a symbolic link (:func:`mlsp.runtime.atomic.open_no_follow`),
written, checked and renamed through that descriptor, so a link planted in the cache never makes
mlsp write a file elsewhere; a destination that is a link is refused.

Plain ``urllib`` (standard library): it follows redirects (GitHub's raw URLs redirect to its
LFS media host) keeping the ``Range`` header, and honours the ``https_proxy`` variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request

from ..errors import DownloadError, DownloadInterrupted, IntegrityError, WeightsUnavailableError, WriteError
from .atomic import describe_os_error, fsync_path, open_no_follow, refuse_link, same_file
from .progress import ProgressFactory, null_progress

log = logging.getLogger(__name__)

RETRIES = 3  # resumptions per URL after a broken connection, within one call
TIMEOUT = 30.0  # seconds without a byte (or below MIN_RATE) before a connection counts as broken
MIN_RATE = 1024  # bytes per second: a source slower than this over TIMEOUT seconds has stalled
DEADLINE = 300.0  # seconds each source has for a file, plus its size at DEADLINE_RATE
DEADLINE_RATE = 32 * 1024  # bytes per second: a 255 MB head may take 2 h 15 min from one source
CHUNK = 1 << 20  # bytes read and written at a time
_LFS_POINTER = b"version https://git-lfs"


class SourceFailed(Exception):
    """One URL did not give the file (HTTP error, refused connection, too many breaks)."""


class Broken(Exception):
    """A transfer stopped before the end (connection reset or closed, timeout): resumable."""


def partial_path(dest: str) -> str:
    """Where ``dest`` is downloaded to until it is complete and checked: ``.NAME.part`` beside it."""
    folder, name = os.path.split(os.fspath(dest))
    return os.path.join(folder, f".{name}.part")


def verify(path: str, *, size: int, sha256: str) -> str:
    """``path`` if it has ``size`` bytes and the ``sha256``, else :class:`IntegrityError`."""
    with open(path, "rb") as handle:
        _check(handle, path, size, sha256)
    return path


def _check(handle, path: str, size: int, sha256: str) -> None:
    """:class:`IntegrityError` unless the open file ``handle`` (named ``path``) is ``size`` bytes of ``sha256``."""
    actual = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    if actual != size:
        pointer = ""
        if handle.read(len(_LFS_POINTER)) == _LFS_POINTER:
            pointer = " (a Git LFS pointer, not the file: fetch it with `git lfs pull` or from a media URL)"
        raise IntegrityError(path, f"{actual:,} bytes{pointer}", f"{size:,} bytes (truncated or another file?)")
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(CHUNK), b""):
        digest.update(chunk)
    if digest.hexdigest() != sha256.lower():
        raise IntegrityError(path, f"sha256 {digest.hexdigest()}",
                             f"sha256 {sha256.lower()} (a corrupt or another file)")


def deadline_for(size: int) -> float:
    """Seconds one source has for a file of ``size`` bytes, resumptions included."""
    return DEADLINE + size / DEADLINE_RATE


def download(urls, dest: str, *, size: int, sha256: str, progress: ProgressFactory = null_progress,
             retries: int = RETRIES, timeout: float = TIMEOUT, deadline: float | None = None,
             min_rate: float = MIN_RATE, advice: str = "", label: str = "") -> str:
    """Download ``dest`` from the first of ``urls`` that gives a file of ``size`` bytes with the
    ``sha256``; returns ``dest``. A complete, valid ``dest`` is returned as it is. The one-line
    :class:`DownloadError` calls the file ``label`` (default: its name) and ends with ``advice``
    (e.g. another way to give the file). ``deadline``: seconds each source has (default
    :func:`deadline_for`). Ctrl-C is :class:`DownloadInterrupted`, saying what is kept."""
    dest = os.fspath(dest)
    refuse_link(dest)
    if os.path.isfile(dest):
        return verify(dest, size=size, sha256=sha256)
    part = partial_path(dest)
    limits = _Limits(timeout, deadline_for(size) if deadline is None else deadline, min_rate)
    failures = []
    try:
        with _exclusive(part, dest) as fd:
            for url in urls:
                failure = _try(url, _Part(part, fd), size, sha256, progress, retries, limits)
                if failure is None:
                    return _into_place(part, fd, dest, url)
                failures.append(f"{url}: {failure}")
                log.warning("%s", failures[-1])
    except KeyboardInterrupt as exc:
        raise DownloadInterrupted(_kept(part, size)) from exc
    raise DownloadError(dest, size=size, sha256=sha256, urls=urls, failures=failures, advice=advice, label=label)


def _kept(part: str, size: int) -> str:
    """What an interrupted download left for the next try, truly."""
    try:
        have = os.lstat(part).st_size
    except OSError:
        have = 0
    if not have:
        return "nothing was downloaded yet"
    return f"{have:,} of {size:,} bytes downloaded so far are kept in {part}; run the same command again to resume"


class _Part:
    """The partial file: its name (for messages and the rename) and its open descriptor (for every
    read, write and size)."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def write_at(self, data, offset: int) -> None:
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def kept(self) -> str:
        have = self.size()
        return f"{have:,} bytes kept for the next try" if have else "nothing kept"


class _Limits:
    """How long a source may take: ``timeout`` seconds without a byte or below ``min_rate`` bytes/s
    (a stall: resumed), ``deadline`` seconds in all (the source fails)."""

    def __init__(self, timeout: float, deadline: float, min_rate: float):
        self.timeout, self.deadline, self.min_rate = timeout, deadline, min_rate

    def start(self) -> float:
        """The moment a source's deadline ends, when it starts now."""
        return time.monotonic() + self.deadline


def _try(url: str, part: _Part, size: int, sha256: str, progress, retries: int, limits: _Limits) -> str | None:
    """Complete and check ``part`` from ``url``: ``None``, or why it failed. A wrong file is
    emptied; when it had begun with bytes of an earlier try (another source, an earlier run),
    ``url`` is asked again for the whole file before it is blamed."""
    while True:
        inherited = part.size() > 0
        try:
            _fetch(url, part, size, progress, retries, limits)
            with os.fdopen(os.dup(part.fd), "rb") as handle:
                _check(handle, part.path, size, sha256)
            return None
        except IntegrityError as exc:
            part.truncate(0)
            if not inherited:
                return f"gave {exc.found}, expected {exc.expected}"
            log.info("%s: %s with the bytes kept from an earlier try; downloading it whole", url, exc.found)
        except SourceFailed as exc:
            return str(exc)


@contextlib.contextmanager
def _exclusive(part: str, dest: str):
    """The partial file, opened without following a link, under an exclusive lock: one download
    of ``dest`` at a time. Yields its descriptor; an empty partial file is removed at the end."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)
        fd = open_no_follow(part)
    except OSError as exc:
        raise WriteError(part, describe_os_error(exc), "nothing was downloaded") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WeightsUnavailableError(
                f"{dest}: another mlsp process is downloading it now; wait for it to finish") from None
        yield fd
    finally:
        empty = same_file(part, fd) and os.fstat(fd).st_size == 0
        os.close(fd)
        if empty:
            with contextlib.suppress(OSError):
                os.remove(part)


def _into_place(part: str, fd: int, dest: str, url: str) -> str:
    try:
        os.fsync(fd)
        if not same_file(part, fd):
            raise WriteError(part, "it was replaced by another file while downloading", "nothing was put in place")
        refuse_link(dest)
        os.replace(part, dest)
    except OSError as exc:
        raise WriteError(dest, describe_os_error(exc), f"the checked download is kept in {part}") from exc
    with contextlib.suppress(OSError):
        fsync_path(os.path.dirname(os.path.abspath(dest)))
    log.info("%s: downloaded from %s and checked (size, sha256)", dest, url)
    return dest


def _fetch(url: str, part: _Part, size: int, progress: ProgressFactory, retries: int, limits: _Limits):
    """Complete ``part`` from ``url``, resuming after each broken connection up to ``retries`` times,
    within the source's deadline."""
    breaks = 0
    ends = limits.start()
    bar = _Bar(progress, total=size, desc=os.path.basename(part.path)[1:-len(".part")], unit="B",
               unit_scale=True, unit_divisor=1024)
    try:
        while True:
            have = part.size()
            if have == size:
                return
            if have > size:
                part.truncate(0)
                have = 0
            try:
                _get(url, part, have, size, bar, limits, ends)
            except Broken as exc:
                reason = str(exc)
            else:
                got = part.size()
                if got >= size:
                    return
                reason = f"the connection closed at {got:,} of {size:,} bytes"
            breaks += 1
            if breaks > retries:
                raise SourceFailed(f"{reason}; broke {breaks} times, {part.kept()}")
            log.info("%s: %s; resuming at byte %d", url, reason, part.size())
    finally:
        bar.close()


class _Bar:
    """A progress bar opened when the first bytes arrive (not for a source that never answers),
    at the offset the download starts from; opened anew when a source starts over."""

    def __init__(self, progress: ProgressFactory, **options):
        self.progress, self.options = progress, options
        self.bar = None
        self.n = 0

    def at(self, offset: int):
        if self.bar is None or offset < self.n:
            self.close()
            self.bar, self.n = self.progress(**self.options), 0
        self.update(offset - self.n)

    def update(self, n: int):
        if n:
            self.bar.update(n)
            self.n += n

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _get(url: str, part: _Part, have: int, size: int, bar, limits: _Limits, ends: float):
    """One HTTP GET of ``url`` from byte ``have`` (a ``Range`` request when ``have`` > 0) into ``part``."""
    from ..version import __version__

    headers = {"User-Agent": f"mlsp/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    left = ends - time.monotonic()
    if left <= 0:
        raise SourceFailed(_late(limits, part))
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=min(limits.timeout, left))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file does not fit this source: start over
            part.truncate(0)
            raise Broken("the server refused to resume (HTTP 416)") from exc
        raise SourceFailed(_http_error(exc)) from exc
    except urllib.error.URLError as exc:
        raise SourceFailed(_reason(exc.reason)) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise SourceFailed(_reason(exc)) from exc
    with response:
        start = _start(response, have, size)
        try:
            part.truncate(start)
            bar.at(start)
            _stream(response, part, start, size, bar, limits, ends)
        except OSError as exc:
            have = part.size()
            kept = f"{have:,} bytes downloaded so far are kept in {part.path}" if have else "nothing was downloaded"
            raise WriteError(part.path, describe_os_error(exc), kept) from exc


def _stream(response, part: _Part, offset: int, size: int, bar, limits: _Limits, ends: float):
    """Write the body into ``part`` from ``offset`` as it arrives (what came before a break is kept),
    never past ``size``; a stall (below ``limits.min_rate`` over ``limits.timeout`` s) is
    :class:`Broken`, the deadline ``ends`` :class:`SourceFailed`."""
    window, window_bytes = time.monotonic(), 0
    while data := _read(response, min(CHUNK, size - offset + 1)):
        if offset + len(data) > size:
            part.truncate(0)
            raise SourceFailed(f"sends more than the {size:,} bytes expected (another file?); nothing kept")
        part.write_at(data, offset)
        offset += len(data)
        bar.update(len(data))
        now = time.monotonic()
        if now > ends:
            raise SourceFailed(_late(limits, part))
        window_bytes += len(data)
        if now - window >= limits.timeout:
            if window_bytes < limits.min_rate * (now - window):
                raise Broken(f"slower than {limits.min_rate:,.0f} bytes/s for {now - window:.0f} s (stalled)")
            window, window_bytes = now, 0


def _late(limits: _Limits, part: _Part) -> str:
    seconds = f"{limits.deadline:,.0f}" if limits.deadline >= 10 else f"{limits.deadline:g}"
    return f"did not finish within {seconds} s (too slow); {part.kept()}"


def _read(response, n: int) -> bytes:
    """What has arrived, up to ``n`` bytes (one read of the socket: never waits to fill a buffer)."""
    try:
        return response.read1(n)
    except (OSError, http.client.HTTPException) as exc:
        raise Broken(_reason(exc)) from exc


_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20}|\*)")
_DIGITS = re.compile(r"\d{1,20}")


def _start(response, have: int, size: int) -> int:
    """The offset the response's body starts at; a source whose file has another size, or whose
    size headers cannot be read, fails."""
    if response.status == 206:
        header = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if not match:
            raise SourceFailed(f"answered a resume with a malformed Content-Range header ({_shown(header)})")
        first, _, total = match.groups()
        if int(first) != have:
            raise SourceFailed(f"answered a resume at byte {have} from byte {int(first)}")
        if total != "*" and int(total) != size:
            raise SourceFailed(f"serves {int(total):,} bytes, expected {size:,}")
        return have
    length = response.headers.get("Content-Length")
    if length is not None:
        if not _DIGITS.fullmatch(length.strip()):
            raise SourceFailed(f"sent a malformed Content-Length header ({_shown(length)})")
        if int(length) != size:
            raise SourceFailed(f"serves {int(length):,} bytes, expected {size:,} (another file, or an error page?)")
    if have:
        log.info("%s: the server does not resume; downloading from the start", response.url)
    return 0


def _http_error(exc: urllib.error.HTTPError) -> str:
    if urllib.request.HTTPRedirectHandler.inf_msg in str(exc.reason):  # a loop, or too many: a 3-line message
        return f"HTTP {exc.code}: redirects in a loop (or more than {urllib.request.HTTPRedirectHandler.max_redirections})"
    return f"HTTP {exc.code} {_one_line(str(exc.reason))}"


def _shown(text: str, limit: int = 60) -> str:
    """A header value as it may be shown in a one-line message."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _one_line(text: str, limit: int = 200) -> str:
    """Text a server sent, on one line: line breaks and control characters become spaces."""
    text = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", text).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _reason(exc) -> str:
    """A short reason for a network failure: "connection refused", "timed out", ..."""
    if isinstance(exc, http.client.IncompleteRead):
        return f"the connection broke after {len(exc.partial):,} more bytes"
    if isinstance(exc, BaseException):
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    else:
        text = str(exc)
    return _one_line(text.lower().splitlines()[0] if text.strip() else "failed")
