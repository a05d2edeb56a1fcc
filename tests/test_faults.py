"""Fault injection: each fault the library promises to survive is injected for real, and the test checks what must
hold afterwards. "Loses nothing" means: a finished result is never overwritten by a broken one, an interrupted run
resumes from its last complete epoch and ends exactly where an uninterrupted run ends, no run executes to completion
twice, and every input that was skipped is named.

The docs chapter nbs/12_reliability.ipynb tabulates these tests (fault, injection, what survives). Each test's
docstring starts with the fault it injects. Helpers (broken audio, fault-injecting callbacks, full disks, a pickle
that carries code) live in tests/faults_helpers.py.
"""
from __future__ import annotations

import ast
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from faults_helpers import (BAD_KINDS, SimulatedFullDisk, break_audio, fill_disk, leftovers, make_action,
                            make_poison, malicious_checkpoint, tmpfs, write_tone)

from audiotl_nb.core import (CheckpointError, ConfigError, DataError, RunDir, UnknownNameError, atomic_write_json,
                             atomic_write_text, read_json)

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "faults_helpers.py"
TINY = dict(model_kw={"width": 0.125}, bs=8, clip_seconds=1.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for every test and module fixture: a busy 2-core machine runs tiny models several times faster
    so, and runs compared bit for bit must use the same number of threads (reductions split differently otherwise)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture(autouse=True)
def _quiet_and_one_thread():
    "No warning noise; one torch thread again after each test (an in-process executor sets its own thread count)."
    env = {k: os.environ.get(k) for k in THREAD_VARS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(1)
    for k, v in env.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "The embedded world at its tiny preset, with 1 s clips and 60 bird-detection clips (36 train, 4 dev, 20 test)."
    from audiotl_nb.synth import make_world, world_config
    cfg = world_config("tiny", clip_seconds=1.0, n_train=20, n_eval=10, bird_clips=20, kws_speakers=3, scene_cities=1)
    return make_world(tmp_path_factory.mktemp("world") / "w", config=cfg)


def ref_spec(world, **kw) -> dict:
    "A deterministic 3-epoch fine-tuning of a tiny Cnn10 with a warm-up + cosine schedule (4 steps per epoch)."
    return dict(kind="finetune", task="dcase2018_bad", root=str(world.tasks["dcase2018_bad"]), epochs=3,
                deterministic=True, schedule="cosine", schedule_kw={"warmup": 3}, **{**TINY, **kw})


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    "The uninterrupted run of `ref_spec`: what every interrupted and resumed run must end with."
    from audiotl_nb.train.core import run_spec
    return run_spec(ref_spec(world), tmp_path_factory.mktemp("ref") / "run")


def assert_same_run(a, b):
    "Two finished runs with identical metrics, history (but its timings) and weights."
    assert a.status == b.status == "done"
    assert a.test == b.test and a.metrics["dev"] == b.metrics["dev"] and a.metrics["best_epoch"] == b.metrics["best_epoch"]
    pd.testing.assert_frame_equal(a.history.drop(columns="time"), b.history.drop(columns="time"))
    sa = torch.load(Path(a.run_dir) / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(Path(b.run_dir) / "model.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def status_of(run_dir) -> str: return json.loads((Path(run_dir) / "status.json").read_text())["status"]


# =====================================================================================================================
# Broken audio
# =====================================================================================================================
REASONS = {"corrupt": "cannot decode", "truncated": "truncated", "empty": "0 bytes", "nan": "NaN"}


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "nan"])
def test_broken_audio_is_a_data_error_naming_the_file(kind, tmp_path):
    "Corrupt, truncated, empty (0-byte) and NaN-containing audio: load_audio raises DataError naming the file and why."
    from audiotl_nb.audio import load_audio
    p = break_audio(tmp_path / f"clip_{kind}.wav", kind)
    with pytest.raises(DataError) as e: load_audio(p)
    assert str(p) in str(e.value) and REASONS[kind] in str(e.value)


def test_zero_length_audio_is_skipped_by_the_feature_store(tmp_path):
    "Zero-length audio (a valid header, no samples): load_audio returns 0 samples; the feature store skips the file and says why."
    from audiotl_nb.audio import load_audio
    from audiotl_nb.store import FeatureStore
    p = break_audio(tmp_path / "a" / "zero.wav", "zero_length")
    good = write_tone(tmp_path / "a" / "good.wav")
    assert load_audio(p)[0].numel() == 0
    store = FeatureStore(tmp_path / "features", "panns16k")
    rep = store.build([p, good])
    assert rep.computed == 1 and list(rep.skipped.values()) == ["no audio (0 samples)"]
    assert read_json(store.path / store.skipped_file) == {str(p): "no audio (0 samples)"}
    with pytest.raises(DataError, match="skipped"): store.get(p)
    assert store.get(good).shape[-1] == 64


def _bad_items(folder: Path, kinds) -> pd.DataFrame:
    "Three good clips with broken ones between them, all labelled 'a'."
    names = ["good0", *[f"bad_{k}" for k in kinds[:2]], "good1", *[f"bad_{k}" for k in kinds[2:]], "good2"]
    paths = []
    for i, n in enumerate(names):
        p = folder / f"{n}.wav"
        if n.startswith("good"): write_tone(p, 0.5, freq=300 + 100 * i)
        else: break_audio(p, n[4:], 0.5)
        paths.append(str(p))
    return pd.DataFrame({"path": paths, "label": "a"})


def test_dataset_reports_and_skips_broken_audio(tmp_path):
    "Corrupt, truncated, empty and NaN audio in a dataset: every batch is full and finite, each file is reported once with its reason."
    from audiotl_nb.data import AudioDataset, SamplerDL
    from audiotl_nb.samplers import EvalShardSampler
    kinds = ["corrupt", "truncated", "empty", "nan"]
    items = _bad_items(tmp_path / "clips", kinds)
    log = tmp_path / "bad_files.csv"
    ds = AudioDataset(items, ["a"], clip_seconds=0.5, bad_file_log=log)
    for _ in range(2):    # two epochs: the broken files are reported once
        xs = [x for x, _ in SamplerDL(ds, sampler=EvalShardSampler(len(ds)), bs=4)]
    x = torch.cat(xs)
    assert x.shape == (len(items), 8000) and torch.isfinite(x).all() and (x.abs().amax(1) > 0.05).all()
    bad = sorted(p for p in items.path if "bad_" in p)
    assert sorted(p for p, _ in ds.failures) == bad
    report = pd.read_csv(log)
    assert sorted(report.path) == bad
    for p, why in zip(report.path, report.reason): assert REASONS[Path(p).stem[4:]] in why


def test_dataset_reports_zero_length_audio(tmp_path):
    "Zero-length audio in a dataset: reported and skipped like the other broken files (as the feature store does)."
    from audiotl_nb.data import AudioDataset
    items = _bad_items(tmp_path / "clips", ["zero_length"])
    ds = AudioDataset(items, ["a"], clip_seconds=0.5)
    xs = [ds[i][0] for i in range(len(ds))]
    assert [p for p, _ in ds.failures] == [p for p in items.path if "zero_length" in p]
    assert all(x.abs().amax() > 0.05 for x in xs)     # no silent stand-in for the empty clip


@pytest.fixture(scope="module")
def damaged_run(world, tmp_path_factory):
    """A 1-epoch fine-tuning on a copy of the bird-detection task with 5 % of its 60 clips deleted and four training
    clips broken (corrupt, truncated, empty, NaN). Returns (result, removed paths, broken paths, warning texts)."""
    from audiotl_nb.data import get_task
    from audiotl_nb.train.core import finetune
    tmp = tmp_path_factory.mktemp("damaged")
    root = tmp / "dcase2018_bad"
    shutil.copytree(world.tasks["dcase2018_bad"], root)
    task = get_task("dcase2018_bad", root)
    wavs = sorted(root.rglob("*.wav"))
    assert len(wavs) == 60
    removed = [str(p) for p in wavs[::20]]            # 3 of 60 clips: 5 %
    for p in removed: os.unlink(p)
    train = [p for p in task.items("train").path if p not in removed]
    broken = {k: train[3 + 4 * i] for i, k in enumerate(["corrupt", "truncated", "empty", "nan"])}
    for k, p in broken.items(): break_audio(p, k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")   # one batch of the whole training split: every clip is drawn in the epoch
        res = finetune(dict(task="dcase2018_bad", root=str(root), epochs=1, **{**TINY, "bs": len(train), "valid_bs": 8}),
                       tmp / "run")
    return res, removed, list(broken.values()), [str(w.message) for w in caught], len(train)


def test_run_completes_with_missing_and_broken_clips(damaged_run):
    "5 % of a data set's clips missing and four training clips broken: the training run completes, counts the missing clips and names the broken ones."
    res, removed, broken, said, n_train = damaged_run
    assert res.status == "done" and status_of(res.run_dir) == "done"
    assert res.metrics["n_train"] == n_train                    # the missing clips left the split
    assert all(np.isfinite(v) for v in res.test.values()) and res.model_path is not None
    text = "\n".join(said)
    assert "3 of 60 listed clips are missing" in text
    for p in broken: assert f"skipping unreadable audio {p}" in text, f"{p} was skipped without a word"
    from audiotl_nb.data import get_task     # the task's own manifest names the missing clips and their splits
    task = get_task("dcase2018_bad", json.loads((Path(res.run_dir) / "spec.json").read_text())["root"])
    assert sorted(task.missing.path) == sorted(removed) and set(task.missing.reason) == {"missing"}
    assert set(task.missing.split) <= {"train", "dev", "test"} and "test" in set(task.missing.split)


def test_run_directory_lists_skipped_clips(damaged_run):
    "5 % missing and broken clips: the run directory holds a manifest naming every clip the run skipped, with a reason."
    res, removed, broken, _, _ = damaged_run
    rd = Path(res.run_dir)
    records = [p for p in rd.iterdir() if p.suffix in (".csv", ".json") and p.name not in
               ("history.csv", "metrics.json", "spec.json", "status.json")]
    text = "\n".join(p.read_text() for p in records)
    for p in removed + broken: assert p in text, f"{p} is in no manifest of {rd}"


# =====================================================================================================================
# Unknown names
# =====================================================================================================================
def _unknown_name_cases():
    from audiotl_nb.audio import FRONTENDS, create_frontend
    from audiotl_nb.data import TASKS, get_task
    from audiotl_nb.experiments import ONTOLOGY_SUBSETS, OntologyStudy
    from audiotl_nb.metrics import METRICS, get_metric
    from audiotl_nb.models.core import create_model, list_models
    from audiotl_nb.ontology import AUDIOSET_SUBSETS, get_subset
    return {
        "subset": (lambda: get_subset("animals"), list(AUDIOSET_SUBSETS), "animal"),
        "study subset": (lambda: OntologyStudy(subsets=["animals"]), ONTOLOGY_SUBSETS + ["all"], "animal"),
        "model": (lambda: create_model("cnn_10", 2), list_models(), "cnn10"),
        "task": (lambda: get_task("dcase2018bad", "."), TASKS.names(), "dcase2018_bad"),
        "front-end": (lambda: create_frontend("panns_16k"), FRONTENDS.names(), "panns16k"),
        "metric": (lambda: get_metric("uarr"), METRICS.names(), "uar"),
    }


@pytest.mark.parametrize("kind", ["subset", "study subset", "model", "task", "front-end", "metric"])
def test_unknown_name_lists_the_valid_names(kind):
    "Unknown subset, model, task, front-end and metric names: UnknownNameError lists every valid name and suggests the closest."
    call, valid, meant = _unknown_name_cases()[kind]
    with pytest.raises(UnknownNameError) as e: call()
    msg = str(e.value)
    assert sorted(e.value.valid) == sorted(valid) and len(valid) > 2
    for v in valid: assert repr(v) in msg or f" {v}," in msg or f" {v}." in msg, f"{v!r} not listed in: {msg}"
    assert meant in e.value.suggestions


@pytest.mark.parametrize("field,value,kind", [("model", "cnn_10", "model"), ("frontend", "panns_16k", "front-end"),
                                              ("task", "dcase2018bad", "task"), ("metrics", ["uarr"], "clip metric"),
                                              ("task_kw", {"subset": "animals"}, "pre-training set")])
def test_unknown_name_in_a_run_spec_fails_the_run_with_the_valid_names(field, value, kind, world, tmp_path):
    "Unknown names in a training spec: the run fails, and its status names the unknown name and the valid ones."
    from audiotl_nb.train.core import finetune, pretrain
    spec = dict(task="dcase2018_bad", root=str(world.tasks["dcase2018_bad"]), epochs=1, **TINY)
    train = finetune
    if field == "task_kw": spec, train = dict(root=str(world.audioset), epochs=1, **TINY), pretrain
    with pytest.raises(UnknownNameError) as e: train({**spec, field: value}, tmp_path / "run")
    st = status_of(tmp_path / "run")
    assert st.startswith("failed: UnknownNameError") and f"Unknown {kind}" in st
    assert f"Valid {kind} names: " in st and all(v in st for v in e.value.valid)


# =====================================================================================================================
# kill -9 of a training process
# =====================================================================================================================
def test_training_killed_mid_epoch_resumes_to_the_same_result(world, reference, tmp_path):
    "kill -9 of a training process in the middle of epoch 1: the rerun resumes after epoch 0 and ends exactly as an uninterrupted run."
    from audiotl_nb.train.core import run_spec
    spec = ref_spec(world)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run, marker = tmp_path / "killed", tmp_path / "paused"
    p = subprocess.Popen([sys.executable, str(HELPERS), "train-pause", str(tmp_path / "spec.json"), str(run), str(marker), "1", "2"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    try:
        t0 = time.time()
        while not marker.exists():
            assert p.poll() is None, "the training process ended before it reached epoch 1, step 2"
            assert time.time() - t0 < 300, "the training process did not reach epoch 1, step 2 in 300 s"
            time.sleep(0.05)
        assert marker.read_text().split() == [str(p.pid), "1", "2"]
        os.kill(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None: p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert status_of(run) == "running"                                   # killed: no chance to say more
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0  # the last complete epoch
    assert len(pd.read_csv(run / "history.csv")) == 1 and not (run / "metrics.json").exists()
    resumed = run_spec(spec, run)
    assert "resuming after epoch 0" in (run / "log.txt").read_text()
    assert_same_run(resumed, reference)


# =====================================================================================================================
# kill -9 of grid workers and grids; two executors on one store
# =====================================================================================================================
def toy_grid(n: int, sleep: float) -> dict:
    return {"grid": "runs", "runs": [{"kind": "toy", "name": f"r{i}", "seed": i, "n": 120, "sleep": sleep} for i in range(n)]}


def executions(store, rid) -> int:
    "How many times run `rid` was started (the toy runner appends one line per start)."
    p = store.run_path(rid) / "executions.txt"
    return len(p.read_text().splitlines()) if p.exists() else 0


def assert_complete(store, ids, started_twice=()):
    "Every run done with its metrics, started once (or twice if it was killed), one result row per run and metric."
    from audiotl_nb.experiments import results_table, toy_run
    assert all(store.status(r) == "done" for r in ids), store.status_table(ids)
    for r in ids: assert executions(store, r) == (2 if r in started_twice else 1), (r, executions(store, r))
    t = results_table(store, ids)
    assert len(t) == 2 * len(ids) and not t.duplicated(["run_id", "metric"]).any() and set(t.run_id) == set(ids)
    for r in started_twice:   # the result of a killed-then-rerun run is the result of a clean run
        spec = {k: v for k, v in store.record(r).spec.items() if k != "sleep"}
        assert store.run_dir(r).metrics["test"] == toy_run(spec, store.root / "check" / r)["test"]


def _watch_and_kill(store, ids, stop: threading.Event, killed: dict, me: int):
    "Kill -9 the first worker process seen inside a run (it holds the run's lock and the run has started)."
    while not stop.is_set():
        for rid in ids:
            try: info = json.loads((store.run_path(rid) / ".lock").read_text())
            except (OSError, json.JSONDecodeError): continue
            if info.get("pid") not in (None, me) and executions(store, rid):
                os.kill(info["pid"], signal.SIGKILL)
                killed.update(run=rid, pid=info["pid"])
                return
        time.sleep(0.02)


def test_killed_grid_worker_loses_no_run(tmp_path):
    "kill -9 of a grid worker inside a run: the grid restarts the worker and the run, and finishes with every result once."
    from audiotl_nb.experiments import LocalExecutor, RunList, RunStore, run_grid
    store = RunStore(tmp_path / "store")
    ids = store.add_all(RunList.from_dict({k: v for k, v in toy_grid(4, 0.5).items() if k != "grid"}).runs())
    stop, killed = threading.Event(), {}
    t = threading.Thread(target=_watch_and_kill, args=(store, ids, stop, killed, os.getpid()), daemon=True)
    t.start()
    try: res = run_grid(store, ids, LocalExecutor(workers=1, mode="direct", threads=1), progress=False, poll=0.1)
    finally: stop.set(); t.join(5)
    assert killed, "no worker was killed"
    assert res.ok and res.count("done") == 4
    assert_complete(store, ids, started_twice=[killed["run"]])


@pytest.mark.slow
def test_killed_papermill_worker_takes_its_kernel_along(tmp_path):
    "kill -9 of a grid worker executing a notebook: its orphaned kernel shuts down by itself, the run is redone once, every result is there once."
    from audiotl_nb.experiments import LocalExecutor, RunList, RunStore, run_grid
    store = RunStore(tmp_path / "store")
    ids = store.add_all(RunList.from_dict({k: v for k, v in toy_grid(2, 4.0).items() if k != "grid"}).runs())
    stop, killed = threading.Event(), {}
    def kernels_of(pid):
        r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return [int(k) for k in r.stdout.split()]
    def watch():
        while not stop.is_set():
            for rid in ids:
                try: info = json.loads((store.run_path(rid) / ".lock").read_text())
                except (OSError, json.JSONDecodeError): continue
                if executions(store, rid):
                    killed.update(run=rid, kernels=kernels_of(info["pid"]))
                    os.kill(info["pid"], signal.SIGKILL)
                    return
            time.sleep(0.02)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try: res = run_grid(store, ids, LocalExecutor(workers=1, mode="papermill", threads=1), progress=False, poll=0.2)
    finally: stop.set(); t.join(5)
    assert killed and killed["kernels"], killed
    assert not any(Path(f"/proc/{k}").exists() and Path(f"/proc/{k}/stat").read_text().split()[2] != "Z" for k in killed["kernels"])
    assert res.ok
    assert_complete(store, ids, started_twice=[killed["run"]])


def _grid_cli(*args) -> list[str]:
    return [sys.executable, "-c", "import sys; from audiotl_nb.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def test_killed_grid_rerun_finishes_without_duplicates(tmp_path):
    "kill -9 of a whole grid (`audiotl grid run` and its worker): rerunning it finishes every run, each result once, finished runs not redone."
    import yaml
    from audiotl_nb.experiments import RunStore, grid_main, load_grid
    f = tmp_path / "grid.yaml"
    f.write_text(yaml.safe_dump(toy_grid(5, 0.5)))
    store = RunStore(tmp_path / "store")
    ids = store.add_all(load_grid(f)[0].runs())
    log = open(tmp_path / "grid.log", "w")
    p = subprocess.Popen(_grid_cli("grid", "run", str(f), "--store", str(store.root), "--mode", "direct", "--workers", "1",
                                   "--no-progress"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:   # two runs finished and a third one started
            done = [r for r in ids if store.run_dir(r).status == "done"]
            busy = [r for r in ids if executions(store, r) and r not in done]
            if len(done) >= 2 and busy: break
            assert p.poll() is None, (tmp_path / "grid.log").read_text()
            assert time.time() - t0 < 300
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
        p.wait(); log.close()
    time.sleep(0.2)
    done = [r for r in ids if store.run_dir(r).status == "done"]
    interrupted = [r for r in ids if executions(store, r) and r not in done]
    assert len(done) >= 2 and len(interrupted) == 1
    info = store.info(interrupted[0])
    assert (info["status"], info["reason"]) == ("pending", "interrupted")     # its lock holder is gone
    before = {r: (store.run_path(r) / "metrics.json").read_bytes() for r in done}
    assert grid_main(["run", str(f), "--store", str(store.root), "--mode", "direct", "--workers", "0", "--no-progress"]) == 0
    assert_complete(store, ids, started_twice=interrupted)
    assert all((store.run_path(r) / "metrics.json").read_bytes() == b for r, b in before.items())


def test_two_executors_on_one_store_never_run_a_run_twice(tmp_path):
    "Two executors (two processes) started on one store: together they finish the grid, and no run is ever started twice."
    from audiotl_nb.experiments import LocalExecutor, RunList, RunStore, run_grid
    store = RunStore(tmp_path / "store")
    ids = store.add_all(RunList.from_dict({k: v for k, v in toy_grid(6, 0.4).items() if k != "grid"}).runs())
    code = ("import sys; from audiotl_nb.experiments import LocalExecutor, RunStore, run_grid; "
            "r = run_grid(RunStore(sys.argv[1]), sys.argv[2:], LocalExecutor(workers=0, mode='direct', threads=1), progress=False, poll=0.05); "
            "sys.exit(0 if r.ok else 1)")
    p = subprocess.Popen([sys.executable, "-c", code, str(store.root), *ids], cwd=ROOT)
    try:
        t0 = time.time()
        while not any(executions(store, r) for r in ids):     # the other executor has started its first run
            assert p.poll() is None and time.time() - t0 < 300
            time.sleep(0.02)
        res = run_grid(store, ids, LocalExecutor(workers=0, mode="direct", threads=1), progress=False, poll=0.05)
        assert p.wait(300) == 0
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert res.ok
    assert_complete(store, ids)
    pids = {(store.run_path(r) / "executions.txt").read_text().split()[1] for r in ids}
    assert pids == {str(p.pid), str(os.getpid())}, "both executors should have run some of the runs"


# =====================================================================================================================
# A full disk
# =====================================================================================================================
class Disk:
    "A folder whose file system can be filled and freed: a real tmpfs, or a simulation (ENOSPC from os.write/fsync)."
    def __init__(self, folder: Path, monkeypatch=None):
        self.folder, self.real, self.ballast = Path(folder), monkeypatch is None, None
        self.sim = None if self.real else SimulatedFullDisk(monkeypatch, self.folder, active=False)

    def fill(self):
        if self.real: self.ballast = fill_disk(self.folder)
        else: self.sim.fill()

    def free(self):
        if self.real: self.ballast.unlink()
        else: self.sim.free()


@pytest.fixture(params=["tmpfs", "simulated"])
def disk(request, tmp_path, monkeypatch):
    "A file system that can be made full: a real 16 MB tmpfs (where this process may mount one), or a simulated one."
    if request.param == "simulated":
        (tmp_path / "fs").mkdir()
        yield Disk(tmp_path / "fs", monkeypatch)
        return
    with tmpfs(tmp_path / "fs", "16m") as mnt:
        if mnt is None: pytest.skip("cannot mount a tmpfs here (needs root); the simulated variant covers this")
        yield Disk(mnt)


def _enospc(e: BaseException) -> bool:
    "Whether `e` (or what it was raised from) is a 'no space left on device' error."
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC: return True
        if "No space left" in str(e) or "file write failed" in str(e): return True
        e = e.__cause__ or e.__context__
    return False


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and "ballast" not in p.name}


def test_full_disk_never_corrupts_results_or_checkpoints(disk):
    "A full disk while writing metrics, status, history and a checkpoint: each write fails, the earlier files stay intact, no temporary file is left."
    from audiotl_nb.audio import create_frontend
    from audiotl_nb.models.core import create_model, load_checkpoint, save_checkpoint
    rd, fe = RunDir(disk.folder / "run"), create_frontend("panns16k").config
    old_model, new_model = create_model("cnn10", 2, width=0.125), create_model("cnn10", 2, width=0.125)
    rd.write_spec({"kind": "finetune", "seed": 1})
    rd.write_metrics({"test": {"uar": 0.75}})
    atomic_write_text(rd / rd.history_file, "epoch,train_loss\n0,0.5\n")
    save_checkpoint(rd / rd.model_file, old_model, frontend_config=fe, labels=["a", "b"])
    rd.set_status("done")
    before = _snapshot(rd.path)
    disk.fill()
    writes = {"metrics": lambda: rd.write_metrics({"test": {"uar": 0.1}}),
              "status": lambda: rd.set_status("failed: overwritten"),
              "history": lambda: atomic_write_text(rd / rd.history_file, "epoch,train_loss\n" + "0,0.1\n" * 5000),
              "checkpoint": lambda: save_checkpoint(rd / rd.model_file, new_model, frontend_config=fe),
              "json": lambda: atomic_write_json(rd / "extra.json", {"x": list(range(10000))})}
    for what, write in writes.items():
        with pytest.raises(Exception) as e: write()
        assert _enospc(e.value), f"{what}: {e.value!r}"
    assert _snapshot(rd.path) == before and leftovers(rd.path) == []
    ck = load_checkpoint(rd / rd.model_file, expect_frontend="panns16k")
    assert all(torch.equal(v, old_model.state_dict()[k]) for k, v in ck["state_dict"].items())
    assert rd.metrics == {"test": {"uar": 0.75}} and rd.status == "done"
    disk.free()
    rd.write_metrics({"test": {"uar": 0.5}})
    assert rd.metrics == {"test": {"uar": 0.5}}


def test_full_disk_keeps_the_feature_store_intact(disk, tmp_path):
    "A full disk while a feature store grows: the build fails, the stored features and the index stay as they were, no half-written shard is left."
    from audiotl_nb.store import FeatureStore
    clips = [write_tone(tmp_path / "clips" / f"c{i}.wav", 1.0, freq=200 + 50 * i) for i in range(6)]
    store = FeatureStore(disk.folder / "features", "panns16k")
    store.build(clips[:3])
    old = [store.get(c) for c in clips[:3]]
    index = (store.path / store.index_file).read_bytes()
    disk.fill()
    with pytest.raises(Exception) as e: FeatureStore(disk.folder / "features", "panns16k").build(clips[3:])
    assert _enospc(e.value), repr(e.value)
    assert (store.path / store.index_file).read_bytes() == index and leftovers(disk.folder) == []
    again = FeatureStore(disk.folder / "features", "panns16k")
    assert len(again) == 3 and all(torch.equal(again.get(c), o) for c, o in zip(clips[:3], old))
    disk.free()
    assert again.build(clips).computed == 3 and len(again) == 6


def _toy_store(folder, n=3):
    from audiotl_nb.experiments import RunRecord, RunStore
    store = RunStore(folder)
    return store, store.add_all([RunRecord({"kind": "toy", "seed": i, "n": 120}) for i in range(n)])


def test_full_disk_keeps_finished_grid_results(disk):
    "A full disk while a grid runs: the run fails, the finished runs' results stay intact and listed, and the grid finishes once space is back."
    from audiotl_nb.experiments import LocalExecutor, execute_run, results_table, run_grid
    store, ids = _toy_store(disk.folder / "store")
    for r in ids[:2]: assert execute_run(store, r)["outcome"] == "done"
    before, table = _snapshot(store.root), results_table(store)
    disk.fill()
    try: out = execute_run(store, ids[2])
    except Exception as e: out = {"outcome": "raised", "error": e}
    assert out["outcome"] in ("failed", "raised") and store.run_dir(ids[2]).metrics is None
    after = _snapshot(store.root)
    assert {k: v for k, v in after.items() if not k.startswith(f"runs/{ids[2]}")} == \
           {k: v for k, v in before.items() if not k.startswith(f"runs/{ids[2]}")}
    pd.testing.assert_frame_equal(results_table(store), table)
    assert leftovers(store.root) == []
    disk.free()
    if disk.real: (store.run_path(ids[2]) / ".lock").unlink(missing_ok=True)   # see the next test
    res = run_grid(store, ids, LocalExecutor(workers=0, mode="direct", threads=1), progress=False, poll=0.05)
    assert res.ok and res.count("skipped") == 2 and len(results_table(store)) == 6


def test_full_disk_leaves_no_lock_that_blocks_the_run(tmp_path):
    "A full disk while a grid takes a run's lock: once space is back, the run executes (no empty lock blocks it forever)."
    from audiotl_nb.experiments import execute_run
    with tmpfs(tmp_path / "fs", "4m") as mnt:
        if mnt is None: pytest.skip("needs a real full file system (a tmpfs mounted as root)")
        store, ids = _toy_store(mnt / "store", 1)
        ballast = fill_disk(mnt)
        with pytest.raises(OSError): execute_run(store, ids[0])
        ballast.unlink()
        assert execute_run(store, ids[0])["outcome"] == "done"


def test_full_disk_keeps_the_previous_report(tmp_path, monkeypatch):
    "A full disk while a study report is rewritten: the write fails and the previous results.csv stays complete."
    import papermill
    from audiotl_nb.experiments import RunRecord, execute_run, write_report
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: None)   # only the tables matter here
    with tmpfs(tmp_path / "fs", "4m") as mnt:
        if mnt is None: pytest.skip("needs a real full file system (a tmpfs mounted as root)")
        store, ids = _toy_store(tmp_path / "store", 30)     # the store on another disk: only the report's is full
        for r in ids: execute_run(store, r)
        write_report(store, mnt / "report", html=False)
        before = (mnt / "report" / "results.csv").read_bytes()
        # 70 more runs: the new results.csv needs more pages than the old tables free when they are truncated
        for r in store.add_all([RunRecord({"kind": "toy", "seed": 100 + i, "n": 120}) for i in range(70)]): execute_run(store, r)
        ballast = fill_disk(mnt)
        with pytest.raises(OSError): write_report(store, mnt / "report", html=False)
        ballast.unlink()
        assert (mnt / "report" / "results.csv").read_bytes() == before


def test_full_disk_mid_training_loses_no_epoch(world, reference, tmp_path, monkeypatch):
    "A full disk in the middle of epoch 1 of a training run: the run fails, its epoch-0 checkpoint stays intact; once space is back it resumes and ends as an uninterrupted run."
    from audiotl_nb.train.core import run_spec
    spec = ref_spec(world)
    with tmpfs(tmp_path / "fs", "16m") as mnt:
        disk = Disk(mnt) if mnt is not None else Disk(tmp_path, monkeypatch)   # the real thing where possible
        run = disk.folder / "run"
        with pytest.raises(Exception) as e: run_spec(spec, run, cbs=[make_action(1, 1, disk.fill)])
        assert _enospc(e.value), repr(e.value)
        assert status_of(run) in ("running", "failed: OSError: [Errno 28] No space left on device")
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0
        assert not (run / "metrics.json").exists() and not (run / "model.pt").exists() and leftovers(run) == []
        disk.free()
        resumed = run_spec(spec, run)
        assert "resuming after epoch 0" in (run / "log.txt").read_text()
        assert_same_run(resumed, reference)


# =====================================================================================================================
# Non-finite loss
# =====================================================================================================================
def test_nonfinite_loss_fails_the_run_and_a_retry_resumes(world, reference, tmp_path):
    "A NaN batch at epoch 1, step 2: status `failed: non-finite loss at epoch 1 step 2`, no result written; a retry resumes after epoch 0 and ends as an uninterrupted run."
    from audiotl_nb.train.core import NonFiniteLossError, run_spec
    spec, run = ref_spec(world), tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e: run_spec(spec, run, cbs=[make_poison(1, 2)])
    assert (e.value.epoch, e.value.step) == (1, 2) and not np.isfinite(e.value.value)
    assert status_of(run) == "failed: non-finite loss at epoch 1 step 2"
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0
    assert not (run / "metrics.json").exists() and not (run / "model.pt").exists()
    assert_same_run(run_spec(spec, run), reference)


def test_nonfinite_loss_status_survives_the_grid(world, tmp_path):
    "A diverging run executed by the grid: the run store shows `failed: non-finite loss at epoch E step S`."
    from audiotl_nb.experiments import RunRecord, RunStore, execute_run
    store = RunStore(tmp_path / "store")
    rid = store.add(RunRecord(dict(kind="finetune", task="dcase2018_bad", root=str(world.tasks["dcase2018_bad"]), epochs=2,
                                   lr=1e30, **TINY)))
    assert execute_run(store, rid)["outcome"] == "failed"
    assert re.fullmatch(r"failed: non-finite loss at epoch \d+ step \d+", store.run_dir(rid).status), store.run_dir(rid).status


# =====================================================================================================================
# Checkpoints
# =====================================================================================================================
def test_checkpoint_carrying_code_is_refused_everywhere(world, tmp_path, monkeypatch):
    "A checkpoint whose pickle would create a file (and run a shell): every loader reads with weights_only=True and refuses it; the file is never created."
    from audiotl_nb.models.core import load_checkpoint, model_from_checkpoint
    from audiotl_nb.train.core import finetune, read_checkpoint_file, read_resume_checkpoint
    marker = tmp_path / "pwned"
    markers = [marker, Path(str(marker) + ".sh")]
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)                     # the payload is live: an unsafe load runs it
    assert all(m.exists() for m in markers)
    for m in markers: m.unlink()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    for load in (load_checkpoint, model_from_checkpoint, read_checkpoint_file):
        with pytest.raises(CheckpointError, match="refusing to load"): load(evil)
    assert read_resume_checkpoint(evil) is None               # a resume file that would run code: start afresh
    rd = tmp_path / "run"
    with pytest.raises(CheckpointError, match="refusing to load"):
        finetune(dict(task="dcase2018_bad", root=str(world.tasks["dcase2018_bad"]), epochs=1, pretrained=str(evil), **TINY), rd)
    assert status_of(rd).startswith("failed: CheckpointError: refusing to load")
    assert loads and all(w is True for w in loads), loads
    assert not any(m.exists() for m in markers)


def test_checkpoint_with_another_frontend_is_refused_naming_both(tmp_path):
    "A checkpoint made with panns16k features loaded for panns32k: refused, and the message names both front-ends and what differs."
    from audiotl_nb.audio import create_frontend
    from audiotl_nb.models.core import create_model, load_checkpoint, model_from_checkpoint, save_checkpoint
    m = create_model("cnn10", 2, frontend="panns16k", width=0.125)
    path = save_checkpoint(tmp_path / "model.pt", m, labels=["no", "yes"])
    assert load_checkpoint(path, expect_frontend="panns16k")["labels"] == ["no", "yes"]
    for load in (load_checkpoint, model_from_checkpoint):
        with pytest.raises(CheckpointError) as e: load(path, expect_frontend=create_frontend("panns32k"))
        msg = str(e.value)
        assert "front-end mismatch" in msg and "'sample_rate': 16000" in msg and "'sample_rate': 32000" in msg
        assert "'name': 'panns16k'" in msg and "'name': 'panns32k'" in msg and "differing:" in msg and str(path) in msg


# =====================================================================================================================
# Injection through parameters and grid files
# =====================================================================================================================
def hostile_strings(marker: Path) -> list[str]:
    "Strings that would run code (create `marker`) if a parameter were pasted into source code or a shell unescaped."
    m = str(marker)
    return [f'"; open({m!r}, "w"); x = "', f"'; open({m!r}, 'w'); x = '", f'"""; open({m!r}, "w"); x = """',
            f"'''; open({m!r}, 'w'); x = '''", f'\nopen({m!r}, "w")\n', f'\\"; open({m!r}, "w") #', "ends in a backslash \\",
            f'\r\nopen({m!r}, "w")', f'\u2028open({m!r}, "w")', f"$(touch {m})", f"`touch {m}`", f"; touch {m}",
            "{run_dir}{{spec_json}}", "\x00\x1b[31m", "ünïcödé ✓ 🎧", f'{{"kind": "toy"}}"); open({m!r}, "w"); ("']


def _injected_assignments(nb) -> dict:
    "The assignments of papermill's injected-parameters cell; fails unless it holds only `name = 'string constant'` lines."
    cells = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    tree = ast.parse(cells[0].source)
    out = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), ast.dump(node)
        assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str), ast.dump(node)
        out[node.targets[0].id] = node.value.value
    return out


def test_papermill_parameters_stay_strings(tmp_path):
    "Parameters with quotes, newlines and code-like text: papermill's injected cell holds only string constants equal to them."
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    from audiotl_nb.experiments import notebook_for
    nb = load_notebook_node(str(notebook_for("finetune")))
    for s in hostile_strings(tmp_path / "pwned"):
        params = {"spec_json": s, "overrides_json": s[::-1], "run_dir": s + "/x"}
        assert _injected_assignments(parameterize_notebook(nb, params)) == params


def test_papermill_run_cannot_be_injected(tmp_path):
    "A grid run executed by papermill with hostile strings in its spec and its run-store path: the run is done, the strings arrive intact, no code ran."
    from audiotl_nb.experiments import RunRecord, RunStore, execute_run
    marker = tmp_path / "pwned"
    nasty = hostile_strings(marker)
    store = RunStore(tmp_path / "st\"o're $(touch x)\nnl")
    rid = store.add(RunRecord({"kind": "toy", "seed": 3, "n": 120, "note": "\n".join(nasty), "more": nasty}))
    out = execute_run(store, rid, mode="papermill")
    assert out["outcome"] == "done", out
    assert store.run_dir(rid).metrics["note"] == "\n".join(nasty)
    params = _injected_assignments(nbformat.read(store.run_path(rid) / "notebook.ipynb", as_version=4))
    assert json.loads(params["spec_json"]) == store.record(rid).spec and params["run_dir"] == str(store.run_path(rid))
    assert not marker.exists() and not (Path.cwd() / "x").exists() and not (ROOT / "nbs" / "experiments" / "x").exists()


def test_grid_and_config_yaml_cannot_construct_objects(tmp_path):
    "A grid file or config YAML with python object tags: refused as a configuration error, and nothing runs."
    from audiotl_nb.core import Config
    from audiotl_nb.experiments import load_grid
    from audiotl_nb.train.core import FinetuneSpec
    marker = tmp_path / "pwned"
    for tag in ("!!python/object/apply:os.system", "!!python/object/apply:subprocess.call"):
        f = tmp_path / "grid.yaml"
        f.write_text(f"grid: runs\nruns:\n  - kind: toy\n    note: {tag} [['touch', '{marker}']]\n")
        with pytest.raises(ConfigError, match="cannot parse grid"): load_grid(f)
        with pytest.raises(Exception) as e: FinetuneSpec.from_yaml(f"task: {tag} [['touch', '{marker}']]\n")
        assert "could not determine a constructor" in str(e.value) or isinstance(e.value, ConfigError)
    assert not marker.exists()
