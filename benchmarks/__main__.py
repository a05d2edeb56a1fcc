"""Run the benchmarks and summarise them: `python -m benchmarks [names...] [--quick]`.

Each `benchmarks/bench_<name>.py` runs as a script in a subprocess of its own (a new session: its own process group,
killed whole when it overruns `--timeout`) and writes its results JSON to `<results>/<name>.json`. The benchmarks run
one after the other, never side by side. Then one table of the measured ratios against their targets is printed and
written, with the machine it ran on, to `<results>/summary.json` and the report (`benchmarks/RESULTS.md`).

Benchmarks not named on the command line are not run: their last results JSON (if any) is read into the summary as it
is, marked `from file` with the date it was measured. `--quick` runs tiny sizes (a check that everything runs, not a
measurement) and writes into a temporary folder unless `--results` is given, so the recorded results stay untouched.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from benchmarks import RESULTS, ROOT, cpu_model, loadavg

HERE = Path(__file__).resolve().parent


# --- what each benchmark reports ------------------------------------------------------------------------------------
@dataclass
class Row:
    "One measured number: `value` against `target` (`op` '>=' or '<='; no target: information only)."
    benchmark: str
    measure: str
    value: float | None
    unit: str = "x"
    target: float | None = None
    op: str = ">="
    bound: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None: return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    @property
    def vs_target(self) -> float | None:
        "value / target for '>=' targets, target / value for '<=': 1 or more means met."
        if self.target is None or not self.value: return None
        return self.value / self.target if self.op == ">=" else self.target / self.value

    def to_dict(self) -> dict:
        return dict(benchmark=self.benchmark, measure=self.measure, value=self.value, unit=self.unit, target=self.target,
                    op=self.op, vs_target=self.vs_target, met=self.met, bound=self.bound)


def _get(d: dict, *path, default=None):
    for k in path:
        if not isinstance(d, dict) or k not in d: return default
        d = d[k]
    return d


def _load_bound(r: dict) -> str:
    "Cores and load average from the machine info of a results JSON (the layouts of the benchmarks differ)."
    m = r.get("machine", {}) if isinstance(r.get("machine"), dict) else {}
    cores = m.get("cores") or m.get("cpus") or r.get("cpus")
    start = m.get("loadavg_start") or m.get("load_average_before") or r.get("load_average_before")
    end = m.get("loadavg_end") or m.get("load_average_after") or r.get("load_average_after")
    s = f"{cores} cores" if cores else ""
    if start: s += f", load average {start[0]:.1f}" + (f" -> {end[0]:.1f}" if end else "")
    return s


def rows_frontend(r: dict) -> list[Row]:
    b = _load_bound(r) + "; per-clip librosa vs a batch"
    one = next((v for k, v in r.get("rows", {}).items() if "1 thread" in k), {})
    return [Row("frontend", "log-mel clips/s vs librosa", r.get("speedup_vs_librosa"), "x", 5.0, bound=b),
            Row("frontend", "  same, 1 torch thread", one.get("x_librosa"), "x", 5.0, bound=b),
            Row("frontend", "  per CPU-second", r.get("speedup_vs_librosa_cpu_time"), "x", 5.0, bound=b)]


def rows_train_step(r: dict) -> list[Row]:
    b = f"{r.get('model', 'cnn10')}, {r.get('torch_threads', '?')} torch thread(s); " + (r.get("bound") or _load_bound(r))
    return [Row("train_step", "trainer/plain training samples/s", r.get("ratio"), "x", 0.9, bound=b),
            Row("train_step", "  per CPU-second", r.get("ratio_cpu_time"), "x", 0.9, bound=b),
            Row("train_step", "  whole epoch (dev metrics, checkpoints)", r.get("ratio_whole_epoch"), "x", None, bound=b)]


def rows_store(r: dict) -> list[Row]:
    b = _load_bound(r)
    return [Row("store", f"epoch from store vs on the fly ({k})", v, "x", 10.0, bound=b)
            for k, v in (r.get("speedup") or {}).items()] or [Row("store", "epoch from store vs on the fly", None, "x", 10.0)]


def rows_ontology(r: dict) -> list[Row]:
    b = _load_bound(r) + f"; CPU {_get(r, 'repeated', 'total_cpu_s', default=float('nan')):.1f} s"
    rows_n = _get(r, "repeated", "rows")
    return [Row("ontology", f"parse {rows_n:,} rows + all subsets" if rows_n else "parse + all subsets",
                _get(r, "repeated", "total_s"), "s", r.get("limit_s", 15.0), "<=", b),
            Row("ontology", "  distinct label sets (stress)", _get(r, "distinct", "total_s"), "s", None, "<=",
                f"stress variant CPU {_get(r, 'distinct', 'total_cpu_s', default=float('nan')):.1f} s")]


def rows_metrics(r: dict) -> list[Row]:
    b = _load_bound(r) + "; no target set: >= 1 means ours is faster"
    shape = _get(r, "map", "shape") or ["?", "?"]
    over = _get(r, "psds1", "overhead_vs_direct_total")
    return [Row("metrics", f"mAP {shape[0]:,} x {shape[1]} vs scikit-learn" if isinstance(shape[0], int) else "mAP vs scikit-learn",
                _get(r, "map", "speedup_vs_sklearn"), "x", None, bound=b),
            Row("metrics", "  mAP vs torchmetrics", _get(r, "map", "speedup_vs_torchmetrics"), "x", None, bound=b),
            Row("metrics", f"PSDS1 ({_get(r, 'psds1', 'clips')} clips) vs sed_scores_eval", 1 / over if over else None, "x",
                None, bound=b)]


def rows_grid(r: dict) -> list[Row]:
    b = r.get("bound") or _load_bound(r)
    return [Row("grid", f"2 workers vs 1 ({r.get('runs')} runs, {r.get('mode')})", r.get("speedup"), "x", 1.7, bound=b),
            Row("grid", "  steady state (start-up excluded)", r.get("steady_speedup"), "x", None, bound=b)]


def rows_gpu(r: dict) -> list[Row]:
    if r.get("skipped"): return [Row("gpu", "skipped (see why)", None, "", None, bound=str(r.get("reason", "")))]
    v = r.get("variants", {})
    amp = v.get("amp + channels_last", {})
    b = r.get("bound", "")
    return [Row("gpu", "fp32 samples/s", _get(v, "fp32", "samples_per_s"), "/s", None, bound=b),
            Row("gpu", "AMP + channels_last vs fp32", r.get("speedup_amp_channels_last"), "x", None,
                bound=f"GPU utilisation {amp.get('gpu_utilisation_pct')} %"),
            Row("gpu", "  trainer vs plain loop (AMP + channels_last)", r.get("trainer_vs_plain_amp_channels_last"), "x",
                0.9, bound=b)]


def rows_study(r: dict) -> list[Row]:
    return [Row("study", f"{r.get('preset', '')} study: {r.get('target_s', 900):.0f} s / wall", r.get("ratio"), "x",
                r.get("target", 1.0), bound=r.get("bound") or _load_bound(r))]


def rows_synth(r: dict) -> list[Row]:
    return [Row("synth", f"{r.get('preset', '')} world generated from nothing", r.get("wall_s"), "s",
                r.get("target_s", 60.0), "<=", bound=r.get("bound") or _load_bound(r))]


def rows_generic(name: str) -> Callable[[dict], list[Row]]:
    "Any other benchmark: its `ratio`/`speedup` against its `target`, else a pointer to its JSON."
    def f(r: dict) -> list[Row]:
        for k in ("ratio", "speedup"):
            if isinstance(r.get(k), (int, float)):
                return [Row(name, k, r[k], "x", r.get("target"), bound=r.get("bound") or _load_bound(r))]
        return [Row(name, f"see results/{name}.json", None, "", None, bound=r.get("bound") or _load_bound(r))]
    return f


@dataclass
class Bench:
    """A benchmark: its name, the arguments of a --quick run (None: none), how its results JSON becomes table rows,
    and its own time limit (None: the runner's `--timeout`)."""
    name: str
    quick: list | None = field(default_factory=list)
    rows: Callable[[dict], list[Row]] | None = None
    folder: Path = HERE
    timeout: float | None = None

    @property
    def path(self) -> Path: return self.folder / f"bench_{self.name}.py"


KNOWN = {
    "frontend": Bench("frontend", ["--batch", "4", "--librosa-clips", "2", "--repeats", "1"], rows_frontend),
    "train_step": Bench("train_step", ["--width", "0.125", "--clips", "16", "--dev", "4", "--bs", "8", "--seconds", "0.5",
                                       "--rounds", "1"], rows_train_step),
    "store": Bench("store", ["--clips", "8", "--repeats", "1"], rows_store),
    "ontology": Bench("ontology", ["--rows", "20000"], rows_ontology),
    "grid": Bench("grid", ["--runs", "2", "--clips", "8", "--bs", "8", "--rounds", "1"], rows_grid),
    "metrics": Bench("metrics", ["--clips", "5", "--map-rows", "500"], rows_metrics),
    "gpu": Bench("gpu", ["--bs", "4", "--steps", "2", "--rounds", "1", "--frames", "101"], rows_gpu),
    "study": Bench("study", None, rows_study),
    "synth": Bench("synth", ["--preset", "tiny"], rows_synth),
}


def _constant(path: Path, name: str):
    "The value of a module-level `NAME = <literal>` in a benchmark's source (None if absent), without importing it."
    try: tree = ast.parse(path.read_text())
    except (OSError, SyntaxError): return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            try: return ast.literal_eval(node.value)
            except ValueError: return None
    return None


def available(folder: Path = HERE) -> dict[str, Bench]:
    """Every `bench_<name>.py` of `folder`, in a fixed order (the known ones first). A benchmark file may define
    `QUICK = [...]` (its --quick arguments) and `TIMEOUT = seconds` (a time limit above the runner's)."""
    found = sorted(p.stem[len("bench_"):] for p in folder.glob("bench_*.py"))
    out = {}
    for n in [*KNOWN, *found]:
        if n not in found or n in out: continue
        path = folder / f"bench_{n}.py"
        known = KNOWN.get(n) or Bench(n, None, rows_generic(n))
        quick, timeout = _constant(path, "QUICK"), _constant(path, "TIMEOUT")
        out[n] = Bench(n, [str(x) for x in quick] if isinstance(quick, (list, tuple)) else known.quick, known.rows, folder,
                       float(timeout) if isinstance(timeout, (int, float)) else None)
    return out


# --- running --------------------------------------------------------------------------------------------------------
def run_one(path: Path, args: list, out: Path, timeout: float, log: Path | None = None, echo: bool = True) -> dict:
    """Run benchmark script `path` with `args --out out` in a new session; kill its whole process group after
    `timeout` seconds. Returns {status: ok | failed | timed out, exit_code, seconds, log}: ok when it wrote `out`."""
    cmd = [sys.executable, str(path), *map(str, args), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.time()
    before = out.stat().st_mtime if out.exists() else None
    log = log or Path(tempfile.mkstemp(prefix=f"bench_{path.stem}_", suffix=".log")[1])
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)

        def copy_output():
            for line in p.stdout:
                fh.write(line); fh.flush()
                if echo: print("  " + line, end="", flush=True)
        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        timed_out = False
        try: code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try: os.killpg(p.pid, signal.SIGKILL)      # the benchmark and every process it started (its session)
            except ProcessLookupError: pass
            code = p.wait()
        reader.join(5)
    fresh = out.exists() and (before is None or out.stat().st_mtime > before) and out.stat().st_mtime >= t0 - 1
    status = "timed out" if timed_out else ("ok" if fresh else "failed")
    return dict(status=status, exit_code=code, seconds=round(time.time() - t0, 1), log=str(log))


def rows_for(b: Bench, result: dict | None, run: dict | None) -> list[Row]:
    "The table rows of benchmark `b`: its numbers, or one row saying why there are none."
    if result is None:
        why = "no results" if run is None else f"{run['status']} (exit {run['exit_code']}) after {run['seconds']} s; log {run['log']}"
        return [Row(b.name, why, None, "", None)]
    try: rows = (b.rows or rows_generic(b.name))(result)
    except Exception as e:  # a results layout this runner does not know
        rows = [Row(b.name, f"unreadable results ({type(e).__name__}: {e})", None, "", None)]
    if run is not None and run["status"] != "ok":
        for r in rows: r.bound = f"STALE: this run {run['status']}; numbers from an earlier run. " + r.bound
    return rows


def _fmt(v, unit: str) -> str:
    if v is None: return "-"
    if isinstance(v, float) and v != v: return "nan"
    if unit == "x": return f"{v:.2f}x"
    if unit == "s": return f"{v:.1f} s"
    if unit == "/s": return f"{v:,.0f}/s"
    return f"{v:.3g}"


def table(rows: list[Row], markdown: bool = False) -> str:
    "The rows as a text table (or a Markdown table): benchmark, measure, value, target, value vs target, met."
    head = ["benchmark", "measure", "value", "target", "vs target", "met"]
    body = []
    for r in rows:
        tgt = "-" if r.target is None else f"{r.op} {_fmt(r.target, r.unit)}"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        body.append([r.benchmark, r.measure, _fmt(r.value, r.unit), tgt, "-" if r.vs_target is None else f"{r.vs_target:.2f}", met])
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
                         + ["| " + " | ".join(esc(c) for c in row) + " |" for row in body])
    w = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(n) if i < 2 else str(c).rjust(n) for i, (c, n) in enumerate(zip(cells, w)))
    return "\n".join([line(head), line(["-" * n for n in w]), *map(line, body)])


