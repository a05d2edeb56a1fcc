"""Build the documentation site from the notebooks, offline, without executing them.

    python -m docs.build                 # writes _docs/ (nbdev's doc_path)
    python -m docs.build --out DIR       # somewhere else
    python -m docs.build --check         # then open every page in headless Chromium (docs/check.py)
                                         # and save a screenshot of the landing page as DIR/screenshot.png

The pages are the committed notebooks with their stored outputs, processed the way nbdev prepares
them for Quarto (front matter from the `# Title` / `> summary` cell, `#| hide` and `#| export` cells
removed, a `show_doc` entry after every exported definition). The API entries are rendered from the
installed package with nbdev's own `show_doc` renderer, so they show the signature and docstring a
Quarto build would show. The notebooks are never run: the build takes seconds.

The site is plain HTML + CSS with two small scripts (search, sidebar): it works from a web server
or straight from the file system, with nothing fetched from the network. Math is converted to
MathML at build time, figures are written out as image files, and search uses an index written
as a script (`search_index.js`).
"""
from __future__ import annotations

import argparse
import base64
import functools
import html
import importlib
import importlib.util
import json
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEMPLATES, STATIC = HERE / "templates", HERE / "static"

_ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")
_OPT_LINE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_SHOW_DOC = re.compile(r"^\s*show_doc\((.+?)(?:,\s*\w+\s*=.*)?\)\s*$", re.S)
_TAGS = re.compile(r"<[^>]+>")
_WS = re.compile(r"\s+")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class BuildError(Exception):
    "The site could not be built (the message names the notebook and cell)."


# ----------------------------------------------------------------------------------------------
# Finding the notebooks: the same files, order and sections as the sidebar.yml Quarto renders
# ----------------------------------------------------------------------------------------------
@functools.cache
def _nbdev_config():
    from nbdev.config import get_config
    return get_config()


def _custom_sidebar_order(nbs: Path) -> list[str] | None:
    """The notebooks of `nbs/sidebar.yml`, in its order, when nbdev is told the sidebar is written by hand
    (`custom_sidebar = true`); None when nbdev generates it."""
    from fastcore.basics import str2bool
    if not str2bool(_nbdev_config().get("custom_sidebar", False)) or not (nbs / "sidebar.yml").is_file(): return None
    import yaml
    out = []
    def walk(items):
        for it in items:
            if isinstance(it, str): out.append(it)
            elif isinstance(it, dict):
                if isinstance(it.get("href"), str): out.append(it["href"])
                walk(it.get("contents", []))
    walk(yaml.safe_load((nbs / "sidebar.yml").read_text())["website"]["sidebar"]["contents"])
    return [f for f in out if f.endswith(".ipynb")]


