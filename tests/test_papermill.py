"""The parameterised experiment notebooks under papermill: safe parameters, every notebook at tiny size, the report."""
import json
import os
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from audiotl_nb.experiments import (LocalExecutor, NOTEBOOKS, RunList, RunStore, default_spec, experiments_dir,
                                    html_report, notebook_for, results_table, run_grid, run_notebook, study_config,
                                    write_report)

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "nbs" / "experiments"
MICRO = dict(clip_seconds=1.0, n_train=40, n_eval=20, bird_clips=8, kws_speakers=3, scene_cities=1)


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUDIOTL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    from audiotl_nb.synth import make_world, world_config
    return make_world(tmp_path_factory.mktemp("world") / "w", world_config("tiny", **MICRO))


def _images(nb_path) -> int:
    nb = nbformat.read(nb_path, as_version=4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_every_notebook_has_a_tagged_parameters_cell_and_a_kernel():
    names = sorted(p.stem for p in EXP.glob("*.ipynb"))
    assert set(NOTEBOOKS.values()) | {"study_report"} <= set(names)
    assert experiments_dir() == EXP
    for p in EXP.glob("*.ipynb"):
        nb = nbformat.read(p, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{p.name}: {len(tagged)} cells tagged 'parameters'"
        params = pm.inspect_notebook(str(p))
        want = {"store", "metric"} if p.stem == "study_report" else {"spec_json", "overrides_json", "run_dir"}
        assert set(params) == want, f"{p.name}: {sorted(params)}"
        assert all(v["default"] == '""' for v in params.values()), p.name      # defaults: the tiny run
        assert nb.metadata["kernelspec"]["language"] == "python"


MALICIOUS = ['"; open("{p}", "w").write("pwned"); x = "', "'''\nopen('{p}', 'w')\n'''", '"""); import os; os.system("touch {p}"); ("""',
             "\\\"; __import__('os').system('touch {p}') #", "line1\nline2\r\n\t\\n é ☃ \u2028 {{}} $(touch {p})", "\x00\x1b[31m"]


def test_parameters_cannot_inject_code(tmp_path):
    "Strings full of quotes, newlines and code, in both JSON parameters, arrive unchanged and never run."
    sentinel = tmp_path / "pwned"
    notes = [m.format(p=sentinel) for m in MALICIOUS]
    spec = {"kind": "toy", "seed": 3, "note": "\n".join(notes), "nested": {"k'\"": notes}}
    over = {"note": notes[0] + notes[2], "alpha": 2.0}
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(notebook_for("toy")), str(out), kernel_name="python3", progress_bar=False,
                        parameters={"spec_json": json.dumps(spec), "overrides_json": json.dumps(over), "run_dir": str(tmp_path / "run")})
    assert not sentinel.exists()                     # nothing in the strings ran ...
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    ns = {}
    exec(injected[0].source, ns)                     # ... the injected cell only assigns three strings ...
    assert {k for k in ns if not k.startswith("__")} == {"spec_json", "overrides_json", "run_dir"}
    assert json.loads(ns["spec_json"]) == spec and json.loads(ns["overrides_json"]) == over
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["note"] == over["note"] and not sentinel.exists()     # ... and the notebook used them as data


def test_pretrain_then_finetune_notebooks_through_the_executor(tmp_path, micro_world):
    "A two-run grid (fine-tuning reads the pre-training's checkpoint) run by the local executor in papermill mode."
    pre = {**default_spec("pretrain", micro_world), "epochs": 1}
    ft = {**default_spec("finetune", micro_world), "epochs": 1, "pretrained": "run:pre/model.pt"}
    grid = RunList.from_dict({"runs": [{"name": "pre", **pre}, {"name": "ft", **ft}]})
    store = RunStore(tmp_path / "store")
    res = run_grid(store, grid, LocalExecutor(workers=0, mode="papermill"), progress=False)
    assert res.ok, res.errors
    pre_id, ft_id = res.ids
    for rid in res.ids:
        rd = store.run_dir(rid)
        assert rd.status == "done" and (rd / "notebook.ipynb").exists() and (rd / "model.pt").exists()
        assert _images(rd / "notebook.ipynb") >= 1                 # the learning curves are in the executed notebook
        assert json.loads((rd / "spec.json").read_text())["kind"] == store.record(rid).kind
    assert store.run_dir(ft_id).metrics["pretrained"] == str(store.run_path(pre_id) / "model.pt")
    df = results_table(store)
    assert set(df.kind) == {"pretrain", "finetune"}
    assert df[df.kind == "finetune"].n_samples.iloc[0] == store.run_dir(pre_id).metrics["n_train"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear_probe", "pairtune", "ssl_pretrain", "sed_distill"])
def test_other_notebooks_run_their_tiny_default(name, tmp_path, micro_world):
    if name == "sed_distill":     # the default recipe: one teacher, then a student distilled from it
        params = {"overrides_json": json.dumps({"root": str(micro_world.audioset), "clip_seconds": 1.0, "epochs": 1})}
    else:
        params = {"spec_json": json.dumps({**default_spec(name, micro_world), "epochs": 1})}
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(EXP / f"{name}.ipynb"), str(out), parameters={**params, "run_dir": str(tmp_path / "run")},
                        kernel_name="python3", progress_bar=False, cwd=str(EXP))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test"], m
    if name == "sed_distill": assert (tmp_path / "run" / "teacher" / "model.pt").exists()


@pytest.mark.slow
def test_study_report_from_a_real_store(tmp_path, micro_world):
    "A micro study run for real, then its report: executed notebook with the figures, and HTML."
    from audiotl_nb.synth import world_config
    st = study_config("tiny", world=world_config("tiny", **MICRO).to_dict(), subsets=["animal"], random_fractions=["random30"],
                      seeds=[1, 2], pretrain={"epochs": 1, "bs": 8}, finetune={"epochs": 1, "bs": 8})
    from audiotl_nb.experiments import run_study
    out = run_study(tmp_path / "store", st, LocalExecutor(workers=1, mode="direct"), progress=False)
    assert out["grid"].ok, out["grid"].errors
    assert _images(out["notebook"]) >= 3           # samples, classes, cosine-distance heatmap
    html = Path(out["html"]).read_text()
    assert "<img" in html and "data:image/png;base64" in html and "mean ± std" in html
    nb = nbformat.read(out["notebook"], as_version=4)
    text = "".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "random30" in text and "animal" in text and "none" in text
