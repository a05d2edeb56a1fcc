"""Benchmark audiotl_nb.metrics against the reference implementations.

1. mAP (and mAUC, lwlrap) on an AudioSet-eval-sized problem: 20,000 clips x 527 classes. The targets are the real
   labels of the first 20,000 rows of AudioSet's `eval_segments.csv`; the scores are a noisy float32 "model"
   (sigmoid of 2.5 x label + standard normal noise). Ours vs `sklearn.metrics.average_precision_score`
   (macro over classes with positives) vs torchmetrics `multilabel_average_precision` (exact, thresholds=None).
2. PSDS1 (DTC = GTC = 0.7, alpha_ct = alpha_st = 0, max eFPR 100/h) on AudioSet-Strong-eval-shaped input: 10 s clips,
   250 frames at 40 ms, 407 classes. Event onsets and durations are drawn from the real rows of
   `strong_eval_sample.tsv`; each clip gets 1 + Poisson(4) events of distinct classes drawn uniformly from the 407.
   Scores: a noisy frame detector with jittered event edges, median-filtered over 12 frames. The full eval set
   (16,996 clips) takes sed_scores_eval some 20-25 CPU-minutes in one process, so the run uses `--clips` clips
   (default 200) and the JSON also gives the CPU time scaled linearly to 16,996 clips.
   Ours (`psds1` from the (B, T, C) array: conversion + evaluation) vs building sed_scores_eval's DataFrames
   with its own `create_score_dataframe` and calling `sed_scores_eval.intersection_based.psds` directly.

Wall and CPU (process) seconds are both recorded: the machine is shared, so wall time depends on its load.

    .venv/bin/python benchmarks/bench_metrics.py [--clips 400] [--meta ../shared/audioset] [--out benchmarks/results/metrics.json]
"""
import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from audiotl_nb import metrics as M

ROOT = Path(__file__).resolve().parents[1]
FULL_STRONG_EVAL_CLIPS = 16996


def timed(fn, repeat: int = 1):
    "Run `fn` `repeat` times; return its last output, the best wall seconds and the CPU seconds of that run."
    best = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        if best is None or w < best[0]: best = (w, c)
    return out, round(best[0], 4), round(best[1], 4)


def eval_labels(meta: Path, n: int) -> np.ndarray:
    "Multi-hot (n, 527) targets from the first n rows of the real eval_segments.csv."
    mids = pd.read_csv(meta / "class_labels_indices.csv")["mid"].tolist()
    col = {m: i for i, m in enumerate(mids)}
    Y = np.zeros((n, len(mids)), np.int64)
    r = 0
    for line in (meta / "eval_segments.csv").read_text().splitlines():
        if line.startswith("#"): continue
        for lab in line.split(', "', 1)[1].rstrip('"').split(","): Y[r, col[lab]] = 1
        r += 1
        if r == n: break
    return Y