def find_notebooks(nbs: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Notebooks under `nbs` in the sidebar's order. With a hand-written sidebar (`custom_sidebar = true`), the
    order of `nbs/sidebar.yml`, which must list every notebook once; otherwise nbdev's generated order: `index`
    first, then files by name, then each sub-folder (a sidebar section) the same way. Folders and files
    starting with `_` or `.` are skipped."""
    nbs = Path(nbs)
    files = []
    for p in nbs.rglob("*.ipynb"):
        rel = p.relative_to(nbs)
        if any(part.startswith(("_", ".")) for part in rel.parts): continue
        if any(rel.match(g) or str(rel).startswith(g.rstrip("/") + "/") for g in exclude): continue
        files.append(rel)
    listed = _custom_sidebar_order(nbs)
    if listed is not None:
        on_disk = {r.as_posix() for r in files}
        missing = sorted(on_disk - set(listed))
        if missing: raise BuildError(f"nbs/sidebar.yml does not list {', '.join(missing)}: add them where readers should find them")
        return [nbs / f for f in listed if f in on_disk]
    def key(rel: Path):
        return (rel.parent.parts, "00" if rel.name.startswith("index.") else rel.name)
    return [nbs / r for r in sorted(files, key=key)]


def page_url(rel: Path) -> str:
    "The html path Quarto gives a notebook: numeric prefix dropped (`05a_models.cnn.ipynb` -> `models.cnn.html`)."
    from nbdev.config import nbpath2html
    return nbpath2html(rel).as_posix()


def section_name(rel: Path) -> str | None:
    return None if len(rel.parts) == 1 else re.sub(r"^\d+_", "", rel.parts[0])


# ----------------------------------------------------------------------------------------------
# Processing a notebook like nbdev does for Quarto (but without executing anything)
# ----------------------------------------------------------------------------------------------
def process_notebook(path: Path):
    "Read `path` and apply nbdev's documentation processors, except the ones that execute code."
    from fastcore.nbio import read_nb
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    from nbdev import processors as P
    nb = read_nb(path)
    nb.path_ = str(path)
    default_exp = P._default_exp(nb)
    procs = [FrontmatterProc, P.populate_language, P.add_show_docs, P.strip_ansi, P.hide_line, P.filter_stream_,
             P.rm_header_dash, P.clean_show_doc, P.rm_export, _clean_magics(), P.hide_, P.add_fold, P.mv_exports,
             P.strip_hidden_metadata]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NBProcessor(nb=nb, procs=procs, rm_directives=True).process()
    cells = [c for c in nb.cells if c.cell_type != "raw"]
    # nbdev inserts the entries of one cell in reverse order; show them in definition order
    out, i = [], 0
    while i < len(cells):
        if getattr(cells[i], "has_sd", False):
            j = i
            while j < len(cells) and getattr(cells[j], "has_sd", False): j += 1
            out += cells[i:j][::-1]; i = j
        else:
            out.append(cells[i]); i += 1
    return nb.frontmatter_ or {}, default_exp, out


def _clean_magics():
    "nbdev's clean_magics (drop housekeeping magics such as %load_ext), reading the configuration once."
    from nbdev import processors as P
    mm = str(_nbdev_config().get("strip_magics", P._def_strip_magics)).split()
    pat = re.compile(rf"^\s*({'|'.join(re.escape(m) for m in mm)})\b.*", re.MULTILINE) if mm else None
    def clean_magics(cell):
        if pat is None or cell.cell_type != "code": return
        cell.source = pat.sub("", cell.source).strip()
    return clean_magics


def split_options(source: str) -> tuple[dict, str]:
    "Leading `#| key: value` lines of a code cell (Quarto options such as echo, output, code-fold) and the rest."
    lines, opts = source.splitlines(), {}
    while lines and (m := _OPT_LINE.match(lines[0])):
        opts[m.group(1)] = m.group(2).strip().strip('"\'')
        lines.pop(0)
    return opts, "\n".join(lines).strip("\n")


def _false(v) -> bool: return str(v).strip().lower() in ("false", "no", "0")


# ----------------------------------------------------------------------------------------------
# API entries
# ----------------------------------------------------------------------------------------------
@dataclass
class ApiEntry:
    name: str           # as shown: `check_name`, `Registry.register`
    anchor: str         # html id
    module: str         # audiotl_nb.core
    signature: str = ""
    doc: str = ""
    markdown: str = ""  # what nbdev's show_doc renders


@functools.cache
def _lib_name() -> str:
    return Path(_nbdev_config().lib_path).name


def resolve_symbol(expr: str, module: str | None):
    """The object `show_doc(expr)` documents, looked up in the notebook's module first, then in every module
    of the package (a notebook may export into another module with `#| export other`)."""
    lib = _lib_name()
    tried = []
    candidates = [f"{lib}.{module}"] if module else []
    from importlib import import_module
    try:
        idx = import_module(f"{lib}._modidx").d["syms"]
        head = expr.split(".")[0]
        candidates += [m for m, syms in idx.items() if f"{m}.{head}" in syms and m not in candidates]
    except Exception:  # noqa: BLE001 - the index is only a hint
        pass
    for modname in candidates:
        try: mod = import_module(modname)
        except Exception as e:  # noqa: BLE001
            tried.append(f"{modname} ({type(e).__name__}: {e})"); continue
        try: return eval(expr, dict(vars(mod))), modname  # noqa: S307 - a dotted name from our own notebooks
        except Exception as e:  # noqa: BLE001
            tried.append(f"{modname} ({type(e).__name__}: {e})")
    raise LookupError(f"cannot resolve `{expr}` in " + (", ".join(tried) or "any module"))


def api_entry(expr: str, module: str | None) -> ApiEntry:
    "Render `show_doc(expr)` with nbdev's markdown renderer."
    from fastcore.docments import MarkdownRenderer
    from nbdev.showdoc import show_doc
    obj, modname = resolve_symbol(expr, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = show_doc(obj, renderer=MarkdownRenderer, name=expr)
    if r is None: raise LookupError(f"show_doc({expr}) rendered nothing")
    return ApiEntry(name=expr, anchor=expr.lower(), module=modname, signature=str(r.dm), doc=r.docs or "",
                    markdown=r._repr_markdown_())


# ----------------------------------------------------------------------------------------------
# Markdown: markdown-it (CommonMark + tables + footnotes + $math$ as MathML), with url rewriting,
# heading ids and links from `symbol` to its API entry
# ----------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    s = re.sub(r"[^\w\s.-]", "", _TAGS.sub("", html.unescape(text)).strip().lower())
    return re.sub(r"[\s]+", "-", s) or "section"


def highlight(code: str, lang: str | None = None, attrs=None) -> str:
    from pygments import highlight as _hl
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import TextLexer, get_lexer_by_name
    try: lexer = get_lexer_by_name(lang or "python")
    except Exception: lexer = TextLexer()  # noqa: BLE001
    return _hl(code, lexer, HtmlFormatter(nowrap=True))


def math_html(tex: str, options: dict) -> str:
    from latex2mathml.converter import convert
    display = "block" if options.get("display_mode") else "inline"
    try: return convert(tex.strip(), display=display)
    except Exception:  # noqa: BLE001 - show the source rather than fail the build
        cls = "math-src block" if display == "block" else "math-src"
        return f'<code class="{cls}">{html.escape(tex)}</code>'


def make_markdown():
    from markdown_it import MarkdownIt
    from markdown_it.token import Token
    from mdit_py_plugins.dollarmath import dollarmath_plugin
    from mdit_py_plugins.footnote import footnote_plugin

    def _hl(code, lang, attrs):
        return f'<pre class="highlight"><code>{highlight(code, lang)}</code></pre>'

    md = (MarkdownIt("commonmark", {"html": True, "highlight": _hl})
          .enable("table").enable("strikethrough")
          .use(footnote_plugin)
          .use(dollarmath_plugin, allow_labels=False, double_inline=True, renderer=math_html))

    def heading_ids(state):
        "Give each heading a unique id (per page) and record it in env for the table of contents."
        page = state.env.get("page")
        toks = state.tokens
        for i, t in enumerate(toks):
            if t.type != "heading_open": continue
            text = toks[i + 1].content if i + 1 < len(toks) else ""
            if page is not None: t.attrSet("id", page.unique_id(slugify(text)))
            state.env.setdefault("headings", []).append((int(t.tag[1]), t.attrGet("id"), text))

    def rewrite(state):
        page = state.env.get("page")
        if page is None: return
        for t in state.tokens:
            if t.type != "inline" or not t.children: continue
            new = []
            for c in t.children:
                if c.type == "link_open": c.attrSet("href", page.site.rewrite_link(page, c.attrGet("href") or ""))
                elif c.type == "image": c.attrSet("src", page.site.copy_asset(page, c.attrGet("src") or "", state.env))
                if c.type == "code_inline" and (target := page.site.symbol_link(page, c.content)) and not (
                        new and new[-1].type == "link_open"):
                    a = Token("link_open", "a", 1); a.attrSet("href", target); a.attrSet("class", "api-link")
                    new += [a, c, Token("link_close", "a", -1)]
                else: new.append(c)
            t.children = new

    md.core.ruler.push("heading_ids", heading_ids)
    md.core.ruler.push("rewrite", rewrite)
    return md


def inline_text(token) -> str:
    "The words of an inline markdown token: text, code and math content without the markup."
    if not token.children: return token.content
    return "".join(c.content if c.type in ("text", "code_inline", "math_inline", "math_single") else
                   " " if c.type in ("softbreak", "hardbreak") else "" for c in token.children)


def plain_text(html_text: str) -> str:
    return _WS.sub(" ", html.unescape(_TAGS.sub(" ", html_text))).strip()


# ----------------------------------------------------------------------------------------------
# Pages and the site
# ----------------------------------------------------------------------------------------------
@dataclass
class Page:
    src: Path
    rel: Path
    url: str
    title: str
    description: str = ""
    module: str | None = None
    section: str | None = None
    cells: list = field(default_factory=list)
    api: list = field(default_factory=list)        # ApiEntry in page order
    body: str = ""
    toc: list = field(default_factory=list)        # (level, id, text)
    search: list = field(default_factory=list)     # search-index records
    site: "Site" = None
    _ids: set = field(default_factory=set)
    n_figures: int = 0
    title_html: str = ""

    @property
    def title_text(self) -> str: return plain_text(self.title_html) if self.title_html else self.title

    @property
    def root(self) -> str:
        "Relative path from this page back to the site root."
        return "../" * self.url.count("/")

    def unique_id(self, base: str) -> str:
        i, cand = 1, base
        while cand in self._ids: i += 1; cand = f"{base}-{i}"
        self._ids.add(cand)
        return cand


class Site:
    def __init__(self, nbs: Path, out: Path, exclude=(), strict: bool = False, log=print):
        self.nbs, self.out, self.strict, self.log = Path(nbs).resolve(), Path(out).resolve(), strict, log
        self.exclude = tuple(exclude)
        self.problems: list[str] = []
        self.pages: list[Page] = []
        self.by_nb: dict[str, Page] = {}
        self.symbols: dict[str, tuple[Page, str]] = {}
        meta = self._site_meta()
        self.title, self.description, self.repo_url = meta

    # -- configuration ---------------------------------------------------------------------
    def _site_meta(self):
        import yaml
        title, desc, repo = None, "", None
        p = self.nbs / "nbdev.yml"
        if p.exists():
            w = (yaml.safe_load(p.read_text()) or {}).get("website", {})
            title, desc, repo = w.get("title"), w.get("description", ""), w.get("repo-url")
        cfg = _nbdev_config()
        return title or str(cfg.get("title", cfg.lib_name)), desc or str(cfg.get("description", "")), repo

    def problem(self, msg: str):
        self.problems.append(msg)
        self.log(f"warning: {msg}")

    # -- links ------------------------------------------------------------------------------
    def repo_notebook(self, href: str) -> Path | None:
        """The notebook an absolute link into this repository names (`{repo-url}/blob/{branch}/nbs/x.ipynb`,
        the form that also works in README.md on GitHub), or None for any other link."""
        if not self.repo_url: return None
        base = self.repo_url.rstrip("/") + "/blob/"
        path = href.partition("#")[0].partition("?")[0]
        if not (path.startswith(base) and path.endswith(".ipynb")): return None
        parts = unquote(path[len(base):]).split("/")[1:]          # drop the branch
        if len(parts) < 2 or parts[0] != self.nbs.name: return None
        return self.nbs.joinpath(*parts[1:])

    def rewrite_link(self, page: Page, href: str) -> str:
        """Links to notebooks become links to their pages; everything else is left alone. A notebook is
        named by a path relative to the linking notebook, or by its address in the repository."""
        if (repo_nb := self.repo_notebook(href or "")) is not None:
            frag = href.partition("#")[2]
            rel = repo_nb.relative_to(self.nbs)
            if str(rel) in self.by_nb:
                return self.relurl(page, self.by_nb[str(rel)].url) + (f"#{frag}" if frag else "")
            self.problem(f"{page.rel}: link to a notebook that is not in the site: {href}")
            return href
        if not href or href.startswith(("#", "mailto:", "data:")) or urlsplit(href).scheme: return href
        path, _, frag = href.partition("#")
        if path.endswith(".ipynb"):
            target = (page.src.parent / unquote(path)).resolve()
            try: rel = target.relative_to(self.nbs)
            except ValueError: return href
            if str(rel) in self.by_nb:
                return self.relurl(page, self.by_nb[str(rel)].url) + (f"#{frag}" if frag else "")
            self.problem(f"{page.rel}: link to a notebook that is not in the site: {href}")
        return href

    def relurl(self, page: Page, target: str) -> str:
        "URL of site path `target` relative to `page`."
        return page.root + target

    def symbol_link(self, page: Page, code: str) -> str | None:
        name = code.strip()
        name = name[:-2] if name.endswith("()") else name
        lib = _lib_name() + "."
        for cand in (name, name.split(".", 2)[-1] if name.startswith(lib) else None):
            if cand and cand in self.symbols:
                p, anchor = self.symbols[cand]
                return (self.relurl(page, p.url) if p is not page else "") + f"#{anchor}"
        return None

    def copy_asset(self, page: Page, src: str, env: dict) -> str:
        "Copy an image the notebook's markdown refers to (a file next to it or a cell attachment) into the site."
        if not src or src.startswith("data:") or urlsplit(src).scheme in ("http", "https"): return src
        if src.startswith("attachment:"):
            name = unquote(src[len("attachment:"):])
            att = (env.get("attachments") or {}).get(name)
            if not att:
                self.problem(f"{page.rel}: missing attachment {name}"); return src
            mime, data = next(iter(att.items()))
            return self.write_figure(page, base64.b64decode(data), mime)
        p = (page.src.parent / unquote(src.split("#")[0])).resolve()
        if not p.is_file():
            self.problem(f"{page.rel}: image not found: {src}"); return src
        try: rel = p.relative_to(self.nbs)
        except ValueError: rel = Path("assets") / p.name
        dest = self.out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
        return self.relurl(page, quote(rel.as_posix()))

    def write_figure(self, page: Page, data: bytes, mime: str) -> str:
        ext = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/svg+xml": "svg"}.get(mime, "bin")
        page.n_figures += 1
        rel = f"figures/{page.url[:-5]}-{page.n_figures}.{ext}"
        dest = self.out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return self.relurl(page, rel)

    # -- building -----------------------------------------------------------------------------
    def collect(self):
        "Pass 1: find and process every notebook, resolve its API entries."
        for path in find_notebooks(self.nbs, self.exclude):
            rel = path.relative_to(self.nbs)
            try: fm, default_exp, cells = process_notebook(path)
            except Exception as e:  # noqa: BLE001
                raise BuildError(f"{rel}: cannot process the notebook: {type(e).__name__}: {e}") from e
            url = page_url(rel)
            title = str(fm.get("title") or rel.stem)
            page = Page(src=path, rel=rel, url=url, title=title, description=str(fm.get("description") or ""),
                        module=default_exp, section=section_name(rel), cells=cells, site=self)
            if any(p.url == url for p in self.pages):
                raise BuildError(f"{rel} and another notebook both become {url}")
            self.pages.append(page); self.by_nb[str(rel)] = page
            for cell in cells:
                if cell.cell_type != "code" or not getattr(cell, "has_sd", False): continue
                _, src = split_options(cell.source)
                m = _SHOW_DOC.match(src)
                if not m: continue
                try: entry = api_entry(m.group(1).strip(), default_exp)
                except Exception as e:  # noqa: BLE001
                    self.problem(f"{rel}: no API entry for {m.group(1)}: {e}"); cell.api_entry_ = None; continue
                entry.anchor = page.unique_id(entry.anchor)
                cell.api_entry_ = entry
                page.api.append(entry)
                self.symbols.setdefault(entry.name, (page, entry.anchor))
        if not self.pages: raise BuildError(f"no notebooks found under {self.nbs}")
        if not any(p.url == "index.html" for p in self.pages):
            raise BuildError(f"{self.nbs} has no index.ipynb for the landing page")

    def render_page(self, page: Page, md):
        parts, sections = [], []
        cur = {"h": page.title_text, "a": "", "x": []}
        sections.append(cur)

        def new_section(anchor, text):
            nonlocal cur
            cur = {"h": text, "a": anchor, "x": []}
            sections.append(cur)

        for i, cell in enumerate(page.cells):
            where = f"{page.rel} cell {i}"
            try:
                if cell.cell_type == "markdown":
                    env = {"page": page, "attachments": cell.get("attachments") or {}}
                    tokens = md.parse(cell.source, env)
                    for j, t in enumerate(tokens):
                        if t.type == "heading_open" and t.tag in ("h1", "h2", "h3", "h4"):
                            new_section(t.attrGet("id"), tokens[j + 1].content)
                        elif t.type == "inline" and not (j and tokens[j - 1].type == "heading_open"):
                            cur["x"].append(inline_text(t))
                    parts.append(f'<div class="cell markdown">{md.renderer.render(tokens, md.options, env)}</div>')
                    page.toc += [h for h in env.get("headings", []) if h[0] in (2, 3)]
                elif cell.cell_type == "code":
                    if getattr(cell, "has_sd", False):
                        entry = getattr(cell, "api_entry_", None)
                        if entry is None: continue
                        parts.append(self.render_api(page, entry, md))
                        page.toc.append((3, entry.anchor, entry.name))
                        new_section(entry.anchor, entry.name)
                        cur["x"].append(f"{entry.signature} {entry.doc}")
                        continue
                    html_cell, text = self.render_code(page, cell, md)
                    if html_cell: parts.append(html_cell)
                    if text: cur["x"].append(text)
            except BuildError: raise
            except Exception as e:  # noqa: BLE001
                raise BuildError(f"{where}: {type(e).__name__}: {e}") from e
        page.body = "\n".join(parts)
        for s in sections:
            text = _WS.sub(" ", " ".join(s["x"])).strip()
            if not text and not s["a"]: continue
            page.search.append({"p": page.title_text, "u": page.url + (f"#{s['a']}" if s["a"] else ""),
                                "h": s["h"], "x": text[:4000]})

    def render_api(self, page: Page, e: ApiEntry, md) -> str:
        body = md.render(e.markdown, {"page": page})
        return (f'<section class="api" id="{html.escape(e.anchor)}">'
                f'<h3 class="api-name"><a class="anchor" href="#{html.escape(e.anchor)}">{html.escape(e.name)}</a>'
                f'<span class="api-module">{html.escape(e.module)}</span></h3>{body}</section>')

    def render_code(self, page: Page, cell, md) -> tuple[str, str]:
        opts, src = split_options(cell.source)
        opts = {**{k: v for k, v in (cell.directives_ or {}).items() if isinstance(v, str)}, **opts}
        if _false(opts.get("include", "true")): return "", ""
        show_src = not _false(opts.get("echo", "true")) and src.strip()
        show_out = not _false(opts.get("output", "true"))
        asis = opts.get("output") == "asis"
        out = []
        if show_src:
            code = f'<pre class="highlight source"><code>{highlight(src, getattr(cell.metadata, "language", None))}</code></pre>'
            if "code-fold" in opts and not _false(opts["code-fold"]):
                summary = html.escape(opts.get("code-summary") or "Code")
                is_open = " open" if opts["code-fold"] == "show" else ""
                code = f"<details class=\"fold\"{is_open}><summary>{summary}</summary>{code}</details>"
            out.append(code)
        if show_out:
            outs = [self.render_output(page, o, md, asis) for o in cell.get("outputs", [])]
            outs = [o for o in outs if o]
            if outs: out.append('<div class="outputs">' + "".join(outs) + "</div>")
        if not out: return "", ""
        return f'<div class="cell code">{"".join(out)}</div>', (src if show_src else "")

    def render_output(self, page: Page, o, md, asis=False) -> str:
        kind = o.get("output_type")
        if kind == "stream":
            text = _ANSI.sub("", "".join(o.get("text", "")))
            if not text.strip(): return ""
            return f'<pre class="output stream {o.get("name", "stdout")}">{html.escape(text)}</pre>'
        if kind == "error":
            tb = _ANSI.sub("", "\n".join(o.get("traceback") or [f"{o.get('ename')}: {o.get('evalue')}"]))
            return f'<pre class="output error">{html.escape(tb)}</pre>'
        if kind not in ("display_data", "execute_result"): return ""
        data = o.get("data", {})
        def text(k): v = data[k]; return "".join(v) if isinstance(v, list) else v
        if WIDGET_MIME in data:
            plain = html.escape(text("text/plain")) if "text/plain" in data else "widget"
            return (f'<div class="output widget"><p class="widget-note">Interactive widget: run the notebook to use it.'
                    f'</p><pre>{plain}</pre></div>')
        if asis and "text/markdown" in data: return md.render(text("text/markdown"), {"page": page})
        for mime in ("image/png", "image/jpeg", "image/gif"):
            if mime in data:
                url = self.write_figure(page, base64.b64decode(text(mime)), mime)
                meta = o.get("metadata", {}).get(mime, {}) or {}
                size = "".join(f' {k}="{int(meta[k])}"' for k in ("width", "height") if k in meta)
                alt = html.escape(text("text/plain")[:200]) if "text/plain" in data else "figure"
                return f'<div class="output figure"><img src="{url}" alt="{alt}"{size}></div>'
        if "image/svg+xml" in data:
            url = self.write_figure(page, text("image/svg+xml").encode(), "image/svg+xml")
            return f'<div class="output figure"><img src="{url}" alt="figure"></div>'
        if "text/html" in data: return f'<div class="output html">{text("text/html")}</div>'
        if "text/markdown" in data: return f'<div class="output markdown">{md.render(text("text/markdown"), {"page": page})}</div>'
        if "text/latex" in data:
            return f'<div class="output math">{math_html(text("text/latex").strip("$"), {"display_mode": True})}</div>'
        if "text/plain" in data: return f'<pre class="output result">{html.escape(_ANSI.sub("", text("text/plain")))}</pre>'
        return ""

    def nav(self) -> list[dict]:
        "Sidebar: top-level pages, then one section per sub-folder, each in notebook order."
        items, sections = [], {}
        for p in self.pages:
            entry = {"title": p.title_html or html.escape(p.title), "url": p.url}
            if p.section is None: items.append(entry)
            else:
                if p.section not in sections:
                    sections[p.section] = {"section": p.section.replace("_", " ").capitalize(), "pages": []}
                    items.append(sections[p.section])
                sections[p.section]["pages"].append(entry)
        return items

    def write(self):
        from jinja2 import Environment, FileSystemLoader, select_autoescape
        from pygments.formatters import HtmlFormatter
        env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
        tpl = env.get_template("page.html")
        nav = self.nav()
        order = [p.url for p in self.pages]
        for i, p in enumerate(self.pages):
            prev_p = self.pages[i - 1] if i > 0 else None
            next_p = self.pages[i + 1] if i + 1 < len(self.pages) else None
            dest = self.out / p.url
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = f"{self.repo_url}/blob/main/nbs/{p.rel.as_posix()}" if self.repo_url else None
            dest.write_text(tpl.render(site=self, page=p, nav=nav, root=p.root, prev=prev_p, next=next_p,
                                       source=source, is_index=p.url == "index.html", site_lib=_lib_name() + "."), encoding="utf-8")
        (self.out / "static").mkdir(parents=True, exist_ok=True)
        for f in STATIC.iterdir():
            if f.is_file(): shutil.copy2(f, self.out / "static" / f.name)
        (self.out / "static" / "pygments.css").write_text(
            HtmlFormatter(style="friendly").get_style_defs(".highlight"), encoding="utf-8")
        records = [r for p in self.pages for r in p.search]
        (self.out / "search_index.js").write_text(
            "window.SEARCH_INDEX = " + json.dumps(records, ensure_ascii=False, separators=(",", ":")) + ";\n",
            encoding="utf-8")
        (self.out / "search.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        manifest = {"title": self.title, "pages": [{"url": p.url, "notebook": p.rel.as_posix(), "title": p.title_text,
                                                    "api": [e.name for e in p.api], "figures": p.n_figures}
                                                   for p in self.pages], "order": order, "problems": self.problems}
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        (self.out / ".nojekyll").write_text("")

    def build(self):
        if self.out.exists():
            for name in ("figures", "static", "tutorials", "experiments"):
                if (self.out / name).is_dir(): shutil.rmtree(self.out / name)
            for f in self.out.glob("*.html"): f.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.collect()
        md = make_markdown()
        for p in self.pages: p.title_html = md.renderInline(p.title)
        for p in self.pages: self.render_page(p, md)
        self.write()
        if self.strict and self.problems:
            raise BuildError("the site has problems:\n  " + "\n  ".join(self.problems))
        return self


REQUIRED = {"markdown_it": "markdown-it-py", "mdit_py_plugins": "mdit-py-plugins", "pygments": "pygments",
            "jinja2": "jinja2", "latex2mathml": "latex2mathml", "nbdev": "nbdev", "yaml": "pyyaml"}


def check_requirements():
    "Fail early, naming the pip packages, when a package the build needs is missing."
    missing = [pkg for mod, pkg in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if missing: raise BuildError(f"the docs build needs {', '.join(missing)}: pip install {' '.join(missing)}")


def build(out: Path | str | None = None, nbs: Path | str | None = None, exclude=(), strict: bool = False,
          quiet: bool = False) -> Site:
    "Build the site from the notebooks in `nbs` (default: nbdev's nbs_path) into `out` (default: nbdev's doc_path)."
    check_requirements()
    cfg = _nbdev_config()
    nbs = Path(nbs) if nbs else Path(cfg.nbs_path)
    out = Path(out) if out else Path(cfg.doc_path)
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    t0 = time.time()
    site = Site(nbs, out, exclude=exclude, strict=strict, log=(lambda *a: None) if quiet else print).build()
    site.seconds = time.time() - t0
    if not quiet:
        n_api = sum(len(p.api) for p in site.pages)
        print(f"built {len(site.pages)} pages ({n_api} API entries, {sum(p.n_figures for p in site.pages)} figures) "
              f"into {site.out} in {site.seconds:.1f} s", flush=True)
    return site


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m docs.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (default: doc_path from pyproject.toml, _docs)")
    ap.add_argument("--nbs", help="notebook folder (default: nbs_path, nbs)")
    ap.add_argument("--exclude", action="append", default=[], help="skip notebooks under this folder or matching this glob "
                    "(relative to the notebook folder), e.g. --exclude experiments")
    ap.add_argument("--strict", action="store_true", help="fail on any problem (unresolvable API entry, broken notebook link)")
    ap.add_argument("--check", action="store_true", help="then open every page in headless Chromium, check console errors, "
                    "links and images, and save OUT/screenshot.png")
    ap.add_argument("--serve", action="store_true", help="then serve the site on http://127.0.0.1:8000 until Ctrl-C")
    a = ap.parse_args(argv)
    try: site = build(a.out, a.nbs, exclude=tuple(a.exclude), strict=a.strict)
    except BuildError as e:
        print(f"docs build failed: {e}", file=sys.stderr); return 1
    rc = 0
    if a.check:
        from docs.check import check_site, ensure_chromium
        reason = ensure_chromium()
        if reason:
            print(f"cannot check the site: {reason}", file=sys.stderr); return 2
        report = check_site(site.out)
        print(report.summary())
        rc = 0 if report.ok else 1
    if a.serve:
        from docs.check import serve
        with serve(site.out, port=8000) as url:
            print(f"serving {site.out} at {url} (Ctrl-C to stop)")
            try:
                while True: time.sleep(3600)
            except KeyboardInterrupt: pass
    return rc


if __name__ == "__main__":
    sys.exit(main())
