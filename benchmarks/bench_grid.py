"""Benchmark: a grid of small training runs through the experiments executor, 2 local workers against 1.

The grid: `--runs` fine-tuning runs (`FinetuneSpec`: Cnn10 at width 0.125, one epoch over a `folder` task of 1 s WAV
clips written for the benchmark, `features="online"`), differing only in their seed. By default 12 runs of 384 clips,
about 4 s each on a quiet core: small runs, under half the length of the embedded study's fine-tunings (median 10.5 s
in benchmarks/results/study.json). With much smaller runs the fixed start-up dominates: `--clips 32` (0.5 s runs,
recorded in results/grid_tiny_runs.json) gives about 1.3x, as the bound below predicts. Each round gives the same grid
to a fresh `RunStore` and runs it with `run_grid(store, records, LocalExecutor(workers=w, mode=..., threads=1))`:
worker processes start, import the library, take runs from the queue and execute them (`execute_run`: lock, status,
`train.finetune`, metrics), so process start-up, locking and bookkeeping are inside the timing, as in real use.

Rounds alternate (1 worker, 2 workers, 2 workers, 1 worker, ...); reported: the median wall time of each, the speed-up
1 worker / 2 workers (the target: >= 1.7x), the CPU seconds of the worker processes (`RUSAGE_CHILDREN`), and from the
runs' own durations (status.json): the steady-state speed-up (runs after each worker's first), each worker's start-up
(process start and library import, plus the lazy imports its first run does) and the speed-up that start-up allows.

One torch thread per worker on both sides, so that the ratio measures the executor's parallelism alone (the
executor's default, cores // workers threads, would give the single worker two threads, which on a machine loaded far
beyond its cores is several times slower than one). The default mode is `direct` (runs execute in the worker process);
`--mode papermill` executes each run's experiment notebook in a fresh kernel instead (seconds more per run).

What bounds the number: each worker is a fresh Python process that imports torch, fastai (with the pandas, scipy,
scikit-learn and matplotlib it imports) and the trainer, and its first run imports torch._dynamo (torch's optimizers do,
on first use): about 7 CPU seconds, against about 0.5 CPU seconds for one of these runs. Both sides pay that start-up
once (on Linux the executor forks the workers from one template process that made the imports, so a second worker
costs a fork, not a second start-up), so with start-up S and run time r the speed-up is at most
(S + n r) / (S + n r / 2): the grid must be long next to S before 2 workers can approach 2x. The workers run in sessions
of their own (the executor starts them so), so Linux's CFS with autogroups (`/proc/sys/kernel/sched_autogroup_enabled`),
which shares the CPU between sessions, gives each its own share when other sessions load the machine. `--no-fork` starts
each worker as a fresh process instead (each pays the start-up). The workers' CPU (`RUSAGE_CHILDREN`) includes the
template's.

    .venv/bin/python benchmarks/bench_grid.py [--runs 16] [--rounds 1] [--mode direct] [--warmup 0] [--no-fork] [--out benchmarks/results/grid.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

TIMEOUT = 300      # seconds: the runner's default of 150 is too tight for both sides when the machine is loaded

if __package__ in (None, ""): sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import RESULTS, write_result, loadavg, machine_info, median, spread  # noqa: E402
from benchmarks.bench_train_step import write_task  # noqa: E402


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def autogroup() -> str:
    try: return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError: return "unknown"


def run_times(store, ids) -> dict:
    "Durations of the runs (status.json), split into each worker's first run and the others (by worker pid)."
    by_pid = {}
    for i in ids:
        st = store.run_dir(i).status_info
        log = (store.run_dir(i).path / "log.txt").read_text().split(" pid ", 1)
        pid = log[1].split()[0].strip(")") if len(log) > 1 else "?"
        t_end = float(st.get("time", 0) or 0)
        by_pid.setdefault(pid, []).append((t_end, float(st.get("seconds") or 0.0)))
    first, rest = [], []
    for runs in by_pid.values():
        runs.sort()
        first.append(runs[0][1]); rest += [s for _, s in runs[1:]]
    return dict(workers_seen=len(by_pid), first_s=first, steady_s=rest, steady_median_s=median(rest))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=12, help="runs in the grid (12 of 384 clips: both sides within 2 minutes when quiet)")
    ap.add_argument("--clips", type=int, default=384, help="training clips of each run (one epoch; 384: about 4 s per run)")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds of each worker count")
    ap.add_argument("--mode", default="direct", choices=["direct", "papermill"])
    ap.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    ap.add_argument("--no-fork", action="store_true", help="start each worker as a fresh process (no template)")
    ap.add_argument("--out", default=str(RESULTS / "grid.json"))
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_grid_"))
    os.environ["AUDIOTL_CACHE"] = str(tmp / "cache")          # workers inherit it: nothing lands in the user's cache
    from audiotl_nb.experiments import LocalExecutor, RunRecord, RunStore, run_grid
    info = machine_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    t_start = time.perf_counter()
    rows = {1: [], 2: []}
    try:
        root = write_task(tmp / "data", a.clips, 8, 4, 1.0)
        spec = dict(kind="finetune", task="folder", root=str(root), model="cnn10", model_kw={"width": a.width},
                    clip_seconds=1.0, epochs=1, bs=a.bs, device="cpu")
        records = [RunRecord({**spec, "seed": s}, None, {"seed": s}) for s in range(a.runs)]
        k = 0
        for r in range(a.warmup + a.rounds):
            for w in ((1, 2) if r % 2 == 0 else (2, 1)):
                k += 1
                store = RunStore(tmp / f"store{k}")
                la0, c0, t0 = loadavg(), children_cpu(), time.perf_counter()
                res = run_grid(store, records, LocalExecutor(workers=w, mode=a.mode, threads=1, fork=not a.no_fork), progress=False)
                wall, cpu = time.perf_counter() - t0, children_cpu() - c0
                if not res.ok: raise RuntimeError(f"grid failed with {w} worker(s): {res.errors}")
                m = dict(wall_s=wall, workers_cpu_s=cpu, loadavg_before=la0, loadavg_after=loadavg(), **run_times(store, res.ids))
                if r >= a.warmup: rows[w].append(m)
                print(f"round {r}{' (warm-up)' if r < a.warmup else ''} {w} worker{'s' * (w > 1)}: {a.runs} runs in {wall:.1f} s "
                      f"(workers' CPU {cpu:.1f} s; first run of each worker {', '.join(f'{x:.1f}' for x in m['first_s'])} s, "
                      f"the others {m['steady_median_s']:.1f} s median; load {la0[0]})", flush=True)
                shutil.rmtree(store.root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    t1, t2 = median(m["wall_s"] for m in rows[1]), median(m["wall_s"] for m in rows[2])
    per_round = [x["wall_s"] / y["wall_s"] for x, y in zip(rows[1], rows[2])]
    speedup = t1 / t2
    info["loadavg_end"] = loadavg()
    cpu1, cpu2 = median(m["workers_cpu_s"] for m in rows[1]), median(m["workers_cpu_s"] for m in rows[2])
    # steady state: a run's duration with 1 worker vs with 2 running side by side
    r1 = median(x for m in rows[1] for x in m["steady_s"])
    r2 = median(x for m in rows[2] for x in m["steady_s"])
    steady = 2 * r1 / r2 if r2 == r2 and r2 > 0 else float("nan")
    # what start-up allows: one worker's fixed cost (wall not spent in steady runs) against the runs
    startup = median(m["wall_s"] - m["steady_median_s"] * (a.runs - 1) for m in rows[1])
    allowed = (startup + a.runs * r1) / (startup + math.ceil(a.runs / 2) * r1)
    result = dict(
        benchmark="grid", runs=a.runs, run=f"finetune cnn10 width {a.width}, 1 epoch of {a.clips} 1 s clips, batch {a.bs}",
        mode=a.mode, threads_per_worker=1, machine=info, rounds=a.rounds,
        one_worker=dict(wall_s=t1, all_wall_s=[m["wall_s"] for m in rows[1]], workers_cpu_s=cpu1, rounds=rows[1]),
        two_workers=dict(wall_s=t2, all_wall_s=[m["wall_s"] for m in rows[2]], workers_cpu_s=cpu2, rounds=rows[2]),
        sched_autogroup_enabled=autogroup(), forked_workers=not a.no_fork,
        speedup=speedup, speedup_per_round=per_round, speedup_spread=spread(per_round),
        steady_run_s={"1": r1, "2": r2}, steady_speedup=steady, worker_startup_s=startup,
        speedup_allowed_by_startup=allowed, target=1.7, target_met=bool(speedup >= 1.7),
        seconds=round(time.perf_counter() - t_start, 1),
        bound=(f"{cores} cores, load average {info['loadavg_start'][0]} -> {info['loadavg_end'][0]} from other sessions; "
               f"autogroup scheduling {'on' if autogroup() == '1' else autogroup()}"
               f" (each worker in a session of its own); workers {'forked from one template' if not a.no_fork else 'started fresh'}; "
               f"worker start-up {startup:.0f} s vs {r1:.1f} s per run: start-up alone allows {allowed:.2f}x for {a.runs} runs; "
               f"steady-state speed-up {steady:.2f}x; workers' CPU {cpu1:.1f} s (1) vs {cpu2:.1f} s (2)"),
        when=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"{a.runs} runs ({result['run']}), {a.mode} mode, 1 thread per worker; {cores} cores, "
          f"load {info['loadavg_start'][0]} -> {info['loadavg_end'][0]}")
    print(f"1 worker {t1:.1f} s, 2 workers {t2:.1f} s: speed-up {speedup:.2f}x (rounds {', '.join(f'{x:.2f}' for x in per_round)}; "
          f"target 1.7x)")
    print(f"steady state: a run takes {r1:.2f} s alone, {r2:.2f} s beside another ({steady:.2f}x); worker start-up "
          f"{startup:.1f} s, which allows at most {allowed:.2f}x for {a.runs} runs")
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
