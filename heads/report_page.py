"""The HTML report's page: its CSS and JavaScript, plain and inline (no CDN, no fonts, no
server), so that the file opens offline from disk. :mod:`heads.report` fills :data:`PAGE`.

The page reads its photos from one JSON block (``<script type="application/json"
id="report-data">``): ``rows`` (one object per photo: ``n`` name, ``s`` score or null, ``t`` and
``a`` indices into ``thumbs`` of its thumbnail and saliency overlay or -1, ``f`` and ``g`` links
to the full photo and overlay, ``x`` why there is no picture, and where known ``m`` true MOS,
``sp`` split, ``o`` opinion spread, ``h`` the 10-bin vote histogram), ``thumbs`` (JPEG data
URIs), ``page_size``, and ``lists`` (named lists of row indices shown as fixed strips, e.g. the
best 24). The gallery pages through the rows ``page_size`` at a time, sorted and filtered in the
browser, so a page of 50,000 rows opens as fast as one of 1,000.
"""

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dde1e8; --bg: #f6f7f9; --card: #fff; --accent: #2f5f9e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: var(--card); border-bottom: 1px solid var(--line); padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: var(--muted); }
main { padding: 8px 28px 40px; max-width: 1600px; margin: 0 auto; }
section { margin: 22px 0; }
h2 { font-size: 18px; margin: 0 0 10px; }
.note { background: #fff6e0; border: 1px solid #f0d58a; padding: 8px 12px; border-radius: 6px; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; }
.figures figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
.figures img { max-width: 100%; max-height: 420px; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; background: var(--card); font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef1f5; }
details pre { background: var(--card); border: 1px solid var(--line); padding: 10px; overflow: auto; max-height: 420px; }
.controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 12px; }
.controls input { font: inherit; padding: 5px 9px; border: 1px solid #b9c0cc; border-radius: 6px; min-width: 240px; }
button { font: inherit; padding: 5px 12px; border: 1px solid #b9c0cc; border-radius: 6px; background: var(--card);
         cursor: pointer; }
button:hover { border-color: var(--accent); }
button:disabled { opacity: .45; cursor: default; }
.count { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 12px; }
.strip { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
        display: flex; flex-direction: column; cursor: pointer; }
.tile:hover { border-color: var(--accent); box-shadow: 0 2px 8px rgba(0,0,0,.08); }
.pics { display: flex; background: #e9ecf1; height: 160px; }
.strip .pics { height: 130px; }
.pics img { flex: 1 1 0; min-width: 0; object-fit: contain; width: 100%; height: 100%; }
.pics img + img { border-left: 2px solid var(--card); }
.placeholder { flex: 1; display: flex; align-items: center; justify-content: center; text-align: center;
               color: var(--muted); font-size: 12px; padding: 8px; word-break: break-word; }
.meta { padding: 6px 9px 8px; display: flex; flex-direction: column; gap: 2px; }
.score { font-size: 20px; font-weight: 650; }
.rank { color: var(--muted); font-size: 12px; font-weight: 400; margin-left: 6px; }
.name { font-size: 12px; color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.extra { font-size: 12px; color: var(--ink); }
.over { color: #a33a2b; } .under { color: #2b6ba3; }
.hist { display: block; margin-top: 2px; }
.pager { display: flex; gap: 6px; align-items: center; margin-top: 14px; }
#lightbox { position: fixed; inset: 0; background: rgba(15, 18, 25, .88); display: none; align-items: center;
            justify-content: center; flex-direction: column; z-index: 10; padding: 20px; }
#lightbox.open { display: flex; }
#lightbox .pair { display: flex; gap: 12px; max-width: 96vw; max-height: 82vh; }
#lightbox img { max-width: 47vw; max-height: 82vh; object-fit: contain; background: #222; }
#lightbox .pair.single img { max-width: 94vw; }
#lightbox p { color: #fff; margin: 10px 0 0; }
"""

JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var rows = D.rows, thumbs = D.thumbs, pageSize = D.page_size;
  var state = { desc: true, query: "", page: 0 };
  var order = rows.map(function (r, i) { return i; });

  function fmt(v, digits) { return (v === null || v === undefined) ? "n/a" : v.toFixed(digits); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function histogram(h) {
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    var peak = Math.max.apply(null, h) || 1;
    svg.setAttribute("width", "120"); svg.setAttribute("height", "26"); svg.setAttribute("class", "hist");
    h.forEach(function (p, k) {
      var bar = document.createElementNS(ns, "rect"), height = 24 * p / peak;
      bar.setAttribute("x", String(k * 12)); bar.setAttribute("width", "10");
      bar.setAttribute("y", String(25 - height)); bar.setAttribute("height", String(height));
      bar.setAttribute("fill", "#3b6ea8");
      var title = document.createElementNS(ns, "title");
      title.textContent = "score " + (k + 1) + ": " + (100 * p).toFixed(1) + "%";
      bar.appendChild(title); svg.appendChild(bar);
    });
    return svg;
  }
  function picture(src, alt) {
    var img = el("img"); img.src = src; img.alt = alt; img.loading = "lazy"; return img;
  }
  function tile(i, rank) {
    var r = rows[i], t = el("div", "tile"), pics = el("div", "pics");
    t.dataset.row = String(i); t.dataset.name = r.n;
    if (r.s !== null) { t.dataset.score = String(r.s); }
    if (r.t >= 0) { pics.appendChild(picture(thumbs[r.t], r.n)); }
    else { pics.appendChild(el("div", "placeholder", r.x || "no picture")); }
    if (r.a >= 0) { pics.appendChild(picture(thumbs[r.a], "saliency of " + r.n)); }
    t.appendChild(pics);
    var meta = el("div", "meta"), score = el("div", "score", fmt(r.s, 2));
    if (rank !== undefined) { score.appendChild(el("span", "rank", "#" + (rank + 1))); }
    meta.appendChild(score);
    meta.appendChild(el("div", "name", r.n)).title = r.n;
    if (r.m !== undefined && r.m !== null) {
      var err = (r.s === null) ? null : r.s - r.m;
      var line = el("div", "extra", "true " + fmt(r.m, 2) + (err === null ? "" : " (" + (err > 0 ? "+" : "") + fmt(err, 2) + ")"));
      if (err !== null && Math.abs(err) >= 0.5) { line.className += err > 0 ? " over" : " under"; }
      meta.appendChild(line);
    }
    if (r.sp) { meta.appendChild(el("div", "name", r.sp)); }
    if (r.o !== undefined) { meta.appendChild(el("div", "extra", "opinion spread " + fmt(r.o, 2))); }
    if (r.h) { meta.appendChild(histogram(r.h)); }
    t.appendChild(meta);
    t.addEventListener("click", function () { openBox(i); });
    return t;
  }
  function openBox(i) {
    var r = rows[i], box = document.getElementById("lightbox"), pair = box.querySelector(".pair");
    pair.textContent = "";
    var sources = [[r.f, r.t], [r.g, r.a]].filter(function (s) { return s[0] || s[1] >= 0; });
    sources.forEach(function (s) {
      var img = el("img"); img.alt = r.n;
      var fallback = s[1] >= 0 ? thumbs[s[1]] : "";
      img.addEventListener("error", function () { if (fallback && img.src !== fallback) { img.src = fallback; } });
      img.src = s[0] || fallback;
      pair.appendChild(img);
    });
    pair.className = "pair" + (sources.length < 2 ? " single" : "");
    box.querySelector("p").textContent = r.n + ": " + fmt(r.s, 2) + (r.x ? " (" + r.x + ")" : "");
    box.classList.add("open");
  }
  function closeBox() { document.getElementById("lightbox").classList.remove("open"); }

  function sorted() {
    var q = state.query.toLowerCase();
    var picked = q ? order.filter(function (i) { return rows[i].n.toLowerCase().indexOf(q) >= 0; }) : order.slice();
    picked.sort(function (a, b) {
      var x = rows[a].s, y = rows[b].s;
      if (x === null || y === null) { return (x === null) - (y === null); }
      return state.desc ? y - x : x - y;
    });
    return picked;
  }
  function render() {
    var picked = sorted(), pages = Math.max(1, Math.ceil(picked.length / pageSize));
    state.page = Math.min(state.page, pages - 1);
    var grid = document.getElementById("gallery"), start = state.page * pageSize;
    var fragment = document.createDocumentFragment();
    picked.slice(start, start + pageSize).forEach(function (i, k) { fragment.appendChild(tile(i, start + k)); });
    grid.textContent = ""; grid.appendChild(fragment);
    document.getElementById("count").textContent = picked.length.toLocaleString() + " of " +
      rows.length.toLocaleString() + " photos" + (pages > 1 ? ", page " + (state.page + 1) + " of " + pages : "");
    document.getElementById("page-info").textContent = (pages > 1) ? "page " + (state.page + 1) + " / " + pages : "";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
    document.getElementById("sort").textContent = state.desc ? "Best first" : "Worst first";
  }
  function strips() {
    Object.keys(D.lists || {}).forEach(function (id) {
      var holder = document.getElementById(id);
      if (!holder) { return; }
      D.lists[id].forEach(function (i) { holder.appendChild(tile(i)); });
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    strips();
    if (document.getElementById("gallery")) {
      document.getElementById("sort").addEventListener("click", function () { state.desc = !state.desc; state.page = 0; render(); });
      document.getElementById("filter").addEventListener("input", function (e) { state.query = e.target.value; state.page = 0; render(); });
      document.getElementById("prev").addEventListener("click", function () { state.page -= 1; render(); window.scrollTo(0, document.getElementById("all").offsetTop); });
      document.getElementById("next").addEventListener("click", function () { state.page += 1; render(); window.scrollTo(0, document.getElementById("all").offsetTop); });
      render();
    }
    document.getElementById("lightbox").addEventListener("click", closeBox);
    document.addEventListener("keydown", function (e) { if (e.key === "Escape") { closeBox(); } });
    document.body.dataset.ready = "1";
  });
})();
"""

GALLERY = """<section id="all"><h2>All photos</h2>
<div class="controls"><button id="sort" type="button" title="Toggle the order">Best first</button>
<input id="filter" type="search" placeholder="Filter by file name" aria-label="Filter by file name">
<span id="count" class="count"></span></div>
<div id="gallery" class="grid"></div>
<div class="pager"><button id="prev" type="button">Previous</button><button id="next" type="button">Next</button>
<span id="page-info" class="count"></span></div></section>"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body><header><h1>{title}</h1><p>{subtitle}</p></header>
<main>{body}</main>
<div id="lightbox" role="dialog" aria-label="Photo"><div class="pair"></div><p></p></div>
<script type="application/json" id="report-data">{data}</script>
<script>{js}</script>
</body></html>
"""
