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
import re
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
REPO_NBS = "https://github.com/audiotl/audiotl_nb/blob/main/nbs/"   # a notebook's address on GitHub (README links)


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


def test_landing_page_links_every_tutorial(site):
    """The landing page (and README.md, rendered from the same notebook) has a Tutorials section linking each
    tutorial: by its GitHub address in the notebook and README, by its page on the site."""
    tutorials = [p for p in site.pages if p.rel.parts[0] == "tutorials"]
    assert len(tutorials) >= 4
    nb = nbformat.read(NBS / "index.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Tutorials"))
    readme = (ROOT / "README.md").read_text()
    assert cell in readme
    html = (site.out / "index.html").read_text()
    sec = html[html.index('id="tutorials"'):]
    sec = sec[:sec.index("<h2")] if "<h2" in sec else sec
    for p in tutorials:
        address = REPO_NBS + p.rel.as_posix()
        assert f"]({address})" in cell, f"the Tutorials section does not link {p.rel}"
        assert (NBS / p.rel).is_file()                                     # so the README link works on GitHub
        assert f'href="{p.url}"' in sec, f"the landing page does not link {p.url}"
        assert p.title_text in _text(sec)


def test_reliability_chapter_tabulates_every_fault_test(site):
    "The reliability chapter is in the sidebar and its table has one row per test of tests/test_faults.py."
    import ast
    page = next(p for p in site.pages if p.rel.as_posix() == "12_reliability.ipynb")
    assert f'href="{page.url}"' in (site.out / "index.html").read_text()  # in the sidebar of every page
    html = (site.out / page.url).read_text()
    src = (ROOT / "tests" / "test_faults.py").read_text()
    tests = {n.name: n.lineno for n in ast.parse(src).body
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    rows = re.findall(r'href="https://github\.com/[^"]+/tests/test_faults\.py#L(\d+)"[^>]*>([^<]+)</a>', html)
    named = {"test_" + text.strip().replace(" ", "_"): int(line) for line, text in rows}
    assert set(named) == set(tests), (f"tests without a row: {sorted(set(tests) - set(named))}; "
                                      f"rows without a test: {sorted(set(named) - set(tests))} (re-run 12_reliability)")
    lines = src.splitlines()
    for name, line in named.items():
        assert f"def {name}(" in lines[line - 1], f"the row of {name} links line {line}, not its definition"
    assert "<table" in html and "Fault injected" in html


def test_sidebar_order_is_the_one_quarto_renders(site):
    """The site's pages come in the order of the sidebar Quarto renders: the hand-written nbs/sidebar.yml
    (custom_sidebar = true), or, without one, the sidebar.yml nbdev generates. The tutorials come right
    after the landing page."""
    from fastcore.basics import str2bool
    from nbdev.config import get_config
    if str2bool(get_config().get("custom_sidebar", False)):
        quarto = _sidebar_files(yaml.safe_load((NBS / "sidebar.yml").read_text())["website"]["sidebar"]["contents"])
    else:
        from nbdev.quarto import nbdev_sidebar
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf): nbdev_sidebar(path=str(NBS), printit=True, force=True)
        quarto = _sidebar_files(yaml.safe_load(buf.getvalue())["website"]["sidebar"]["contents"])
    assert [p.rel.as_posix() for p in site.pages] == quarto
    n_tut = sum(p.section == "tutorials" for p in site.pages)
    assert [p.section for p in site.pages[:1 + n_tut]] == [None] + ["tutorials"] * n_tut
    # and the rendered sidebar of a page shows them in that order
    html = (site.out / "core.html").read_text()
    pos = [html.index(f'href="{p.url}"') for p in site.pages]
    assert pos == sorted(pos)
    assert html.index('<span class="section-title">Tutorials</span>') < html.index('href="core.html"')


def test_a_notebook_missing_from_a_hand_written_sidebar_is_refused(tmp_path):
    "With custom_sidebar = true, a notebook that nbs/sidebar.yml does not list stops the build, named."
    from fastcore.basics import str2bool
    from nbdev.config import get_config
    if not str2bool(get_config().get("custom_sidebar", False)): pytest.skip("the sidebar is generated by nbdev")
    (tmp_path / "index.ipynb").write_text("{}"); (tmp_path / "01_new.ipynb").write_text("{}")
    (tmp_path / "sidebar.yml").write_text("website:\n  sidebar:\n    contents:\n    - index.ipynb\n")
    with pytest.raises(B.BuildError, match="01_new.ipynb"): B.find_notebooks(tmp_path)
    (tmp_path / "sidebar.yml").write_text("website:\n  sidebar:\n    contents:\n    - 01_new.ipynb\n    - index.ipynb\n")
    assert [p.name for p in B.find_notebooks(tmp_path)] == ["01_new.ipynb", "index.ipynb"]


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
    index = nbformat.v4.new_notebook(cells=[md("# mini\n\n> A small site."), md("Start with [the core](00_core.ipynb#errors).\n\n"
        f"On GitHub: [the tutorial]({REPO_NBS}tutorials/01_first.ipynb), [a test]({REPO_NBS.replace('/nbs/', '/tests/')}test_x.py).")])
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
    assert 'href="tutorials/first.html"' in idx                                   # GitHub address of a notebook -> its page
    assert f'href="{REPO_NBS.replace("/nbs/", "/tests/")}test_x.py"' in idx      # any other file stays on GitHub


