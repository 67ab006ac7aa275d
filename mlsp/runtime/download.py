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

Plain ``urllib`` (standard library): it follows redirects (GitHub's raw URLs redirect to its
LFS media host) keeping the ``Range`` header, and honours the ``https_proxy`` variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import logging
import os
import urllib.error
import urllib.request

from .atomic import describe_os_error, fsync_path
from .files import file_sha256
from ..errors import DownloadError, IntegrityError, WeightsUnavailableError, WriteError
from .progress import ProgressFactory, null_progress

log = logging.getLogger(__name__)

RETRIES = 3  # resumptions per URL after a broken connection, within one call
TIMEOUT = 30.0  # seconds without a byte before a connection counts as broken
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
    actual = os.path.getsize(path)
    if actual != size:
        pointer = ""
        with open(path, "rb") as handle:
            if handle.read(len(_LFS_POINTER)) == _LFS_POINTER:
                pointer = " (a Git LFS pointer, not the file: fetch it with `git lfs pull` or from a media URL)"
        raise IntegrityError(path, f"{actual:,} bytes{pointer}", f"{size:,} bytes (truncated or another file?)")
    digest = file_sha256(path)
    if digest != sha256.lower():
        raise IntegrityError(path, f"sha256 {digest}", f"sha256 {sha256.lower()} (a corrupt or another file)")
    return path


def download(urls, dest: str, *, size: int, sha256: str, progress: ProgressFactory = null_progress,
             retries: int = RETRIES, timeout: float = TIMEOUT, advice: str = "", label: str = "") -> str:
    """Download ``dest`` from the first of ``urls`` that gives a file of ``size`` bytes with the
    ``sha256``; returns ``dest``. A complete, valid ``dest`` is returned as it is. The one-line
    :class:`DownloadError` calls the file ``label`` (default: its name) and ends with ``advice``
    (e.g. another way to give the file)."""
    dest = os.fspath(dest)
    if os.path.isfile(dest):
        return verify(dest, size=size, sha256=sha256)
    part = partial_path(dest)
    failures = []
    with _exclusive(part, dest):
        for url in urls:
            failure = _try(url, part, size, sha256, progress, retries, timeout)
            if failure is None:
                return _into_place(part, dest, url)
            failures.append(f"{url}: {failure}")
            log.warning("%s", failures[-1])
    raise DownloadError(dest, size=size, sha256=sha256, urls=urls, failures=failures, advice=advice, label=label)


def _try(url: str, part: str, size: int, sha256: str, progress, retries: int, timeout: float) -> str | None:
    """Complete and check ``part`` from ``url``: ``None``, or why it failed. A wrong file is
    emptied; when it had begun with bytes of an earlier try (another source, an earlier run),
    ``url`` is asked again for the whole file before it is blamed."""
    while True:
        inherited = os.path.getsize(part) > 0
        try:
            _fetch(url, part, size, progress, retries, timeout)
            verify(part, size=size, sha256=sha256)
            return None
        except IntegrityError as exc:
            _truncate(part, 0)
            if not inherited:
                return f"gave {exc.found}, expected {exc.expected}"
            log.info("%s: %s with the bytes kept from an earlier try; downloading it whole", url, exc.found)
        except SourceFailed as exc:
            return str(exc)


@contextlib.contextmanager
def _exclusive(part: str, dest: str):
    """Hold an exclusive lock on the partial file: one download of ``dest`` at a time."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteError(part, describe_os_error(exc), "nothing was downloaded") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WeightsUnavailableError(
                f"{dest}: another mlsp process is downloading it now; wait for it to finish") from None
        yield
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            if os.path.getsize(part) == 0:
                os.remove(part)


def _into_place(part: str, dest: str, url: str) -> str:
    try:
        fsync_path(part)
        os.replace(part, dest)
    except OSError as exc:
        raise WriteError(dest, describe_os_error(exc), f"the checked download is kept in {part}") from exc
    with contextlib.suppress(OSError):
        fsync_path(os.path.dirname(os.path.abspath(dest)))
    log.info("%s: downloaded from %s and checked (size, sha256)", dest, url)
    return dest


def _fetch(url: str, part: str, size: int, progress: ProgressFactory, retries: int, timeout: float):
    """Complete ``part`` from ``url``, resuming after each broken connection up to ``retries`` times."""
    breaks = 0
    bar = _Bar(progress, total=size, desc=os.path.basename(part)[1:-len(".part")], unit="B", unit_scale=True,
               unit_divisor=1024)
    try:
        while True:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if have == size:
                return
            if have > size:
                _truncate(part, 0)
                have = 0
            try:
                _get(url, part, have, size, bar, timeout)
            except Broken as exc:
                reason = str(exc)
            else:
                got = os.path.getsize(part)
                if got >= size:
                    return
                reason = f"the connection closed at {got:,} of {size:,} bytes"
            breaks += 1
            got = os.path.getsize(part) if os.path.exists(part) else 0
            if breaks > retries:
                raise SourceFailed(f"{reason}; broke {breaks} times, {got:,} bytes kept for the next try")
            log.info("%s: %s; resuming at byte %d", url, reason, got)
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


def _get(url: str, part: str, have: int, size: int, bar, timeout: float):
    """One HTTP GET of ``url`` from byte ``have`` (a ``Range`` request when ``have`` > 0) into ``part``."""
    from ..version import __version__

    headers = {"User-Agent": f"mlsp/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file does not fit this source: start over
            _truncate(part, 0)
            raise Broken("the server refused to resume (HTTP 416)") from exc
        raise SourceFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise SourceFailed(_reason(exc.reason)) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise SourceFailed(_reason(exc)) from exc
    with response:
        start = _start(response, have, size)
        try:
            with open(part, "r+b" if start else "wb") as out:
                out.seek(start)
                out.truncate()
                bar.at(start)
                buffer = memoryview(bytearray(CHUNK))
                while n := _read(response, buffer):  # what arrived is written before a break is raised
                    out.write(buffer[:n])
                    bar.update(n)
        except OSError as exc:
            raise WriteError(part, describe_os_error(exc), "the bytes downloaded so far are kept") from exc


def _read(response, buffer) -> int:
    try:
        return response.readinto(buffer)
    except (OSError, http.client.HTTPException) as exc:
        raise Broken(_reason(exc)) from exc


def _start(response, have: int, size: int) -> int:
    """The offset the response's body starts at; a source whose file has another size fails."""
    if response.status == 206:
        first, _, total = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
        start = first.partition("-")[0]
        if start != str(have):
            raise SourceFailed(f"answered a resume at byte {have} from {start or 'nowhere'}")
        if total not in ("", "*") and int(total) != size:
            raise SourceFailed(f"serves {int(total):,} bytes, expected {size:,}")
        return have
    length = response.headers.get("Content-Length")
    if length is not None and int(length) != size:
        raise SourceFailed(f"serves {int(length):,} bytes, expected {size:,} (another file, or an error page?)")
    if have:
        log.info("%s: the server does not resume; downloading from the start", response.url)
    return 0


def _truncate(path: str, length: int):
    with open(path, "r+b") as handle:
        handle.truncate(length)


def _reason(exc) -> str:
    """A short reason for a network failure: "connection refused", "timed out", ..."""
    if isinstance(exc, http.client.IncompleteRead):
        return f"the connection broke after {len(exc.partial):,} more bytes"
    if isinstance(exc, BaseException):
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    else:
        text = str(exc)
    return text.lower().splitlines()[0]
