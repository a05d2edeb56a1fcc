"""Shared pytest fixtures and options."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AUDIOTL_SHARED", ROOT.parent / "shared"))
AUDIOSET_META = SHARED / "audioset"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"): return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for it in items:
        if "slow" in it.keywords: it.add_marker(skip)


@pytest.fixture(scope="session")
def audioset_meta() -> Path:
    "The real AudioSet metadata folder (ontology.json, class_labels_indices.csv, segment CSVs, strong TSVs)."
    if not (AUDIOSET_META / "ontology.json").exists():
        pytest.fail(f"real AudioSet metadata not found at {AUDIOSET_META}; set AUDIOTL_SHARED")
    return AUDIOSET_META
