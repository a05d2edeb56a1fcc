"""Benchmark: generating the embedded-default sound world from nothing, as a fresh clone's first study does.

`audiotl synth DEST --preset P` runs in a subprocess with an empty DEST and an empty cache, so every clip of the
AudioSet-like pre-training corpus and of the three downstream tasks is synthesised and written. This is repeated
`--repeat` times (3 by default, each into new folders): this machine is shared, and the CPU time the same work takes
varies by tens of percent between runs, so the median is reported, with every run beside it. Per run: the wall
seconds of the whole command (Python start-up and imports included), the generation time the command itself prints,
the CPU seconds of the process tree and the load average before and after; and the files and bytes written.
The target for the `default` preset is 60 s on the 2 cores; `ratio` is 60 / median wall seconds (1 or more meets it).

Every repetition uses the same seed, so the trees must be byte-identical: with two or more runs the benchmark checks
it (`determinism`). The runner's quick mode generates the tiny world once.

    .venv/bin/python benchmarks/bench_synth.py [--preset default] [--repeat 3] [--out benchmarks/results/synth.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import RESULTS, write_result, machine_info, loadavg  # noqa: E402

QUICK = ["--preset", "tiny", "--repeat", "1"]
TIMEOUT = 600
TARGET_S = 60.0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def tree_digest(root: Path) -> tuple[str, int, int]:
    "(sha256 over every file's relative path and bytes, file count, total bytes) of the folder `root`."
    h, n, size = hashlib.sha256(), 0, 0
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        data = p.read_bytes()
        h.update(str(p.relative_to(root)).encode()); h.update(data)
        n, size = n + 1, size + len(data)
    return h.hexdigest(), n, size


def generate(preset: str, dest: Path, cache: Path) -> dict:
    "Run `audiotl synth` once into the empty `dest`; wall and CPU seconds and what it printed."
    exe = Path(sys.executable).parent / "audiotl"
    cmd = [str(exe), "synth", str(dest), "--preset", preset]
    env = {**os.environ, "AUDIOTL_CACHE": str(cache), "MPLBACKEND": "Agg"}
    la0, c0, t0 = loadavg(), children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if r.returncode != 0: raise SystemExit(f"audiotl synth failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    m = re.search(r"generated in ([0-9.]+) s", r.stdout)
    return dict(wall_s=round(wall, 1), cpu_s=round(cpu, 1), generation_s=float(m.group(1)) if m else None,
                loadavg_before=la0, loadavg_after=loadavg(), output=r.stdout.strip().splitlines())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", help="world size preset (default: default)")
    ap.add_argument("--repeat", type=int, default=3, help="generations from nothing; the median is reported (default: 3)")
    ap.add_argument("--check-determinism", action="store_true", help="at least two generations (they are compared byte by byte)")
    ap.add_argument("--out", default=str(RESULTS / "synth.json"))
    a = ap.parse_args(argv)
    if a.repeat < 1: ap.error(f"--repeat must be at least 1, got {a.repeat}")
    repeat = max(a.repeat, 2 if a.check_determinism else 1)
    info = machine_info()
    runs, digests = [], []
    for k in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:   # a world is some 350 MB: one at a time
            tmp = Path(tmp)
            r = generate(a.preset, tmp / "world", tmp / "cache")
            digest, n_files, n_bytes = tree_digest(tmp / "world")
        runs.append(r); digests.append(digest)
        print(f"{a.preset} world, run {k + 1}/{repeat}: {r['wall_s']} s wall ({r['generation_s']} s generating), "
              f"{r['cpu_s']} CPU-s, {n_files} files, {n_bytes / 1e6:.1f} MB, "
              f"load average {r['loadavg_before'][0]} -> {r['loadavg_after'][0]}", flush=True)
    walls = sorted(r["wall_s"] for r in runs)
    med = runs[[r["wall_s"] for r in runs].index(walls[len(walls) // 2])]
    identical = len(set(digests)) == 1 if repeat > 1 else None
    if identical is not None: print(f"{repeat} generations byte-identical: {identical}", flush=True)
    bound = (f"{info['cores']} cores; median of {repeat} run(s): {med['wall_s']} s wall, {med['cpu_s']} CPU-s for "
             f"{n_files} files at load average {med['loadavg_before'][0]:.1f} -> {med['loadavg_after'][0]:.1f} "
             f"(all runs: {', '.join(f'{w} s' for w in walls)}; rendering runs in up to 2 processes)")
    out = dict(preset=a.preset, target_s=TARGET_S, repeat=repeat, wall_s=med["wall_s"], generation_s=med["generation_s"],
               cpu_s=med["cpu_s"], wall_s_all=[r["wall_s"] for r in runs], cpu_s_all=[r["cpu_s"] for r in runs],
               files=n_files, bytes=n_bytes, sha256=digests[0], ratio=round(TARGET_S / med["wall_s"], 2), target=1.0,
               determinism=identical, runs=runs, bound=bound, machine={**info, "loadavg_end": loadavg()})
    write_result(a.out, out)
    return 0 if identical is not False else 1


if __name__ == "__main__":
    sys.exit(main())