def bench_map(meta: Path, n: int = 20000) -> dict:
    from sklearn import metrics as skm
    import torchmetrics.functional.classification as tmf
    Y = eval_labels(meta, n)
    rng = np.random.default_rng(0)
    S = (1 / (1 + np.exp(-(2.5 * Y - 1.5 + rng.standard_normal(Y.shape))))).astype(np.float32)
    pos = Y.sum(0) > 0
    # the references get C-contiguous copies of the classes with positives (a boolean column selection
    # alone returns a Fortran-ordered array, which makes scikit-learn about 10x slower)
    Yp, Sp = np.ascontiguousarray(Y[:, pos]), np.ascontiguousarray(S[:, pos])
    res = {"shape": list(Y.shape), "classes_with_positives": int(pos.sum()), "dtype": "float32"}
    ours, res["ours_s"], res["ours_cpu_s"] = timed(lambda: M.mean_average_precision(Y, S), repeat=2)
    Yt, St = torch.from_numpy(Y), torch.from_numpy(S)
    _, res["ours_from_tensors_s"], _ = timed(lambda: M.mean_average_precision(Yt, St))
    sk, res["sklearn_s"], res["sklearn_cpu_s"] = timed(lambda: skm.average_precision_score(Yp, Sp, average="macro"))
    tm, res["torchmetrics_s"], res["torchmetrics_cpu_s"] = timed(
        lambda: tmf.multilabel_average_precision(torch.from_numpy(Sp), torch.from_numpy(Yp), num_labels=int(pos.sum()),
                                         average="macro").item())
    res.update(map_ours=ours, map_sklearn=sk, map_torchmetrics=tm, abs_diff_sklearn=abs(ours - sk),
               abs_diff_torchmetrics=abs(ours - tm),
               speedup_vs_sklearn=round(res["sklearn_s"] / res["ours_s"], 2),
               speedup_vs_torchmetrics=round(res["torchmetrics_s"] / res["ours_s"], 2))
    # the other two ranking metrics share the kernel
    au, res["mauc_ours_s"], _ = timed(lambda: M.mauc(Y, S))
    sau, res["mauc_sklearn_s"], _ = timed(lambda: skm.roc_auc_score(Yp, Sp, average="macro"))
    lw, res["lwlrap_ours_s"], _ = timed(lambda: M.lwlrap(Y, S))
    rows = Y.sum(1) > 0
    slw, res["lwlrap_sklearn_s"], _ = timed(
        lambda: skm.label_ranking_average_precision_score(Y[rows], S[rows], sample_weight=Y[rows].sum(1)))
    res.update(mauc_abs_diff=abs(au - sau), lwlrap_abs_diff=abs(lw - slw))
    return res


def strong_eval_like(meta: Path, n_clips: int, n_classes: int = 407, T: int = 250, hop: float = 0.04, seed: int = 0):
    "Ground truth {id: events} and (B, T, C) scores shaped like AudioSet Strong eval, events drawn from real rows."
    real = pd.read_csv(meta / "strong_eval_sample.tsv", sep="\t")
    on_real = real.start_time_seconds.to_numpy()
    dur_real = (real.end_time_seconds - real.start_time_seconds).to_numpy()
    rng = np.random.default_rng(seed)
    ids = [f"clip{i:05d}" for i in range(n_clips)]
    classes = [f"/m/class{c:03d}" for c in range(n_classes)]
    gt, x = {}, rng.random((n_clips, T, n_classes), dtype=np.float32) * 0.3
    for b, cid in enumerate(ids):
        k = min(n_classes, 1 + rng.poisson(4))
        evs = []
        for c in rng.choice(n_classes, size=k, replace=False):
            j = rng.integers(len(real))
            on = float(on_real[j]); off = min(10.0, on + float(dur_real[j]))
            evs.append((on, off, classes[c]))
            a, z = (np.array([on, off]) + rng.normal(0, 0.1, 2)) / hop
            x[b, max(0, int(a)):max(0, int(z)), c] += rng.uniform(0.3, 0.7)
        gt[cid] = sorted(evs)
    return ids, classes, gt, np.clip(x, 0, 1)