def machine_summary() -> dict:
    "CPU, cores, library versions and date, without importing torch (the runner stays light)."
    v = {}
    for p in ("torch", "numpy", "torchaudio", "fastai", "librosa", "scikit-learn", "torchmetrics", "sed_scores_eval"):
        try: v[p] = version(p)
        except PackageNotFoundError: pass
    try: autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError: autogroup = None
    return dict(cpu=cpu_model(), cores=os.cpu_count(), python=sys.version.split()[0], versions=v,
                sched_autogroup_enabled=autogroup, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_CORETYPE")})


def report(summary: dict, rows: list[Row]) -> str:
    "RESULTS.md: machine, the table, what bounds each number, how to run."
    m = summary["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = ["# Benchmark results", "",
             "Measured by `python -m benchmarks`" + (" --quick (tiny sizes: a check, not a measurement)" if summary["quick"] else "")
             + f" on {m['date']}. Each benchmark times its ratios side by side in one run (alternating repetitions,",
             "medians); `vs target` is value / target (target / value for time limits): 1 or more meets it.", "",
             "## Machine", "",
             f"- CPU: {m['cpu']}, {m['cores']} cores; Python {m['python']}; {vers}",
             f"- load average before / after all benchmarks: {summary['loadavg_before']} / {summary['loadavg_after']}"
             " (1, 5, 15 min; above the core count, processes wait for a core)",
             f"- scheduler autogroups: {m.get('sched_autogroup_enabled')} (1: CPU is shared fairly between sessions, not processes)",
             "", "## Results", "", table(rows, markdown=True), ""]
    findings = HERE / "FINDINGS.md"      # what was learnt from the numbers, written by hand; kept across runs
    extra = [f"- {n}" for n in summary.get("notes") or []]
    if findings.exists() and not summary["quick"]: extra += [findings.read_text().strip()]
    if extra: lines += ["## Findings", "", *extra, ""]
    lines += ["## What bounds each number", ""]
    seen = set()
    for r in rows:
        if r.bound and (r.benchmark, r.bound) not in seen:
            seen.add((r.benchmark, r.bound)); lines.append(f"- **{r.benchmark}**: {r.bound}")
    notes = {k: b["notes"] for k, b in summary["benchmarks"].items() if b.get("notes")}
    if notes:
        lines += ["", "## Method notes (from the results)", ""] + [f"- **{k}**: {v}" for k, v in notes.items()]
    lines += ["", "## Runs", ""]
    for name, b in summary["benchmarks"].items():
        lines.append(f"- `{name}`: {b['status']}" + (f" in {b['seconds']} s" if b.get("seconds") is not None else "")
                     + (f", measured {b['measured']}" if b.get("measured") else "") + (f" ({b['args']})" if b.get("args") else ""))
    lines += ["", "Reproduce: `.venv/bin/python -m benchmarks` (all), `.venv/bin/python -m benchmarks train_step grid` (some), "
              "`--quick` for a fast check; each `benchmarks/bench_<name>.py` documents its method in its docstring.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    benches = available()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(benches)}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs (not a measurement)")
    ap.add_argument("--timeout", type=float, default=150.0,
                    help="seconds allowed per benchmark (default 150; a benchmark's own TIMEOUT may allow more)")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder of the results JSON (default: benchmarks/results; with --quick a temporary folder)")
    ap.add_argument("--report", type=Path, default=None, help="the Markdown report (default: benchmarks/RESULTS.md, "
                    "with --quick <results>/RESULTS.md)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    a = ap.parse_args(argv)
    if a.list:
        for n, b in benches.items(): print(f"{n:12s} {b.path.relative_to(ROOT)}")
        return 0
    unknown = [n for n in a.names if n not in benches]
    if unknown: ap.error(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(benches)}")
    results = a.results or (Path(tempfile.mkdtemp(prefix="benchmarks_quick_")) if a.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    report_path = a.report or (results / "RESULTS.md" if a.quick else HERE / "RESULTS.md")
    names = a.names or list(benches)
    logs = results / "logs" if a.quick else Path(tempfile.mkdtemp(prefix="benchmarks_logs_"))   # not kept in the repo
    logs.mkdir(parents=True, exist_ok=True)
    summary = dict(quick=a.quick, machine=machine_summary(), loadavg_before=loadavg(), timeout_s=a.timeout,
                   results_dir=str(results), benchmarks={}, notes=list(a.note))
    runs = {}
    for n in names:
        b = benches[n]
        args = (b.quick if b.quick is not None else None) if a.quick else []
        if args is None:
            runs[n] = None
            summary["benchmarks"][n] = dict(status="not run: no quick arguments (define QUICK = [...] in its file)")
            print(f"== {n}: skipped in --quick mode (no quick arguments)")
            continue
        limit = max(a.timeout, b.timeout or 0)
        print(f"== {n}: {b.path.relative_to(ROOT)} {' '.join(args)} (timeout {limit:.0f} s, load {loadavg()})", flush=True)
        runs[n] = run_one(b.path, args, results / f"{n}.json", limit, logs / f"{n}.log")
        summary["benchmarks"][n] = dict(runs[n], args=" ".join(args))
        print(f"== {n}: {runs[n]['status']} in {runs[n]['seconds']} s", flush=True)
    rows = []
    for n, b in benches.items():
        path = results / f"{n}.json"
        if n not in names and not path.exists(): continue
        try: res = json.loads(path.read_text()) if path.exists() else None
        except json.JSONDecodeError: res = None
        if n not in names:
            summary["benchmarks"][n] = dict(status="from file (not run now)")
        if res is not None:
            summary["benchmarks"][n]["measured"] = res.get("when") or res.get("date") or _get(res, "machine", "date") or ""
            if isinstance(res.get("notes"), str): summary["benchmarks"][n]["notes"] = res["notes"]
        rows += rows_for(b, res, runs.get(n))
    summary["loadavg_after"] = loadavg()
    summary["rows"] = [r.to_dict() for r in rows]
    text = table(rows)
    print("\n" + text + "\n")
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report(summary, rows))
    print(f"written: {results / 'summary.json'}, {report_path}")
    failed = [n for n in names if runs.get(n) and runs[n]["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