def test_builder_reports_broken_notebook_links(tmp_path):
    nbs = _mini_project(tmp_path)
    nb = nbformat.read(nbs / "index.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("See [gone](99_missing.ipynb)."))
    nbformat.write(nb, nbs / "index.ipynb")
    with pytest.raises(B.BuildError, match="index.ipynb: link to a notebook that is not in the site: 99_missing.ipynb"):
        B.build(out=tmp_path / "site", nbs=nbs, quiet=True, strict=True)
    nb.cells[-1] = nbformat.v4.new_markdown_cell(f"See [gone]({REPO_NBS}tutorials/02_missing.ipynb).")
    nbformat.write(nb, nbs / "index.ipynb")
    with pytest.raises(B.BuildError, match="link to a notebook that is not in the site: https://github.com/.*/02_missing.ipynb"):
        B.build(out=tmp_path / "site2", nbs=nbs, quiet=True, strict=True)


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


def _sidebar_files(items, out=None) -> list[str]:
    "The files a Quarto sidebar's `contents` names, in order (sections flattened, their `href`s included)."
    out = [] if out is None else out
    for it in items:
        if isinstance(it, str): out.append(it)
        elif isinstance(it, dict):
            for k in ("href", "file"):
                if it.get(k): out.append(it[k])
            _sidebar_files(it.get("contents", []), out)
    return out


def _file_refs(node, out=None) -> list[str]:
    "Every string value in a Quarto config that names a file (by its extension)."
    out = [] if out is None else out
    if isinstance(node, dict):
        for v in node.values(): _file_refs(v, out)
    elif isinstance(node, list):
        for v in node: _file_refs(v, out)
    elif isinstance(node, str) and re.search(r"\.(ipynb|qmd|md|yml|yaml|css|scss|html|png|svg|ico)$", node) and "://" not in node:
        out.append(node)
    return out


def test_quarto_configuration_stays_valid():
    """Readers with Quarto use nbdev's pipeline (`nbdev-docs`, `nbdev-preview`) with nbs/_quarto.yml: it and the
    files it includes parse, every file they name exists, the sidebar lists every notebook once in nbdev's order
    (index, chapters, then each folder, tutorials included, by number), and nbdev would not rewrite them."""
    q = yaml.safe_load((NBS / "_quarto.yml").read_text())
    assert q["project"]["type"] == "website"
    assert q["format"]["html"]["css"] and (NBS / q["format"]["html"]["css"]).is_file()
    configs = {"_quarto.yml": q}
    for f in q.get("metadata-files", []):
        assert (NBS / f).is_file(), f"_quarto.yml names {f}, which is missing"
        configs[f] = yaml.safe_load((NBS / f).read_text())
    assert {"nbdev.yml", "sidebar.yml"} <= set(configs)
    for name, cfg in configs.items():
        for ref in _file_refs(cfg):
            assert (NBS / ref).is_file(), f"{name} names {ref}, which does not exist in nbs/"
    # the sidebar: every notebook, once, nothing else
    listed = _sidebar_files(configs["sidebar.yml"]["website"]["sidebar"]["contents"])
    nbs = [p.relative_to(NBS).as_posix() for p in B.find_notebooks(NBS)]
    assert listed[0] == "index.ipynb"
    assert sorted(listed) == sorted(nbs) and len(set(listed)) == len(listed), \
        f"not listed: {sorted(set(nbs) - set(listed))}; not notebooks: {sorted(set(listed) - set(nbs))}"
    assert listed == nbs                                                   # the site's order
    tut = [f for f in listed if f.startswith("tutorials/")]
    assert len(tut) >= 4 and tut == sorted(tut) and [t.split("/")[1][:3] for t in tut] == [f"{i:02d}_" for i in range(1, len(tut) + 1)]
    sections = [it["section"].lower() for it in configs["sidebar.yml"]["website"]["sidebar"]["contents"] if isinstance(it, dict)]
    assert "tutorials" in sections
    # nbdev regenerates nbdev.yml, and sidebar.yml unless it is written by hand (custom_sidebar = true), before
    # rendering: the committed files are already what it writes, so a Quarto build changes nothing in the tree
    from nbdev.config import get_config
    from nbdev.quarto import nbdev_sidebar
    cfg = get_config()
    from fastcore.basics import str2bool
    if not str2bool(cfg.get("custom_sidebar", False)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf): nbdev_sidebar(path=str(NBS), printit=True, force=True)
        assert yaml.safe_load(buf.getvalue()) == configs["sidebar.yml"], "sidebar.yml differs from what nbdev writes"
    site_cfg = configs["nbdev.yml"]
    assert site_cfg["project"]["output-dir"] == Path(cfg.doc_path).name
    w = site_cfg["website"]
    assert w["title"] == cfg.title and w["repo-url"] == cfg.git_url and w["repo-branch"] == cfg.branch
    assert w["site-url"] == f"{cfg.doc_host}{cfg.doc_baseurl}" and w["description"] == cfg.description
    import nbdev.quarto as Q
    if hasattr(Q, "_nbdev_yml"):                                           # nbdev 3's template for nbdev.yml
        vals = {k: cfg[k] for k in ["title", "description", "branch", "git_url", "doc_host", "doc_baseurl"]}
        assert (NBS / "nbdev.yml").read_text() == Q._nbdev_yml.format(doc_path=Path(cfg.doc_path).name, **vals)
