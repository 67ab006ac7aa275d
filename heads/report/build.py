"""An HTML report of scored photos: one self-contained page that opens offline from disk.

``heads.report.make.report(source, out)`` reads what stage 2 wrote and writes one HTML file (CSS,
JavaScript, charts and thumbnails inline; :mod:`heads.report.page`). The kinds of source are
registered in :data:`SOURCES` by :mod:`heads.report.sources` (each detects its own and builds its page):

- ``scores``: a CSV of ``mlsp score --out``: the photos as a gallery by predicted score (a
  toggle for worst first, a filter by name, pages of ``max_photos``), a histogram of the scores,
  the best and worst 24, and for a distribution head each photo's predicted vote histogram and
  opinion spread;
- ``run``: a run folder of ``mlsp train``: metrics per split, predicted against true MOS, loss
  and learning rate per epoch, the 24 largest over- and under-predictions of the test split, the
  gallery of its predictions and the run's configuration;
- ``personalisation``: a folder with ``evaluation.csv`` (``user,k,repeat,n_adapt,n_test,
  srcc_generic,srcc_personal``) and ``summary.json``: the gain per person, as a chart and a table.

At most ``max_photos`` thumbnails (long side :data:`THUMB_SIDE`) are made, the best and worst by
score, so the build takes time in proportion to the photos shown, whatever the number of rows; the
other rows are listed without a picture. A photo that cannot be read or is not where the source
says is a placeholder tile with the reason. Where ``saliency`` (a folder of ``mlsp explain``)
holds ``<id>.png``, that overlay is shown beside the photo.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import os
import urllib.parse
from typing import Callable

import numpy as np

from mlsp.errors import ConfigError, ImageDecodeError
from mlsp.runtime.progress import ProgressFactory
from mlsp.registry import Registry

from . import page as report_page

log = logging.getLogger(__name__)

MAX_PHOTOS = 1000  # thumbnails made, and photos on one page of the gallery
THUMB_SIDE = 256  # long side of a thumbnail, px
THUMB_QUALITY = 82  # JPEG quality of the thumbnails
EXTREMES = 24  # the best and worst, the largest over- and under-predictions
HISTOGRAM_COLUMNS = [f"p{k}" for k in range(1, 11)]


@dataclasses.dataclass
class Page:
    """What a source's builder gives: the heading, the HTML sections and the photos."""

    title: str
    subtitle: str
    sections: list  # HTML strings, in order
    photos: "Photos | None" = None


@dataclasses.dataclass(frozen=True)
class ReportSource:
    """One kind of report source: ``detect(path)`` says whether ``path`` is one, ``build(path,
    images, saliency, max_photos, progress, out_dir)`` makes its :class:`Page`."""

    name: str
    description: str
    detect: Callable
    build: Callable


SOURCES: Registry[ReportSource] = Registry("report source")


def report_source(name: str, description: str, detect: Callable):
    """Register the decorated page builder as the report of sources ``detect`` recognises
    (beside its code in :mod:`heads.report.sources`)."""
    def register(build: Callable) -> Callable:
        SOURCES.register(ReportSource(name, description, detect, build))
        return build

    return register


# --------------------------------------------------------------------------------------------
# Photos: the gallery's rows, their thumbnails and where the files are
# --------------------------------------------------------------------------------------------


