"""Analyses on a run store laid out as the experiments module writes it (runs/<id>/run.json with tags and
`run:` references, spec.json, status.json, metrics.json, history.csv, model.pt), checkpoint formats,
and the statistics against SciPy, statsmodels and deepsig."""
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from audiotl_nb import analysis as A
from audiotl_nb.core import CheckpointError, DataError, RunDir, UnknownNameError, atomic_write_json, seed_everything
from audiotl_nb.models.core import create_model, save_checkpoint

SUBSETS = {"things": (900, 20), "animal": (300, 12), "random10": (1700, 52), "random1": (170, 52), "all": (17000, 52)}
TASKS = ("dcase2020_asc", "dcase2018_bad")


def _pid(i): return f"aa{i:010x}"      # run ids are hex hashes in a real store


def _run(root, rid, spec, tags, metrics=None, model=None, history=None, status="done"):
    rd = RunDir(root / "runs" / rid)
    atomic_write_json(rd / "run.json", {"id": rid, "spec": spec, "tags": tags, "world": None})
    resolved = dict(spec)
    if isinstance(spec.get("pretrained"), str) and spec["pretrained"].startswith("run:"):
        resolved["pretrained"] = str(root / "runs" / spec["pretrained"][4:])
    rd.write_spec(resolved)
    rd.set_status(status)
    if metrics is not None: rd.write_metrics(metrics)
    if model is not None: save_checkpoint(rd / rd.model_file, model)
    if history is not None: pd.DataFrame(history).to_csv(rd / rd.history_file, index=False)
    return rd


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    "A study-shaped store: 5 pre-training runs, fine-tuning runs (2 tasks × 6 states × 3 seeds), a failed run."
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    for i, (sub, (n, c)) in enumerate(SUBSETS.items()):
        seed_everything(i)
        _run(root, _pid(i), {"kind": "pretrain", "task": "audioset", "task_kw": {"subset": sub}, "seed": 1, "pretrained": None},
             {"study": "ontology", "stage": "pretrain", "subset": sub, "group": A.subset_group(sub), "task": "audioset", "seed": 1},
             {"kind": "pretrain", "n_train": n, "n_classes": c, "test": {"uaf1": 0.1 + 0.01 * i, "mean_average_precision": 0.3}},
             model=create_model("cnn10", c, width=0.125))
    states = ["none", *SUBSETS]
    for t, task in enumerate(TASKS):
        for j, sub in enumerate(states):
            for seed in (1, 2, 3):
                n = 0 if sub == "none" else SUBSETS[sub][0]
                acc = 0.4 + 0.05 * np.log10(n + 1) + 0.01 * seed + 0.1 * t
                pre = None if sub == "none" else f"run:{_pid(list(SUBSETS).index(sub))}/model.pt"
                hist = {"epoch": [0, 1, 2], "train_loss": [1.0, 0.8, 0.7], "dev_uar": [acc - 0.2, acc - 0.1, acc],
                        "dev_accuracy": [acc - 0.1, acc, acc]}
                tags = {"study": "ontology", "stage": "finetune", "subset": sub, "group": A.subset_group(sub), "task": task,
                        "seed": seed, "pretrain_id": None if pre is None else pre[4:16]}
                _run(root, f"bb{t:02x}{j:02x}{seed:06x}", {"kind": "finetune", "task": task, "seed": seed, "pretrained": pre}, tags,
                     {"kind": "finetune", "n_train": 54, "n_classes": 10, "test": {"uar": acc, "accuracy": acc + 0.01}},
                     history=hist)
    for seed in (1, 2):   # paper 2's methods on one task
        for kind, speed in (("finetune", 0.1), ("pairtune", 0.4)):
            _run(root, f"m{kind[0]}{seed}", {"kind": kind, "task": "esc50", "seed": seed, "pretrained": None},
                 {"study": "backbone", "task": "esc50", "seed": seed, "method": kind},
                 {"kind": kind, "n_train": 40, "n_classes": 5, "test": {"accuracy": 0.5}},
                 history={"epoch": list(range(5)), "dev_accuracy": [min(1, speed * (e + 1)) for e in range(5)]})
    _run(root, "zz-failed", {"kind": "finetune", "task": "dcase2020_asc", "seed": 9, "pretrained": None}, {}, status="failed: boom")
    return root


