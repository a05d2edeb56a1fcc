/* audiotl_nb documentation site: sidebar toggle and client-side search over search_index.js. */
(function () {
  "use strict";
  var root = document.body.getAttribute("data-root") || "";

  // sidebar: keep the current page in view, toggle on small screens
  var sidebar = document.getElementById("sidebar");
  var current = sidebar && sidebar.querySelector("a.current");
  if (current) sidebar.scrollTop = Math.max(0, current.offsetTop - sidebar.clientHeight / 2);
  var toggle = document.querySelector(".menu-toggle");
  if (toggle) toggle.addEventListener("click", function () { document.body.classList.toggle("menu-open"); });

  // search
  var input = document.getElementById("search-input");
  var box = document.getElementById("search-results");
  if (!input || !box) return;
  var index = null, loading = false, active = -1, results = [];

  function prep(r) { r.hl = r.h.toLowerCase(); r.pl = r.p.toLowerCase(); r.xl = r.x.toLowerCase(); return r; }
  function esc(s) {
    return s.replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; });
  }
  function load(then) {
    if (index) { then(); return; }
    if (loading) return;
    loading = true;
    var s = document.createElement("script");
    s.src = root + "search_index.js";
    s.onload = function () { index = (window.SEARCH_INDEX || []).map(prep); then(); };
    s.onerror = function () { show('<div class="r-none">The search index could not be loaded.</div>'); };
    document.head.appendChild(s);
  }
  function occurrences(text, term) {
    var n = 0, i = text.indexOf(term);
    while (i >= 0 && n < 5) { n++; i = text.indexOf(term, i + term.length); }
    return n;
  }
  function search(query) {
    var terms = query.toLowerCase().split(/\s+/).filter(Boolean);
    if (!terms.length) return [];
    var scored = [];
    index.forEach(function (r) {
      var total = 0;
      for (var k = 0; k < terms.length; k++) {
        var t = terms[k], s = 0;
        if (r.hl === t) s += 40; else if (r.hl.indexOf(t) >= 0) s += 12;
        if (r.pl.indexOf(t) >= 0) s += 4;
        s += 2 * occurrences(r.xl, t);
        if (!s) return;            // every term must match somewhere
        total += s;
      }
      scored.push([total, r]);
    });
    scored.sort(function (a, b) { return b[0] - a[0]; });
    return scored.slice(0, 25).map(function (x) { return x[1]; });
  }
  function snippet(r, terms) {
    var i = -1;
    for (var k = 0; k < terms.length && i < 0; k++) i = r.xl.indexOf(terms[k]);
    var start = Math.max(0, i - 50), text = r.x.slice(start, start + 160);
    var html = esc((start > 0 ? "…" : "") + text);
    terms.forEach(function (t) {
      if (t.length < 2) return;
      var re = new RegExp("(" + t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + ")", "gi");
      html = html.replace(re, "<mark>$1</mark>");
    });
    return html;
  }
  function show(html) { box.innerHTML = html; box.hidden = false; }
  function hide() { box.hidden = true; active = -1; }
  function render() {
    var q = input.value.trim();
    if (!q) { hide(); return; }
    results = search(q);
    var terms = q.toLowerCase().split(/\s+/).filter(Boolean);
    if (!results.length) { show('<div class="r-none">No results for “' + esc(q) + '”</div>'); return; }
    show(results.map(function (r, i) {
      return '<a href="' + root + r.u + '" data-i="' + i + '"><span class="r-head">' + esc(r.h) +
        '</span><span class="r-page">' + esc(r.p) + '</span><span class="r-text">' + snippet(r, terms) + "</span></a>";
    }).join(""));
    active = -1;
  }
  function move(d) {
    var links = box.querySelectorAll("a");
    if (!links.length) return;
    active = (active + d + links.length) % links.length;
    links.forEach(function (a, i) { a.classList.toggle("active", i === active); });
    links[active].scrollIntoView({ block: "nearest" });
  }
  input.addEventListener("focus", function () { load(function () { if (input.value.trim()) render(); }); });
  input.addEventListener("input", function () { load(render); });
  input.addEventListener("keydown", function (e) {
    if (e.key === "ArrowDown") { e.preventDefault(); move(1); }
    else if (e.key === "ArrowUp") { e.preventDefault(); move(-1); }
    else if (e.key === "Escape") { hide(); input.blur(); }
    else if (e.key === "Enter") {
      var links = box.querySelectorAll("a");
      if (links.length) { e.preventDefault(); window.location.href = links[Math.max(active, 0)].href; }
    }
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "/" && document.activeElement !== input) { e.preventDefault(); input.focus(); }
  });
  document.addEventListener("click", function (e) {
    if (!box.contains(e.target) && e.target !== input) hide();
  });
})();
