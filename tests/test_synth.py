"""The synthetic world: official on-disk formats, determinism, caching, atomic generation, CLI, ontology."""
import csv
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audiotl_nb import synth
from audiotl_nb.core import AudiotlError, ConfigError
from audiotl_nb.synth import (SYNTH_CLASSES, SCENES, TRAIN_DEVICES, World, WorldConfig, build_synth_ontology,
                              make_world, synth_main, synth_ontology, world_config)

MICRO = dict(clip_seconds=1.0, n_train=6, n_eval=3, scene_cities=1, scene_locations=1, bird_clips=2,
             kws_words=["yes", "no"], kws_speakers=3, kws_noise_seconds=1.0)


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("synth") / "tiny", "tiny")


# ------------------------------------------------------------------ formats
def test_audioset_root_official_formats(tiny, audioset_meta):
    a, cfg = tiny.audioset, tiny.config
    real_head = (audioset_meta / "balanced_train_segments.csv").read_text().splitlines()[2]
    for name, n, folder in [("balanced_train_segments.csv", cfg.n_train, "balanced_train_segments"),
                            ("eval_segments.csv", cfg.n_eval, "eval_segments")]:
        lines = (a / name).read_text().splitlines()
        assert lines[0].startswith("# Segments csv created") and lines[1].startswith(f"# num_ytids={n}, num_segs={n},")
        assert lines[2] == real_head                                   # '# YTID, start_seconds, end_seconds, positive_labels'
        rows = lines[3:]
        assert len(rows) == n
        for r in rows:
            m = re.fullmatch(r'([A-Za-z0-9_-]{11}), (\d+\.000), (\d+\.000), "(/[mt]/[0-9a-z_]+(,/[mt]/[0-9a-z_]+)*)"', r)
            assert m, r
            assert float(m[3]) - float(m[2]) == cfg.clip_seconds
            wav = a / "audios" / folder / f"Y{m[1]}.wav"
            info = sf.info(str(wav))
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", int(cfg.clip_seconds * 16000))
    # the label space and ontology files are the world's own, in the official formats
    labels = pd.read_csv(a / "class_labels_indices.csv")
    assert list(labels.columns) == ["index", "mid", "display_name"] and list(labels["index"]) == list(range(len(SYNTH_CLASSES)))
    assert (a / "class_labels_indices.csv").read_text().splitlines()[1] == f'0,{SYNTH_CLASSES[0].mid},"{SYNTH_CLASSES[0].name}"'
    assert json.loads((a / "ontology.json").read_text()) == synth_ontology()


def test_strong_labels_agree_with_weak_labels(tiny):
    from audiotl_nb.ontology import read_segments, read_strong
    for csv_name, tsv_name in [("balanced_train_segments.csv", "audioset_train_strong.tsv"),
                               ("eval_segments.csv", "audioset_eval_strong.tsv")]:
        segs, strong = read_segments(tiny.audioset / csv_name), read_strong(tiny.audioset / tsv_name)
        assert (tiny.audioset / tsv_name).read_text().splitlines()[0] == "segment_id\tstart_time_seconds\tend_time_seconds\tlabel"
        weak = {f"{y}_{int(s * 1000)}": set(l.split(",")) for y, s, l in zip(segs.ytid, segs.start, segs.labels)}
        got = strong.groupby("segment_id")["label"].agg(set).to_dict()
        assert set(got) <= set(weak)
        for seg, labs in weak.items(): assert got.get(seg, set()) == labs, seg      # every weak label has onsets, and only those
        assert (strong.start >= 0).all() and (strong.end <= tiny.config.clip_seconds).all() and (strong.end > strong.start).all()


def test_every_class_in_both_splits(tiny):
    for name in ("balanced_train_segments.csv", "eval_segments.csv"):
        rows = (tiny.audioset / name).read_text().splitlines()[3:]
        labels = {l for r in rows for l in r.split('"')[1].split(",")}
        assert labels == {c.mid for c in SYNTH_CLASSES}, name


