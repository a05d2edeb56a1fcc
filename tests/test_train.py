"""End-to-end tests of the trainers on a small embedded-default world: run directories, resume after SIGKILL,
non-finite losses, checkpoint safety, the linear probe against scikit-learn, PairTune, SSL, SED and distillation."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from audiotl_nb.core import CheckpointError, ConfigError, UnknownNameError
from audiotl_nb.train.core import (FinetuneSpec, NonFiniteLossError, PretrainSpec, TRAINERS, TrainResult,
                                   create_schedule, finetune, predict, pretrain, run_spec, spec_from_dict)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_kw={"width": 0.125}, epochs=2, bs=8, clip_seconds=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    "One torch thread: on a busy 2-core machine two threads are several times slower."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A small synthetic world (1 s clips) in the official layouts."
    from audiotl_nb.synth import make_world, world_config
    cfg = world_config("tiny", clip_seconds=1.0, n_train=40, n_eval=20, bird_clips=8, kws_speakers=3, scene_cities=1)
    return make_world(tmp_path_factory.mktemp("world") / "w", config=cfg)


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    "A tiny Cnn10 pre-trained on the world's AudioSet."
    return pretrain(dict(root=str(world.audioset), **TINY), tmp_path_factory.mktemp("runs") / "pre")


def bad_task(world, **kw):
    return dict(task="dcase2018_bad", root=str(world.tasks["dcase2018_bad"]), **{**TINY, **kw})


def skipped(run_dir) -> pd.DataFrame:
    "The run's skipped.csv, checked for its columns and its line in the log."
    df = pd.read_csv(Path(run_dir) / "skipped.csv")
    assert list(df.columns) == ["split", "path", "reason"]
    assert f"skipped {len(df)} clips" in (Path(run_dir) / "log.txt").read_text()
    return df


# --- specs ---------------------------------------------------------------------------------------------------
def test_spec_defaults_are_the_papers():
    p, f = PretrainSpec(), FinetuneSpec()
    assert (p.model, p.epochs, p.bs, p.lr, p.optimizer, p.loss) == ("cnn10", 30, 128, 1e-3, "adam", "bce")
    assert (f.epochs, f.bs, f.lr, f.loss, f.metric, f.keep) == (50, 32, 1e-3, "auto", "auto", "best")
    s = spec_from_dict({"kind": "ssl_pretrain"})
    assert (s.betas, s.weight_decay, s.schedule, s.lr, s.n_distractors) == ([0.9, 0.98], 0.01, "linear", 3e-4, 100)
    t = spec_from_dict({"kind": "ssl_finetune"})
    assert (t.schedule, t.consistency, t.augment, t.sampler) == ("tristage", 2.0, "conformer_ssl", "balanced")
    q = spec_from_dict({"kind": "pairtune"})
    assert (q.proj_dim, q.temperature, q.miner, q.epsilon, q.lr) == (256, 0.1, "multi_similarity", 0.1, 5e-5)
    d = spec_from_dict({"kind": "distill", "teachers": ["a.pt"]})
    assert (d.lam, d.epochs, d.sampler, d.mixup_p, d.mixup_alpha) == (0.9, 120, "uniform", 0.3, 0.2)
    e = spec_from_dict({"kind": "sed"})
    assert (e.schedule, e.schedule_kw, e.sampler, e.metric, e.model_kw["rnn"]) == ("cosine", {"warmup": 5000}, "active_time", "psds1", True)


def test_spec_errors():
    with pytest.raises(ConfigError, match="Allowed keys"): spec_from_dict({"kind": "finetune", "epoch": 3})
    with pytest.raises(UnknownNameError, match="pretrain"): spec_from_dict({"kind": "pretrian"})
    with pytest.raises(UnknownNameError, match="cosine"): FinetuneSpec(schedule="cosin")
    with pytest.raises(ConfigError): FinetuneSpec(kind="pretrain")
    assert set(TRAINERS.names()) >= {"pretrain", "finetune", "linear_probe", "pairtune", "ssl_pretrain", "ssl_finetune", "sed", "distill"}


def test_schedules_against_torch():
    from torch.optim import lr_scheduler as L
    def lrs(make, total, per_epoch=None):
        p = torch.nn.Parameter(torch.zeros(1)); opt = torch.optim.SGD([p], lr=1.0); sch = make(opt); out = []
        for s in range(total):
            out.append(opt.param_groups[0]["lr"]); opt.step()
            if per_epoch is None or (s + 1) % per_epoch == 0: sch.step()
        return np.array(out)
    T = 120
    np.testing.assert_allclose(create_schedule("cosine", warmup=0.1, warmup_start=0.2).curve(T),
                               lrs(lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.2, 1, 12), L.CosineAnnealingLR(o, T - 12)], [12]), T), atol=1e-7)
    warm = lrs(lambda o: L.LinearLR(o, 1 / 30, 1, 30), T)
    np.testing.assert_allclose(create_schedule("step", warmup=30).curve(T, 10),
                               warm * lrs(lambda o: L.MultiStepLR(o, list(range(2, 50, 2)), 0.5), T, per_epoch=10), atol=1e-7)
    tri = create_schedule("tristage").curve(100)
    assert tri[0] == pytest.approx(0.01) and tri[30:60].min() == 1 and tri[-1] == pytest.approx(0.01 ** (39 / 40))


# --- supervised runs -------------------------------------------------------------------------------------------
def test_pretrain_run_directory(pretrained, world):
    rd = pretrained.run_dir
    for f in ("spec.json", "status.json", "history.csv", "metrics.json", "model.pt", "log.txt"): assert (rd / f).exists(), f
    assert not (rd / "last.pt").exists() and not (rd / "best.pt").exists()
    assert json.loads((rd / "status.json").read_text())["status"] == "done"
    h = pd.read_csv(rd / "history.csv")
    assert list(h.columns) == ["epoch", "train_loss", "dev_loss", "dev_mean_average_precision", "dev_uaf1", "lr", "time"]
    assert len(h) == 2 and np.isfinite(h.train_loss).all()
    m = pretrained.metrics
    assert m["best_epoch"] == 1 and m["n_train"] == 40 and m["n_classes"] == 49     # keep="last"
    assert set(m["test"]) == {"loss", "mean_average_precision", "uaf1"}
    from audiotl_nb.models.core import load_checkpoint
    ck = load_checkpoint(rd / "model.pt", expect_frontend="panns16k")
    assert ck["model"]["name"] == "cnn10" and ck["frontend"]["name"] == "panns16k" and len(ck["labels"]) == 49
    assert len(skipped(rd)) == 0                                                      # nothing skipped: the header only


def test_finetune_from_pretrained(pretrained, world, tmp_path):
    r = finetune(dict(pretrained=str(pretrained.run_dir / "model.pt"), **bad_task(world, epochs=3)), tmp_path / "ft")
    h = r.history
    assert r.metrics["best_epoch"] == int(h.epoch[h.dev_uar == h.dev_uar.max()].iloc[0])     # first best dev UAR
    assert r.metrics["pretrained"].endswith("model.pt")
    # the saved model takes waveforms; its test UAR is the one in metrics.json
    from audiotl_nb.data import get_task, make_dataloader
    from audiotl_nb.models.core import model_from_checkpoint
    from sklearn.metrics import balanced_accuracy_score
    model = model_from_checkpoint(r.run_dir / "model.pt")
    task = get_task("dcase2018_bad", world.tasks["dcase2018_bad"])
    assert model.labels == task.classes
    dl = make_dataloader(task, "test", bs=8, clip_seconds=1.0)
    logits, y = predict(model, dl)
    assert balanced_accuracy_score(y.numpy(), logits.argmax(1).numpy()) == pytest.approx(r.test["uar"])
    # the pre-trained convolutions were loaded (the head was not)
    pre = torch.load(pretrained.run_dir / "model.pt", weights_only=True)["state_dict"]
    ft0 = finetune(dict(pretrained=str(pretrained.run_dir / "model.pt"), **bad_task(world, epochs=1, lr=0.0)), tmp_path / "ft0")
    sd = torch.load(ft0.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert torch.equal(sd["conv_block1.conv1.weight"], pre["conv_block1.conv1.weight"])
    assert sd["fc_audioset.weight"].shape == (2, 64)


def test_finished_run_is_not_redone_and_other_specs_refused(world, tmp_path):
    spec = bad_task(world, epochs=1)
    r1 = finetune(spec, tmp_path / "r")
    t = (tmp_path / "r" / "metrics.json").stat().st_mtime_ns
    r2 = finetune(spec, tmp_path / "r")
    assert (tmp_path / "r" / "metrics.json").stat().st_mtime_ns == t and r2.test == r1.test
    with pytest.raises(ConfigError, match="differing: lr"): finetune({**spec, "lr": 0.01}, tmp_path / "r")


def test_frontend_mismatch_is_refused(pretrained, world, tmp_path):
    spec = dict(pretrained=str(pretrained.run_dir / "model.pt"), **bad_task(world, epochs=1))
    with pytest.raises(CheckpointError) as e: finetune({**spec, "frontend": {"name": "panns16k", "n_mels": 32}}, tmp_path / "a")
    assert "'n_mels': 64" in str(e.value) and "'n_mels': 32" in str(e.value)
    st = json.loads((tmp_path / "a" / "status.json").read_text())["status"]
    assert st.startswith("failed: CheckpointError: front-end mismatch")
    with pytest.raises(CheckpointError, match="holds a 'cnn10' model but the spec asks for 'cf_tiny'"):
        finetune({**spec, "model": "cf_tiny", "model_kw": {}}, tmp_path / "b")


def test_bad_metric_names_fail_before_training(world, tmp_path):
    with pytest.raises(ConfigError, match="psds1 needs frame labels"): finetune(bad_task(world, metrics=["psds1"]), tmp_path / "a")
    with pytest.raises(UnknownNameError, match="uaf1"): finetune(bad_task(world, metric="uaf"), tmp_path / "b")
    assert not (tmp_path / "a" / "history.csv").exists()


def test_panns_and_autrainer_states(world, tmp_path):
    "Third-party Cnn10 states: PANNs (with its STFT/mel extractor, checked against the front-end) and autrainer ('out')."
    from audiotl_nb.audio import create_frontend
    from audiotl_nb.models.cnn import Cnn10, panns_extractor_state
    src = Cnn10(n_classes=527, width=0.125)
    state = {**src.state_dict(), **panns_extractor_state(create_frontend("panns16k"))}
    torch.save({"model": state}, tmp_path / "panns.pth")
    r = finetune(dict(pretrained=str(tmp_path / "panns.pth"), **bad_task(world, epochs=1, lr=0.0, model_kw={})), tmp_path / "p")
    sd = torch.load(r.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert torch.equal(sd["conv_block2.conv1.weight"], src.state_dict()["conv_block2.conv1.weight"])
    with pytest.raises(CheckpointError, match="front-end mismatch"):
        finetune(dict(pretrained=str(tmp_path / "panns.pth"), **bad_task(world, epochs=1, model_kw={}, frontend="panns32k")), tmp_path / "q")
    aut = {("out." + k[len("fc_audioset."):] if k.startswith("fc_audioset.") else k): v for k, v in src.state_dict().items()}
    torch.save(aut, tmp_path / "autrainer.pt")
    r = finetune(dict(pretrained=str(tmp_path / "autrainer.pt"), **bad_task(world, epochs=1, lr=0.0, model_kw={})), tmp_path / "a")
    assert r.status == "done"
    # a file that would run code on loading is refused
    torch.save({"model": subprocess.Popen}, tmp_path / "evil.pt")   # unpickling it would import a callable
    with pytest.raises(CheckpointError, match="refusing"):
        finetune(dict(pretrained=str(tmp_path / "evil.pt"), **bad_task(world, epochs=1)), tmp_path / "e")


def test_nonfinite_loss_stops_the_run(world, tmp_path):
    with pytest.raises(NonFiniteLossError):
        finetune(bad_task(world, epochs=2, lr=1e30, schedule="constant"), tmp_path / "nan")
    st = json.loads((tmp_path / "nan" / "status.json").read_text())["status"]
    assert re.fullmatch(r"failed: non-finite loss at epoch \d+ step \d+", st), st


def test_feature_store_run(world, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOTL_CACHE", str(tmp_path / "cache"))
    r = finetune(bad_task(world, epochs=1, features="store", max_train=10), tmp_path / "s")
    assert r.status == "done" and any((tmp_path / "cache" / "features").iterdir())
    assert r.metrics["n_train"] == 10


# --- resume after kill -9 ---------------------------------------------------------------------------------------
def test_resume_after_sigkill_matches_uninterrupted_run(world, tmp_path):
    spec = dict(kind="finetune", deterministic=True, schedule="cosine", schedule_kw={"warmup": 3},
                **bad_task(world, epochs=4, bs=4))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = tmp_path / "killed"
    code = ("import sys, torch; torch.set_num_threads(1); from audiotl_nb.train.core import train_main; "
            "sys.exit(train_main(sys.argv[1:]))")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "spec.json"), str(run)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    t0 = time.time()
    while not (run / "last.pt").exists():
        assert p.poll() is None, "the training process ended before its first checkpoint"
        assert time.time() - t0 < 240
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert json.loads((run / "status.json").read_text())["status"] == "running"     # killed: no chance to say more
    epoch = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert epoch < 3, "killed too late to test a resume"
    resumed = run_spec(spec, run)
    assert "resuming after epoch" in (run / "log.txt").read_text()
    straight = run_spec(spec, tmp_path / "straight")
    assert resumed.test == straight.test and resumed.metrics["best_epoch"] == straight.metrics["best_epoch"]
    pd.testing.assert_frame_equal(resumed.history.drop(columns="time"), straight.history.drop(columns="time"))
    a = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- linear probe and PairTune ------------------------------------------------------------------------------------
def test_linear_probe_matches_sklearn(pretrained, world, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from audiotl_nb.data import get_task, make_dataloader
    from audiotl_nb.models.core import model_from_checkpoint
    r = run_spec(dict(kind="linear_probe", task="speechcommands", root=str(world.tasks["speechcommands"]),
                      pretrained=str(pretrained.run_dir / "model.pt"), Cs=[0.1, 1.0], **TINY), tmp_path / "lp")
    assert list(r.history.C) == [0.1, 1.0] and r.metrics["C"] in (0.1, 1.0)
    assert len(skipped(r.run_dir)) == 0
    model = model_from_checkpoint(r.run_dir / "model.pt")
    task = get_task("speechcommands", world.tasks["speechcommands"])
    dls = {s: make_dataloader(task, s, bs=8, clip_seconds=1.0) for s in ("train", "test")}
    emb = {s: predict(model, dl, fn=lambda m, x: m.embed(x)) for s, dl in dls.items()}
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=r.metrics["C"], max_iter=1000))
    clf.fit(emb["train"][0].double().numpy(), emb["train"][1].numpy())
    logits, _ = predict(model, dls["test"])
    ref = clf.predict_proba(emb["test"][0].double().numpy())
    present = clf.classes_
    np.testing.assert_allclose(torch.softmax(logits.double(), -1).numpy()[:, present], ref, atol=1e-4)
    # the encoder is the pre-trained one, untouched
    pre = torch.load(pretrained.run_dir / "model.pt", weights_only=True)["state_dict"]
    sd = torch.load(r.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert torch.equal(sd["conv_block3.conv2.weight"], pre["conv_block3.conv2.weight"])


def test_pairtune(pretrained, world, tmp_path):
    r = run_spec(dict(kind="pairtune", pretrained=str(pretrained.run_dir / "model.pt"), **bad_task(world, lr=1e-3)), tmp_path / "pt")
    h = r.history
    assert {"dev_uar", "dev_accuracy", "train_loss"} <= set(h.columns) and len(h) == 2    # the convergence curve
    assert h.dev_uar.notna().all() and (h.train_loss > 0).any()
    sd = torch.load(r.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith(("proj.", "encoder.")) for k in sd)                      # the projection is dropped
    assert sd["fc_audioset.weight"].shape == (2, 64)
    assert len(skipped(r.run_dir)) == 0


def test_projection_head():
    from audiotl_nb.models.core import create_model
    from audiotl_nb.train.probe import Projected
    enc = create_model("cnn10", 3, width=0.125)
    z = Projected(enc, enc.head.in_features, 256)(torch.randn(2, 1, 50, 64))
    assert z.shape == (2, 256)


# --- SSL -------------------------------------------------------------------------------------------------------
def test_ssl_pretrain_and_finetune(world, tmp_path):
    from fastai.callback.core import Callback
    r = run_spec(dict(kind="ssl_pretrain", root=str(world.audioset), model="cf_tiny", epochs=2, bs=8, clip_seconds=1.0,
                      n_distractors=10), tmp_path / "ssl")
    assert r.history.dev_loss.notna().all() and set(r.test) == {"loss"}
    assert r.history.lr.iloc[-1] < r.history.lr.iloc[0]                              # linear decay
    shapes = []
    class Shapes(Callback):
        def before_batch(self):
            if self.training: shapes.append((len(self.learn.xb[0]), len(self.learn.yb[0])))
    f = run_spec(dict(kind="ssl_finetune", task="speechcommands", root=str(world.tasks["speechcommands"]),
                      pretrained=str(r.run_dir / "model.pt"), epochs=2, bs=4, clip_seconds=1.0, output_dropout=0.2),
                 tmp_path / "ft", cbs=[Shapes()])
    assert shapes and all(x == 8 and y == 8 for x, y in shapes)                          # two views of 4 clips
    ck = torch.load(f.run_dir / "model.pt", weights_only=True)
    assert ck["model"]["pooling"] == "mean" and ck["model"]["head_dropout"] == 0.2
    pre = torch.load(r.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert pre["mask_emb"].shape == ck["state_dict"]["mask_emb"].shape
    assert len(skipped(r.run_dir)) == 0 and len(skipped(f.run_dir)) == 0


# --- SED teachers and distillation ---------------------------------------------------------------------------
def test_sed_teachers_and_distillation(pretrained, world, tmp_path):
    sk = dict(root=str(world.audioset), model_kw={"backbone": "cnn10", "backbone_kw": {"width": 0.125}, "rnn_hidden": 16},
              epochs=1, bs=8, clip_seconds=1.0, schedule_kw={"warmup": 2})
    t1 = run_spec(dict(kind="sed", pretrained=str(pretrained.run_dir / "model.pt"), lr_decay=0.5, **sk), tmp_path / "t1")
    lrs = t1.metrics["base_lrs"]
    np.testing.assert_allclose(np.array(lrs[1:]) / np.array(lrs[:-1]), 2.0)              # layer-wise decay 0.5
    assert lrs[-1] == pytest.approx(3e-4) and {"psds1", "mean_average_precision"} <= set(t1.test)
    t2 = run_spec(dict(kind="sed", seed=1, augment=None, sampler="uniform", **sk), tmp_path / "t2")
    kd = run_spec(dict(kind="distill", teachers=[str(t1.run_dir / "model.pt"), str(t2.run_dir / "model.pt")], **sk),
                  tmp_path / "kd")
    assert kd.status == "done" and np.isfinite(kd.history.train_loss).all()
    assert len(skipped(t1.run_dir)) == 0 and len(skipped(kd.run_dir)) == 0
    # the stored predictions are the mean of the teachers' frame logits
    from audiotl_nb.data import get_task, make_dataloader
    from audiotl_nb.models.core import model_from_checkpoint
    import dataclasses
    stored = np.load(kd.run_dir / "teacher_logits.npy")
    task = dataclasses.replace(get_task("audioset_strong", world.audioset), clip_seconds=1.0)
    dl = make_dataloader(task, "train", bs=8, clip_seconds=1.0)
    zs = [predict(model_from_checkpoint(t.run_dir / "model.pt"), dl, fn=lambda m, x: m.frame_logits(x))[0] for t in (t1, t2)]
    assert stored.shape == (40, 25, 49)
    np.testing.assert_allclose(stored.astype(np.float32), ((zs[0] + zs[1]) / 2).numpy(), atol=2e-2)


# --- skipped clips ------------------------------------------------------------------------------------------------
def _damaged_copy(world, name, tmp_path):
    "A copy of a task's data with one listed test clip deleted and one training clip corrupted. Returns (root, removed, broken)."
    import shutil
    root = tmp_path / name
    shutil.copytree(world.tasks[name] if name in world.tasks else world.audioset, root)
    task = quiet_task(name, root)
    removed, broken = sorted(task.items("test").path)[0], sorted(task.items("train").path)[0]
    os.unlink(removed)
    Path(broken).write_bytes(b"RIFF" + bytes(range(200)))
    return root, removed, broken


def quiet_task(name, root):
    from audiotl_nb.data import get_task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_task(name, root)


def test_linear_probe_lists_skipped_clips(pretrained, world, tmp_path):
    "Missing and unreadable clips of a linear probe's loaders (not the fastai training loop) are in skipped.csv."
    root, removed, broken = _damaged_copy(world, "speechcommands", tmp_path)
    r = run_spec(dict(kind="linear_probe", task="speechcommands", root=str(root),
                      pretrained=str(pretrained.run_dir / "model.pt"), **TINY), tmp_path / "lp")
    df = skipped(r.run_dir)
    assert r.status == "done" and (Path(r.run_dir) / ".unreadable.csv").exists()
    assert df.set_index("path").loc[removed].tolist() == ["test", "missing"]
    split, why = df.set_index("path").loc[broken].tolist()
    assert split == "train" and why != "missing"
    assert len(df) == 2


def test_skipped_manifest_survives_resume_and_force(world, tmp_path):
    "A clip reported before an interruption stays in skipped.csv after the resume; force=True starts the list afresh."
    from fastai.callback.core import Callback
    root, removed, broken = _damaged_copy(world, "dcase2018_bad", tmp_path)
    spec = dict(task="dcase2018_bad", root=str(root), **{**TINY, "epochs": 2, "bs": 64})   # one batch: every clip drawn
    class Stop(Callback):
        order = 40
        def after_epoch(self):
            if self.epoch == 0 and getattr(self.learn, "in_training_run", False): raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): finetune(spec, tmp_path / "r", cbs=[Stop()])
    assert broken in set(skipped(tmp_path / "r").path)                   # written by the failed attempt too
    r = finetune(spec, tmp_path / "r")
    df = skipped(r.run_dir)
    assert {removed, broken} <= set(df.path) and not df.duplicated().any()
    assert "resuming after epoch 0" in (Path(r.run_dir) / "log.txt").read_text()
    # a forced re-run of another spec on intact data starts with an empty list
    r2 = finetune({**bad_task(world), "epochs": 1}, tmp_path / "r", force=True)
    assert len(skipped(r2.run_dir)) == 0


# --- mixed precision and channels-last ---------------------------------------------------------------------------
class _Probe:
    "A forward hook on the model's first convolution: the dtype of its output and the memory format of its input."
    def __init__(self): self.seen = []
    def __call__(self, module, inputs, output):
        if module.training: self.seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))


def _amp_run(world, tmp_path, device):
    from fastai.callback.core import Callback
    probe, weights = _Probe(), {}
    class Hook(Callback):
        order = -10
        def before_fit(self):
            conv = self.learn.raw_model.conv_block1.conv1
            self.h = conv.register_forward_hook(probe)
        def after_fit(self):
            self.h.remove()
            weights["cl"] = self.learn.raw_model.conv_block1.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    r = finetune(bad_task(world, epochs=1, amp=True, channels_last=True, device=device), tmp_path / f"amp-{device}", cbs=[Hook()])
    return r, probe.seen, weights


def test_amp_and_channels_last_on_cpu(world, tmp_path):
    "amp=True runs the CPU forward pass under bfloat16 autocast; channels_last stores weights and inputs channels-last."
    r, seen, weights = _amp_run(world, tmp_path, "cpu")
    assert r.status == "done" and np.isfinite(r.history.train_loss).all() and np.isfinite(r.test["loss"])
    assert seen and all(dt == torch.bfloat16 and cl for dt, cl in seen)
    assert weights["cl"]
    log = (Path(r.run_dir) / "log.txt").read_text()
    assert "amp: bfloat16 autocast on cpu" in log and "channels_last on cpu" in log
    # without amp the same convolution computes in float32
    probe = _Probe()
    from audiotl_nb.models.core import model_from_checkpoint
    m = model_from_checkpoint(r.run_dir / "model.pt").train()
    m.conv_block1.conv1.register_forward_hook(probe)
    m(torch.randn(2, 16000))
    assert probe.seen[0][0] == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_and_channels_last_on_cuda(world, tmp_path):
    "On CUDA amp=True trains in float16 with fastai's MixedPrecision (loss scaling); inputs and weights channels-last."
    r, seen, weights = _amp_run(world, tmp_path, "cuda")
    assert r.status == "done" and np.isfinite(r.history.train_loss).all()
    assert seen and all(dt == torch.float16 and cl for dt, cl in seen)
    assert weights["cl"] and "amp: float16 autocast on cuda" in (Path(r.run_dir) / "log.txt").read_text()