def bench_psds(meta: Path, n_clips: int) -> dict:
    import sed_scores_eval
    from scipy import ndimage
    from sed_scores_eval.base_modules.scores import create_score_dataframe
    ids, classes, gt, x = strong_eval_like(meta, n_clips)
    res = {"clips": n_clips, "frames": x.shape[1], "classes": x.shape[2], "events": sum(map(len, gt.values())),
           "frame_hop_s": 0.04, "median_filter_frames": 12}
    sub = x[:100]  # the torch median filter (the GPU path) vs scipy (what median_filter uses on the CPU)
    mt, res["median_filter_torch_100clips_s"], res["median_filter_torch_100clips_cpu_s"] = timed(
        lambda: M.median_filter(sub, 12, backend="torch"))
    ms, res["median_filter_scipy_100clips_s"], res["median_filter_scipy_100clips_cpu_s"] = timed(
        lambda: ndimage.median_filter(sub, size=(1, 12, 1)))
    res["median_filter_torch_equals_scipy"] = bool(np.array_equal(mt, ms))
    xf = M.median_filter(x, 12)
    ours, res["ours_s"], res["ours_cpu_s"] = timed(lambda: M.psds1(gt, xf, ids=ids, classes=classes, details=True))
    res["classes_present"] = len(ours["classes"])
    _, res["ours_frames_to_scores_s"], _ = timed(lambda: M.frames_to_scores(xf, ids, classes))

    # direct: sed_scores_eval's own DataFrame builder, the present classes only, then its psds
    present = ours["classes"]
    cols = [classes.index(c) for c in present]
    stamps = np.round(np.arange(x.shape[1] + 1) * 0.04, 6)

    def build(cls):
        return {cid: cls(create_score_dataframe(xf[b][:, cols], stamps, present)) for b, cid in enumerate(ids)}

    def direct(scores):
        return sed_scores_eval.intersection_based.psds(
            scores, {cid: gt[cid] for cid in scores}, {cid: 10.0 for cid in scores}, dtc_threshold=0.7,
            gtc_threshold=0.7, alpha_ct=0.0, alpha_st=0.0, max_efpr=100.0)

    try:  # plain DataFrames, on a few clips
        few = ids[:20]
        plain = {cid: pd.DataFrame(create_score_dataframe(xf[ids.index(cid)], stamps, classes)) for cid in few}
        keep = sorted({e[2] for cid in few for e in gt[cid]})
        direct({cid: df[["onset", "offset", *keep]] for cid, df in plain.items()})
        res["direct_plain_dataframes"] = "ok"
    except ValueError as e:  # sed_scores_eval 0.0.4 with pandas >= 3 (copy-on-write gives read-only arrays)
        res["direct_plain_dataframes"] = f"fails: {e}"
    frames, res["direct_build_s"], _ = timed(lambda: build(M.ScoreFrame))
    want, res["direct_psds_s"], res["direct_psds_cpu_s"] = timed(lambda: direct(frames))
    res["direct_total_s"] = round(res["direct_build_s"] + res["direct_psds_s"], 4)
    res.update(psds1_ours=ours["psds"], psds1_direct=float(want[0]), abs_diff=abs(ours["psds"] - float(want[0])),
               overhead_vs_direct_total=round(res["ours_s"] / res["direct_total_s"], 3))
    scale = FULL_STRONG_EVAL_CLIPS / n_clips
    res["full_eval_estimate"] = {"clips": FULL_STRONG_EVAL_CLIPS, "ours_cpu_s": round(res["ours_cpu_s"] * scale, 1),
                                 "direct_psds_cpu_s": round(res["direct_psds_cpu_s"] * scale, 1),
                                 "note": "CPU seconds scaled linearly in the number of clips, one process (num_jobs=1)"}
    return res


def machine() -> dict:
    import scipy, sklearn, torchmetrics, sed_scores_eval  # noqa: F401
    from importlib.metadata import version
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average_before": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": {p: version(p) for p in ("numpy", "pandas", "scipy", "scikit-learn", "torch", "torchmetrics",
                                                 "sed_scores_eval")}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=200, help="clips in the PSDS1 benchmark (full eval set: 16996)")
    ap.add_argument("--map-rows", type=int, default=20000)
    ap.add_argument("--meta", type=Path, default=Path(os.environ.get("AUDIOTL_SHARED", ROOT.parent / "shared")) / "audioset")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "metrics.json")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    out = {"benchmark": "metrics: mAP 20,000 x 527 and PSDS1 on AudioSet-Strong-eval-shaped input",
           "machine": machine()}
    out["map"] = bench_map(a.meta, a.map_rows)
    print(json.dumps(out["map"], indent=1), flush=True)
    out["psds1"] = bench_psds(a.meta, a.clips)
    print(json.dumps(out["psds1"], indent=1), flush=True)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    out["machine"]["load_average_after"] = list(os.getloadavg())
    out["note"] = ("wall seconds depend on the load of this shared machine (see load averages); "
                   "CPU seconds (process time) are the comparable figures")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"total {out['total_s']} s -> {a.out}")
    return out


if __name__ == "__main__":
    main()
