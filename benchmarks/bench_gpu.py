"""Benchmark: Cnn10 training on a CUDA GPU with mixed precision (AMP) and channels-last, samples/s and GPU utilisation.

Cnn10 (full width, 527 outputs, BCE as in AudioSet pre-training) on log-mel batches of 10 s clips (B, 1, 1001, 64)
held on the GPU, Adam. Timed, interleaved over several rounds after a warm-up (cuDNN autotuning on):

* `fp32`: a plain PyTorch loop in float32;
* `amp`: the same under `torch.autocast(dtype=float16)` with a `GradScaler`;
* `amp + channels_last`: and the model and batches in channels-last memory format;
* `trainer amp + channels_last`: the library's trainer (`train.fit_run` with `amp=True, channels_last=True`:
  fastai's `MixedPrecision` callback) on the same batches served by a fastai `DataLoader` from host memory.

Each timing synchronises the device; GPU utilisation is sampled every 0.2 s with `nvidia-smi` during each variant
(`torch.cuda.utilization()` where nvidia-smi is missing); the peak memory each variant allocates is recorded.

Without CUDA the benchmark records that it was skipped and why (no target is failed). `--device cpu` runs the same
code on the CPU at a tiny size (autocast in bfloat16), to check it, not to measure anything.

    .venv/bin/python benchmarks/bench_gpu.py [--bs 32] [--steps 20] [--rounds 3] [--out benchmarks/results/gpu.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

if __package__ in (None, ""): sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import RESULTS, write_result, loadavg, machine_info, median, spread  # noqa: E402


def cuda_status() -> tuple[bool, str]:
    "(usable, why not) for CUDA."
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return False, (f"torch.cuda.is_available() is False: no CUDA device visible on this machine "
                       f"(torch {torch.__version__}, built {'with CUDA ' + built if built else 'without CUDA'})")
    return True, ""


class UtilSampler:
    "GPU utilisation (%) and memory in use (MiB), sampled every `every` seconds in a thread while active."
    def __init__(self, index: int = 0, every: float = 0.2):
        self.index, self.every, self.samples, self._stop = index, every, [], threading.Event()
        self.smi = shutil.which("nvidia-smi")

    def _one(self):
        if self.smi:
            r = subprocess.run([self.smi, "-i", str(self.index), "--query-gpu=utilization.gpu,memory.used",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            u, m = (float(v) for v in r.stdout.strip().split(","))
            return u, m
        return float(torch.cuda.utilization(self.index)), float("nan")

    def _run(self):
        while not self._stop.is_set():
            try: self.samples.append(self._one())
            except Exception: pass
            self._stop.wait(self.every)

    def __enter__(self):
        self.samples.clear(); self._stop.clear()
        self.t = threading.Thread(target=self._run, daemon=True); self.t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set(); self.t.join()

    @property
    def mean_util(self) -> float:
        return sum(u for u, _ in self.samples) / len(self.samples) if self.samples else float("nan")


def plain_loop(model, batches, device, amp: bool, channels_last: bool, amp_dtype):
    "A step function over pre-made (x, y) batches on `device`: forward, BCE, backward, Adam (AMP: autocast + scaler)."
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def steps(n: int):
        model.train()
        for i in range(n):
            x, y = batches[i % len(batches)]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt); scaler.update()
    return steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the code at a tiny size)")
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=1001, help="log-mel frames (1001: 10 s at 16 kHz, hop 160)")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--classes", type=int, default=527)
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    a = ap.parse_args(argv)
    info = machine_info()
    base = dict(benchmark="gpu", target=None, when=time.strftime("%Y-%m-%d %H:%M:%S"))
    ok, why = cuda_status()
    if a.device == "cuda" and not ok:
        info["loadavg_end"] = loadavg()
        result = dict(base, skipped=True, reason=why, machine=info, bound=why)
        print(f"skipped: {why}")
        write_result(a.out, result)
        return result

    from audiotl_nb.core import RunDir
    from audiotl_nb.models.core import create_model
    from audiotl_nb.train.core import FinetuneSpec, fit_run
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader as FastaiDL

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    if cuda:
        torch.backends.cudnn.benchmark = True
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    t_start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    n_batches = 4
    host = [(torch.randn(a.bs, 1, a.frames, 64, generator=g), (torch.rand(a.bs, a.classes, generator=g) < 0.02).float())
            for _ in range(n_batches)]
    on_dev = [(x.to(device), y.to(device)) for x, y in host]
    init = create_model("cnn10", a.classes, width=a.width)
    n_params = sum(p.numel() for p in init.parameters())

    def sync():
        if cuda: torch.cuda.synchronize(device)

    variants = {"fp32": (False, False), "amp": (True, False), "amp + channels_last": (True, True)}
    steppers = {k: plain_loop(copy.deepcopy(init).to(device), on_dev, device, amp, cl, amp_dtype) for k, (amp, cl) in variants.items()}

    # the library's trainer on the same batches from host memory (a fastai DataLoader over the items)
    items = [(x[i], y[i]) for x, y in host for i in range(a.bs)]

    class Repeat(torch.utils.data.Dataset):
        "`items` repeated to `n`."
        def __init__(self, n): self.n = n
        def __len__(self): return self.n
        def __getitem__(self, i): return items[i % len(items)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))

    class StepTimer(Callback):
        order = 100
        def before_train(self): sync(); self.t0 = time.perf_counter()
        def after_train(self): sync(); self.dt = time.perf_counter() - self.t0

    k = [0]
    def trainer_steps(n: int):
        dls = DataLoaders(FastaiDL(Repeat(n * a.bs), bs=a.bs, shuffle=True, drop_last=True),
                          FastaiDL(Repeat(a.bs), bs=a.bs), device=device)
        spec = FinetuneSpec(task="folder", epochs=1, bs=a.bs, amp=True, channels_last=True, device=a.device, loss="bce")
        k[0] += 1
        timer = StepTimer()
        fit_run(spec, RunDir(tmp / f"run{k[0]}"), copy.deepcopy(init), dls, torch.nn.BCEWithLogitsLoss(), kind="multi",
                metrics=[], metric="loss", extra_cbs=[timer])
        return timer.dt

    util = UtilSampler(device.index or 0) if cuda else None
    rows = {k: [] for k in [*variants, "trainer amp + channels_last"]}
    utils = {k: [] for k in rows}
    mem = {}
    try:
        for name, st in steppers.items():                     # warm-up: cuDNN autotuning, allocator
            st(3)
        trainer_steps(3)
        for r in range(a.rounds):
            names = list(rows) if r % 2 == 0 else list(rows)[::-1]
            for name in names:
                if cuda: torch.cuda.reset_peak_memory_stats(device)
                with (util if util is not None else contextlib.nullcontext()):
                    if name.startswith("trainer"):
                        dt = trainer_steps(a.steps)
                    else:
                        sync(); t0 = time.perf_counter()
                        steppers[name](a.steps)
                        sync(); dt = time.perf_counter() - t0
                rows[name].append(a.steps * a.bs / dt)
                if util is not None: utils[name].append(util.mean_util)
                if cuda: mem[name] = torch.cuda.max_memory_allocated(device) / 2**20
                print(f"round {r} {name:28s} {a.steps * a.bs / dt:9.1f} samples/s"
                      + (f", GPU utilisation {util.mean_util:.0f} %" if util is not None else ""), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    res = {k: dict(samples_per_s=median(v), all_samples_per_s=v, spread=spread(v),
                   gpu_utilisation_pct=median(utils[k]) if utils[k] else None, peak_memory_mib=mem.get(k)) for k, v in rows.items()}
    fp32 = res["fp32"]["samples_per_s"]
    for v in res.values(): v["x_fp32"] = v["samples_per_s"] / fp32
    info["loadavg_end"] = loadavg()
    result = dict(base, skipped=False, device=str(device), model=f"cnn10 width {a.width} ({n_params:,} parameters)",
                  input=f"log-mel (B, 1, {a.frames}, 64)", batch=a.bs, steps=a.steps, rounds=a.rounds, classes=a.classes,
                  amp_dtype=str(amp_dtype).replace("torch.", ""), variants=res, machine=info,
                  speedup_amp_channels_last=res["amp + channels_last"]["x_fp32"],
                  trainer_vs_plain_amp_channels_last=res["trainer amp + channels_last"]["samples_per_s"]
                  / res["amp + channels_last"]["samples_per_s"],
                  seconds=round(time.perf_counter() - t_start, 1),
                  bound=(f"{info.get('gpu', 'CPU check run')}; batches already on the device for the plain loops, served "
                         f"from host memory by a fastai DataLoader for the trainer"))
    for k, v in res.items():
        print(f"{k:28s} {v['samples_per_s']:9.1f} samples/s  {v['x_fp32']:5.2f}x fp32"
              + (f"  GPU {v['gpu_utilisation_pct']:.0f} %" if v["gpu_utilisation_pct"] is not None else "")
              + (f"  peak {v['peak_memory_mib']:.0f} MiB" if v["peak_memory_mib"] is not None else ""))
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