class Photos:
    """The gallery's rows (a pandas frame with ``id`` and ``score``, optionally ``path``, ``mos``,
    ``split``, ``opinion_std``, ``p1``..``p10``) and the thumbnails of those shown."""

    def __init__(self, frame, out_dir: str):
        self.frame = frame.reset_index(drop=True)
        self.out_dir = out_dir
        self.thumbs: list[str] = []
        self.rows: list[dict] = []
        self.lists: dict[str, list[int]] = {}

    def build(self, max_photos: int, saliency: str | None, progress: ProgressFactory):
        """Rows for the page, thumbnails for at most ``max_photos`` of them (the best and worst)."""
        frame = self.frame
        scores = frame["score"].to_numpy(np.float64)
        order = np.argsort(np.where(np.isfinite(scores), -scores, np.inf), kind="stable")
        shown = _shown(order, max_photos)
        self.rows = [self._row(r) for r in frame.itertuples(index=False)]
        bar = progress(total=len(shown), desc="report", unit="photo")
        missing = 0
        try:
            for i in shown:
                missing += self._picture(int(i), saliency)
                bar.update(1)
        finally:
            bar.close()
        if missing:
            log.warning("%d of the %d photos shown could not be found or read: placeholder tiles say why",
                        missing, len(shown))
        return self

    def _row(self, r) -> dict:
        row = {"n": str(r.id), "s": _number(r.score), "t": -1, "a": -1}
        for key, column in (("m", "mos"), ("o", "opinion_std")):
            if hasattr(r, column) and _number(getattr(r, column)) is not None:
                row[key] = _number(getattr(r, column))
        if hasattr(r, "split") and isinstance(r.split, str):
            row["sp"] = r.split
        if all(hasattr(r, c) for c in HISTOGRAM_COLUMNS):
            hist = [_number(getattr(r, c)) for c in HISTOGRAM_COLUMNS]
            if None not in hist:
                row["h"] = [round(v, 4) for v in hist]
        if hasattr(r, "error") and isinstance(r.error, str) and r.error:
            row["x"] = f"not scored: {r.error}"
        return row

    def _picture(self, i: int, saliency: str | None) -> int:
        """The thumbnail (and saliency overlay) of row ``i``; 1 if the photo is not usable."""
        row, path = self.rows[i], self.frame.at[i, "path"] if "path" in self.frame else None
        problem = 0
        if not isinstance(path, str) or not path:
            row.setdefault("x", "photo not found (give its folder with --images)")
            problem = 1
        elif not os.path.isfile(path):
            row.setdefault("x", f"photo not found: {path}")
            problem = 1
        else:
            thumb, reason = thumbnail(path)
            if thumb is None:
                row["x"] = f"unreadable: {reason}"
                problem = 1
            else:
                row["t"] = self._add(thumb)
                row["f"] = self.link(path)
        overlay = os.path.join(saliency, *row["n"].split("/")) + ".png" if saliency else None
        if overlay and os.path.isfile(overlay):
            thumb, _ = thumbnail(overlay)
            if thumb is not None:
                row["a"] = self._add(thumb)
                row["g"] = self.link(overlay)
        return problem

    def _add(self, data_uri: str) -> int:
        self.thumbs.append(data_uri)
        return len(self.thumbs) - 1

    def link(self, path: str) -> str:
        """A link to ``path`` relative to the page's folder (the page and photos move together)."""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.out_dir))
        return urllib.parse.quote(rel.replace(os.sep, "/"))

    def strip(self, key: str, rows) -> str:
        """A fixed strip of tiles (rendered by the page's script) for the row indices ``rows``."""
        self.lists[key] = [int(i) for i in rows]
        return f'<div id="{key}" class="strip"></div>'

    def best_and_worst(self) -> str:
        scores = self.frame["score"].to_numpy(np.float64)
        finite = np.flatnonzero(np.isfinite(scores))
        ranked = finite[np.argsort(-scores[finite], kind="stable")]
        n = min(EXTREMES, len(ranked))
        return (f"<section><h2>Best {n}</h2>{self.strip('best', ranked[:n])}</section>"
                f"<section><h2>Worst {n}</h2>{self.strip('worst', ranked[::-1][:n])}</section>")

    def data(self, page_size: int) -> dict:
        return {"rows": self.rows, "thumbs": self.thumbs, "page_size": int(page_size), "lists": self.lists}


def _shown(order: np.ndarray, max_photos: int) -> np.ndarray:
    """The rows whose thumbnails are made: all, or the best and worst ``max_photos`` in all."""
    if len(order) <= max_photos:
        return order
    half = max_photos // 2
    return np.concatenate([order[:half], order[len(order) - (max_photos - half):]])


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return round(value, 4) if np.isfinite(value) else None


def thumbnail(path: str, side: int = THUMB_SIDE) -> tuple[str | None, str | None]:
    """``(data URI of a JPEG of long side <= side, None)``, or ``(None, why)`` for a file that
    cannot be decoded (:func:`mlsp.images.decode.decode_image`: orientation, 16-bit, HEIC...)."""
    from PIL import Image

    from mlsp.images.decode import decode_image

    try:
        image = decode_image(path, side)
    except ImageDecodeError as exc:
        return None, exc.reason
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


def locate(ids, images: str) -> dict:
    """{id: path} of the image files under ``images``, with the ids extraction and scoring give them."""
    from mlsp.images.decode import image_ids, list_images

    if not os.path.isdir(images):
        raise ConfigError(f"{images}: no such folder (--images: the folder of the photos)")
    paths, _ = list_images(os.path.abspath(images))
    found = dict(zip(image_ids(paths, os.path.abspath(images)), paths))
    wanted = set(map(str, ids))
    return {k: v for k, v in found.items() if k in wanted}


def place_photos(frame, images: str | None):
    """Give the frame a ``path`` column: its own where the file is there, else found by id under
    ``images``."""
    if images is None:
        return frame
    found = locate(frame["id"], images)
    if "path" not in frame:
        frame["path"] = [found.get(str(i)) for i in frame["id"]]
        return frame
    frame["path"] = [p if isinstance(p, str) and os.path.isfile(p) else found.get(str(i), p)
                     for i, p in zip(frame["id"], frame["path"])]
    return frame


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------


def figure(png: bytes | None, caption: str) -> str:
    if not png:
        return ""
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<figure><img src="{src}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def figures(*items: str) -> str:
    return '<div class="figures">' + "".join(items) + "</div>"


def table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def section(title: str, content: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{content}</section>"


def render(page: Page, max_photos: int) -> str:
    """The page's HTML: the sections, the gallery (when there are photos) and the data block."""
    body = "".join(page.sections)
    data = {"rows": [], "thumbs": [], "page_size": max_photos, "lists": {}}
    if page.photos is not None:
        body += report_page.GALLERY
        data = page.photos.data(max_photos)
    # inside <script>, "</" would end the block: JSON allows "<\/" for it
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return report_page.PAGE.format(title=html.escape(page.title), subtitle=html.escape(page.subtitle),
                                   css=report_page.CSS, body=body, data=text, js=report_page.JS)
