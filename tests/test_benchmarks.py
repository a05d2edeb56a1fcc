"""The benchmark runner (`python -m benchmarks`): table formatting, result extraction, timeouts, and a --quick run.

Nothing here is timed: the benchmarks' numbers are never asserted on (they depend on the machine and its load).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import KNOWN, Bench, Row, available, main, rows_for, run_one, table  # noqa: E402


def test_row_targets():
    up = Row("b", "ratio", 1.8, "x", 1.7)
    assert up.met is True and up.vs_target == pytest.approx(1.8 / 1.7)
    down = Row("b", "seconds", 20.0, "s", 15.0, "<=")
    assert down.met is False and down.vs_target == pytest.approx(0.75)
    assert Row("b", "info", 2.0).met is None and Row("b", "info", 2.0).vs_target is None
    assert Row("b", "missing", None, "x", 1.0).met is None


def test_table_text_and_markdown():
    rows = [Row("grid", "2 workers vs 1", 0.5, "x", 1.7, bound="2 cores"), Row("ontology", "parse", 10.27, "s", 15.0, "<="),
            Row("gpu", "skipped (see why)", None, "", None)]
    text = table(rows).splitlines()
    assert text[0].split() == ["benchmark", "measure", "value", "target", "vs", "target", "met"]
    assert set(text[1].replace(" ", "")) == {"-"}
    assert text[2].split() == ["grid", "2", "workers", "vs", "1", "0.50x", ">=", "1.70x", "0.29", "NO"]
    assert text[3].split() == ["ontology", "parse", "10.3", "s", "<=", "15.0", "s", "1.46", "yes"]
    assert text[4].split() == ["gpu", "skipped", "(see", "why)", "-", "-", "-", "-"]
    assert all(len(l) == len(text[1]) for l in text)          # columns aligned: every line as wide as the rule
    assert text[2].index("0.50x") + len("0.50x") == text[3].index("10.3 s") + len("10.3 s")   # numbers right-aligned
    md = table(rows, markdown=True).splitlines()
    assert md[0] == "| benchmark | measure | value | target | vs target | met |" and md[1] == "|---|---|---|---|---|---|"
    assert md[2] == "| grid | 2 workers vs 1 | 0.50x | >= 1.70x | 0.29 | NO |"
    assert table([Row("x", "a|b", 1.0)], markdown=True).splitlines()[2].startswith("| x | a\\|b |")


def test_rows_from_results():
    ts = {"model": "cnn10 width 0.25", "ratio": 0.95, "ratio_cpu_time": 1.0, "ratio_whole_epoch": 0.9, "bound": "load 9",
          "torch_threads": 1}
    rows = rows_for(KNOWN["train_step"], ts, {"status": "ok"})
    assert [r.value for r in rows] == [0.95, 1.0, 0.9] and rows[0].met is True and rows[2].met is None
    assert rows[0].bound == "cnn10 width 0.25, 1 torch thread(s); load 9"
    gpu = rows_for(KNOWN["gpu"], {"skipped": True, "reason": "no CUDA device"}, None)
    assert len(gpu) == 1 and gpu[0].value is None and gpu[0].bound == "no CUDA device"
    # a failed run: one row saying so; a failed run with an older file: the old numbers, marked stale
    failed = {"status": "timed out", "exit_code": -9, "seconds": 150.0, "log": "x.log"}
    assert "timed out" in rows_for(KNOWN["grid"], None, failed)[0].measure
    stale = rows_for(KNOWN["grid"], {"speedup": 1.2, "runs": 4, "mode": "direct"}, failed)
    assert stale[0].value == 1.2 and stale[0].bound.startswith("STALE")
    # a layout the runner does not know is reported, not raised
    bad = rows_for(Bench("store", rows=lambda r: r["nope"]), {"x": 1}, {"status": "ok"})
    assert "unreadable results" in bad[0].measure


def test_discovers_other_benchmarks_and_their_quick_args(tmp_path):
    (tmp_path / "bench_alpha.py").write_text("import sys\nQUICK = ['--n', 3]\nTIMEOUT = 900\n")
    (tmp_path / "bench_beta.py").write_text("QUICK = make_args()\n")
    (tmp_path / "bench_train_step.py").write_text("")
    (tmp_path / "helper.py").write_text("")
    b = available(tmp_path)
    assert list(b) == ["train_step", "alpha", "beta"]
    assert b["alpha"].quick == ["--n", "3"] and b["alpha"].timeout == 900.0 and b["alpha"].path == tmp_path / "bench_alpha.py"
    assert b["beta"].quick is None and b["beta"].timeout is None          # not a literal: no quick run
    assert b["train_step"].quick == KNOWN["train_step"].quick


def _script(tmp_path, body: str) -> Path:
    p = tmp_path / "bench_fake.py"
    p.write_text("import sys, json, time, subprocess\nout = sys.argv[sys.argv.index('--out') + 1]\n" + body)
    return p


def test_run_one_ok_and_failed(tmp_path):
    ok = run_one(_script(tmp_path, "print('hello'); json.dump({'ratio': 1.0}, open(out, 'w'))\n"), [], tmp_path / "a.json",
                 60, tmp_path / "a.log", echo=False)
    assert ok["status"] == "ok" and ok["exit_code"] == 0 and "hello" in (tmp_path / "a.log").read_text()
    bad = run_one(_script(tmp_path, "raise SystemExit('broken')\n"), [], tmp_path / "b.json", 60, tmp_path / "b.log", echo=False)
    assert bad["status"] == "failed" and bad["exit_code"] == 1 and "broken" in (tmp_path / "b.log").read_text()


def test_run_one_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    body = (f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(c.pid))\nprint('started', flush=True)\ntime.sleep(120)\n")
    r = run_one(_script(tmp_path, body), [], tmp_path / "c.json", 5, tmp_path / "c.log", echo=False)
    assert r["status"] == "timed out" and not (tmp_path / "c.json").exists()
    child = int(pidfile.read_text())
    for _ in range(50):                       # the grandchild was killed with its process group
        try: os.kill(child, 0)
        except ProcessLookupError: break
        if Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z": break
        time.sleep(0.1)
    else: pytest.fail(f"process {child} outlived the timeout")


def test_unknown_name_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e: main(["nonesuch", "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nonesuch" in err and "train_step" in err and "grid" in err


def test_quick_run_writes_summary_and_report(tmp_path):
    "The real runner in --quick mode on the cheapest benchmarks (a subprocess per benchmark)."
    res = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "ontology", "--quick", "--results", str(res), "--timeout", "300"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((res / "summary.json").read_text())
    assert s["quick"] is True and set(s["benchmarks"]) == {"gpu", "ontology"}
    assert all(b["status"] == "ok" for b in s["benchmarks"].values())
    assert s["machine"]["cores"] == os.cpu_count() and s["loadavg_before"] and "torch" in s["machine"]["versions"]
    onto = [r for r in s["rows"] if r["benchmark"] == "ontology"]
    assert onto[0]["target"] == 15.0 and onto[0]["op"] == "<=" and isinstance(onto[0]["value"], float)
    gpu = json.loads((res / "gpu.json").read_text())
    import torch
    assert gpu["skipped"] is (not torch.cuda.is_available())
    report = (res / "RESULTS.md").read_text()
    assert "| benchmark | measure | value | target | vs target | met |" in report and "## Machine" in report
    assert "--quick" in report
    assert "benchmark  measure" in p.stdout                 # the printed table
    assert not (ROOT / "benchmarks" / "results" / "summary.json").exists() or \
        json.loads((ROOT / "benchmarks" / "results" / "summary.json").read_text())["quick"] is False
