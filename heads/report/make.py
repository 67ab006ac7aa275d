"""``mlsp report``: which kind of source a path is (:data:`heads.report.build.SOURCES`, whose
entries :mod:`heads.report.sources` registers beside their code) and its page written as one
HTML file (:mod:`heads.report.build`)."""

from __future__ import annotations

import logging
import os

from mlsp.errors import ConfigError
from mlsp.runtime.atomic import atomic_path
from mlsp.runtime.progress import ProgressFactory, null_progress

from . import sources  # noqa: F401  (registers the kinds of source)
from .build import MAX_PHOTOS, SOURCES, ReportSource, render

log = logging.getLogger(__name__)


def detect(source: str) -> ReportSource:
    """The registered kind of ``source``; a path that is none of them is a one-line error."""
    if not os.path.exists(source):
        raise ConfigError(f"{source}: no such file or folder")
    for spec in SOURCES.specs():
        if spec.detect(source):
            return spec
    kinds = "; ".join(f"{s.name}: {s.description}" for s in SOURCES.specs())
    raise ConfigError(f"{source}: not a source mlsp can report on ({kinds})")


def default_out(source: str) -> str:
    """``<scores>.html`` beside a scores file, ``<folder>/report.html`` in a folder."""
    if os.path.isdir(source):
        return os.path.join(source, "report.html")
    return os.path.splitext(source)[0] + ".html"


def report(source: str, out: str | None = None, *, images: str | None = None, saliency: str | None = None,
           max_photos: int = MAX_PHOTOS, progress: ProgressFactory = null_progress) -> str:
    """Write the HTML report of ``source`` to ``out`` (default :func:`default_out`); returns its
    path. ``images``: the folder to find the photos in by id (a run's, or a scores file's whose
    photos moved); ``saliency``: a folder of ``mlsp explain`` overlays (a run's default: its
    ``saliency`` folder)."""
    if max_photos < 1:
        raise ConfigError(f"max_photos must be at least 1, received {max_photos}")
    spec = detect(source)
    out = out or default_out(source)
    if not out.endswith((".html", ".htm")):
        raise ConfigError(f"{out}: the report is an HTML file; give a name ending in .html")
    out_dir = os.path.dirname(os.path.abspath(out))
    page = spec.build(source, images=images, saliency=saliency, max_photos=max_photos, progress=progress,
                      out_dir=out_dir)
    text = render(page, max_photos)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(out, keep_extension=True) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    shown = len(page.photos.thumbs) if page.photos is not None else 0
    log.info("wrote %s (%s report, %.1f MB, %d pictures)", out, spec.name, len(text) / 1e6, shown)
    return out
