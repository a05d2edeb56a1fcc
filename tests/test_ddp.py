"""A training run under torchrun with 2 processes on the CPU (gloo): the ranks agree, rank 0 alone writes the run directory."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAUNCHER = """
import json, os, sys, torch
torch.set_num_threads(1)
from fastai.callback.core import Callback
from audiotl_nb.train.core import run_spec

class Checksum(Callback):
    "Every parameter and buffer of the trained model, summed, after training (DDP keeps the replicas equal)."
    def after_fit(self):
        if getattr(self.learn, "in_training_run", False):
            m = self.learn.raw_model
            self.sums = {k: float(v.double().sum()) for k, v in {**dict(m.named_parameters()), **dict(m.named_buffers())}.items()}

spec, run_dir, out = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
cb = Checksum()
res = run_spec(spec, run_dir, cbs=[cb])
rank = int(os.environ["RANK"])
json.dump({"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "metrics": res.metrics, "sums": cb.sums,
           "history": res.history.drop(columns="time").to_dict("list")}, open(f"{out}/rank{rank}.json", "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from audiotl_nb.synth import make_world, world_config
    cfg = world_config("tiny", clip_seconds=1.0, n_train=40, n_eval=20, bird_clips=8, kws_speakers=3, scene_cities=1)
    return make_world(tmp_path_factory.mktemp("world") / "w", config=cfg)


def torchrun_two(spec: dict, tmp_path):
    "Run `spec` under torchrun with 2 CPU processes (gloo); (rank 0's report, rank 1's report, the run directory)."
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "launch.py").write_text(LAUNCHER)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "launch.py"), str(tmp_path / "spec.json"), str(run), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUDIOTL_DEVICE": "cpu"}
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    return r0, r1, run


def test_torchrun_two_processes_gloo(world, tmp_path):
    spec = dict(kind="finetune", task="dcase2018_bad", root=str(world.tasks["dcase2018_bad"]), model_kw={"width": 0.125},
                epochs=2, bs=4, clip_seconds=1.0, deterministic=True, keep="last")
    r0, r1, run = torchrun_two(spec, tmp_path)
    # both ranks hold the same model and computed the same (gathered) metrics and history
    assert r0["sums"] == r1["sums"]
    assert r0["history"] == r1["history"]
    m0, m1 = ({k: v for k, v in r["metrics"].items() if k != "seconds"} for r in (r0, r1))
    assert m0 == m1 and m0["n_train"] == 14                   # the whole training split, not one shard
    # rank 0 alone wrote the run directory
    for f in ("spec.json", "status.json", "history.csv", "metrics.json", "model.pt", "log.txt"): assert (run / f).exists(), f
    assert json.loads((run / "status.json").read_text())["status"] == "done"
    log = (run / "log.txt").read_text()
    assert log.count("start finetune") == 1 and "rank 0 of 2" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"] == r0["metrics"]["test"]
    # the weights saved by rank 0 (keep="last") are the trained replica's
    import torch
    sd = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert float(sd["conv_block1.conv1.weight"].double().sum()) == pytest.approx(r0["sums"]["conv_block1.conv1.weight"], rel=1e-12)


def test_pretrain_torchrun_two_processes_gloo(world, tmp_path):
    "Pre-training under torchrun: the ranks end alike, rank 0 alone writes the run directory (skipped.csv too)."
    spec = dict(kind="pretrain", root=str(world.audioset), model_kw={"width": 0.125}, epochs=1, bs=10, clip_seconds=1.0,
                deterministic=True)
    r0, r1, run = torchrun_two(spec, tmp_path)
    assert r0["sums"] == r1["sums"] and r0["history"] == r1["history"]
    m0, m1 = ({k: v for k, v in r["metrics"].items() if k != "seconds"} for r in (r0, r1))
    assert m0 == m1 and m0["n_train"] == 40 and m0["best_epoch"] == 0 and m0["n_classes"] == 49    # keep="last"
    assert set(m0["test"]) == {"loss", "mean_average_precision", "uaf1"}
    for f in ("spec.json", "status.json", "history.csv", "metrics.json", "model.pt", "log.txt", "skipped.csv"):
        assert (run / f).exists(), f
    assert json.loads((run / "status.json").read_text())["status"] == "done"
    log = (run / "log.txt").read_text()
    assert log.count("start pretrain") == 1 and "rank 0 of 2" in log and log.count("skipped 0 clips") == 1
    import torch
    sd = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert float(sd["conv_block1.conv1.weight"].double().sum()) == pytest.approx(r0["sums"]["conv_block1.conv1.weight"], rel=1e-12)
