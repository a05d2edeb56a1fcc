"""Benchmark: clips per second of the `panns16k` front-end against librosa and a plain torchaudio pipeline.

A CPU batch of 32 ten-second clips at 16 kHz (a chirp, tones and noise). Timed, each on the same clips:

* `audiotl panns16k`: `create_frontend("panns16k")` on the whole batch (B, N) -> (B, 1, 1001, 64);
  once with torch's default threads and once with one thread;
* `torchaudio`: `MelSpectrogram(mel_scale="slaney", norm="slaney", pad_mode="reflect")` + `AmplitudeToDB`
  on the batch (the textbook torchaudio pipeline with the same settings);
* `librosa`: `librosa.feature.melspectrogram` + `power_to_db`, one clip at a time (librosa has no batch axis
  for this path), on 8 of the clips.

Also recorded: the largest difference in dB of each against librosa on those clips, the other presets'
throughput, and the CPU milliseconds per clip of each step, ours (one thread) and librosa's (`stage_cpu_ms_per_clip`:
the FFT, the windowed frames, the power, the filter bank, the dB), which show what bounds the ratio. Each timing is the median of several rounds after one warm-up; the methods are interleaved within a
round, and both wall-clock and CPU time (process time, all threads) are kept, because a shared machine's load moves
wall-clock times a lot. Target: >= 5x librosa.

On a machine shared with other jobs, torch's OpenMP threads spin while they wait for a core, and every small
parallel operation pays for it: the two-thread numbers then fall below the one-thread ones. Running with
`OMP_WAIT_POLICY=PASSIVE` (threads sleep instead of spinning) shows the difference; that run is kept in
`results/frontend_omp_passive.json`:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_frontend.py --out benchmarks/results/frontend_omp_passive.json

    .venv/bin/python benchmarks/bench_frontend.py [--batch 32] [--out benchmarks/results/frontend.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import librosa
import numpy as np
import torch
import torchaudio

from audiotl_nb.audio import FRONTENDS, create_frontend

ROOT = Path(__file__).resolve().parents[1]
SR, SECONDS = 16000, 10.0


def machine() -> dict:
    "Where the numbers were measured."
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): pass
    return dict(platform=platform.platform(), python=platform.python_version(), cpu=cpu, cores=os.cpu_count(),
                affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                torch_threads=torch.get_num_threads(), torch=torch.__version__, torchaudio=torchaudio.__version__,
                librosa=librosa.__version__, numpy=np.__version__, loadavg_start=list(os.getloadavg()),
                env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")})


def clips(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SR * SECONDS)) / SR
    out = []
    for i in range(n):
        f0 = 100 + 50 * i
        x = 0.2 * torch.sin(2 * torch.pi * (f0 * t + 300 * t ** 2)) + 0.1 * torch.sin(2 * torch.pi * 3 * f0 * t)
        out.append(x + 0.05 * torch.randn(len(t), generator=g))
    return torch.stack(out)


def one_thread(fn):
    "Run `fn` with one torch thread."
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try: return fn()
        finally: torch.set_num_threads(n)
    return run


SETTLE_S = 0.3   # pause before each timed call: the previous method's idle threads stop spinning first


def measure(methods: dict, repeats: int) -> dict:
    """Median wall and CPU seconds per call of each method. The methods are interleaved (one call of each per
    round), so that a change in the machine's load affects them alike. Each timed call follows a pause of
    `SETTLE_S`: after a parallel call, OpenMP's and OpenBLAS's worker threads keep spinning for a while, and a call
    that starts at once shares the cores with them (measured: our batch ran at 400 clips/s straight after librosa,
    at 694 alone or after a pause), which would charge one method for the other's threads."""
    for fn, _ in methods.values(): fn()  # warm-up
    wall, cpu = {k: [] for k in methods}, {k: [] for k in methods}
    for _ in range(repeats):
        for k, (fn, _) in methods.items():
            time.sleep(SETTLE_S)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0); cpu[k].append(time.process_time() - c0)
    return {k: dict(clips=n, seconds=statistics.median(wall[k]), cpu_seconds=statistics.median(cpu[k]))
            for k, (_, n) in methods.items()}


