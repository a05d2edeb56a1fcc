"""Pre-training under torchrun with 2 CPU processes (gloo): the ranks end with the same model and metrics, and rank 0
alone writes the run directory (tests/test_ddp.py does the same for fine-tuning; its launcher and world are reused)."""
import json
import os
import subprocess
import sys

import pytest

from test_ddp import LAUNCHER, ROOT, _free_port, world  # noqa: F401  (world: the module fixture)


def test_pretrain_torchrun_two_processes_gloo(world, tmp_path):
    spec = dict(kind="pretrain", root=str(world.audioset), model_kw={"width": 0.125}, epochs=1, bs=10, clip_seconds=1.0,
                deterministic=True)
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
