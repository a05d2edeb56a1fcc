"""The documentation site: built from the committed notebooks (no execution) and opened in headless Chromium.

`python -m docs.build` writes the site; these tests build it into a temporary folder (or into
$AUDIOTL_DOCS_OUT when set, to keep it), check its structure against the notebooks, then serve it on
127.0.0.1 and open every page in Chromium: no console errors, no broken internal link or anchor,
every image loaded with a non-zero size, search finds API entries. The landing page's screenshot
is saved with the build as screenshot.png.
"""
from __future__ import annotations

import base64
import contextlib
import importlib
import inspect
import io
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from docs import build as B  # noqa: E402
from docs import check as C  # noqa: E402

NBS = ROOT / "nbs"


def _text(html: str) -> str:
    "The text of an html page (tags dropped, entities decoded), e.g. code highlighted into spans."
    import html as _h
    import re
    return _h.unescape(re.sub(r"<[^>]+>", "", html))


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def site():
    "The real site, built once for this module."
    keep = os.environ.get("AUDIOTL_DOCS_OUT")
    tmp = None
    if keep: out = Path(keep)
    else:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="audiotl-docs-")
        out = Path(tmp.name) / "site"
    s = B.build(out=out, nbs=NBS, quiet=True)
    print(f"docs build: {len(s.pages)} pages in {s.seconds:.1f} s -> {out}")
    yield s
    if tmp is not None: tmp.cleanup()


def _chromium_or_skip():
    reason = C.ensure_chromium()
    if reason: pytest.skip(reason)
    pytest.importorskip("selenium")


# ----------------------------------------------------------------------------------------------
# the real site
# ----------------------------------------------------------------------------------------------
def test_one_page_per_notebook_in_notebook_order(site):
    manifest = json.loads((site.out / "manifest.json").read_text())
    nbs = [p.relative_to(NBS).as_posix() for p in B.find_notebooks(NBS)]
    assert [p["notebook"] for p in manifest["pages"]] == nbs
    assert nbs[0] == "index.ipynb" and manifest["pages"][0]["url"] == "index.html"
    for rel in NBS.rglob("*.ipynb"):
        r = rel.relative_to(NBS)
        if any(part.startswith(("_", ".")) for part in r.parts): continue
        assert r.as_posix() in nbs, f"{r} has no page"
    for p in manifest["pages"]: assert (site.out / p["url"]).is_file()
    assert manifest["problems"] == [], manifest["problems"]
    tutorials = {"tutorials/ontology_study.html", "tutorials/pairtune.html", "tutorials/sed_distillation.html",
                 "tutorials/your_dataset.html"}
    assert tutorials <= {p["url"] for p in manifest["pages"]}
    html = (site.out / "index.html").read_text()
    assert '<span class="section-title">Tutorials</span>' in html


def test_sidebar_matches_nbdev_sidebar_for_quarto(site):
    "The sidebar lists the same notebooks in the same order as the sidebar.yml nbdev writes for Quarto."
    from nbdev.quarto import nbdev_sidebar
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): nbdev_sidebar(path=str(NBS), printit=True, force=True)
    def flat(items, out):
        for it in items:
            if isinstance(it, str): out.append(it)
            else:
                if it.get("href"): out.append(it["href"])
                flat(it.get("contents", []), out)
        return out
    quarto = [p for p in flat(yaml.safe_load(buf.getvalue())["website"]["sidebar"]["contents"], []) if p.endswith(".ipynb")]
    assert [p.rel.as_posix() for p in site.pages] == quarto
    # and the rendered sidebar of a page shows them in that order
    html = (site.out / "core.html").read_text()
    pos = [html.index(f'href="{p.url}"') for p in site.pages]
    assert pos == sorted(pos)


