"""Benchmarks of audiotl_nb against the tools researchers would otherwise use.

Each `bench_<name>.py` has a `main(argv)` that measures its ratios side by side in one run and writes a results JSON
(`--out`); `python -m benchmarks [names...] [--quick]` runs them one by one in subprocesses and writes the summary
(`benchmarks/results/summary.json`, `benchmarks/RESULTS.md`). The helpers below are shared by the newer benchmarks.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    "The processor's model name (from /proc/cpuinfo; `platform.processor()` elsewhere)."
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float]:
    "The 1-, 5- and 15-minute load averages (runnable processes; above the core count, processes wait for a core)."
    try: return [round(x, 2) for x in os.getloadavg()]
    except OSError: return []


def machine_info(**extra) -> dict:
    "Where and when the numbers were measured: CPU, cores, load average, library versions, thread settings."
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for p in ("torch", "torchaudio", "numpy", "fastai", "librosa", "scikit-learn", "pandas"):
        try: versions[p] = version(p)
        except PackageNotFoundError: pass
    info = dict(cpu=cpu_model(), cores=os.cpu_count(),
                affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                platform=platform.platform(), python=platform.python_version(), versions=versions,
                loadavg_start=loadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                    "OPENBLAS_CORETYPE", "CUDA_VISIBLE_DEVICES")})
    if "torch" in sys.modules:
        import torch
        info["torch_threads"] = torch.get_num_threads()
    info.update(extra)
    return info


def timed(fn: Callable) -> tuple[object, float, float]:
    "(fn(), wall seconds, CPU seconds of this process, all threads)."
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def interleaved(methods: dict[str, Callable[[], dict | None]], rounds: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Run every method once per round, in an order that alternates (A B, B A, ...) so that a drift in the machine's
    load affects them alike. Each call returns a dict of measurements (or None: its wall and CPU time are taken);
    the first `warmup` rounds are dropped. Returns {name: [measurement per kept round]}."""
    names, out = list(methods), {k: [] for k in methods}
    for r in range(warmup + rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            res, w, c = timed(methods[k])
            if r >= warmup: out[k].append({"wall_s": w, "cpu_s": c, **(res or {})})
    return out


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs) -> list[float]:
    "[min, max] of `xs`."
    xs = [x for x in xs if x is not None]
    return [float(min(xs)), float(max(xs))] if xs else []


def write_result(out, result: dict) -> dict:
    "Write a benchmark's results JSON to `out` (folders created); returns `result`."
    import json
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
