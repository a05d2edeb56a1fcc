"""Run every library notebook's cells as its own pytest test.

Cells flagged `#| slow` or `#| gpu` are skipped unless named in AUDIOTL_NB_FLAGS (e.g. AUDIOTL_NB_FLAGS="slow").

Experiment notebooks in nbs/experiments/ are parameterised and run under papermill by their own tests.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
SKIP_DIRS = {"experiments", "_proc", ".ipynb_checkpoints"}


def _notebooks():
    for p in sorted(NBS.rglob("*.ipynb")):
        rel = p.relative_to(NBS)
        if any(part in SKIP_DIRS or part.startswith("_") for part in rel.parts): continue
        yield p


@pytest.mark.parametrize("nb", list(_notebooks()), ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb, tmp_path, monkeypatch):
    from nbdev.test import test_nb as run_notebook  # imported here so pytest does not collect it
    monkeypatch.setenv("IN_TEST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("AUDIOTL_CACHE", str(tmp_path / "cache"))
    from nbdev.config import get_config
    skip = get_config().tst_flags
    skip = skip.split() if isinstance(skip, str) else list(skip or [])
    force = os.environ.get("AUDIOTL_NB_FLAGS", "").split()  # e.g. AUDIOTL_NB_FLAGS="slow" runs slow cells too
    ok, secs = run_notebook(nb, skip_flags=[f for f in skip if f not in force], force_flags=force,
                            do_print=False, showerr=True, basepath=NBS.parent)
    assert ok, f"notebook {nb.name} failed (see the traceback above)"