def test_dcase2020_layout(tiny):
    root = tiny.tasks["dcase2020_asc"]
    meta = pd.read_csv(root / "meta.csv", sep="\t")
    assert list(meta.columns) == ["filename", "scene_label", "identifier", "source_label"]
    for f, s, ident, dev in meta.itertuples(index=False):
        scene, city, loc, seg, device = Path(f).stem.split("-")
        assert f.startswith("audio/") and (root / f).is_file()
        assert (scene, f"{city}-{loc}", device) == (s, ident, dev) and s in SCENES
    train = pd.read_csv(root / "evaluation_setup" / "fold1_train.csv", sep="\t")
    ev = pd.read_csv(root / "evaluation_setup" / "fold1_evaluate.csv", sep="\t")
    test = pd.read_csv(root / "evaluation_setup" / "fold1_test.csv", sep="\t")
    assert list(train.columns) == ["filename", "scene_label"] and list(test.columns) == ["filename"]
    assert sorted(train.filename.tolist() + ev.filename.tolist()) == sorted(meta.filename)
    assert list(test.filename) == list(ev.filename)
    loc = lambda fs: {Path(f).stem.split("-")[2] for f in fs}
    assert not loc(train.filename) & loc(ev.filename)
    assert {Path(f).stem.split("-")[-1] for f in train.filename} <= set(TRAIN_DEVICES)
    # parallel recordings: the same segment from several devices
    seg = meta.filename.str.rsplit("-", n=1).str[0]
    assert (seg.value_counts() == 1 + tiny.config.scene_parallel).all()


def test_dcase2018_layout(tiny):
    root = tiny.tasks["dcase2018_bad"]
    for name, spec in synth.BIRD_DATASETS.items():
        rows = list(csv.reader((root / spec["csv"]).read_text().splitlines()))
        assert rows[0] == ["itemid", "datasetid", "hasbird"] and len(rows) == 1 + tiny.config.bird_clips
        for itemid, ds, has in rows[1:]:
            assert ds == name and has in ("0", "1") and (root / spec["folder"] / f"{itemid}.wav").is_file()


def test_speechcommands_layout(tiny):
    root = tiny.tasks["speechcommands"]
    words = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
    assert words == sorted(tiny.config.kws_words)
    files = [f"{w}/{p.name}" for w in words for p in (root / w).glob("*.wav")]
    assert all(re.fullmatch(r"[a-z]+/[0-9a-f]{8}_nohash_\d+\.wav", f) for f in files)
    val, test = [set((root / f).read_text().split()) for f in ("validation_list.txt", "testing_list.txt")]
    spk = lambda fs: {f.split("/")[1].split("_")[0] for f in fs}
    train = set(files) - val - test
    assert val and test and (val | test) <= set(files)
    assert not (spk(train) & spk(val)) and not (spk(train) & spk(test)) and not (spk(val) & spk(test))
    noise = sorted(p.name for p in (root / "_background_noise_").glob("*.wav"))
    assert noise == sorted(f"{k}.wav" for k in synth._NOISE_FILES)
    assert all(sf.info(str(root / f)).frames == 16000 for f in files)


def test_loaders_read_the_world(tiny):
    from audiotl_nb.data import get_task
    for name, root in [("audioset", tiny.audioset), ("audioset_strong", tiny.audioset), *tiny.tasks.items(),
                       ("speechcommands12", tiny.tasks["speechcommands"])]:
        t = get_task(name, root)
        assert len(t.missing) == 0 and all(len(df) for df in t.splits.values()), name
    for subset in ("speech", "humansounds", "things", "animal", "naturalsounds", "nature", "nonhuman", "naturalsources"):
        t = get_task("audioset", tiny.audioset, subset=subset)
        assert 0 < t.n_classes < len(SYNTH_CLASSES) and len(t.splits["train"]), subset


# ------------------------------------------------------------------ determinism, cache, atomicity
def test_byte_identical_whatever_the_workers(tmp_path):
    cfg = WorldConfig.from_dict(MICRO)
    a, b = make_world(tmp_path / "a", cfg, workers=1), make_world(tmp_path / "b", cfg, workers=2)
    da, db = digest(a.root), digest(b.root)
    assert da == db and len(da) > 30
    c = make_world(tmp_path / "c", cfg.replace(seed=1), workers=2)
    dc = digest(c.root)
    assert dc.keys() != da.keys() or dc != da
    assert da["audioset/class_labels_indices.csv"] == dc["audioset/class_labels_indices.csv"]


def test_cache_by_config_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOTL_CACHE", str(tmp_path / "cache"))
    cfg = WorldConfig.from_dict(MICRO)
    w = make_world(config=cfg)
    assert w.root == tmp_path / "cache" / "synth" / cfg.world_hash and w.build_seconds is not None
    stamp = (w.root / "world.json").stat().st_mtime_ns
    again = make_world(config=MICRO)                        # a dict works too; same hash: reused, untouched
    assert again.build_seconds is None and (w.root / "world.json").stat().st_mtime_ns == stamp
    forced = make_world(config=cfg, force=True)
    assert forced.build_seconds is not None and digest(forced.root) == digest(w.root)
    assert make_world(config=cfg.replace(seed=2)).root != w.root
    assert World.load(w.root).config == cfg


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(cfg, root, item): raise RuntimeError("disk full")
    monkeypatch.setitem(synth._RENDERERS, "kws", boom)
    for workers in (1, 2):
        with pytest.raises((RuntimeError, AudiotlError), match="disk full"):
            make_world(tmp_path / "w", MICRO, workers=workers)
        assert not (tmp_path / "w").exists()
        assert [p.name for p in tmp_path.iterdir()] == []