def test_results_from_store(store):
    res = A.results_from_store(store)
    assert "zz-failed" not in set(res.run_id)
    ft = res[(res.kind == "finetune") & (res.metric == "uar") & (res.task == "dcase2020_asc")]
    assert len(ft) == 6 * 3
    for sub, (n, c) in SUBSETS.items():
        rows = ft[ft.subset == sub]
        assert (rows.n_samples == n).all() and (rows.n_classes == c).all()
    assert (ft[ft.subset == "none"].n_samples == 0).all()
    assert set(res[res.kind == "pretrain"].subset) == set(SUBSETS)
    assert res[res.run_id == _pid(0)].pretrain_id.isna().all()
    # a RunStore object and a list of run folders give the same table
    paths = A.run_paths(store)
    assert A.results_from_store(paths).equals(res)


def test_matches_experiments_results_table(store):
    ex = pytest.importorskip("audiotl_nb.experiments")
    try: ref = ex.results_table(store)
    except Exception as e: pytest.skip(f"experiments.results_table cannot read this store: {e}")
    mine = A.results_from_store(store)
    study = lambda d: d[d.run_id.str.startswith(("aa", "bb"))]     # paper 1's runs (the others carry no subset tag)
    mine, ref = study(mine), study(ref)
    cols = ["run_id", "kind", "task", "subset", "group", "seed", "metric", "value", "n_samples", "n_classes"]
    key = ["run_id", "metric"]
    a = mine[cols].sort_values(key).reset_index(drop=True)
    b = ref[cols].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_figures_from_store(store):
    res = A.results_from_store(store)
    t1 = A.pretrain_scores(res)
    assert list(t1.index) == ["all", "things", "animal", "random10", "random1"]
    assert t1.loc["things", "paper_classes"] == 167 and np.isnan(t1.loc["random1", "paper_uaf1"])
    st = A.scaling_table(res, metric="uar")
    r = st.set_index(["task", "group"])
    assert r.loc[("dcase2020_asc", "random"), "n"] == 3 and r.loc[("dcase2020_asc", "ontology"), "n"] == 3
    # the synthetic accuracies are exactly linear in log10(n + 1): near-perfect fits
    assert (st.pearson_r > 0.99).all() and (st.spearman_rho == 1).all()
    fig = A.plot_scaling(res, metric="uar"); assert len(fig.axes) == 2; plt.close(fig)
    fig = A.plot_scaling(res, x="n_classes", metric="uar", groups=("ontology",), all_in=("ontology",)); plt.close(fig)
    cmp = A.compare_settings(res, metric="uar", n_resamples=500)
    assert len(cmp) == 2 * 5 and (cmp.n_pairs == 3).all()
    assert np.allclose(cmp.delta, cmp["mean"] - cmp.baseline_mean)
    agg = A.aggregate_seeds(res[res.kind == "finetune"], by=["task", "subset", "metric"])
    assert (agg[agg.subset != "none"]["n"] == 3).all()


def test_states_and_distances_from_store(store):
    states = A.store_states(store, init_seed=5)
    assert sorted(states) == sorted([*SUBSETS, "none"])
    d = A.first_conv_distances(states)
    assert np.allclose(np.diag(d), 0) and np.allclose(d, d.T)
    # each state's first layer is its seed's fresh initialisation: seed_everything(i) rebuilds it exactly
    seed_everything(1); m = create_model("cnn10", 12, width=0.125)
    assert A.first_conv_distance(m, states["animal"]) == 0.0
    assert A.first_conv_distance(store / "runs" / _pid(1), states["animal"]) == 0.0   # a run folder
    ax = A.plot_distance_matrix(d); plt.close(ax.figure)


