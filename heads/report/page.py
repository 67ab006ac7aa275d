"""The HTML report's page: its template, CSS and JavaScript, package data files in ``static/``
(``page.html``, ``gallery.html``, ``report.css``, ``report.js``) put inline into the one HTML
file (no CDN, no fonts, no server), so that it opens offline from disk.
:mod:`heads.report.build` fills :data:`PAGE`.

The page reads its photos from one JSON block (``<script type="application/json"
id="report-data">``): ``rows`` (one object per photo: ``n`` name, ``s`` score or null, ``t`` and
``a`` indices into ``thumbs`` of its thumbnail and saliency overlay or -1, ``f`` and ``g`` links
to the full photo and overlay, ``x`` why there is no picture, and where known ``m`` true MOS,
``sp`` split, ``o`` opinion spread, ``h`` the 10-bin vote histogram), ``thumbs`` (JPEG data
URIs), ``page_size``, and ``lists`` (named lists of row indices shown as fixed strips, e.g. the
best 24). The gallery pages through the rows ``page_size`` at a time, sorted and filtered in the
browser, so a page of 50,000 rows opens as fast as one of 1,000.
"""

from importlib.resources import files


def _static(name: str) -> str:
    return files(__package__).joinpath("static", name).read_text(encoding="utf-8")


CSS = _static("report.css")
JS = _static("report.js")
GALLERY = _static("gallery.html")  # the paged gallery of every photo
PAGE = _static("page.html")  # str.format: title, subtitle, css, body, data, js
