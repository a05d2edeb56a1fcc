"""Open a built site in headless Chromium and check it the way a reader would meet it.

    python -m docs.check [SITE]          # default: _docs; exit status 1 when something is wrong

The site is served on 127.0.0.1 by `http.server` in a thread. Starting from `index.html`, every
page reachable through `<a href>` is loaded in Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium with the driver given explicitly, so nothing is downloaded). For every page:

* the browser console has no errors (JavaScript exceptions, failed loads of scripts, styles, images);
* every same-site link (`<a href>`, `<link href>`, `<script src>`, `<img src>`) answers 200, and a
  `#fragment` names an element id that exists in the target page;
* every `<img>` has loaded with a non-zero natural size;
* the search box finds an API entry and its result links to it (on the landing page).

A screenshot of the landing page is saved as SITE/screenshot.png. `ensure_chromium()` installs the
Debian packages when they are missing and we are root (like the Slurm test cluster does).
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

PACKAGES = ["chromium", "chromium-driver"]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--hide-scrollbars"]


def find_chromium() -> tuple[str | None, str | None]:
    "Paths of the Chromium binary and of chromedriver (None when missing)."
    browser = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                                "/usr/bin/chromium") if p and Path(p).exists()), None)
    driver = next((p for p in (os.environ.get("CHROMEDRIVER"), shutil.which("chromedriver"), "/usr/bin/chromedriver")
                   if p and Path(p).exists()), None)
    return browser, driver


def ensure_chromium() -> str | None:
    "Install Debian's chromium + chromium-driver if needed; return a reason string when they cannot be had."
    if all(find_chromium()): return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "chromium and chromium-driver are not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0: return f"{' '.join(cmd)} failed: {r.stderr[-500:]}"
    return None if all(find_chromium()) else "chromium was installed but its binaries were not found"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@contextlib.contextmanager
def serve(root: Path, port: int = 0):
    "Serve `root` on http://127.0.0.1:PORT/ in a thread; yields the base URL."
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try: yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown(); httpd.server_close(); t.join(5)


def make_driver(width: int = 1400, height: int = 1000):
    "A headless Chromium WebDriver with browser-console logging, using the installed chromedriver."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = find_chromium()
    if not (browser and driver): raise RuntimeError("chromium / chromedriver not found (see ensure_chromium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for f in CHROMIUM_FLAGS: opts.add_argument(f)
    opts.add_argument(f"--window-size={width},{height}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    d.set_page_load_timeout(60)
    return d


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__(); self.ids = set()
    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("id", "name") and v: self.ids.add(v)


@dataclass
class Report:
    pages: list = field(default_factory=list)            # URLs opened
    errors: list = field(default_factory=list)           # (page, message)
    links_checked: int = 0
    images_checked: int = 0
    external_links: int = 0
    screenshot: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool: return not self.errors

    def summary(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: {len(self.pages)} pages opened in Chromium, {self.links_checked} "
                 f"internal links and {self.images_checked} images checked ({self.external_links} external links not "
                 f"followed) in {self.seconds:.1f} s; screenshot: {self.screenshot}"]
        lines += [f"  {page}: {msg}" for page, msg in self.errors[:50]]
        if len(self.errors) > 50: lines.append(f"  ... and {len(self.errors) - 50} more")
        return "\n".join(lines)


_PAGE_JS = """
const abs = (el, attr) => el.getAttribute(attr) === null ? null : new URL(el.getAttribute(attr), document.baseURI).href;
const refs = [];
for (const a of document.querySelectorAll('a[href]')) refs.push(['a', abs(a, 'href')]);
for (const l of document.querySelectorAll('link[href]')) refs.push(['link', abs(l, 'href')]);
for (const s of document.querySelectorAll('script[src]')) refs.push(['script', abs(s, 'src')]);
for (const i of document.querySelectorAll('img[src]')) refs.push(['img', abs(i, 'src')]);
const imgs = Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);
return {refs: refs, imgs: imgs, title: document.title, h1: (document.querySelector('h1') || {}).textContent || ''};
"""


def _wait_ready(driver, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = driver.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)")
        if state: return True
        time.sleep(0.05)
    return False


def check_site(site: Path, screenshot: bool = True, search_probe: str | None = None, log=None) -> Report:
    """Crawl the built `site` in headless Chromium from its landing page; see the module docstring for what is checked.
    `search_probe` is an API name to search for (default: the first API entry in manifest.json)."""
    site = Path(site).resolve()
    t0 = time.time()
    rep = Report()
    manifest = json.loads((site / "manifest.json").read_text()) if (site / "manifest.json").exists() else {}
    if search_probe is None:
        search_probe = next((a for p in manifest.get("pages", []) for a in p.get("api", []) if "." not in a), None)
    ids_cache: dict[str, set | None] = {}
    status_cache: dict[str, int] = {}

    def status(url: str) -> int:
        if url not in status_cache:
            try:
                with urllib.request.urlopen(url, timeout=30) as r: status_cache[url] = r.status; body = r.read()
                if url.endswith(".html") or url.endswith("/"):
                    p = _Ids(); p.feed(body.decode("utf-8", "replace")); ids_cache[url] = p.ids
            except urllib.error.HTTPError as e: status_cache[url] = e.code
            except Exception:  # noqa: BLE001
                status_cache[url] = -1
        return status_cache[url]

    with serve(site) as base:
        driver = make_driver()
        try:
            driver.get_log("browser")  # drain anything from start-up
            todo, seen = [urljoin(base, "index.html")], set()
            while todo:
                url = todo.pop(0)
                if url in seen: continue
                seen.add(url)
                page = url[len(base):]
                driver.get(url)
                if not _wait_ready(driver): rep.errors.append((page, "did not finish loading in 30 s"))
                info = driver.execute_script(_PAGE_JS)
                rep.pages.append(page)
                if log: log(f"checked {page}")
                if not info["h1"].strip(): rep.errors.append((page, "page has no <h1> title"))
                for src, complete, w, h in info["imgs"]:
                    rep.images_checked += 1
                    if not complete or not w or not h:
                        rep.errors.append((page, f"image {src} did not load (natural size {w}x{h})"))
                for kind, ref in info["refs"]:
                    if not ref: continue
                    if not ref.startswith(base):
                        if urlsplit(ref).scheme in ("http", "https"): rep.external_links += 1
                        elif urlsplit(ref).scheme not in ("mailto", "data", "javascript"):
                            rep.errors.append((page, f"{kind} points outside the site: {ref}"))
                        continue
                    rep.links_checked += 1
                    target, frag = urldefrag(ref)
                    code = status(target)
                    if code != 200:
                        rep.errors.append((page, f"broken {kind} {target[len(base):] or '/'} (HTTP {code})")); continue
                    if frag and target in ids_cache and frag not in ids_cache[target]:
                        from urllib.parse import unquote
                        if unquote(frag) not in ids_cache[target]:
                            rep.errors.append((page, f"link to missing anchor {target[len(base):]}#{frag}"))
                    if kind == "a" and target.endswith(".html") and target not in seen: todo.append(target)
                for entry in driver.get_log("browser"):
                    if entry.get("level") in ("SEVERE", "ERROR"):
                        rep.errors.append((page, f"console: {entry.get('message')}"))
                if page == "index.html":
                    if screenshot:
                        driver.execute_script("window.scrollTo(0, 0)")
                        rep.screenshot = site / "screenshot.png"
                        driver.save_screenshot(str(rep.screenshot))
                    if search_probe: _check_search(driver, base, search_probe, rep)
            built = {p["url"] for p in manifest.get("pages", [])}
            missing = sorted(built - set(rep.pages))
            if missing: rep.errors.append(("(site)", f"pages not reachable from the landing page: {missing}"))
        finally:
            driver.quit()
    rep.seconds = time.time() - t0
    return rep


def _check_search(driver, base: str, name: str, rep: Report):
    "Type an API name into the search box; the first result must be that entry and its link must work."
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.ID, "search-input")
    box.clear(); box.send_keys(name)
    t0 = time.time()
    links = []
    while time.time() - t0 < 10:
        links = driver.execute_script(
            "return Array.from(document.querySelectorAll('#search-results a')).map(a => [a.href, a.textContent])")
        if links: break
        time.sleep(0.1)
    if not links:
        rep.errors.append(("index.html", f"search for {name!r} found nothing")); return
    href = links[0][0]
    if not urldefrag(href)[1] or urldefrag(href)[1] != name.lower():
        rep.errors.append(("index.html", f"search for {name!r}: first result is {href}, not the API entry"))
    box.clear()
    driver.execute_script("document.getElementById('search-results').hidden = true")
    for entry in driver.get_log("browser"):
        if entry.get("level") in ("SEVERE", "ERROR"):
            rep.errors.append(("index.html (search)", f"console: {entry.get('message')}"))


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m docs.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("site", nargs="?", default="_docs")
    a = ap.parse_args(argv)
    reason = ensure_chromium()
    if reason: print(reason, file=sys.stderr); return 2
    rep = check_site(Path(a.site))
    print(rep.summary())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