def test_checkpoint_forms(tmp_path):
    seed_everything(0); m = create_model("cnn10", 3, width=0.125)
    torch.save({"epoch": 2, "model": m.state_dict()}, tmp_path / "best.pt")               # a trainer's best.pt
    torch.save({"module." + k: v for k, v in m.state_dict().items()}, tmp_path / "ddp.pt")  # a DDP-wrapped state
    assert A.first_conv_distance(tmp_path / "best.pt", m) == 0.0
    assert A.first_conv_distance(tmp_path / "ddp.pt", m) == 0.0
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"): A.conv_weight(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing.pt"): A.conv_weight(tmp_path / "missing.pt")
    with pytest.raises(UnknownNameError, match="a.weight"): A.conv_weight({"a.weight": torch.zeros(1, 1, 3, 3)})
    with pytest.raises(UnknownNameError, match="conv_block2.conv1.weight"): A.conv_weight(m, "conv_block9.conv1")
    # SciPy's cosine distance, filter by filter, on random filters of another shape
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 2, 3, 3)), rng.normal(size=(5, 2, 3, 3))
    from scipy.spatial.distance import cosine
    ref = np.mean([cosine(x.ravel(), y.ravel()) for x, y in zip(a, b)])
    assert A.first_conv_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(ref, abs=1e-12)


def test_convergence_from_store(store):
    conv = A.convergence_table(store, "accuracy", kinds=("finetune", "pairtune"), task="esc50")
    assert len(conv) == 2 * 2 * 5
    ax = A.plot_convergence(conv)
    pt = [l for l in ax.lines if l.get_label().startswith("pairtune")][0]
    assert np.allclose(pt.get_ydata(), [0.4, 0.8, 1.0, 1.0, 1.0]) and np.allclose(pt.get_xdata(), [1, 2, 3, 4, 5])
    plt.close(ax.figure)
    with pytest.raises(UnknownNameError, match="accuracy"): A.convergence_table(store, "map", task="esc50")


def test_explorer_on_store(store):
    ex = A.ResultsExplorer(store, by="subset")
    ex.kind.value = "finetune"; ex.task.value = "dcase2018_bad"; ex.metric.value = "uar"
    res = A.results_from_store(store)
    want = res[(res.kind == "finetune") & (res.task == "dcase2018_bad") & (res.metric == "uar")].groupby("subset").value.mean()
    got = ex.plot_data.set_index("subset")["mean"]
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False)
    assert np.allclose([p.get_height() for p in ex.ax.patches], ex.plot_data["mean"])
    ex.by.value = "seed"
    assert list(ex.plot_data.seed) == [1, 2, 3]
    ex.kind.value = "pairtune"
    assert ex.task.value == "esc50" and ex.metric.value == "accuracy"


