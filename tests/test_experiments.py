"""Run store, grids, executors and the study command: concurrency, stale locks, kill -9 and resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from audiotl_nb.core import ConfigError, UnknownNameError
from audiotl_nb.experiments import (LocalExecutor, OntologyStudy, BackboneStudy, DistillStudy, RunList, RunRecord, RunStore,
                                    execute_run, grid_main, grid_to_yaml, load_grid, prebuild_features, results_table, run_grid,
                                    summarise, study_config)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
AUDIOTL = str(Path(sys.executable).parent / "audiotl")
MICRO = dict(clip_seconds=1.0, n_train=40, n_eval=20, bird_clips=8, kws_speakers=3, scene_cities=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUDIOTL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _env(**kw):
    return {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", **kw}


def _executions(store: RunStore, rid: str) -> list[str]:
    p = store.run_path(rid) / "executions.txt"
    return p.read_text().splitlines() if p.exists() else []


def test_grid_expansion_and_yaml_round_trip():
    st = study_config("tiny")
    runs = st.runs()
    pre = [r for r in runs if r.kind == "pretrain"]
    ft = [r for r in runs if r.kind == "finetune"]
    assert [r.tags["subset"] for r in pre] == ["animal", "things", "all", "random30"]
    assert len(ft) == (len(pre) + 1) * len(st.tasks) * len(st.seeds)
    ids = {r.tags["subset"]: r.id for r in pre}
    for r in ft:      # every fine-tuning reads its own pre-training's checkpoint, the baseline none
        want = None if r.tags["subset"] == "none" else f"run:{ids[r.tags['subset']]}/model.pt"
        assert r.spec["pretrained"] == want and r.deps == ([] if want is None else [ids[r.tags["subset"]]])
        assert r.spec["clip_seconds"] == 2.0          # the tiny world's clip length
    assert len({r.id for r in runs}) == len(runs)
    grid, opts = load_grid(grid_to_yaml(st, store="somewhere"))
    assert grid == st and [r.id for r in grid.runs()] == [r.id for r in runs]
    with pytest.raises(UnknownNameError, match="Valid ontology subset names"):
        study_config("tiny", subsets=["animals"])
    with pytest.raises(ConfigError, match="unknown key"):
        OntologyStudy.from_dict({"subset": ["animal"]})
    with pytest.raises(ConfigError, match="unknown key"):     # trainer specs are checked when the grid is built
        study_config("tiny", finetune={"epoch": 3}).runs()


def test_other_grids():
    b = BackboneStudy(world="tiny", backbones=[{"name": "scratch", "model": "cnn10", "model_kw": {"width": 0.125}},
                                               {"name": "pre", "model": "cnn10", "model_kw": {"width": 0.125}, "pretrain": {"epochs": 1}}],
                      tasks=["speechcommands"], methods=["finetune", "pairtune"], seeds=[1, 2])
    runs = b.runs()
    assert [r.kind for r in runs].count("pretrain") == 1 and len(runs) == 1 + 2 * 2 * 2
    pre_id = runs[0].id
    assert all(r.deps == [pre_id] for r in runs if r.tags.get("backbone") == "pre" and r.kind != "pretrain")
    assert all(r.deps == [] for r in runs if r.tags.get("backbone") == "scratch")
    d = DistillStudy(world="tiny", teacher_seeds=[0, 1], seeds=[0]).runs()
    teachers = [r.id for r in d if r.kind == "sed"]
    assert len(teachers) == 2 and d[-1].kind == "distill" and d[-1].deps == teachers
    with pytest.raises(ConfigError, match="not defined before"):
        RunList.from_dict({"runs": [{"kind": "toy", "init": "run:later/metrics.json"}, {"name": "later", "kind": "toy"}]}).runs()


def test_store_skips_done_runs_and_aggregates(tmp_path):
    store = RunStore(tmp_path)
    recs = [RunRecord({"kind": "toy", "seed": s, "noise": nz}, tags={"noise": nz, "seed": s}) for nz in (0.1, 2.0) for s in (1, 2, 3)]
    res = run_grid(store, recs, LocalExecutor(workers=0, mode="direct"), progress=False)
    assert res.count("done") == 6 and res.ok
    again = run_grid(store, recs, LocalExecutor(workers=0, mode="direct"), progress=False)
    assert again.count("skipped") == 6
    assert all(len(_executions(store, r.id)) == 1 for r in recs)
    df = results_table(store)
    sm = summarise(df).set_index(["noise", "metric"])
    for nz in (0.1, 2.0):
        v = df[(df.noise == nz) & (df.metric == "mse")].value.to_numpy()
        assert sm.loc[(nz, "mse"), "n"] == 3
        np.testing.assert_allclose(sm.loc[(nz, "mse"), "mean"], v.mean())
        np.testing.assert_allclose(sm.loc[(nz, "mse"), "std"], v.std(ddof=1))
    assert sm.loc[(2.0, "mse"), "mean"] > sm.loc[(0.1, "mse"), "mean"]


def test_failures_block_dependents_and_retry(tmp_path):
    store = RunStore(tmp_path)
    grid = RunList.from_dict({"runs": [{"name": "bad", "kind": "toy", "fail": "once"},
                                       {"name": "child", "kind": "toy", "init": "run:bad/metrics.json"}]})
    res = run_grid(store, grid, LocalExecutor(workers=0, mode="direct"), progress=False)
    bad, child = res.ids
    assert res.outcomes == {bad: "failed", child: "blocked"} and not res.ok
    assert store.status(bad) == "failed" and store.status(child) == "pending"
    assert "asked to fail: once" in store.info(bad)["reason"]
    # not retried without retry_failed
    run_grid(store, grid, LocalExecutor(workers=0, mode="direct"), progress=False)
    assert len(_executions(store, bad)) == 1
    run_grid(store, grid, LocalExecutor(workers=0, mode="direct"), progress=False, retry_failed=True)
    assert len(_executions(store, bad)) == 2


_HOLD_LOCK = """
import sys, time
from audiotl_nb.experiments import RunStore
lk = RunStore(sys.argv[1]).try_lock(sys.argv[2])
print("locked" if lk else "busy", flush=True)
time.sleep(600)
"""


def test_stale_lock_of_killed_process_is_taken_over(tmp_path):
    store = RunStore(tmp_path)
    rid = store.add(RunRecord({"kind": "toy", "seed": 5}))
    p = subprocess.Popen([PY, "-c", _HOLD_LOCK, str(tmp_path), rid], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert p.stdout.readline().strip() == "locked"
        assert store.status(rid) == "running" and store.lock_holder(rid)["pid"] == p.pid
        assert execute_run(store, rid)["outcome"] == "locked"      # a live owner is respected
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    assert store.lock_holder(rid) is None and store.status(rid) == "pending"
    assert execute_run(store, rid)["outcome"] == "done"
    assert len(_executions(store, rid)) == 1


def test_two_concurrent_executors_never_run_a_run_twice(tmp_path):
    f = tmp_path / "grid.yaml"
    runs = [{"name": "root", "kind": "toy", "seed": 0, "sleep": 1.0}]
    runs += [{"name": f"r{i}", "kind": "toy", "seed": i + 1, "sleep": 1.0, "init": "run:root/metrics.json"} for i in range(14)]
    f.write_text(yaml.safe_dump({"grid": "runs", "store": "store", "runs": runs}))
    cmd = [AUDIOTL, "grid", "run", str(f), "--mode", "direct", "--no-progress"]
    procs = [subprocess.Popen(cmd + ["--workers", w], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for w in ("0", "0")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    store = RunStore(tmp_path / "store")
    ids = store.ids()
    assert len(ids) == 15 and store.counts()["done"] == 15
    executions = {rid: _executions(store, rid) for rid in ids}
    assert all(len(v) == 1 for v in executions.values()), executions
    pids = {line.split()[1] for v in executions.values() for line in v}
    assert len(pids) >= 2, f"the executors did not overlap (executing pids: {pids})"


def test_grid_cli_status_and_retry(tmp_path, capsys):
    f = tmp_path / "g.yaml"
    f.write_text("grid: runs\nruns:\n  - {name: ok, kind: toy}\n  - {name: bad, kind: toy, fail: yes}\n")
    assert grid_main(["run", str(f), "--mode", "direct", "--workers", "0", "--no-progress"]) == 1
    store = RunStore(tmp_path / "runs" / "g")              # default store: runs/<file stem> next to the file
    assert store.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 1}
    capsys.readouterr()
    assert grid_main(["status", str(f)]) == 0
    out = capsys.readouterr().out
    assert "done: 1" in out and "failed: 1" in out and "asked to fail" in out
    assert grid_main(["retry", str(f), "--mode", "direct", "--workers", "0", "--no-progress"]) == 1
    bad = [r for r in store.ids() if store.status(r) == "failed"][0]
    assert len(_executions(store, bad)) == 2


def _wait_then_killpg(p, rs: RunStore, timeout: float = 240):
    "SIGKILL the process group of `p` once a run is done and another is running."
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            ids = rs.ids() if rs.runs_dir.exists() else []
            c = rs.counts(ids) if ids else {}
            if c.get("done", 0) >= 1 and c.get("running", 0) >= 1: return
            assert p.poll() is None, p.stdout.read()
            time.sleep(0.2)
        pytest.fail("the grid did not get going in time")
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
        time.sleep(1.5)        # kernels/workers notice their parent is gone


def test_kill_grid_midway_then_resume(tmp_path):
    "SIGKILL the process group of `audiotl grid run` (2 workers) midway, run it again: nothing finished runs twice."
    f = tmp_path / "grid.yaml"
    runs = [{"name": f"r{i}", "kind": "toy", "seed": i, "sleep": 1.5} for i in range(6)]
    runs += [{"kind": "toy", "seed": 99, "init": "run:r5/metrics.json"}]
    f.write_text(yaml.safe_dump({"grid": "runs", "store": "store", "runs": runs}))
    cmd = [AUDIOTL, "grid", "run", str(f), "--mode", "direct", "--workers", "2", "--no-progress"]
    p = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rs = RunStore(tmp_path / "store")
    _wait_then_killpg(p, rs)
    done_before = [r for r in rs.ids() if rs.run_dir(r).status == "done"]
    interrupted = [r for r in rs.ids() if rs.info(r)["reason"] == "interrupted"]
    assert done_before and interrupted and all(rs.status(r) == "pending" for r in interrupted)
    rerun = [c if c != "2" else "0" for c in cmd]        # again, in one process this time
    r = subprocess.run(rerun, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert rs.counts()["done"] == 7
    assert all(len(_executions(rs, rid)) == 1 for rid in done_before)
    assert all(len(_executions(rs, rid)) == 2 for rid in interrupted)      # the killed attempt, then the one that finished
    assert all(len(_executions(rs, rid)) == 1 for rid in set(rs.ids()) - set(done_before) - set(interrupted))


@pytest.mark.slow
def test_kill_study_midway_then_resume(tmp_path):
    "SIGKILL the whole process group of `audiotl study` during a run, start it again: finished runs are not redone."
    from audiotl_nb.synth import world_config
    cfg = tmp_path / "study.yaml"
    st = study_config("tiny", world=world_config("tiny", **MICRO).to_dict(), subsets=["animal"], include_all=False,
                      random_fractions=[], pretrain={"epochs": 2, "bs": 8}, finetune={"epochs": 3, "bs": 8})
    cfg.write_text(grid_to_yaml(st))
    store = tmp_path / "store"
    cmd = [AUDIOTL, "study", "--config", str(cfg), "--store", str(store), "--no-report", "--workers", "1",
           "--no-progress"]
    p = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rs = RunStore(store)
    _wait_then_killpg(p, rs)
    done_before = {r: (rs.run_path(r) / "metrics.json").stat().st_mtime_ns for r in rs.ids() if rs.run_dir(r).status == "done"}
    interrupted = [r for r in rs.ids() if rs.info(r)["reason"] == "interrupted"]
    assert done_before and interrupted
    assert all(rs.status(r) == "pending" for r in interrupted)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert rs.counts() == {"pending": 0, "running": 0, "done": len(st.runs()), "failed": 0}
    for rid, mtime in done_before.items():     # finished runs untouched, executed once
        assert (rs.run_path(rid) / "metrics.json").stat().st_mtime_ns == mtime
        assert (rs.run_path(rid) / "log.txt").read_text().count("executing ") == 1
    for rid in interrupted:
        assert (rs.run_path(rid) / "log.txt").read_text().count("executing ") == 2
    df = results_table(rs)
    assert set(df[df.kind == "finetune"].subset) == {"none", "animal"}


def test_prebuilt_features_cover_every_store_run_and_leave_the_rng_alone(tmp_path):
    "After prebuild_features no run builds features, so a run's initial weights depend on its seed only."
    import torch
    from audiotl_nb.core import seed_everything
    from audiotl_nb.data import get_task
    from audiotl_nb.models.core import create_model
    from audiotl_nb.store import FeatureStore
    from audiotl_nb.synth import world_config
    st = study_config("tiny", world=world_config("tiny", **MICRO).to_dict(), subsets=["animal", "things"], include_all=False,
                      random_fractions=[], pretrain={"features": "store"}, finetune={"features": "store"})
    store = RunStore(tmp_path)
    ids = store.add_all(st.runs())
    n = prebuild_features(store, ids, progress=False)
    w = store.world(st.runs()[0].world)
    want = set()
    for sub in ("animal", "things"):
        want |= {str(p) for df in get_task("audioset", w.audioset, subset=sub).splits.values() for p in df.path}
    want |= {str(p) for df in get_task("dcase2018_bad", w.tasks["dcase2018_bad"]).splits.values() for p in df.path}
    assert n == len(want)
    fs = FeatureStore(None, "panns16k")
    assert all(p in fs for p in want)
    first = lambda m: next(v for v in m.state_dict().values() if v.ndim == 4).clone()
    seed_everything(1); a = first(create_model("cnn10", 3, width=0.125))
    seed_everything(1); fs.build(sorted(want)); b = first(create_model("cnn10", 3, width=0.125))
    assert torch.equal(a, b)


def test_in_process_runs_restore_the_callers_threads(tmp_path):
    "LocalExecutor(workers=0, threads=n): the run sees n torch threads; afterwards the caller has its own again."
    import torch
    from audiotl_nb.experiments import RUNNERS, register_runner
    def probe(spec, run_dir):
        from audiotl_nb.core import RunDir
        m = {"test": {"threads": torch.get_num_threads()}, "omp": os.environ.get("OMP_NUM_THREADS")}
        RunDir(run_dir).write_metrics(m)
        return m
    register_runner("threads_probe", probe)
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    n = before + 2
    try:
        store = RunStore(tmp_path / "store")
        ids = store.add_all([RunRecord({"kind": "threads_probe", "seed": s}) for s in range(2)])
        res = run_grid(store, ids, LocalExecutor(workers=0, mode="direct", threads=n), progress=False, poll=0.05)
        assert res.ok and res.count("done") == 2
        assert all(store.run_dir(r).metrics["test"]["threads"] == n for r in ids)
        assert all(store.run_dir(r).metrics["omp"] == str(n) for r in ids)
        assert (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")) == (before, env)
    finally:
        RUNNERS._items.pop("threads_probe", None)


def test_workers_have_their_own_session_and_die_with_the_grid(tmp_path):
    "A worker runs in a session of its own (its own CPU share) yet ends when the grid's process is killed alone."
    from audiotl_nb.experiments import pid_alive
    code = ("import sys\nfrom audiotl_nb.experiments import LocalExecutor, RunRecord, RunStore, run_grid\n"
            "store = RunStore(sys.argv[1])\nids = store.add_all([RunRecord({'kind': 'toy', 'sleep': 120})])\n"
            "run_grid(store, ids, LocalExecutor(workers=1, mode='direct', threads=1), progress=False)\n")
    p = subprocess.Popen([PY, "-c", code, str(tmp_path / "store")], env=_env())
    rs = RunStore(tmp_path / "store")
    worker, t0 = None, time.time()
    try:
        while worker is None:
            assert p.poll() is None and time.time() - t0 < 240, "the grid did not start its run"
            for lock in rs.runs_dir.glob("*/.lock") if rs.runs_dir.exists() else []:
                try: worker = json.loads(lock.read_text())["pid"]
                except (OSError, ValueError, KeyError): pass
            time.sleep(0.1)
        assert worker != p.pid and os.getsid(worker) != os.getsid(p.pid) == os.getsid(0)
        p.send_signal(signal.SIGKILL); p.wait()          # the grid's process only, not its process group
        t0 = time.time()
        while pid_alive(worker) and time.time() - t0 < 15: time.sleep(0.1)
        assert not pid_alive(worker), "the worker outlived its grid"
    finally:
        if p.poll() is None: p.kill(); p.wait()
        if worker and pid_alive(worker): os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("fork", [True, False])
def test_workers_forked_from_one_template_or_started_fresh(tmp_path, fork):
    "fork=True: both workers are children of one template process, which ends with the grid; fork=False: children of the grid."
    import threading
    from audiotl_nb.experiments import pid_alive
    store = RunStore(tmp_path / "store")
    ids = store.add_all([RunRecord({"kind": "toy", "seed": s, "sleep": 2.0}) for s in range(2)])
    seen, stop = {}, threading.Event()
    def watch():
        while not stop.is_set():
            for rid in ids:
                try:
                    pid = json.loads((store.run_path(rid) / ".lock").read_text())["pid"]
                    seen[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, KeyError): pass
            time.sleep(0.05)
    t = threading.Thread(target=watch, daemon=True); t.start()
    try: res = run_grid(store, ids, LocalExecutor(workers=2, mode="direct", threads=1, fork=fork), progress=False, poll=0.1)
    finally: stop.set(); t.join(5)
    assert res.ok and res.count("done") == 2
    assert len(seen) == 2 and len(set(seen.values())) == 1, seen
    parent = next(iter(seen.values()))
    if fork: assert parent != os.getpid() and not pid_alive(parent)        # the template ended with the grid
    else: assert parent == os.getpid()
    assert not any(pid_alive(p) for p in seen)