def test_api_entries_for_exported_functions_and_classes(site):
    "Every exported function/class of a notebook's module has an entry with nbdev's signature and docstring."
    from nbdev.showdoc import show_doc
    from fastcore.docments import MarkdownRenderer
    checked = 0
    for page in site.pages:
        if not page.module: continue
        mod = importlib.import_module(f"audiotl_nb.{page.module}")
        names = {e.name for e in page.api}
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", None) != mod.__name__: continue
            if getattr(obj, "__name__", name) != name: continue  # an alias of another symbol
            assert name in names, f"{page.rel}: no API entry for {name}"
            checked += 1
        html = (site.out / page.url).read_text()
        for k, e in enumerate(page.api):
            assert f'id="{e.anchor}"' in html
            if k % 5: continue  # re-rendering every entry costs seconds; every fifth one is enough
            ref = MarkdownRenderer(eval(e.name, vars(importlib.import_module(e.module))), name=e.name)  # noqa: S307
            assert e.signature == str(ref.dm)
    assert checked > 100
    core = (site.out / "core.html").read_text()
    from audiotl_nb.core import check_name
    sec = core[core.index('id="check_name"'):]
    sec = sec[:sec.index("</section>")]
    assert "check_name" in sec and "valid" in sec and check_name.__doc__.split("`")[0].strip() in sec


def test_pages_carry_prose_code_outputs_and_figures(site):
    manifest = json.loads((site.out / "manifest.json").read_text())
    assert sum(p["figures"] for p in manifest["pages"]) > 0
    for f in (site.out / "figures").iterdir():
        assert f.stat().st_size > 100
        if f.suffix == ".png": assert min(_png_size(f)) > 10
    index = (site.out / "index.html").read_text()
    nb = nbformat.read(NBS / "index.ipynb", as_version=4)
    assert 'class="cell code"' in index and 'class="output' in index
    first_md = next(c.source for c in nb.cells[1:] if c.cell_type == "markdown")
    assert B.plain_text(B.make_markdown().render(first_md))[:60] in B.plain_text(index)
    # search index
    idx = json.loads((site.out / "search.json").read_text())
    assert any(r["h"] == "check_name" and r["u"] == "core.html#check_name" for r in idx)


def test_browser_every_page_loads_links_and_images(site):
    _chromium_or_skip()
    rep = C.check_site(site.out)
    print(rep.summary())
    assert rep.ok, rep.summary()
    assert set(rep.pages) >= {p.url for p in site.pages}
    assert rep.links_checked > len(site.pages) * 10 and rep.images_checked > 0
    assert rep.screenshot == site.out / "screenshot.png"
    w, h = _png_size(rep.screenshot)
    assert w >= 800 and h >= 600


# ----------------------------------------------------------------------------------------------
# the builder and the checker on a small handmade project (fast, and able to fail)
# ----------------------------------------------------------------------------------------------
def _png_bytes() -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot([0, 1], [1, 0])
    buf = io.BytesIO(); fig.savefig(buf, format="png"); plt.close(fig)
    return buf.getvalue()


def _code(src, outputs=()):
    c = nbformat.v4.new_code_cell(src)
    c.outputs = [nbformat.from_dict(o) for o in outputs]
    return c


def _mini_project(d: Path) -> Path:
    nbs = d / "nbs"
    (nbs / "tutorials").mkdir(parents=True)
    md, code = nbformat.v4.new_markdown_cell, _code
    png = base64.b64encode(_png_bytes()).decode()
    index = nbformat.v4.new_notebook(cells=[md("# mini\n\n> A small site."), md("Start with [the core](00_core.ipynb#errors).")])
    core = nbformat.v4.new_notebook(cells=[
        md("# Core bits\n\n> One-line summary of the chapter."),
        code("#| default_exp core"),
        md("## Errors\n\nA name must be valid: $d(t) = \\min_{s \\in S} \\mathrm{dist}(t, s)$ and\n\n$$x^2$$\n\nuse `check_name`."),
        code("#| export\ndef check_name(name, valid, kind='name'):\n    \"doc\"\n    return name"),
        code("#| hide\nSECRET_HIDDEN_TOKEN = 1"),
        code("#| echo: false\nprint('ECHO_FALSE_SOURCE')", [{"output_type": "stream", "name": "stdout", "text": "visible output\n"}]),
        code("plot()", [{"output_type": "display_data", "metadata": {},
                         "data": {"image/png": png, "text/plain": "<Figure size 100x75>"}}]),
        code("warn()", [{"output_type": "stream", "name": "stderr", "text": "\x1b[31mred warning\x1b[0m\n"}]),
        md("Back to [the start](index.ipynb) or the [tutorial](tutorials/01_first.ipynb)."),
    ])
    tut = nbformat.v4.new_notebook(cells=[md("# First tutorial\n\n> Steps."), md("See `check_name` and [core](../00_core.ipynb).")])
    for nb, p in ((index, nbs / "index.ipynb"), (core, nbs / "00_core.ipynb"), (tut, nbs / "tutorials" / "01_first.ipynb")):
        nbformat.write(nb, p)
    shutil.copy(NBS / "nbdev.yml", nbs / "nbdev.yml")
    return nbs


