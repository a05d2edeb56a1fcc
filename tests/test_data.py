"""Datasets in their official layouts, bad input, samplers and DataLoaders (audiotl_nb.data, audiotl_nb.samplers).

Every fixture is a tiny copy of a corpus in its real on-disk layout, with real audio files written by soundfile.
"""
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audiotl_nb.core import ConfigError, DataError, UnknownNameError
from audiotl_nb.data import (SPEECH_COMMANDS_WORDS, AudioDataset, SamplerEpochCallback, Task, TASKS, csv_task,
                             frame_targets, get_task, make_dataloader, make_dataloaders)
from audiotl_nb.samplers import ActiveTimeSampler, ClassBalancedSampler


def wav(path, seconds=0.1, sr=16000, freq=440.0, amp=0.1, fmt=None):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(path, (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format=fmt)
    return path


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# ---------------------------------------------------------------------------------------------
# fixtures in the official layouts

def make_tau2020(root, scenes=("airport", "bus", "park", "tram"), n_loc=12, seg=3):
    root = Path(root); meta, tr, te = [], [], []
    for s in scenes:
        for loc in range(n_loc):
            city = ["lisbon", "vienna", "prague"][loc % 3]
            for k in range(seg):
                fn = f"audio/{s}-{city}-{loc}-{k}-{'abc'[k % 3]}.wav"
                wav(root / fn, seconds=0.05, sr=8000)
                meta.append(f"{fn}\t{s}\t{city}-{loc}\t{'abc'[k % 3]}")
                (te if loc % 4 == 0 else tr).append(f"{fn}\t{s}")
    (root / "evaluation_setup").mkdir(parents=True, exist_ok=True)
    (root / "meta.csv").write_text("filename\tscene_label\tidentifier\tsource_label\n" + "\n".join(meta) + "\n")
    (root / "evaluation_setup/fold1_train.csv").write_text("filename\tscene_label\n" + "\n".join(tr) + "\n")
    (root / "evaluation_setup/fold1_evaluate.csv").write_text("filename\tscene_label\n" + "\n".join(te) + "\n")
    return root


def make_bad2018(root, n=(30, 20, 10)):
    root = Path(root)
    for (src, name), k in zip([("ff1010bird", "ff1010bird_metadata_2018.csv"),
                               ("BirdVox-DCASE-20k", "BirdVoxDCASE20k_csvpublic.csv"),
                               ("warblrb10k", "warblrb10k_public_metadata_2018.csv")], n):
        rows = []
        for i in range(k):
            item = f"{src[:3]}-{i}"
            wav(root / src / "wav" / f"{item}.wav", seconds=0.05, sr=8000)
            rows.append(f"{item},{src},{i % 2}")
        (root / name).write_text("itemid,datasetid,hasbird\n" + "\n".join(rows) + "\n")
    return root


def make_speechcommands(root, words, speakers=5, noise=2.0):
    root = Path(root); val, test = [], []
    rng = np.random.default_rng(0)
    for w in words:
        for s in range(speakers):
            for n in range(1 + s % 2):
                rel = f"{w}/{s:08x}_nohash_{n}.wav"
                wav(root / rel, seconds=0.05, sr=16000)
                u = rng.random()
                if u < 0.15: val.append(rel)
                elif u < 0.3: test.append(rel)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    for name in ["pink_noise.wav", "dude_miaowing.wav"]:
        p = root / "_background_noise_" / name; p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, rng.normal(0, 0.05, int(noise * 16000)).astype(np.float32), 16000)
    return root


def make_esc50(root, n_classes=50):
    root = Path(root); rows = []
    for t in range(n_classes):
        for fold in range(1, 6):
            fn = f"{fold}-{100 + t}-A-{t}.wav"
            wav(root / "audio" / fn, seconds=0.02, sr=44100)
            rows.append(f"{fn},{fold},{t},cat{t},False,{100 + t},A")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta/esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tau(tmp_path_factory): return make_tau2020(tmp_path_factory.mktemp("tau") / "TAU-urban-acoustic-scenes-2020-mobile-development")