def stages(fe, x: torch.Tensor, repeats: int = 15) -> dict:
    """CPU milliseconds per clip of each step, ours (one torch thread, one piece of the batch) and librosa's (per clip),
    the smallest of `repeats` runs: what bounds the ratio. Ours repeats the steps of `LogMelFrontend.features`."""
    from audiotl_nb.audio import _mel_bands, _pad_edges
    def best(fn, n):
        fn(); t = []
        for _ in range(repeats):
            c0 = time.process_time(); fn(); t.append(time.process_time() - c0)
        return 1e3 * min(t) / n
    c, b = fe.cfg, len(x)
    bands = [(2 * lo, 2 * hi, fe.fb[lo:hi, a:e].repeat_interleave(2, 0)) for a, e, lo, hi in _mel_bands(fe.fb)]
    padded = _pad_edges(x, c.n_fft // 2, c.pad_mode)
    frames = padded.unfold(-1, c.n_fft, c.hop_length) * fe.window
    spec = torch.fft.rfft(frames)
    sq = torch.view_as_real(spec).square().reshape(-1, 2 * (c.n_fft // 2 + 1))
    M = torch.cat([sq[:, lo:hi] @ w for lo, hi, w in bands], 1)
    ri, buf = torch.view_as_real(spec), torch.empty(torch.view_as_real(spec).shape)
    ours = dict(pad=lambda: _pad_edges(x, c.n_fft // 2, c.pad_mode),
                frames_window=lambda: padded.unfold(-1, c.n_fft, c.hop_length) * fe.window,
                rfft=lambda: torch.fft.rfft(frames), power_re2_im2=lambda: torch.square(ri, out=buf),
                mel_banded=lambda: torch.cat([sq[:, lo:hi] @ w for lo, hi, w in bands], 1),
                power_and_mel_textbook=lambda: ri[..., 0].square().addcmul_(ri[..., 1], ri[..., 1]) @ fe.fb,
                db=lambda: M.clone().clamp_(min=c.amin).log10_().mul_(10.0), all=lambda: fe(x))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(): out = {"ours": {k: best(f, b) for k, f in ours.items()}}
    finally: torch.set_num_threads(n)
    y = x[0].numpy()
    kw = dict(n_fft=512, hop_length=160, win_length=512, window="hann", center=True, pad_mode="reflect")
    S = librosa.stft(y, **kw)
    P = np.abs(S) ** 2
    basis = librosa.filters.mel(sr=SR, n_fft=512, n_mels=64, fmin=50, fmax=8000, htk=False, norm="slaney")
    Mel = basis @ P
    out["librosa"] = dict(stft=best(lambda: librosa.stft(y, **kw), 1), power_abs2=best(lambda: np.abs(S) ** 2, 1),
                          mel_filters=best(lambda: librosa.filters.mel(sr=SR, n_fft=512, n_mels=64, fmin=50, fmax=8000,
                                                                       htk=False, norm="slaney"), 1),
                          mel_dot=best(lambda: basis @ P, 1), db=best(lambda: librosa.power_to_db(Mel, amin=1e-10), 1),
                          all=best(lambda: librosa_db(y), 1))
    return out


def librosa_db(y: np.ndarray) -> np.ndarray:
    S = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=512, hop_length=160, win_length=512, window="hann",
                                       center=True, pad_mode="reflect", power=2.0, n_mels=64, fmin=50, fmax=8000,
                                       htk=False, norm="slaney")
    return librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=None).T


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--librosa-clips", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "frontend.json"))
    args = ap.parse_args(argv)
    info = machine()
    X = clips(args.batch)
    Xl = X[: args.librosa_clips].numpy()
    rows = {}

    fe = create_frontend("panns16k")
    ta = torchaudio.transforms.MelSpectrogram(SR, n_fft=512, win_length=512, hop_length=160, f_min=50, f_max=8000,
                                              n_mels=64, pad_mode="reflect", norm="slaney", mel_scale="slaney")
    db = torchaudio.transforms.AmplitudeToDB("power")
    OURS, ONE, TA, LIB = ("audiotl panns16k (batch)", "audiotl panns16k (batch, 1 thread)",
                          "torchaudio MelSpectrogram+AmplitudeToDB (batch)", "librosa melspectrogram+power_to_db (per clip)")
    threads = torch.get_num_threads()
    with torch.no_grad():
        rows = measure({OURS: (lambda: fe(X), args.batch), ONE: (one_thread(lambda: fe(X)), args.batch),
                        TA: (lambda: db(ta(X)), args.batch), LIB: (lambda: [librosa_db(y) for y in Xl], len(Xl))},
                       args.repeats)
    for k, t in ((OURS, threads), (ONE, 1), (TA, threads), (LIB, "numpy")): rows[k]["threads"] = t

    ref = np.stack([librosa_db(y) for y in Xl])
    with torch.no_grad():
        ours = fe(torch.from_numpy(Xl))[:, 0].numpy()
        theirs = db(ta(torch.from_numpy(Xl))).transpose(1, 2).numpy()
    rows[OURS]["max_abs_db_vs_librosa"] = float(np.abs(ours - ref).max())
    rows[TA]["max_abs_db_vs_librosa"] = float(np.abs(theirs - ref).max())

    others = {}
    with torch.no_grad():
        for name in FRONTENDS:
            f = create_frontend(name)
            x = X[:8] if f.sample_rate == SR else clips(8).repeat_interleave(f.sample_rate // SR, dim=1)
            others[name] = x.shape[0] / measure({name: (lambda: f(x), 8)}, 2)[name]["seconds"]

    steps = stages(fe, X[:2])

    for r in rows.values():
        r["clips_per_s"], r["clips_per_cpu_s"] = r["clips"] / r["seconds"], r["clips"] / r["cpu_seconds"]
    for r in rows.values():
        r["x_librosa"] = r["clips_per_s"] / rows[LIB]["clips_per_s"]
        r["x_librosa_cpu"] = r["clips_per_cpu_s"] / rows[LIB]["clips_per_cpu_s"]
    speedup, speedup_cpu = rows[OURS]["x_librosa"], rows[OURS]["x_librosa_cpu"]
    info["loadavg_end"] = list(os.getloadavg())
    result = dict(benchmark="frontend", clip_seconds=SECONDS, sample_rate=SR, batch=args.batch, machine=info,
                  rows=rows, presets_clips_per_s=others, stage_cpu_ms_per_clip=steps, speedup_vs_librosa=speedup,
                  speedup_vs_librosa_cpu_time=speedup_cpu, target=5.0,
                  target_met=bool(speedup >= 5.0), when=time.strftime("%Y-%m-%d %H:%M:%S"))

    w = max(map(len, rows))
    print(f"{'method'.ljust(w)}  clips/s  x librosa  clips/CPU-s  x librosa  max|dB diff| vs librosa")
    for k, r in rows.items():
        d = r.get("max_abs_db_vs_librosa")
        print(f"{k.ljust(w)}  {r['clips_per_s']:7.1f}  {r['x_librosa']:8.1f}x  {r['clips_per_cpu_s']:11.1f}  "
              f"{r['x_librosa_cpu']:8.1f}x  {'' if d is None else f'{d:.1e}'}")
    for who, st in steps.items():
        print(f"CPU ms per clip, {who}{' (1 torch thread)' if who == 'ours' else ''}:",
              ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
    print("presets (clips/s, batch of 8):", ", ".join(f"{k} {v:.0f}" for k, v in others.items()))
    print(f"speed-up of panns16k over librosa: {speedup:.1f}x wall-clock, {speedup_cpu:.1f}x per CPU-second "
          f"(target 5x) on {info['cores']} cores, load average {info['loadavg_start'][0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