def test_spearman_bootstrap_matches_scipy():
    rng = np.random.default_rng(3)
    x = rng.uniform(1, 100, 15); y = np.log(x) + rng.normal(0, 0.5, 15)
    c = A.correlation(x, y, spearman_ci="bootstrap", n_resamples=1000, seed=4)
    ref = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                          n_resamples=1000, method="percentile", rng=np.random.default_rng(4))
    assert (c["spearman_low"], c["spearman_high"]) == pytest.approx(tuple(ref.confidence_interval), abs=1e-12)
    # Fisher intervals for Spearman are wider than Pearson's by the factor sqrt(1.06) on the z scale
    lo, hi = A.fisher_ci(0.5, 20, 0.95, 1.06)
    z, h = np.arctanh(0.5), stats.norm.ppf(0.975) * np.sqrt(1.06 / 17)
    assert (lo, hi) == pytest.approx((np.tanh(z - h), np.tanh(z + h)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_bootstrap_against_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.6, 0.1, 40); b = a - 0.02 + rng.normal(0, 0.05, 40)
    mine = A.paired_bootstrap(a, b, n_resamples=20000, seed=seed)
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(seed + 10))
    w = ref.confidence_interval.high - ref.confidence_interval.low
    assert mine["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.03 * w)
    assert mine["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.03 * w)
    # p < 0.05 exactly when the 95 % interval excludes 0 (both from the same resamples, up to Monte Carlo error)
    if abs(mine["p_value"] - 0.05) > 0.01: assert (mine["p_value"] < 0.05) == (mine["ci_low"] > 0 or mine["ci_high"] < 0)


def test_bonferroni_against_statsmodels():
    mt = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).uniform(0, 0.1, 25)
    for alpha in (0.05, 0.1):
        rej, adj, *_ = mt.multipletests(p, alpha=alpha, method="bonferroni")
        r2, a2 = A.bonferroni(p, alpha)
        assert np.array_equal(rej, r2) and np.allclose(adj, a2, atol=0, rtol=1e-15)
    with pytest.raises(ValueError, match="\\[0, 1\\]"): A.bonferroni([0.5, 1.2])


def test_aso():
    pytest.importorskip("deepsig")
    rng = np.random.default_rng(0)
    good, bad = rng.normal(0.8, 0.02, 10), rng.normal(0.6, 0.02, 10)
    assert A.aso_test(good, bad, num_bootstrap_iterations=200) < 0.2
    assert A.aso_test(bad, good, num_bootstrap_iterations=200) > 0.8


def test_dimensionality_invariances():
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(50, 10)))
    s = rng.uniform(0.1, 10, (50, 1))
    assert A.anisotropy(X * s) == pytest.approx(A.anisotropy(X), abs=1e-12)          # row scale does not matter
    perm = rng.permutation(10)
    assert A.dimensionality_contribution(X[:, perm]) == A.dimensionality_contribution(X)   # nor the dimension order
    with pytest.warns(UserWarning, match="undefined"):
        out = A.dimensionality_contribution(np.vstack([np.eye(4), -np.eye(4)]))
    assert np.isnan(out["top1"])


def test_embed_2d_umap():
    pytest.importorskip("umap")
    X = np.random.default_rng(0).normal(size=(60, 8))
    Z, used = A.embed_2d(X, method="auto")
    assert used == "umap" and Z.shape == (60, 2)


def test_label_quality_errors():
    with pytest.raises(DataError, match="no class has a quality"):
        A.score_by_label_quality(pd.DataFrame({"class": ["a"], "value": [0.5]}), {"b": 0.9})
    t = A.score_by_label_quality(pd.Series({"a": 0.2, "b": 0.4, "c": 0.9}), {"a": 0.1, "b": 0.6, "c": 0.8},
                                 thresholds=(0.7, 0.5, 0))
    assert t.score.tolist() == pytest.approx([0.9, 0.65, 0.5]) and t.n_classes.tolist() == [1, 2, 3]


def test_compare_settings_aso():
    pytest.importorskip("deepsig")
    rows = [{"task": "t", "subset": s, "seed": k, "metric": "uar", "value": v + 0.01 * k}
            for s, v in [("none", 0.5), ("all", 0.8)] for k in range(5)]
    out = A.compare_settings(pd.DataFrame(rows), test="aso", n_resamples=100, kind=None, split=None)
    assert len(out) == 1 and out.delta.iloc[0] == pytest.approx(0.3) and out.eps_min.iloc[0] < 0.2
    assert "p_bonferroni" not in out


def test_heatmap_small_distances():
    d = pd.DataFrame([[0, 1.5e-4], [1.5e-4, 0]], index=["a", "b"], columns=["a", "b"])
    ax = A.plot_distance_matrix(d)
    assert sorted(t.get_text() for t in ax.texts) == ["0.0e+00", "0.0e+00", "1.5e-04"]
    plt.close(ax.figure)
