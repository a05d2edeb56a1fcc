"""The Slurm executor against the real single-node cluster of tests/slurm_cluster.py (fixture `slurm`)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audiotl_nb.experiments import RunList, RunStore, SlurmExecutor, run_grid

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUDIOTL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def test_tiny_grid_runs_as_job_arrays_through_papermill(slurm, tmp_path):
    "Two independent runs (one array) then one that reads both (a second array), each a papermill notebook in a Slurm job."
    grid = RunList.from_dict({"runs": [{"name": "a", "kind": "toy", "seed": 1}, {"name": "b", "kind": "toy", "seed": 2},
                                       {"name": "c", "kind": "toy", "seed": 3, "init": "run:a/metrics.json",
                                        "note": "run:b/metrics.json"}]})
    store = RunStore(tmp_path / "store")
    ex = SlurmExecutor(time=10, mem_gb=2, cpus=1, mode="papermill", poll=1.0, grace=10)
    t0 = time.time()
    res = run_grid(store, grid, ex, progress=False)
    assert res.ok, res.errors
    assert time.time() - t0 < 400
    a, b, c = res.ids
    for rid in res.ids:
        rd = store.run_dir(rid)
        assert rd.status == "done" and (rd / "notebook.ipynb").exists()
        assert len((rd / "executions.txt").read_text().splitlines()) == 1
    assert store.run_dir(c).metrics["init_r2"] == store.run_dir(a).metrics["test"]["r2"]
    assert store.run_dir(c).metrics["note"] == str(store.run_path(b) / "metrics.json")
    logs = list((tmp_path / "store" / "slurm").rglob("*_log.out"))
    assert len(logs) == 3                              # three Slurm jobs (array tasks) ran
    arrays = {p.name.split("_")[0] for p in logs}
    assert len(arrays) == 2                            # in two job arrays: a and b together, then c
    # the grid again: nothing is submitted
    again = run_grid(store, grid, ex, progress=False)
    assert again.count("skipped") == 3 and len(list((tmp_path / "store" / "slurm").rglob("*_log.out"))) == 3


def test_a_cancelled_job_is_reported_failed_in_bounded_time(slurm, tmp_path):
    "Without accounting, submitit cannot see a cancelled job end: the executor notices it left the queue."
    grid = RunList.from_dict({"runs": [{"name": "slow", "kind": "toy", "sleep": 300}, {"kind": "toy", "init": "run:slow/metrics.json"}]})
    store = RunStore(tmp_path / "store")
    ex = SlurmExecutor(time=10, mem_gb=1, cpus=1, mode="direct", poll=0.5, grace=3)
    slow = store.add_all(grid.runs())[0]
    import threading
    def cancel_when_running():
        for _ in range(600):
            if store.status(slow) == "running":
                ids = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()
                subprocess.run(["scancel", *ids], check=False)
                return
            time.sleep(0.2)
    th = threading.Thread(target=cancel_when_running, daemon=True); th.start()
    t0 = time.time()
    res = run_grid(store, grid, ex, progress=False)
    took = time.time() - t0
    assert took < 200, took                          # far less than the 300 s the run would sleep
    assert res.outcomes[slow] == "failed" and "ended without a result" in res.errors[slow]
    assert list(res.outcomes.values()).count("blocked") == 1
    for _ in range(120):                             # Slurm kills the job's process after KillWait
        if store.lock_holder(slow) is None: break
        time.sleep(0.5)
    assert store.lock_holder(slow) is None and store.status(slow) == "failed"
    assert "cancelled" in store.info(slow)["reason"]
