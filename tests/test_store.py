"""The feature store with real files: correctness, broken files, reuse, stale features, concurrency and killed builds."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import audiotl_nb.store as store_mod
from audiotl_nb.audio import create_frontend, load_audio, save_audio
from audiotl_nb.core import DataError
from audiotl_nb.store import FeatureStore, StoreDataset, StoreMissError, pad_collate

ROOT = Path(__file__).resolve().parents[1]


def _clip(sr, seconds, f0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(sr * seconds)) / sr
    return 0.3 * torch.sin(2 * torch.pi * f0 * t) + 0.02 * torch.randn(len(t), generator=g)


def _files(folder: Path, n: int, sr=16000, seconds=1.0):
    return [save_audio(folder / f"c{i:03d}.wav", _clip(sr, seconds, 200 + 37 * i, i), sr) for i in range(n)]


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_stored_features_equal_the_frontend(tmp_path):
    paths = [save_audio(tmp_path / "a.wav", _clip(16000, 2.0, 300), 16000),
             save_audio(tmp_path / "b.flac", _clip(44100, 0.7, 900), 44100),
             save_audio(tmp_path / "c.ogg", _clip(32000, 1.3, 2000), 32000)]
    for name in ("panns16k", "ast_fbank128", "atdr64x400"):
        st = FeatureStore(tmp_path / "feat", name)
        rep = st.build(paths)
        assert (rep.computed, rep.reused, rep.skipped) == (3, 0, {})
        fe = create_frontend(name)
        for p in paths:
            ref = fe(load_audio(p, sr=fe.sample_rate)[0])[0]
            got = st.get(p)
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert float((got - ref).abs().max()) <= 0.07  # float16 rounding only
    assert len(list((tmp_path / "feat").iterdir())) == 6  # 3 stores + their lock files


def test_broken_files_are_skipped_and_listed(tmp_path):
    good = _files(tmp_path, 2)
    raw = good[0].read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.flac").write_bytes(os.urandom(2000))
    (tmp_path / "zero.wav").write_bytes(b"")
    save_audio(tmp_path / "empty.wav", np.zeros(0), 16000)
    bad = [tmp_path / n for n in ("cut.wav", "junk.flac", "zero.wav", "empty.wav", "missing.wav")]
    st = FeatureStore(tmp_path / "feat")
    with pytest.warns(UserWarning, match="5 of 7 files could not be decoded"):
        rep = st.build(good + bad)
    assert rep.computed == 2 and set(rep.skipped) == {str(p) for p in bad}
    manifest = json.loads((st.path / "skipped.json").read_text())
    assert manifest == st.skipped and "truncated" in manifest[str(tmp_path / "cut.wav")]
    assert "0 samples" in manifest[str(tmp_path / "empty.wav")] and "0 bytes" in manifest[str(tmp_path / "zero.wav")]
    for p in bad:
        with pytest.raises(DataError, match=p.name):
            st.get(p)
    # skipped files are not retried while unchanged, and are once they are repaired
    with pytest.warns(UserWarning):
        assert st.build(good + bad).computed == 0
    save_audio(tmp_path / "cut.wav", _clip(16000, 1.0, 500), 16000)
    with pytest.warns(UserWarning, match="4 of 7"):
        rep = st.build(good + bad)
    assert rep.computed == 1 and st.get(tmp_path / "cut.wav").shape == (1, 101, 64)


def test_reuse_across_instances_and_changes(tmp_path, quiet):
    paths = _files(tmp_path, 3)
    FeatureStore(tmp_path / "feat").build(paths)
    st = FeatureStore(tmp_path / "feat")  # a later run
    rep = st.build(paths)
    assert (rep.computed, rep.reused) == (0, 3)
    save_audio(paths[1], _clip(16000, 0.5, 123), 16000)  # the file changes on disk
    assert st.build(paths).computed == 1 and st.get(paths[1]).shape == (1, 51, 64)
    paths[2].unlink()  # audio deleted after its features were stored: the features stay
    assert st.build(paths).computed == 0 and st.get(paths[2]).shape == (1, 101, 64)
    with pytest.raises(StoreMissError, match="build it first"):
        st.get(tmp_path / "other.wav")


def test_a_changed_config_never_reads_stale_features(tmp_path, quiet):
    paths = _files(tmp_path, 2)
    a = FeatureStore(tmp_path / "feat", "panns16k")
    a.build(paths)
    b = FeatureStore(tmp_path / "feat", create_frontend("panns16k", hop_length=320))
    assert b.path != a.path and len(b) == 0 and paths[0] not in b
    with pytest.raises(StoreMissError):
        b.get(paths[0])
    b.build(paths)
    assert b.get(paths[0]).shape == (1, 51, 64) and a.get(paths[0]).shape == (1, 101, 64)
    # an index that does not match its folder's key is refused rather than read
    idx = json.loads((a.path / "index.json").read_text())
    idx["frontend"]["hop_length"] = 320
    (a.path / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match="different front-end"):
        FeatureStore(tmp_path / "feat", "panns16k").get(paths[0])


def test_normalisation_is_applied_on_read(tmp_path, quiet):
    paths = _files(tmp_path, 2)
    raw = FeatureStore(tmp_path / "feat", "panns16k")
    raw.build(paths)
    fe = create_frontend("panns16k").with_normalization({"mean": -35.0, "std": 8.0}, scale=2.0)
    normed = FeatureStore(tmp_path / "feat", fe)
    assert normed.path == raw.path and normed.frontend_config == fe.config
    torch.testing.assert_close(normed.get(paths[0]), (raw.get(paths[0]) + 35.0) / 16.0)


def test_many_shards_and_a_damaged_shard(tmp_path, quiet):
    paths = _files(tmp_path, 4)
    st = FeatureStore(tmp_path / "feat", shard_mb=0)  # a new shard for every clip
    st.build(paths)
    assert st.info()["shards"] == 4 and st.info()["frames"] == 4 * 101
    fe = create_frontend("panns16k")
    for p in paths:
        assert float((st.get(p) - fe(load_audio(p)[0])[0]).abs().max()) < 0.05
    shard = st.index["items"][str(paths[0])][0]
    with open(st.path / "shards" / shard, "r+b") as f: f.truncate(100)
    with pytest.raises(DataError, match="index expects"):
        FeatureStore(tmp_path / "feat").get(paths[0])


def test_build_with_decoding_workers(tmp_path, quiet):
    paths = _files(tmp_path, 6) + [tmp_path / "missing.wav"]
    st = FeatureStore(tmp_path / "feat", num_workers=2, batch_size=4)
    rep = st.build(paths)
    assert rep.computed == 6 and list(rep.skipped) == [str(tmp_path / "missing.wav")]
    ref = FeatureStore(tmp_path / "feat2", num_workers=0, batch_size=1)
    ref.build(paths)
    for p in paths[:6]:
        torch.testing.assert_close(st.get(p), ref.get(p), atol=0.07, rtol=0)


def test_dataset_and_loader_with_workers(tmp_path, quiet):
    paths = _files(tmp_path, 5) + [save_audio(tmp_path / "long.wav", _clip(16000, 2.0, 440), 16000)]
    (tmp_path / "bad.wav").write_bytes(b"RIFF....")
    items = [(p, i) for i, p in enumerate(paths + [tmp_path / "bad.wav"])]
    ds = StoreDataset(FeatureStore(tmp_path / "feat"), items)
    assert len(ds) == 6 and ds.skipped[0][0] == tmp_path / "bad.wav"
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=pad_collate)
    seen = []
    for x, y, lens in dl:
        assert x.shape[:2] == (len(y), 1) and x.shape[2] == int(lens.max())
        seen += y.tolist()
    assert seen == list(range(6))


_BUILDER = textwrap.dedent("""
    import json, sys, time, warnings
    import audiotl_nb.store as S
    _load = S.load_audio
    def slow(*a, **k):
        time.sleep(float(sys.argv[3])); return _load(*a, **k)
    S.load_audio = slow
    paths = json.loads(open(sys.argv[2]).read())
    open(sys.argv[4], "w").write("started")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = S.FeatureStore(sys.argv[1], "panns16k").build(paths)
    print(json.dumps({"computed": rep.computed, "reused": rep.reused}))