def test_builder_on_a_small_project(tmp_path):
    nbs = _mini_project(tmp_path)
    s = B.build(out=tmp_path / "site", nbs=nbs, quiet=True, strict=True)
    assert [p.url for p in s.pages] == ["index.html", "core.html", "tutorials/first.html"]
    core = (tmp_path / "site" / "core.html").read_text()
    assert "SECRET_HIDDEN_TOKEN" not in core and "default_exp" not in core       # hidden / directive cells
    assert "ECHO_FALSE_SOURCE" not in core and "visible output" in core          # echo: false keeps the output
    assert "<math" in core and 'display="block"' in core                          # $...$ and $$...$$ as MathML
    assert 'id="check_name"' in core and "def check_name(" in _text(core)              # API entry from the real module
    assert 'href="#check_name"' in core                                           # `check_name` links to it
    assert "red warning" in core and "\x1b" not in core                           # ANSI stripped
    assert 'href="index.html"' in core and 'href="tutorials/first.html"' in core  # notebook links rewritten
    tut = (tmp_path / "site" / "tutorials" / "first.html").read_text()
    assert 'href="../core.html#check_name"' in tut and 'href="../core.html"' in tut
    assert 'href="../static/style.css"' in tut
    figs = list((tmp_path / "site" / "figures").glob("*.png"))
    assert len(figs) == 1 and _png_size(figs[0]) == (100, 75)
    idx = (tmp_path / "site" / "index.html").read_text()
    assert 'href="core.html#errors"' in idx


def test_builder_reports_broken_notebook_links(tmp_path):
    nbs = _mini_project(tmp_path)
    nb = nbformat.read(nbs / "index.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("See [gone](99_missing.ipynb)."))
    nbformat.write(nb, nbs / "index.ipynb")
    with pytest.raises(B.BuildError, match="index.ipynb: link to a notebook that is not in the site: 99_missing.ipynb"):
        B.build(out=tmp_path / "site", nbs=nbs, quiet=True, strict=True)


def test_checker_finds_broken_links_images_and_script_errors(tmp_path):
    _chromium_or_skip()
    nbs = _mini_project(tmp_path)
    out = tmp_path / "site"
    B.build(out=out, nbs=nbs, quiet=True, strict=True)
    rep = C.check_site(out)
    assert rep.ok, rep.summary()
    assert sorted(rep.pages) == ["core.html", "index.html", "tutorials/first.html"]
    # now break it in three ways
    core = out / "core.html"
    html = core.read_text()
    html = html.replace("</main>", '<a href="nowhere.html">x</a><a href="index.html#no-such-anchor">y</a>'
                                   '<img src="figures/missing.png"><script>undefinedFunction()</script></main>')
    core.write_text(html)
    rep = C.check_site(out, screenshot=False)
    msgs = "\n".join(m for _, m in rep.errors)
    assert not rep.ok
    assert "broken a nowhere.html (HTTP 404)" in msgs
    assert "missing anchor index.html#no-such-anchor" in msgs
    assert "image figures/missing.png did not load" in msgs
    assert "undefinedFunction" in msgs


def test_quarto_configuration_stays_valid():
    "Readers with Quarto use nbdev's pipeline: its configuration parses and the files it names exist."
    q = yaml.safe_load((NBS / "_quarto.yml").read_text())
    assert q["project"]["type"] == "website"
    for f in q.get("metadata-files", []):
        assert (NBS / f).is_file(), f"_quarto.yml names {f}, which is missing"
        yaml.safe_load((NBS / f).read_text())
    side = yaml.safe_load((NBS / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    assert side[0] == "index.ipynb"