@pytest.fixture(scope="module")
def bird(tmp_path_factory): return make_bad2018(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def sc_root(tmp_path_factory):
    return make_speechcommands(tmp_path_factory.mktemp("sc") / "SpeechCommands" / "speech_commands_v0.02", SPEECH_COMMANDS_WORDS)


# ---------------------------------------------------------------------------------------------
# registry

def test_registry_names_and_unknown_task(tau):
    assert set(TASKS.names()) == {"dcase2020_asc", "dcase2018_bad", "speechcommands", "speechcommands12", "esc50",
                                  "audioset", "audioset_strong", "folder", "csv"}
    with pytest.raises(UnknownNameError) as e: get_task("esc-50", tau)
    assert "Did you mean 'esc50'" in str(e.value) and "dcase2018_bad" in str(e.value)


# ---------------------------------------------------------------------------------------------
# DCASE2020 Task 1A

def _reference_location_split(train_csv, frac=0.1, seed=0):
    "The paper's rule written out independently: shuffle locations, add whole locations until dev >= frac."
    df = pd.read_csv(train_csv, sep="\t")
    df["location"] = df.filename.str.split("-").str[2].astype(int)
    locs = df.location.unique()
    np.random.default_rng(seed).shuffle(locs)
    dev, n = [], 0
    for loc in locs:
        if n < len(df) * frac: dev.append(loc); n += int((df.location == loc).sum())
    return set(df.filename[df.location.isin(dev)])


def test_dcase2020_splits(tau):
    task = get_task("dcase2020_asc", tau)
    dev = {str(Path(p).relative_to(tau)) for p in task.items("dev").path}
    assert dev == _reference_location_split(tau / "evaluation_setup/fold1_train.csv")
    assert not set(task.items("dev").location) & set(task.items("train").location)
    n_train = len(pd.read_csv(tau / "evaluation_setup/fold1_train.csv", sep="\t"))
    assert len(task.items("dev")) >= 0.1 * n_train and len(task.items("dev")) + len(task.items("train")) == n_train
    assert task.classes == ["airport", "bus", "park", "tram"] and task.kind == "single" and task.metric == "uar"
    assert task.class_counts().sum() == len(task.items("train"))
    assert list(get_task("dcase2020_asc", tau, seed=1).items("dev").path) != list(task.items("dev").path)


def test_dcase2020_label_errors(tau, tmp_path):
    root = tmp_path / "tau"; shutil.copytree(tau, root)
    f = root / "evaluation_setup/fold1_evaluate.csv"
    lines = f.read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\tbeach"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"fold1_evaluate.csv, line 4: label 'beach' is not in the label space"):
        get_task("dcase2020_asc", root)
    lines[3] = lines[3].split("\t")[0] + ("\tbus" if "airport" in lines[3] else "\tairport")
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 4: .* is labelled .* here but .* in meta.csv"):
        get_task("dcase2020_asc", root)


def test_dcase2020_missing_audio_is_listed(tau, tmp_path):
    root = tmp_path / "tau"; shutil.copytree(tau, root)
    gone = sorted((root / "audio").glob("*.wav"))[:5]
    for p in gone: p.unlink()
    with pytest.warns(UserWarning, match="5 of .* listed clips are missing"):
        task = get_task("dcase2020_asc", root)
    assert sorted(task.missing.path) == sorted(map(str, gone)) and set(task.missing.reason) == {"missing"}
    task.write_manifest(tmp_path / "manifest.csv")
    assert len(pd.read_csv(tmp_path / "manifest.csv")) == 5


# ---------------------------------------------------------------------------------------------
# DCASE2018 bird audio detection

def test_bird_detection_splits(bird):
    task = get_task("dcase2018_bad", bird)
    assert [len(task.items(s)) for s in ("train", "dev", "test")] == [45, 5, 10]
    train_rows = [f"ff1-{i}" for i in range(30)] + [f"Bir-{i}" for i in range(20)]
    perm = np.random.default_rng(0).permutation(50)
    assert [Path(p).stem for p in task.items("dev").path] == [train_rows[i] for i in sorted(perm[45:])]
    assert set(task.items("test").source) == {"warblrb10k"}
    assert task.classes == ["no_bird", "bird"] and task.class_counts("test").tolist() == [5, 5]


def test_bird_detection_bad_label(bird, tmp_path):
    root = tmp_path / "bad"; shutil.copytree(bird, root)
    f = root / "warblrb10k_public_metadata_2018.csv"
    f.write_text(f.read_text().replace("war-3,warblrb10k,1", "war-3,warblrb10k,2"))
    with pytest.raises(DataError, match=r"warblrb10k_public_metadata_2018.csv, line 5: label '2' is not in the label space"):
        get_task("dcase2018_bad", root)


# ---------------------------------------------------------------------------------------------
# Speech Commands

def test_speechcommands_matches_torchaudio(sc_root):
    from torchaudio.datasets import SPEECHCOMMANDS
    task = get_task("speechcommands", sc_root)
    assert task.classes == SPEECH_COMMANDS_WORDS and task.n_classes == 35
    base = sc_root.parent.parent
    for split, sub in [("train", "training"), ("dev", "validation"), ("test", "testing")]:
        ref = SPEECHCOMMANDS(base, folder_in_archive="SpeechCommands", subset=sub)
        assert sorted(map(os.path.normpath, task.items(split).path)) == sorted(map(os.path.normpath, ref._walker))
        labels = [ref.get_metadata(i)[2] for i in range(len(ref))]
        assert sorted(task.items(split).label) == sorted(labels)


def test_speechcommands12(sc_root):
    base = get_task("speechcommands", sc_root)
    task = get_task("speechcommands12", sc_root, seed=3)
    assert task.classes == ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_"]
    for split in ("train", "dev", "test"):
        n = len(base.items(split))
        counts = dict(zip(task.classes, task.class_counts(split)))
        assert counts["_silence_"] == math.ceil(0.1 * n)
        assert counts["_unknown_"] == sum(l not in task.classes for l in base.items(split).label)
        sil = task.items(split)[task.items(split).label == "_silence_"]
        assert ((sil.start >= 0) & (sil.start + sil.duration <= 2.0)).all()
    ds = AudioDataset.from_task(task, "train")
    i = int(np.flatnonzero(task.items("train").label == "_silence_")[0])
    x, y = ds[i]
    row = task.items("train").iloc[i]
    ref, sr = sf.read(row.path, dtype="float32")
    a = int(round(row.start * sr))
    assert torch.allclose(x, torch.from_numpy(ref[a:a + 16000])) and y.item() == 11


def test_speechcommands_unknown_word_folder(sc_root, tmp_path):
    root = tmp_path / "sc"; shutil.copytree(sc_root, root)
    with pytest.raises(DataError, match=r"label 'wow' is not in the label space"):
        get_task("speechcommands", root, words=[w for w in SPEECH_COMMANDS_WORDS if w != "wow"])
    (root / "validation_list.txt").write_text((root / "validation_list.txt").read_text() + "sing/abc_nohash_0.wav\n")
    with pytest.raises(DataError, match=r"validation_list.txt, line \d+: label 'sing'"):
        get_task("speechcommands", root)


def test_speechcommands_listed_but_absent(sc_root, tmp_path):
    root = tmp_path / "sc"; shutil.copytree(sc_root, root)
    first = (root / "testing_list.txt").read_text().split()[0]
    (root / first).unlink()
    with pytest.warns(UserWarning, match="1 of"):
        task = get_task("speechcommands", root)
    assert task.missing.path.tolist() == [str(root / first)] and task.missing.split.tolist() == ["test"]


# ---------------------------------------------------------------------------------------------
# ESC-50

def test_esc50_folds_and_errors(tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master")
    task = get_task("esc50", root, fold=4)
    assert [len(task.items(s)) for s in ("train", "test")] == [200, 50]
    assert set(task.items("test").fold) == {4} and task.valid_split == "test"
    assert task.classes[7] == "cat7" and (task.class_counts() == 4).all()
    task = get_task("esc50", root, fold=1, dev_fold=2)
    assert [len(task.items(s)) for s in ("train", "dev", "test")] == [150, 50, 50]
    with pytest.raises(ConfigError, match="1..5"): get_task("esc50", root, fold=6)
    meta = root / "meta/esc50.csv"
    text = meta.read_text()
    meta.write_text(text.replace("1-107-A-7.wav,1,7,cat7", "1-107-A-7.wav,1,57,cat7"))
    with pytest.raises(DataError, match=r"esc50.csv, line \d+: label '57' is not in the label space"): get_task("esc50", root)
    meta.write_text(text.replace("2-107-A-7.wav,2,7,cat7", "2-107-A-7.wav,2,7,dog"))
    with pytest.raises(DataError, match="target 7 is 'dog' here but 'cat7'"): get_task("esc50", root)


# ---------------------------------------------------------------------------------------------
# generic CSV / folder

def test_csv_task_errors(tmp_path):
    for k in range(4): wav(tmp_path / "a" / f"{k}.wav")
    (tmp_path / "l.csv").write_text("path,label,split\na/0.wav,x,train\na/1.wav,y,train\na/2.wav,x,holdout\n")
    with pytest.raises(DataError, match=r"l.csv, line 4: split 'holdout'"): csv_task(tmp_path / "l.csv")
    (tmp_path / "l.csv").write_text("path,label\na/0.wav,x\na/1.wav,z\n")
    with pytest.raises(DataError, match=r"l.csv, line 3: label 'z' is not in the label space"):
        csv_task(tmp_path / "l.csv", classes=["x", "y"])
    (tmp_path / "l.csv").write_text("path,label,split\na/0.wav,x,train\na/9.wav,y,train\n/abs/nowhere.wav,x,test\n")
    with pytest.warns(UserWarning, match="2 of 3"):
        t = csv_task(tmp_path / "l.csv", clip_seconds=0.1)
    assert sorted(t.missing.path) == ["/abs/nowhere.wav", str(tmp_path / "a/9.wav")]
    with pytest.raises(DataError, match="is a folder"): get_task("csv", tmp_path)


def test_folder_task_with_split_folders(tmp_path):
    for split, n in [("train", 4), ("test", 2)]:
        for c in ("dog", "cat"):
            for k in range(n): wav(tmp_path / split / c / f"{k}.flac", seconds=0.2, fmt="FLAC")
    t = get_task("folder", tmp_path)
    assert [len(t.items(s)) for s in ("train", "test")] == [8, 4] and t.classes == ["cat", "dog"]
    assert t.clip_seconds == 0.2 and t.valid_split == "test"


# ---------------------------------------------------------------------------------------------
# AudioSet on the real metadata

@pytest.fixture(scope="module")
def audioset_root(audioset_meta, tmp_path_factory):
    root = tmp_path_factory.mktemp("audioset")
    for f in ["class_labels_indices.csv", "ontology.json", "balanced_train_segments.csv", "eval_segments.csv"]:
        os.symlink(audioset_meta / f, root / f)
    return root


def test_audioset_without_audio_lists_every_clip(audioset_root, audioset_meta):
    with pytest.warns(UserWarning, match="42531 of 42531 listed clips are missing"):
        task = get_task("audioset", audioset_root)
    assert len(task.items("train")) == 0 and len(task.missing) == 22160 + 20371
    assert task.missing.path.iloc[0].endswith("audios/balanced_train_segments/Y--PJHxphWEs.wav")


def test_audioset_real_labels_and_subset(audioset_meta, tmp_path):
    audioset_root = tmp_path / "audioset"; audioset_root.mkdir()
    for f in ["class_labels_indices.csv", "ontology.json", "balanced_train_segments.csv", "eval_segments.csv"]:
        os.symlink(audioset_meta / f, audioset_root / f)
    ytids = pd.read_csv(audioset_meta / "balanced_train_segments.csv", skiprows=3, header=None, sep=", ",
                        engine="python", quotechar='"')[0].tolist()
    audio = audioset_root / "audios/balanced_train_segments"
    audio.mkdir(parents=True, exist_ok=True)
    for y in ytids[:300]: (audio / f"Y{y}.wav").touch()
    task = quiet(get_task, "audioset", audioset_root)
    assert len(task.items("train")) == 300 and task.n_classes == 527
    counts = task.class_counts()
    assert counts.sum() == sum(len(l) for l in task.items("train").label)
    nature = quiet(get_task, "audioset", audioset_root, subset="nature")
    assert nature.n_classes == 82
    keep = {c for c in nature.classes}
    assert all(set(l) <= keep and l for l in nature.items("train").label)
    assert len(nature.items("train")) == sum(bool(set(l) & keep) for l in task.items("train").label)


def test_audioset_custom_pattern(audioset_root, tmp_path):
    root = tmp_path / "as"; root.mkdir()
    for f in ["class_labels_indices.csv", "ontology.json"]: os.symlink(audioset_root / f, root / f)
    lines = (audioset_root / "balanced_train_segments.csv").read_text().splitlines()
    (root / "balanced_train_segments.csv").write_text("\n".join(lines[:13]) + "\n")
    (root / "eval_segments.csv").write_text("\n".join(lines[:3]) + "\n")
    for line in lines[3:13]:
        y, s = line.split(", ")[:2]
        wav(root / "clips" / f"{y}_{float(s):.3f}.flac", fmt="FLAC")
    task = get_task("audioset", root, audio_pattern="clips/{ytid}_{start:.3f}.flac")
    assert len(task.items("train")) == 10 and len(task.missing) == 0


# ---------------------------------------------------------------------------------------------
# AudioSet Strong

@pytest.fixture(scope="module")
def strong_root(audioset_meta, tmp_path_factory):
    root = tmp_path_factory.mktemp("strong")
    shutil.copy(audioset_meta / "strong_train_sample.tsv", root / "audioset_train_strong.tsv")
    shutil.copy(audioset_meta / "strong_eval_sample.tsv", root / "audioset_eval_strong.tsv")
    shutil.copy(audioset_meta / "mid_to_display_name.tsv", root / "mid_to_display_name.tsv")
    for f, sub in [("audioset_train_strong.tsv", "unbalanced_train_segments"), ("audioset_eval_strong.tsv", "eval_segments")]:
        for seg in pd.read_csv(root / f, sep="\t").segment_id.unique():
            p = root / "audios" / sub / f"Y{seg.rsplit('_', 1)[0]}.wav"
            p.parent.mkdir(parents=True, exist_ok=True); p.touch()
    return root


def test_strong_frame_counts_against_pandas(strong_root):
    task = quiet(get_task, "audioset_strong", strong_root)
    tsv = pd.read_csv(strong_root / "audioset_train_strong.tsv", sep="\t")
    assert task.classes == sorted(tsv.label.unique()) and len(task.items("train")) == tsv.segment_id.nunique()
    # independent computation: per (segment, label), the union of [floor(on/h), ceil(off/h)) frame ranges
    on = np.floor(np.round(tsv.start_time_seconds / 0.04, 6)).astype(int).clip(0, 250)
    off = np.ceil(np.round(tsv.end_time_seconds / 0.04, 6)).astype(int).clip(0, 250)
    frames = [(s, l, f) for s, l, a, b in zip(tsv.segment_id, tsv.label, on, off) for f in range(a, b)]
    ref = pd.DataFrame(frames, columns=["seg", "label", "f"]).drop_duplicates().groupby(["seg", "label"]).size()
    fc = task.frame_counts().tocoo()
    segs = task.items("train").segment_id.to_numpy()
    got = pd.Series(fc.data, index=pd.MultiIndex.from_arrays([segs[fc.row], np.array(task.classes)[fc.col]]))
    pd.testing.assert_series_equal(got.sort_index().astype(int), ref.sort_index().astype(int), check_names=False)
    # the sampler's weights follow paper 3's formula from these counts
    s = ActiveTimeSampler(task.frame_counts(), num_samples=50, seed=0)
    total = ref.groupby(level=1).sum()
    w_c = 1000.0 / (30 + total)
    clip = ref.mul(w_c, level=1).groupby(level=0).sum()
    np.testing.assert_allclose(s.weights.numpy(), clip.reindex(segs).fillna(0).to_numpy())


def test_strong_eval_labels_outside_train_are_dropped_and_given_classes_enforced(strong_root, tmp_path):
    root = tmp_path / "strong"; shutil.copytree(strong_root, root, symlinks=True)
    ev = pd.read_csv(root / "audioset_eval_strong.tsv", sep="\t")
    seg = ev.segment_id.iloc[0]
    with open(root / "audioset_eval_strong.tsv", "a") as f:
        f.write(f"{seg}\t1.0\t2.0\t/m/not_in_train\n{seg}\t3.0\t4.0\t/m/not_in_train\n")
    task = quiet(get_task, "audioset_strong", root)
    assert task.info["dropped_test_events"] == 2 and task.info["dropped_test_labels"] == ["/m/not_in_train"]
    item = task.items("test").set_index("segment_id").loc[seg]
    assert len(item.events) == int((ev.segment_id == seg).sum())
    with pytest.raises(DataError, match=r"audioset_train_strong.tsv, line \d+: label '/m/"):
        get_task("audioset_strong", root, classes=task.classes[:2])


# ---------------------------------------------------------------------------------------------
# datasets, loaders, bad input under worker processes

def test_frame_targets_hand_values():
    y = frame_targets([(0.0, 0.04, 0), (0.05, 0.05, 1), (9.99, 12.0, 1)], n_frames=250, n_classes=2)
    assert np.flatnonzero(y[:, 0]).tolist() == [0]
    assert np.flatnonzero(y[:, 1]).tolist() == [1, 249]  # a zero-length event marks the frame it is in; past the end is clipped


def test_workers_skip_and_log_bad_files(tmp_path):
    paths = []
    for k in range(10):
        p = wav(tmp_path / f"{k}.wav", seconds=0.1)
        if k in (2, 7): p.write_bytes(p.read_bytes()[:60])  # truncated
        paths.append(str(p))
    task = Task("t", "single", ["a", "b"], {"train": pd.DataFrame({"path": paths, "label": ["a", "b"] * 5}),
                                           "test": pd.DataFrame({"path": paths, "label": ["a", "b"] * 5})}, clip_seconds=0.1)
    log = tmp_path / "bad.csv"
    dls = quiet(make_dataloaders, task, bs=4, num_workers=2, bad_file_log=log, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(b[1]) for b in dls.valid)
        for _ in dls.train: pass
    assert n == 10
    logged = pd.read_csv(log)
    assert set(logged.path) == {paths[2], paths[7]} and logged.reason.str.contains("truncated").all()


def test_balanced_loader_draws_rare_class(tmp_path):
    paths = [str(wav(tmp_path / f"{k}.wav", seconds=0.02)) for k in range(40)]
    labels = ["common"] * 38 + ["rare"] * 2
    task = Task("t", "single", ["common", "rare"], {"train": pd.DataFrame({"path": paths, "label": labels})}, clip_seconds=0.02)
    dl = make_dataloader(task, "train", bs=10, train=True, sampler="balanced", num_samples=40, device="cpu")
    ys = torch.cat([b[1] for b in dl])
    assert ys.tolist().count(1) == 20 and isinstance(dl.sampler, ClassBalancedSampler)
    with pytest.raises(UnknownNameError, match="Did you mean 'balanced'"):
        make_dataloader(task, "train", train=True, sampler="balance")
    with pytest.raises(ConfigError, match="needs frame labels"):
        make_dataloader(task, "train", train=True, sampler="active_time")


def test_sampler_epoch_callback_replays_epochs(tmp_path):
    from fastai.learner import Learner
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
    paths = [str(wav(tmp_path / f"{k}.wav", seconds=0.01, sr=8000)) for k in range(12)]
    task = Task("t", "single", ["a", "b"], {"train": pd.DataFrame({"path": paths, "label": ["a", "b"] * 6}),
                                           "test": pd.DataFrame({"path": paths[:4], "label": ["a", "b"] * 2})}, clip_seconds=0.01)
    dls = make_dataloaders(task, bs=4, sample_rate=8000, device="cpu", seed=3)
    seen = []
    orig = dls.train.get_idxs
    dls.train.get_idxs = lambda: (seen.append(dls.train.epoch), orig())[1]
    learn = Learner(dls, torch.nn.Linear(80, 2), loss_func=torch.nn.CrossEntropyLoss(), cbs=SamplerEpochCallback())
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    assert seen == [0, 1, 2]
    dls.set_epoch(1); first = list(dls.train.get_idxs())
    dls.set_epoch(1); assert list(dls.train.get_idxs()) == first


def _ddp_worker(rank, world, root, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task = quiet(get_task, "dcase2018_bad", root)
        dls = make_dataloaders(task, bs=5, sample_rate=8000, sampler="balanced", num_samples=40, device="cpu")
        idx = list(dls.train.get_idxs())
        valid = list(dls.valid.get_idxs())
        np.save(Path(out) / f"rank{rank}.npy", np.array([len(dls.train)] + idx + [-1] + valid))
    finally:
        dist.destroy_process_group()


def test_real_ddp_ranks_take_their_shards(bird, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); os.environ["_TEST_PORT"] = str(s.getsockname()[1])
    mp.start_processes(_ddp_worker, args=(2, str(bird), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    res = [np.load(tmp_path / f"rank{r}.npy").tolist() for r in range(2)]
    parts = [(r[0], r[1:r.index(-1)], r[r.index(-1) + 1:]) for r in res]
    assert parts[0][0] == parts[1][0] == 4                                   # 20 draws per rank, 4 batches of 5
    task = quiet(get_task, "dcase2018_bad", bird)
    ref = list(ClassBalancedSampler(task.label_indices("train"), num_samples=40, n_classes=2))
    assert [x for pair in zip(parts[0][1], parts[1][1]) for x in pair] == ref  # interleaved shards = the global draw
    assert sorted(parts[0][2] + parts[1][2]) == list(range(5))               # dev: each clip once over both ranks


def test_store_loader_with_workers_skips_unstorable_files(tmp_path):
    from audiotl_nb.store import FeatureStore
    paths = [str(wav(tmp_path / f"{k}.wav", seconds=0.3 + 0.1 * (k % 3), freq=200 + 50 * k)) for k in range(8)]
    Path(paths[5]).write_bytes(b"RIFF")                                      # corrupt: the store skips it
    task = Task("t", "single", ["a", "b"], {"train": pd.DataFrame({"path": paths, "label": ["a", "b"] * 4}),
                                           "test": pd.DataFrame({"path": paths, "label": ["a", "b"] * 4})}, clip_seconds=0.5)
    store = FeatureStore(tmp_path / "feats", "panns16k")
    log = tmp_path / "bad.csv"
    dls = quiet(make_dataloaders, task, bs=4, store=store, num_workers=2, device="cpu", bad_file_log=log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xs = torch.cat([b[0] for b in dls.valid])
    assert xs.shape == (8, 1, 51, 64) and pd.read_csv(log).path.tolist() == [paths[5]]
    ref = make_dataloaders(task, bs=8, frontend="panns16k", device="cpu").valid.dataset
    keep = [t for t in range(51) if not 28 <= t <= 31]                       # 0.3 s clip: 31 frames; not the end ones
    torch.testing.assert_close(xs[0][:, keep], ref[0][0][:, keep], atol=0.05, rtol=0)
    with pytest.raises(ConfigError, match="differs from the feature store"):
        AudioDataset.from_task(task, "test", frontend="panns32k", store=store)


def test_clip_seconds_override_sets_the_frame_targets(tmp_path):
    "A clip length given to from_task / make_dataloader(s) overrides the task's, and the frame targets follow it."
    p = wav(tmp_path / "c.wav", seconds=4.0, sr=8000)
    items = pd.DataFrame({"path": [str(p)], "label": [("e",)], "events": [[(2.0, 2.4, "e"), (0.4, 0.8, "e")]]})
    task = Task("t", "frames", ["e"], {"train": items, "dev": items}, clip_seconds=4.0, frame_hop=0.04)
    assert AudioDataset.from_task(task, "train", sample_rate=8000)[0][1].shape == (100, 1)
    x, y = AudioDataset.from_task(task, "train", sample_rate=8000, clip_seconds=2.0)[0]
    assert x.shape == (16000,) and y.shape == (50, 1)
    np.testing.assert_array_equal(y.numpy(), frame_targets([(2.0, 2.4, 0), (0.4, 0.8, 0)], 50, 0.04, 1))
    assert np.flatnonzero(y[:, 0].numpy()).tolist() == list(range(10, 20))        # 0.4-0.8 s; the 2.0 s event is cut off
    # another hop (and an explicit frame count) still win
    assert AudioDataset.from_task(task, "train", sample_rate=8000, clip_seconds=2.0, frame_hop=0.1)[0][1].shape == (20, 1)
    assert AudioDataset.from_task(task, "train", sample_rate=8000, clip_seconds=2.0, n_frames=7)[0][1].shape == (7, 1)
    xb, yb = next(iter(make_dataloader(task, "train", bs=1, sample_rate=8000, clip_seconds=2.0, device="cpu")))
    assert xb.shape == (1, 16000) and yb.shape == (1, 50, 1)
    dls = make_dataloaders(task, bs=1, sample_rate=8000, clip_seconds=1.0, random_crop=False, device="cpu")
    for dl in (dls.train, dls.valid):
        xb, yb = next(iter(dl))
        assert xb.shape == (1, 8000) and yb.shape == (1, 25, 1)


def test_active_time_sampler_counts_frames_within_the_clip_length(tmp_path):
    "With a clip_seconds override, the active-time sampler weighs the active frames of the clips as trained."
    paths = [str(wav(tmp_path / f"c{k}.wav", seconds=4.0, sr=8000)) for k in range(2)]
    items = pd.DataFrame({"path": paths, "label": [("e",), ("e",)],
                          "events": [[(0.4, 0.8, "e")], [(2.0, 3.6, "e")]]})      # the second lies past 2 s
    task = Task("t", "frames", ["e"], {"train": items, "dev": items}, clip_seconds=4.0, frame_hop=0.04)
    assert task.frame_counts("train").toarray()[:, 0].tolist() == [10, 40]
    assert task.frame_counts("train", n_frames=50).toarray()[:, 0].tolist() == [10, 0]
    dl = make_dataloader(task, "train", bs=1, train=True, sampler="active_time", num_samples=4, sample_rate=8000,
                         clip_seconds=2.0, device="cpu")
    full = make_dataloader(task, "train", bs=1, train=True, sampler="active_time", num_samples=4, sample_rate=8000,
                           device="cpu")
    assert dl.sampler.weights.tolist() != full.sampler.weights.tolist()
    w = dl.sampler.weights
    assert w[0] > w[1]           # within 2 s only the first clip is active

def test_zero_length_audio_is_reported_and_skipped(tmp_path):
    "A WAV with a valid header and no samples is skipped like unreadable audio, with the feature store's reason."
    good = [str(wav(tmp_path / f"g{k}.wav", seconds=0.2, freq=300 + 100 * k)) for k in range(2)]
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    items = pd.DataFrame({"path": [good[0], str(empty), good[1]], "label": "a"})
    ds = AudioDataset(items, ["a"], clip_seconds=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x1 = ds[1][0]
    assert ds.failures == [(str(empty), "no audio (0 samples)")]
    assert torch.equal(x1, ds[2][0])                                                # the slot holds the next clip
    assert any(f"skipping unreadable audio {empty}: no audio (0 samples)" in str(w.message) for w in caught)
