"""Benchmark: generating the embedded-default sound world from nothing, as a fresh clone's first study does.

`audiotl synth DEST --preset P` runs in a subprocess with an empty DEST and an empty cache, so every clip of the
AudioSet-like pre-training corpus and of the three downstream tasks is synthesised and written. Reported: the wall
seconds of the whole command (Python start-up and imports included), the generation time the command itself prints,
the CPU seconds of the process tree, the number of files and bytes written, and the load average before and after.
The target for the `default` preset is 60 s on the 2 cores; `ratio` is 60 / wall seconds (1 or more meets it).

A second generation with the same seed into another folder checks determinism: both trees must be byte-identical
(`--check-determinism`; it doubles the time, so the runner's quick mode leaves it out).

    .venv/bin/python benchmarks/bench_synth.py [--preset default] [--check-determinism] [--out benchmarks/results/synth.json]
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

QUICK = ["--preset", "tiny"]
TIMEOUT = 300
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
    ap.add_argument("--check-determinism", action="store_true", help="generate twice and compare the trees byte by byte")
    ap.add_argument("--out", default=str(RESULTS / "synth.json"))
    a = ap.parse_args(argv)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        tmp = Path(tmp)
        first = generate(a.preset, tmp / "w1", tmp / "cache1")
        digest, n_files, n_bytes = tree_digest(tmp / "w1")
        print(f"{a.preset} world: {first['wall_s']} s wall ({first['generation_s']} s generating), {first['cpu_s']} CPU-s, "
              f"{n_files} files, {n_bytes / 1e6:.1f} MB, load average {first['loadavg_before'][0]} -> {first['loadavg_after'][0]}",
              flush=True)
        second = None
        if a.check_determinism:
            second = generate(a.preset, tmp / "w2", tmp / "cache2")
            same = tree_digest(tmp / "w2")[0] == digest
            print(f"second generation: {second['wall_s']} s wall; byte-identical: {same}", flush=True)
            second["identical"] = same
    wall = first["wall_s"]
    bound = (f"{info['cores']} cores, load average {first['loadavg_before'][0]:.1f} -> {first['loadavg_after'][0]:.1f}; "
             f"{first['cpu_s']} CPU-s for {n_files} files (rendering runs in up to 2 processes)")
    out = dict(preset=a.preset, target_s=TARGET_S, wall_s=wall, generation_s=first["generation_s"], cpu_s=first["cpu_s"],
               files=n_files, bytes=n_bytes, sha256=digest, ratio=round(TARGET_S / wall, 2), target=1.0,
               determinism=second, first=first, bound=bound, machine={**info, "loadavg_end": loadavg()})
    write_result(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