def test_interrupted_regeneration_keeps_the_old_world(tmp_path, monkeypatch):
    old = make_world(tmp_path / "w", MICRO)
    before = digest(old.root)
    monkeypatch.setitem(synth._RENDERERS, "bird", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        make_world(tmp_path / "w", {**MICRO, "seed": 3}, workers=1)
    assert digest(tmp_path / "w") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_stale_temporary_folders_are_removed(tmp_path):
    stale = tmp_path / ".w.tmp-999999999-deadbeef"      # a pid that cannot exist
    (stale / "audioset").mkdir(parents=True)
    make_world(tmp_path / "w", MICRO)
    assert not stale.exists() and World.load(tmp_path / "w")


def test_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "thesis.tex").write_text("do not delete")
    with pytest.raises(ConfigError, match="does not hold a synthetic world"):
        make_world(tmp_path / "mine", MICRO)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(AudiotlError, match="does not hold a complete synthetic world"):
        World.load(tmp_path / "mine")


# ------------------------------------------------------------------ config, CLI, ontology
def test_world_config_validation():
    with pytest.raises(ConfigError, match="n_train"): WorldConfig(n_train=0)
    with pytest.raises(ConfigError, match="clip_seconds"): WorldConfig(clip_seconds=30.0)
    with pytest.raises(KeyError, match="Unknown keyword 'maybe'"): WorldConfig(kws_words=["yes", "maybe"])
    with pytest.raises(ConfigError, match="did you mean 'bird_clips'"): WorldConfig.from_dict({"bird_clip": 3})
    assert WorldConfig().world_hash == WorldConfig.from_json(WorldConfig().to_json()).world_hash
    assert world_config("tiny").world_hash != world_config("default").world_hash


def test_cli(tmp_path, capsys):
    from audiotl_nb.cli import main
    cfg = tmp_path / "micro.json"
    WorldConfig.from_dict(MICRO).save(cfg)
    assert main(["synth", str(tmp_path / "w"), "--config", str(cfg), "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "generated in" in out and "audioset_train" in out
    assert World.load(tmp_path / "w").config.seed == 4
    assert synth_main([str(tmp_path / "w"), "--config", str(cfg), "--seed", "4"]) == 0
    assert "already there" in capsys.readouterr().out
    assert main(["synth", str(tmp_path / "x"), "--preset", "huge"]) == 2
    assert "Valid world preset names: default, tiny" in capsys.readouterr().err


def test_shipped_ontology_is_cut_from_the_real_one(audioset_meta):
    from audiotl_nb.ontology import AUDIOSET_SUBSETS, LabelSpace, Ontology, subset_classes
    assert build_synth_ontology(audioset_meta / "ontology.json") == synth_ontology()
    real = Ontology.from_json(audioset_meta / "ontology.json")
    real_labels = LabelSpace.from_csv(audioset_meta / "class_labels_indices.csv")
    for c in SYNTH_CLASSES: assert c.mid in real_labels and real.name(c.mid) == c.name
    onto = Ontology(synth_ontology())
    labels = LabelSpace([c.mid for c in SYNTH_CLASSES])
    branches = {b for c in SYNTH_CLASSES for b in real.branches(c.mid)}
    assert {"/m/0dgw9r", "/m/0jbk", "/t/dd00041", "/m/059j3w"} <= branches
    for c in SYNTH_CLASSES: assert onto.ancestors(c.mid) == real.ancestors(c.mid)   # every path to the roots kept
    counts = {s: len(subset_classes(s, onto, labels)) for s in AUDIOSET_SUBSETS}
    assert all(counts.values()) and counts["all"] == len(SYNTH_CLASSES)
    assert counts["nonhuman"] <= counts["animal"] + counts["naturalsounds"] + counts["things"]
    assert {"/m/020bb7", "/m/04s8yn", "/m/0h0rv", "/m/09d5_"} <= set(subset_classes("animal", onto, labels))


def test_the_synth_command_does_not_import_torch():
    "`audiotl synth` needs numpy, scipy and soundfile only; loading torch would add two seconds to every generation."
    import subprocess, sys
    code = "import sys, audiotl_nb.cli, audiotl_nb.synth; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
