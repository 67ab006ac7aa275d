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
