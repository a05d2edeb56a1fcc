"""Shared pytest fixtures and options."""
import os
from pathlib import Path

import sys

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import slurm_cluster

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: the workers already use every core, and oversubscribed
    # torch threads make tiny models many times slower
    import torch
    torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    "A real single-node Slurm cluster on localhost (see tests/slurm_cluster.py); SLURM_CONF is set while it runs."
    from slurm_cluster import LocalSlurm, ensure_slurm_installed
    why = ensure_slurm_installed()
    if why:
        if os.environ.get("CI"): pytest.fail(why)
        pytest.skip(why)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), port=16817 + 10 * (os.getpid() % 50)).start()
    old = os.environ.get("SLURM_CONF"); cluster.activate()
    yield cluster
    cluster.stop()
    if old is None: os.environ.pop("SLURM_CONF", None)
    else: os.environ["SLURM_CONF"] = old