""")


def _spawn(tmp_path, paths, delay, tag):
    lst = tmp_path / "paths.json"
    lst.write_text(json.dumps([str(p) for p in paths]))
    flag = tmp_path / f"started-{tag}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _BUILDER, str(tmp_path / "feat"), str(lst), str(delay), str(flag)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, flag


def _wait_for(cond, timeout=60):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: raise TimeoutError
        time.sleep(0.05)


def test_two_processes_build_the_same_store(tmp_path):
    paths = _files(tmp_path, 8)
    procs = [_spawn(tmp_path, paths, 0.05, tag) for tag in ("a", "b")]
    outs = []
    for proc, _ in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["computed"] for o in outs) == [0, 8] and sorted(o["reused"] for o in outs) == [0, 8]
    st = FeatureStore(tmp_path / "feat")
    assert len(st) == 8 and st.info()["shards"] == 1
    assert not list((tmp_path / "feat").glob(".tmp-*"))


class _NoLock(FeatureStore):
    "Builders without a working lock that wait for each other after reading the index: the worst case for merging."
    barrier, turns, turn = None, None, 0
    def _lock(self): return contextlib.nullcontext()
    def _decoded(self, keys):
        if self.barrier is not None: self.barrier.wait(60)
        yield from super()._decoded(keys)
    def _commit(self, *a, **k):  # with `turns`: builder i adds to the store only after builder i - 1 has
        if self.turns: self.turns[self.turn].wait(60)
        try: return super()._commit(*a, **k)
        finally:
            if self.turns and self.turn + 1 < len(self.turns): self.turns[self.turn + 1].set()


def _race(folder, parts, barrier=True, in_turn=False):
    "Build each list of `parts` in its own thread, all at once, without a lock (`in_turn`: finishing in order); the reports."
    turns = [threading.Event() for _ in parts] if in_turn else None
    if turns: turns[0].set()
    cls = type("Racing", (_NoLock,), {"barrier": threading.Barrier(len(parts)) if barrier else None, "turns": turns})
    reports, errors = [], []
    def build(i, ps):
        try:
            st = cls(folder); st.turn = i
            reports.append(st.build(ps))
        except BaseException as e: errors.append(e)
    threads = [threading.Thread(target=build, args=(i, ps)) for i, ps in enumerate(parts)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    return reports


def _index_files(st):
    return sorted(p.name.split("-")[0] for p in (st.path / "index.d").glob("*.json"))


@pytest.mark.parametrize("in_turn", [False, True], ids=["together", "one-after-the-other"])
def test_without_a_working_lock_the_loser_merges(tmp_path, in_turn, quiet):
    "Two builders without a lock both compute; whether they finish together or one after the other, all six files are kept."
    paths = _files(tmp_path, 6)
    reports = _race(tmp_path / "feat", [paths[:4], paths[2:]], in_turn=in_turn)
    assert sorted(r.computed for r in reports) == [4, 4]  # both read the index before either added to it
    st = FeatureStore(tmp_path / "feat")
    fe = create_frontend("panns16k")
    assert len(st) == 6
    for p in paths:
        assert float((st.get(p) - fe(load_audio(p)[0])[0]).abs().max()) < 0.05
    assert all(s in st.index["shards"] for s in {st.index["items"][str(p)][0] for p in paths})


def test_many_builders_without_a_lock_on_an_existing_store(tmp_path, quiet):
    paths = _files(tmp_path, 13, seconds=0.3)
    FeatureStore(tmp_path / "feat").build(paths[:1])  # every builder adds to a store that exists
    for rnd in range(2):
        part = paths[1 + 6 * rnd: 7 + 6 * rnd]
        _race(tmp_path / "feat", [part[i:i + 2] for i in range(0, 6, 2)])  # three builders, two files each
        st = FeatureStore(tmp_path / "feat")
        assert set(st.paths()) == {str(p) for p in paths[:7 + 6 * rnd]}
    # what a race left unfolded is folded by the next build; nothing is lost on the way
    extra = save_audio(tmp_path / "extra.wav", _clip(16000, 0.3, 999), 16000)
    st.build([extra])
    assert len(st.reload()) == 14 and "add" not in _index_files(st)
    assert FeatureStore(tmp_path / "feat").build(paths + [extra]).computed == 0


def test_readers_see_every_finished_build_while_builders_fold(tmp_path, monkeypatch, quiet):
    "Readers running beside lock-less builders (which fold and delete index files) never miss a finished build."
    paths = _files(tmp_path, 17, seconds=0.2)
    load = store_mod._load
    monkeypatch.setattr(store_mod, "_load", lambda p: (time.sleep(0.005), load(p))[1])  # wider windows for the race
    FeatureStore(tmp_path / "feat").build(paths[:1])
    done, stop, errors, reads = {str(paths[0])}, threading.Event(), [], [0]
    def builder(ps):
        try:
            for p in ps:
                _NoLock(tmp_path / "feat").build([p]); done.add(str(p))
        except BaseException as e: errors.append(e)
    def reader():
        try:
            while not stop.is_set():
                before = set(done)
                got = set(FeatureStore(tmp_path / "feat").paths())
                assert before <= got, f"missed {before - got}"
                reads[0] += 1
        except BaseException as e: errors.append(e)
    builders = [threading.Thread(target=builder, args=(paths[1 + i::2],)) for i in range(2)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers + builders: t.start()
    for t in builders: t.join()
    stop.set()
    for t in readers: t.join()
    assert not errors, errors
    assert reads[0] > 10 and len(FeatureStore(tmp_path / "feat")) == 17


def test_without_hard_links_the_additions_are_read_and_folded_later(tmp_path, monkeypatch, quiet):
    paths = _files(tmp_path, 4, seconds=0.3)
    FeatureStore(tmp_path / "feat").build(paths[:1])
    def no_link(*a): raise OSError(95, "Operation not supported")
    monkeypatch.setattr(store_mod.os, "link", no_link)
    for p in paths[1:]: FeatureStore(tmp_path / "feat").build([p])
    st = FeatureStore(tmp_path / "feat")
    assert len(st) == 4 and _index_files(st) == ["add"] * 3
    assert json.loads((st.path / "index.json").read_text())["items"].keys() == {str(paths[0])}
    monkeypatch.undo()
    save_audio(paths[2], _clip(16000, 0.5, 321), 16000)  # changed: computed again; the newer entry wins
    assert st.build(paths).computed == 1
    assert _index_files(st) == ["gen"] and len(st.reload()) == 4 and st.get(paths[2]).shape == (1, 51, 64)
    gen = json.loads(next((st.path / "index.d").glob("gen-*.json")).read_text())
    assert set(gen["items"]) == {str(p) for p in paths} and gen["format"] == store_mod.STORE_FORMAT


def test_a_store_with_a_single_index_file_is_read_and_migrated(tmp_path, quiet):
    paths = _files(tmp_path, 5, seconds=0.3)
    old = FeatureStore(tmp_path / "feat")
    old.build(paths[:3])
    idx = json.loads((old.path / "index.json").read_text())
    idx["format"] = "audiotl_nb.store/1"   # as the single-file layout wrote it
    (old.path / "index.json").write_text(json.dumps(idx))
    assert not (old.path / "index.d").exists()
    st = FeatureStore(tmp_path / "feat")
    assert len(st) == 3 and st.get(paths[0]).shape == (1, 31, 64)
    assert st.build(paths).computed == 2
    for _ in range(2): st.build([save_audio(tmp_path / f"n{_}.wav", _clip(16000, 0.3, 600 + _), 16000)])
    st = FeatureStore(tmp_path / "feat")
    assert len(st) == 7 and all(st.get(p).shape == (1, 31, 64) for p in paths)
    assert not (st.path / "index.json").exists() and _index_files(st) == ["gen", "gen"]  # generations 2 and 3
    idx["format"] = "audiotl_nb.store/99"
    (st.path / "index.d" / "gen-000099.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match="unknown feature store format"):
        FeatureStore(tmp_path / "feat").get(paths[0])


def test_a_file_system_without_locks_builds_with_a_warning(tmp_path, monkeypatch):
    paths = _files(tmp_path, 2, seconds=0.3)
    def flock(f, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(store_mod.fcntl, "flock", flock)
    with pytest.warns(UserWarning, match="no file locks"):
        rep = FeatureStore(tmp_path / "feat").build(paths)
    assert rep.computed == 2 and len(FeatureStore(tmp_path / "feat")) == 2


@pytest.mark.parametrize("existing", [False, True])
def test_a_killed_build_leaves_nothing_half_written(tmp_path, existing, quiet):
    paths = _files(tmp_path, 30, seconds=0.5)
    if existing: FeatureStore(tmp_path / "feat").build(paths[:3])
    proc, flag = _spawn(tmp_path, paths, 0.2, "k")
    _wait_for(lambda: flag.exists() and list((tmp_path / "feat").glob(".tmp-*/shards/*.f16")))
    time.sleep(0.5)  # well inside the build: some features written to the temporary shard
    proc.send_signal(signal.SIGKILL); proc.wait()
    st = FeatureStore(tmp_path / "feat")
    if existing:
        assert len(st) == 3 and st.get(paths[0]).shape == (1, 51, 64)  # the old index, intact
        with pytest.raises(StoreMissError): st.get(paths[10])
    else:
        assert not st.path.exists() and len(st) == 0
    assert list((tmp_path / "feat").glob(".tmp-*"))  # the killed builder's leftovers ...
    rep = st.build(paths)
    assert rep.computed == 30 - 3 * existing and len(st) == 30
    assert not list((tmp_path / "feat").glob(".tmp-*"))  # ... are cleaned by the next build
