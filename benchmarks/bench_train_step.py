"""Benchmark: Cnn10 training samples/s through the library's fastai trainer against a minimal plain PyTorch loop.

Identical on both sides: the data (one `AudioDataset` over WAV files on disk, a `folder` task; 16 kHz clips read and
randomly cropped per item, `num_workers=0`), the `panns16k` front-end run on each batch of waveforms (no gradient),
the model (Cnn10, one initialisation copied to both), the loss (`make_loss`: class-balanced cross-entropy), the
optimiser (Adam, lr 1e-3), the batch size and `drop_last`, the torch thread count.

* ours: `audiotl_nb.train.finetune(spec, run_dir, cbs=[timer])`, one epoch per call (a fresh run directory each
  time): fastai `Learner`, the library's `SamplerDL` loaders, `FeatureCallback`, `LRScheduler`, `NonFiniteCallback`,
  `EvalCallback` (dev metrics), `RunRecorder` (history.csv, best.pt and last.pt with the optimiser state every epoch).
  A timing callback (`order` outside the others) records the training phase (`before_train` → `after_train`) and the
  whole epoch (`before_epoch` → `after_epoch`: training, validation with metrics, checkpoint writes).
* plain: a `torch.utils.data.DataLoader` (shuffled) over the same dataset, `frontend(x)` → `model` → loss →
  `zero_grad`/`backward`/`step`; for the whole epoch, also an evaluation pass over the dev split (predictions only).

The two alternate (ours, plain, plain, ours, ...), one epoch each per round, after a warm-up round; both start each
round from the same initial weights with a fresh optimiser (a one-epoch fit), so first-step costs such as allocating
Adam's state count on both sides. The medians of the rounds are reported, wall-clock and CPU (process) time. Target: ours/plain training samples/s >= 0.9.

After the timed rounds, one more (untimed) call of ours records the CPU time spent in each fastai callback.

Defaults: Cnn10 at width 0.25 on 1 s clips, one torch thread. On a busy 2-core machine a full-width Cnn10 step takes
seconds, too few to time within two minutes; a narrower model makes the trainer's fixed per-batch and per-epoch costs
a larger share of the step, so its ratio is a lower bound for the full model (`--width 1` for that). One thread,
because on a machine whose load average is far above its core count, torch's two OpenMP threads wait for each other
at every barrier: epochs then ran some ten times slower than with one thread and their times varied twofold between
identical rounds, wall and CPU time alike (`--threads 0` for torch's default).

    .venv/bin/python benchmarks/bench_train_step.py [--width 0.25] [--clips 64] [--bs 16] [--rounds 5] [--out ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastai.callback.core import Callback

if __package__ in (None, ""): sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import RESULTS, write_result, loadavg, machine_info, median, spread  # noqa: E402

SR = 16000


def write_task(root: Path, n_train: int, n_dev: int, n_classes: int, seconds: float, seed: int = 0) -> Path:
    "A `folder` task ROOT/{train,dev}/<class>/*.wav of tones in noise, 16-bit, 16 kHz (soundfile)."
    import soundfile as sf
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds * 1.25)) / SR       # 25 % longer than the crop: the random crop does work
    for split, n in (("train", n_train), ("dev", n_dev)):
        for i in range(n):
            c = i % n_classes
            x = 0.3 * np.sin(2 * np.pi * (200 + 150 * c) * t) + 0.05 * rng.standard_normal(len(t))
            p = root / split / f"class{c}" / f"{split}{i:04d}.wav"
            p.parent.mkdir(parents=True, exist_ok=True)
            sf.write(p, x.astype(np.float32), SR, subtype="PCM_16")
    return root


class PhaseTimer(Callback):
    "Wall and CPU seconds of each epoch's training phase and of the whole epoch; training samples seen."
    order = 100          # after RunRecorder (30): its checkpoint writes count in the epoch
    def __init__(self): self.rows = []
    def before_epoch(self):
        self.e0 = (time.perf_counter(), time.process_time()); self.n, self.t0 = 0, None
    def before_train(self): self.t0 = (time.perf_counter(), time.process_time())
    def after_batch(self):
        if self.training: self.n += len(self.learn.yb[0])
    def after_train(self): self.t1 = (time.perf_counter(), time.process_time())
    def after_epoch(self):
        if self.t0 is None: return        # a validation-only pass (the final test evaluation)
        e1 = (time.perf_counter(), time.process_time())
        self.rows.append(dict(samples=self.n, train_s=self.t1[0] - self.t0[0], train_cpu_s=self.t1[1] - self.t0[1],
                              epoch_s=e1[0] - self.e0[0], epoch_cpu_s=e1[1] - self.e0[1]))


def callback_costs(run: Callable[[], object]) -> dict:
    "CPU milliseconds spent in each fastai callback (all events) during `run()`, by callback and event."
    cost, orig = {}, Callback.__call__
    def timed_call(self, event_name):
        t = time.process_time()
        try: return orig(self, event_name)
        finally:
            k = (type(self).__name__, event_name)
            cost[k] = cost.get(k, 0.0) + time.process_time() - t
    Callback.__call__ = timed_call
    try: run()
    finally: Callback.__call__ = orig
    out = {}
    for (cb, ev), v in sorted(cost.items(), key=lambda kv: -kv[1]):
        d = out.setdefault(cb, {"total_ms": 0.0, "events_ms": {}})
        d["total_ms"] += 1000 * v
        if v >= 5e-4: d["events_ms"][ev] = round(1000 * v, 1)
    for d in out.values(): d["total_ms"] = round(d["total_ms"], 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total_ms"]))


class Plain:
    """The minimal loop: shuffled torch DataLoader, front-end per batch, forward, loss, backward, Adam step.
    Each `epoch()` starts from a fresh copy of the initial model and a fresh optimiser, as each `finetune` call does."""
    def __init__(self, model, frontend, loss_func, train_ds, dev_ds, bs: int, lr: float, seed: int = 0):
        self.init, self.fe, self.loss_func, self.lr = model, frontend, loss_func, lr
        g = torch.Generator().manual_seed(seed)
        self.dl = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=len(train_ds) >= bs,
                                              generator=g)
        self.dev = torch.utils.data.DataLoader(dev_ds, batch_size=bs)

    def epoch(self) -> dict:
        self.model = copy.deepcopy(self.init)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8)
        w0, c0 = time.perf_counter(), time.process_time()
        self.model.train()
        n = 0
        for x, y in self.dl:
            with torch.no_grad(): x = self.fe(x)
            loss = self.loss_func(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            n += len(y)
        w1, c1 = time.perf_counter(), time.process_time()
        self.model.eval()
        with torch.no_grad(): preds = [self.model(self.fe(x)) for x, _ in self.dev]
        torch.cat(preds)
        w2, c2 = time.perf_counter(), time.process_time()
        return dict(samples=n, train_s=w1 - w0, train_cpu_s=c1 - c0, epoch_s=w2 - w0, epoch_cpu_s=c2 - c0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, default=0.25, help="Cnn10 width multiplier (1: the published Cnn10)")
    ap.add_argument("--clips", type=int, default=64, help="training clips (one epoch)")
    ap.add_argument("--dev", type=int, default=16, help="dev clips")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=1.0, help="clip length (crop)")
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one epoch of each side per round)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(RESULTS / "train_step.json"))
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    from audiotl_nb.core import seed_everything
    from audiotl_nb.train.core import (FinetuneSpec, dataloaders_from_spec, finetune, frontend_detached,
                                       frontend_from_spec, make_loss, model_from_spec, task_from_spec)
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    t_start = time.perf_counter()
    try:
        root = write_task(tmp / "data", a.clips, a.dev, a.classes, a.seconds)
        spec = FinetuneSpec(task="folder", root=str(root), model="cnn10", model_kw={"width": a.width},
                            clip_seconds=a.seconds, epochs=1, bs=a.bs, lr=1e-3, optimizer="adam", device="cpu", seed=0)
        # the plain side: the objects `finetune` builds from the spec (same seed: the same initial weights)
        seed_everything(spec.seed, spec.deterministic)
        task = task_from_spec(spec)
        fe = frontend_from_spec(spec)
        dls = dataloaders_from_spec(spec, task, fe)
        model, _ = model_from_spec(spec, task.n_classes, fe)
        loss_func = make_loss(spec.loss, task)
        with frontend_detached(model) as detached:
            plain = Plain(copy.deepcopy(model), detached, loss_func, dls.train.dataset, dls.valid.dataset, a.bs, spec.lr)
        n_params = sum(p.numel() for p in plain.init.parameters())

        k = [0]
        def ours() -> dict:
            timer = PhaseTimer()
            k[0] += 1
            res = finetune(spec, tmp / "runs" / f"ours{k[0]}", cbs=[timer])
            assert res.status == "done" and len(timer.rows) == 1
            return timer.rows[0]

        rows = {"ours": [], "plain": []}
        for r in range(a.rounds + 1):                       # round 0: warm-up
            for name in (("ours", "plain") if r % 2 == 0 else ("plain", "ours")):
                w0 = time.perf_counter()
                m = ours() if name == "ours" else plain.epoch()
                m["call_s"] = time.perf_counter() - w0        # ours: the whole finetune() call (setup, test pass, saves)
                if r > 0: rows[name].append(m)
                print(f"round {r}{' (warm-up)' if r == 0 else ''} {name:5s}: {m['samples']} samples, train "
                      f"{m['train_s']:.2f} s ({m['train_cpu_s']:.2f} CPU-s), epoch {m['epoch_s']:.2f} s, call {m['call_s']:.2f} s",
                      flush=True)
        # one more call of ours, untimed, with every callback event timed (CPU): what each callback costs
        costs = callback_costs(ours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(ms):
        sps = [m["samples"] / m["train_s"] for m in ms]
        return dict(samples_per_epoch=ms[0]["samples"], train_samples_per_s=median(sps),
                    train_samples_per_cpu_s=median(m["samples"] / m["train_cpu_s"] for m in ms),
                    epoch_samples_per_s=median(m["samples"] / m["epoch_s"] for m in ms),
                    train_s=[m["train_s"] for m in ms], epoch_s=[m["epoch_s"] for m in ms], call_s=[m["call_s"] for m in ms],
                    train_cpu_s=[m["train_cpu_s"] for m in ms])
    s = {k: summary(v) for k, v in rows.items()}
    per_round = [o["samples"] / o["train_s"] / (p["samples"] / p["train_s"]) for o, p in zip(rows["ours"], rows["plain"])]
    ratio = s["ours"]["train_samples_per_s"] / s["plain"]["train_samples_per_s"]
    ratio_cpu = s["ours"]["train_samples_per_cpu_s"] / s["plain"]["train_samples_per_cpu_s"]
    ratio_epoch = s["ours"]["epoch_samples_per_s"] / s["plain"]["epoch_samples_per_s"]
    info["loadavg_end"] = loadavg()
    result = dict(
        benchmark="train_step", model=f"cnn10 width {a.width} ({n_params:,} parameters)", clip_seconds=a.seconds,
        frontend="panns16k (online, per batch)", batch=a.bs, train_clips=a.clips, dev_clips=a.dev, classes=a.classes,
        rounds=a.rounds, machine=info, sides=s, ratio=ratio, ratio_cpu_time=ratio_cpu, ratio_per_round=per_round,
        ratio_spread=spread(per_round), ratio_whole_epoch=ratio_epoch, target=0.9, target_met=bool(ratio >= 0.9),
        torch_threads=torch.get_num_threads(), callback_cpu_ms_one_epoch=costs,
        seconds=round(time.perf_counter() - t_start, 1),
        bound=(f"{info['cores']} cores shared with other processes (load average {info['loadavg_start'][0]} -> "
               f"{info['loadavg_end'][0]}); per-round ratios {', '.join(f'{x:.2f}' for x in per_round)}"),
        notes=("ratio: median training samples/s (the training phase of an epoch) of ours / plain; ratio_whole_epoch "
               "adds validation (ours: with metrics) and ours' per-epoch history and checkpoint writes (best.pt, last.pt "
               "with optimiser state)"),
        when=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"cnn10 width {a.width}, {a.seconds} s clips, batch {a.bs}, {a.clips} clips/epoch, {info['cores']} cores, "
          f"load {info['loadavg_start'][0]} -> {info['loadavg_end'][0]}")
    for k, v in s.items():
        print(f"{k:5s}: train {v['train_samples_per_s']:.1f} samples/s ({v['train_samples_per_cpu_s']:.1f}/CPU-s), "
              f"whole epoch {v['epoch_samples_per_s']:.1f} samples/s")
    print("CPU ms per one-epoch call in each callback (FeatureCallback runs the front-end, as the plain loop does):",
          ", ".join(f"{k} {v['total_ms']:.0f}" for k, v in costs.items()))
    print(f"ours/plain: {ratio:.3f} training samples/s (rounds {', '.join(f'{x:.2f}' for x in per_round)}), "
          f"{ratio_cpu:.3f} per CPU-second, {ratio_epoch:.3f} whole epoch; target >= 0.9")
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
