"""Benchmark: one training epoch read from the feature store against decoding and computing features on the fly.

200 ten-second clips (default) are written as 16-bit WAV files at 16 kHz, mono: the format that is cheapest to
decode and needs no resampling, so the on-the-fly side is at its fastest. (`--rate 44100 --format flac` gives the
costlier case of downloaded clips.) Features are `panns16k` log-mels, (1, 1001, 64) per clip.

Timed, as an epoch of a DataLoader with batch size 32, shuffled, in the main process (`num_workers=0`); batches
are stacked with numpy (`np.stack`, which allocates large arrays on huge pages; `torch.stack` of the same 8 MB
batch takes several times longer here, page faults mostly), the same collate function for every method:

* `store`: `StoreDataset` over a built `FeatureStore` (float16 memory-mapped shards) → batches (32, 1, 1001, 64);
* `on the fly, batched front-end`: each item decodes its file (`load_audio`, resampled to 16 kHz); the front-end
  runs on the batch of waveforms, as when the front-end is the first layer of the model;
* `on the fly, per clip` (with `--per-clip`; always the slower of the two): each item decodes its file and runs
  the front-end on it;
* `store, default collate`: the store again, with torch's default collate function (`torch.stack`), for reference.

The build reads every file first, so the files are in the page cache and disk reads do not count against decoding.
Each epoch is timed `--repeats` times (once if it takes more than 10 s), methods interleaved; medians are reported, wall-clock and CPU time. All of it
runs twice: with torch's default number of threads and with one thread, because on a machine shared with other
jobs torch's threads spin while waiting for a core and inflate every small tensor operation (a batch's
`torch.stack` most of all); one thread is the fair setting there. The one-time build is timed too.
Target: the store >= 10x faster than the faster on-the-fly pipeline.

    .venv/bin/python benchmarks/bench_store.py [--clips 200] [--rate 16000] [--format wav] [--out benchmarks/results/store.json]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from audiotl_nb.audio import create_frontend, load_audio, save_audio
from audiotl_nb.store import FeatureStore, StoreDataset

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    "Where the numbers were measured."
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): pass
    import soundfile, torchaudio
    return dict(platform=platform.platform(), python=platform.python_version(), cpu=cpu, cores=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, torchaudio=torchaudio.__version__,
                soundfile=soundfile.__version__, libsndfile=soundfile.__libsndfile_version__,
                loadavg_start=list(os.getloadavg()),
                env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")})


def write_clips(folder: Path, n: int, rate: int, fmt: str, seconds: float = 10.0) -> list[Path]:
    "n clips of a gliding tone in noise (numpy: no torch thread start-up per clip)."
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    paths = []
    for i in range(n):
        f0 = 80 + 13 * i
        x = 0.2 * np.sin(2 * np.pi * (f0 * t + 20 * t ** 2)) + 0.05 * rng.standard_normal(len(t))
        paths.append(save_audio(folder / f"clip{i:04d}.{fmt}", x.astype(np.float32), rate, subtype="PCM_16"))
    return paths


class OnTheFly(Dataset):
    "Decode (and optionally compute features) per item."
    def __init__(self, paths, sr, frontend=None): self.paths, self.sr, self.frontend = paths, sr, frontend
    def __len__(self): return len(self.paths)
    def __getitem__(self, i):
        x, _ = load_audio(self.paths[i], sr=self.sr)
        if self.frontend is None: return x, i
        with torch.no_grad(): return self.frontend(x)[0], i


def np_collate(batch):
    "Stack (x, y) items with numpy."
    xs, ys = zip(*batch)
    return torch.from_numpy(np.stack([x.numpy() for x in xs])), torch.tensor(ys)


def epoch(loader, frontend=None) -> int:
    n = 0
    with torch.no_grad():
        for x, y in loader:
            if frontend is not None: x = frontend(x)
            assert x.dim() == 4
            n += len(y)
    return n


def measure(methods: dict, repeats: int, enough: float = 10.0) -> dict:
    "Median epoch times; a method whose epoch took more than `enough` seconds is not repeated (time limit)."
    wall, cpu = {k: [] for k in methods}, {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            if wall[k] and wall[k][-1] > enough: continue
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0); cpu[k].append(time.process_time() - c0)
    return {k: dict(epoch_seconds=statistics.median(wall[k]), epoch_cpu_seconds=statistics.median(cpu[k]),
                    all_epoch_seconds=wall[k]) for k in methods}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--rate", type=int, default=16000)
    ap.add_argument("--format", default="wav", choices=["wav", "flac"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-clip", action="store_true", help="also time the per-clip on-the-fly pipeline")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store.json"))
    args = ap.parse_args(argv)
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        t0 = time.perf_counter()
        paths = write_clips(tmp / "audio", args.clips, args.rate, args.format)
        t_write = time.perf_counter() - t0
        fe = create_frontend("panns16k")
        store = FeatureStore(tmp / "features", fe)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = store.build(paths)
        t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
        torch.set_num_threads(threads)
        assert rep.computed == args.clips and not rep.skipped

        items = [(p, i) for i, p in enumerate(paths)]
        ds_store = StoreDataset(store, items)
        ds_fly = OnTheFly(paths, fe.sample_rate, fe)
        ds_wav = OnTheFly(paths, fe.sample_rate)
        mk = lambda ds, collate=np_collate: DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=0,
                                                       collate_fn=collate, generator=torch.Generator().manual_seed(0))
        STORE, FLY, FLYB, STORE_D = ("store", "on the fly, per clip", "on the fly, batched front-end",
                                     "store, default collate")
        epoch(mk(ds_store))  # warm-up: memory maps, allocator
        runs = {}
        for n_threads in (1, threads):
            torch.set_num_threads(n_threads)
            methods = {STORE: lambda: epoch(mk(ds_store)), FLYB: lambda: epoch(mk(ds_wav), fe)}
            if args.per_clip: methods[FLY] = lambda: epoch(mk(ds_fly))
            methods[STORE_D] = lambda: epoch(mk(ds_store, None))
            rows = measure(methods, args.repeats)
            fly = min(r["epoch_seconds"] for k, r in rows.items() if k in (FLY, FLYB))
            fly_cpu = min(r["epoch_cpu_seconds"] for k, r in rows.items() if k in (FLY, FLYB))
            for r in rows.values():
                r["clips_per_s"] = args.clips / r["epoch_seconds"]
                r["x_vs_fastest_on_the_fly"] = fly / r["epoch_seconds"]
            runs[f"{n_threads} thread{'s' * (n_threads > 1)}"] = dict(
                torch_threads=n_threads, rows=rows, speedup=fly / rows[STORE]["epoch_seconds"],
                speedup_cpu_time=fly_cpu / rows[STORE]["epoch_cpu_seconds"])
        torch.set_num_threads(threads)
        disk = store.info()["bytes"]
        audio_bytes = sum(p.stat().st_size for p in paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    info["loadavg_end"] = list(os.getloadavg())
    result = dict(benchmark="store", clips=args.clips, clip_seconds=10.0, audio=f"{args.format} PCM_16 {args.rate} Hz mono",
                  frontend="panns16k", batch=args.batch, machine=info, write_seconds=t_write,
                  build=dict(seconds=t_build, cpu_seconds=c_build, clips_per_s=args.clips / t_build, torch_threads=1),
                  store_bytes=disk, audio_bytes=audio_bytes, runs=runs,
                  speedup={k: r["speedup"] for k, r in runs.items()}, target=10.0,
                  target_met={k: bool(r["speedup"] >= 10.0) for k, r in runs.items()},
                  when=time.strftime("%Y-%m-%d %H:%M:%S"))

    print(f"{args.clips} clips x 10 s, {result['audio']}, panns16k, batch {args.batch}, {info['cores']} cores, "
          f"load average {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    print(f"{'epoch':32s} {'threads':>7s}  seconds  CPU-s  clips/s  speed-up")
    for run in runs.values():
        for k, r in run["rows"].items():
            print(f"{k:32s} {run['torch_threads']:7d}  {r['epoch_seconds']:7.2f}  {r['epoch_cpu_seconds']:5.2f}  "
                  f"{r['clips_per_s']:7.0f}  {r['x_vs_fastest_on_the_fly']:7.1f}x")
    print(f"one-time build (1 thread): {t_build:.1f} s ({args.clips / t_build:.0f} clips/s); store {disk / 2**20:.1f} MiB "
          f"for {audio_bytes / 2**20:.1f} MiB of audio")
    print("store vs fastest on-the-fly (target 10x): " + "; ".join(
        f"{k}: {r['speedup']:.1f}x wall-clock, {r['speedup_cpu_time']:.1f}x CPU time" for k, r in runs.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
