#!/usr/bin/env python3
"""Set up and run audiotl_nb from a fresh clone with nothing but Python 3.11+.

    python3 dev.py study     # the main job: the embedded-default ontology transfer study
    python3 dev.py test      # the whole test suite (notebook tests + pytest)

Both create `.venv/` next to this file on first use and install the project (with its `dev`
extra) into it; later calls reuse it and reinstall only when `pyproject.toml` changed.
Other commands: `python3 dev.py setup` (install only), `python3 dev.py docs` (build the site),
`python3 dev.py bench` (run the benchmarks). Extra arguments are passed on (to pytest, or to
`audiotl study`).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".audiotl-installed"


def sh(*cmd, check=True, **kw) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    r = subprocess.run([str(c) for c in cmd], cwd=kw.pop("cwd", ROOT), **kw)
    if check and r.returncode != 0: sys.exit(r.returncode)
    return r.returncode


def setup() -> None:
    "Create .venv and install the project with its dev extra, unless already up to date."
    if sys.version_info < (3, 11): sys.exit(f"audiotl_nb needs Python >= 3.11 (this is {sys.version.split()[0]})")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want: return
    sh(PY, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--upgrade", "pip")
    sh(PY, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", ".[dev]")
    STAMP.write_text(want)


def _git_diff() -> str | None:
    if not (ROOT / ".git").exists(): return None
    r = subprocess.run(["git", "diff", "--", "nbs", "audiotl_nb"], cwd=ROOT, capture_output=True, text=True)
    s = subprocess.run(["git", "status", "--porcelain", "--", "nbs", "audiotl_nb"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout + s.stdout


def sync_check() -> None:
    "Export the notebooks and clean them; in CI, any change this makes is a failure."
    before = _git_diff()
    sh(BIN / "nbdev-export")
    sh(BIN / "nbdev-clean")
    after = _git_diff()
    if before is not None and before != after:
        msg = "nbdev-export / nbdev-clean changed files: the package and notebooks were out of sync"
        if os.environ.get("CI"):
            subprocess.run(["git", "--no-pager", "diff", "--stat"], cwd=ROOT)
            sys.exit("FAILED: " + msg)
        print("note: " + msg + " (now fixed in your tree)", flush=True)


def test(args) -> None:
    setup()
    sync_check()
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}
    rc = sh(PY, "-m", "pytest", *(args or ["-n", "2", "--dist", "loadfile"]), check=False, env=env)
    if rc == 5: sys.exit("FAILED: pytest collected no tests")
    sys.exit(rc)


def study(args) -> None:
    setup()
    env = {**os.environ, "MPLBACKEND": "Agg"}
    sys.exit(sh(BIN / "audiotl", "study", *args, check=False, env=env))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__); return
    cmd, rest = argv[0], argv[1:]
    if cmd == "setup": setup()
    elif cmd == "test": test(rest)
    elif cmd == "study": study(rest)
    elif cmd == "docs": setup(); sys.exit(sh(PY, "-m", "docs.build", *rest, check=False))
    elif cmd == "bench": setup(); sys.exit(sh(PY, "-m", "benchmarks", *rest, check=False))
    else: sys.exit(f"unknown command {cmd!r}; use one of: setup, test, study, docs, bench")


if __name__ == "__main__":
    main()
