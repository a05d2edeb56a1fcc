"""audiotl_nb.metrics against scikit-learn, torchmetrics, sed_scores_eval, mir_eval and scipy on random and real inputs.

Nothing here is timed; benchmarks/bench_metrics.py measures speed.
"""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from sklearn import metrics as skm

from audiotl_nb.core import DataError, UnknownNameError
from audiotl_nb.metrics import (
    CLIP_METRICS, METRICS, ScoreFrame, accuracy, average_precision, d_prime, events_from_table, fastai_metric,
    frames_to_events, frames_to_scores, get_metric, lwlrap, mauc, mean_average_precision, median_filter,
    onset_f_measure, psds1, roc_auc, uaf1, uar,
)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _multilabel(rng, N, C, p=0.1, ties=False):
    Y = (rng.random((N, C)) < p).astype(np.int64)
    S = rng.random((N, C)).astype(np.float32)
    if ties: S = np.round(S, 2)
    return Y, S


# ---------------------------------------------------------------------------------------------- ranking metrics
@pytest.mark.parametrize("ties", [False, True])
def test_map_matches_sklearn_and_torchmetrics_large(rng, ties):
    import torchmetrics.functional.classification as tmf
    Y, S = _multilabel(rng, 3000, 60, p=0.03, ties=ties)
    Y[:, 5] = 0  # a class without positives is left out of the mean
    pos = Y.sum(0) > 0
    want = skm.average_precision_score(Y[:, pos], S[:, pos], average="macro")
    assert abs(mean_average_precision(Y, S) - want) < 1e-7
    per_class = average_precision(torch.tensor(Y), torch.tensor(S))
    assert np.isnan(per_class[5])
    np.testing.assert_allclose(per_class[pos], skm.average_precision_score(Y[:, pos], S[:, pos], average=None), atol=1e-7)
    tm = tmf.multilabel_average_precision(torch.tensor(S[:, pos]), torch.tensor(Y[:, pos]),
                                          num_labels=int(pos.sum()), average="macro")
    assert abs(mean_average_precision(Y, S) - tm.item()) < 1e-6  # torchmetrics works in float32


@pytest.mark.parametrize("ties", [False, True])
def test_mauc_and_d_prime_match_sklearn_and_torchmetrics(rng, ties):
    import torchmetrics.functional.classification as tmf
    from scipy.stats import norm
    Y, S = _multilabel(rng, 2000, 30, p=0.2, ties=ties)
    Y[:, 0] = 0; Y[:, 1] = 1  # neither has both labels: excluded
    ok = slice(2, None)
    want = skm.roc_auc_score(Y[:, ok], S[:, ok], average="macro")
    assert abs(mauc(Y, S) - want) < 1e-7
    np.testing.assert_allclose(roc_auc(Y, S)[ok], skm.roc_auc_score(Y[:, ok], S[:, ok], average=None), atol=1e-7)
    assert np.isnan(roc_auc(Y, S)[:2]).all()
    tm = tmf.multilabel_auroc(torch.tensor(S[:, ok]), torch.tensor(Y[:, ok]), num_labels=28, average="macro")
    assert abs(mauc(Y, S) - tm.item()) < 1e-6
    assert abs(d_prime(Y, S) - math.sqrt(2) * norm.ppf(want)) < 1e-7


def test_lwlrap_matches_sklearn(rng):
    Y, S = _multilabel(rng, 500, 40, p=0.08, ties=True)
    Y[:20] = 0  # clips without labels carry no weight
    rows = Y.sum(1) > 0
    want = skm.label_ranking_average_precision_score(Y[rows], S[rows], sample_weight=Y[rows].sum(1))
    assert abs(lwlrap(Y, S) - want) < 1e-7
    # single-label targets: one positive per clip → mean precision at the true class
    y = rng.integers(0, 40, 300)
    want = skm.label_ranking_average_precision_score(np.eye(40)[y], S[:300])
    assert abs(lwlrap(y, S[:300]) - want) < 1e-7


def test_ranking_edge_cases(rng):
    Y = (rng.random((64, 4)) < 0.3).astype(int)
    Y[:, 0] = 1
    Z = np.zeros((64, 4))  # all-zero predictions: AP = prevalence, AUC = 1/2
    np.testing.assert_allclose(average_precision(Y, Z), Y.mean(0), atol=1e-12)
    assert abs(mauc(Y, Z) - 0.5) < 1e-12 and abs(d_prime(Y, Z)) < 1e-12
    # one class, as (N, 1) and as 1-D binary
    y1, s1 = (rng.random(80) < 0.4).astype(int), rng.random(80)
    assert abs(mean_average_precision(y1, s1) - skm.average_precision_score(y1, s1)) < 1e-12
    assert abs(mauc(y1[:, None], s1[:, None]) - skm.roc_auc_score(y1, s1)) < 1e-12
    # perfect ranking
    assert mean_average_precision(Y, Y + 0.0) == 1.0 and lwlrap(Y, Y * 1.0) == 1.0
    # nothing to average → NaN, not an exception
    assert math.isnan(mean_average_precision(np.zeros((5, 2)), rng.random((5, 2))))
    assert math.isnan(mauc(np.ones((5, 2)), rng.random((5, 2))))
    assert math.isnan(lwlrap(np.zeros((5, 2)), rng.random((5, 2))))
    with pytest.raises(ValueError, match="only 0 and 1"): mean_average_precision(np.full((3, 2), 0.5), np.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN"): mauc(Y, np.full(Y.shape, np.nan))


def test_ranking_accepts_float16_and_frames(rng):
    Y, S = _multilabel(rng, 120, 6, p=0.3)
    t = torch.tensor(S).half()
    want = skm.average_precision_score(Y, t.float().numpy(), average="macro")
    assert abs(mean_average_precision(torch.tensor(Y), t) - want) < 1e-7
    Yf, Sf = Y.reshape(4, 30, 6), S.reshape(4, 30, 6)
    assert mean_average_precision(Yf, Sf) == mean_average_precision(Y, S)


# ---------------------------------------------------------------------------------------------- decision metrics
def test_decision_metrics_single_label(rng):
    import torchmetrics.functional.classification as tmf
    y, S = rng.integers(0, 7, 1000), rng.random((1000, 7))
    p = S.argmax(1)
    assert abs(uar(y, S) - skm.balanced_accuracy_score(y, p)) < 1e-12
    assert abs(uar(y, S) - tmf.multiclass_recall(torch.tensor(S), torch.tensor(y), num_classes=7, average="macro").item()) < 1e-6
    assert abs(uaf1(y, S) - skm.f1_score(y, p, average="macro")) < 1e-12
    assert abs(uaf1(y, S) - tmf.multiclass_f1_score(torch.tensor(S), torch.tensor(y), num_classes=7, average="macro").item()) < 1e-6
    assert abs(accuracy(y, S) - skm.accuracy_score(y, p)) < 1e-12
    # labels instead of scores, and a class only in the predictions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_uar = skm.balanced_accuracy_score([0, 0, 1, 1], [0, 2, 1, 1])
    assert uar([0, 0, 1, 1], [0, 2, 1, 1]) == want_uar
    assert uaf1([0, 0, 1, 1], [0, 2, 1, 1]) == skm.f1_score([0, 0, 1, 1], [0, 2, 1, 1], average="macro", zero_division=0)
    # one class only
    assert uar([3, 3, 3], [3, 1, 3]) == pytest.approx(2 / 3)


def test_decision_metrics_multi_label(rng):
    import torchmetrics.functional.classification as tmf
    Y, S = _multilabel(rng, 800, 12, p=0.25)
    P = S >= 0.5
    assert abs(uaf1(Y, S) - skm.f1_score(Y, P, average="macro", zero_division=0)) < 1e-12
    tm = tmf.multilabel_f1_score(torch.tensor(S), torch.tensor(Y), num_labels=12, average="macro", threshold=0.5)
    assert abs(uaf1(Y, S) - tm.item()) < 1e-6
    assert abs(uar(Y, S) - skm.recall_score(Y, P, average="macro")) < 1e-12
    assert abs(accuracy(Y, S) - skm.accuracy_score(Y, P)) < 1e-12
    logits = torch.logit(torch.tensor(S, dtype=torch.float64))
    assert uaf1(Y, logits, threshold=0.0) == pytest.approx(uaf1(Y, S))
    Y[:, 3] = 0  # no positives: counts as 0 in UAF1, skipped by present_only and by UAR
    keep = Y.sum(0) > 0
    assert abs(uaf1(Y, S) - skm.f1_score(Y, P, average="macro", zero_division=0)) < 1e-12
    assert abs(uaf1(Y, S, present_only=True) - skm.f1_score(Y[:, keep], P[:, keep], average="macro")) < 1e-12
    assert abs(uar(Y, S) - skm.recall_score(Y[:, keep], P[:, keep], average="macro")) < 1e-12
    assert uar(Y, np.zeros_like(S)) == 0.0 and uaf1(Y, np.zeros_like(S)) == 0.0


# ---------------------------------------------------------------------------------------------- median filter
@pytest.mark.parametrize("mode", ["reflect", "nearest", "mirror"])
def test_median_filter_matches_scipy(rng, mode):
    x = rng.random((5, 250, 30)).astype(np.float32)
    x[:, 100:110] = 0.5  # ties
    for k in (2, 3, 12, 13, 300):
        want = ndimage.median_filter(x, size=(1, k, 1), mode=mode)
        np.testing.assert_array_equal(median_filter(x, k, mode, backend="torch"), want)
        np.testing.assert_array_equal(median_filter(x, k, mode), want)
    t = torch.tensor(x[0])
    out = median_filter(t, 12, mode, backend="torch")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), ndimage.median_filter(x[0], size=(12, 1), mode=mode))


def test_median_filter_errors():
    with pytest.raises(ValueError, match=r"\(T, C\)"): median_filter(np.zeros(5), 3)
    with pytest.raises(ValueError, match=">= 1"): median_filter(np.zeros((5, 2)), 0)
    with pytest.raises(UnknownNameError): median_filter(np.zeros((5, 2)), 3, mode="wrapped")
    with pytest.raises(UnknownNameError, match="backend"): median_filter(np.zeros((5, 2)), 3, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_metrics_on_gpu(rng):
    x = rng.random((4, 250, 10)).astype(np.float32)
    out = median_filter(torch.tensor(x, device="cuda"), 12)
    assert out.is_cuda
    np.testing.assert_array_equal(out.cpu().numpy(), ndimage.median_filter(x, size=(1, 12, 1)))
    Y, S = _multilabel(rng, 200, 10, p=0.3)
    assert mean_average_precision(torch.tensor(Y, device="cuda"), torch.tensor(S, device="cuda")) == \
        mean_average_precision(Y, S)


# ---------------------------------------------------------------------------------------------- onset F-measure
def test_onset_f_measure_matches_mir_eval(rng):
    import mir_eval
    for window in (0.05, 0.2):
        for _ in range(100):
            ref = np.sort(rng.uniform(0, 30, rng.integers(1, 200)))
            est = np.sort(np.abs(np.concatenate([ref + rng.normal(0, window, len(ref)), rng.uniform(0, 30, 20)])))
            ref, est = np.round(ref, 2), np.round(est, 2)
            want = mir_eval.onset.f_measure(ref, est, window=window)
            assert onset_f_measure(ref, est, window, return_pr=True) == pytest.approx(want, abs=1e-12)
    # unsorted input is fine; empty lists give 0
    assert onset_f_measure([1.0, 0.2], [0.21, 0.99]) == 1.0
    assert onset_f_measure([], []) == 0.0
    with pytest.raises(ValueError, match="1-D"): onset_f_measure(np.zeros((2, 2)), [0.1])


# ---------------------------------------------------------------------------------------------- PSDS1
def _direct_psds(gt, scores, durations, **kw):
    import sed_scores_eval
    kw = {"dtc_threshold": 0.7, "gtc_threshold": 0.7, "alpha_ct": 0.0, "alpha_st": 0.0, "max_efpr": 100.0, **kw}
    return sed_scores_eval.intersection_based.psds(scores, gt, durations, **kw)


def _random_sed(rng, B=40, T=250, C=6, hop=0.04):
    ids, classes = [f"clip{b}" for b in range(B)], [f"/m/c{c}" for c in range(C)]
    gt, x = {}, rng.random((B, T, C)) * 0.4
    for b, cid in enumerate(ids):
        evs = []
        for c in rng.choice(C - 1, size=rng.integers(0, 3), replace=False):  # the last class never occurs
            on = round(float(rng.uniform(0, 8)), 3); off = round(min(10.0, on + float(rng.uniform(0.2, 2))), 3)
            evs.append((on, off, classes[c]))
            a, z = int((on + rng.normal(0, 0.1)) / hop), int((off + rng.normal(0, 0.1)) / hop)
            x[b, max(a, 0):max(z, 0), c] += 0.5
        gt[cid] = sorted(evs)
    return ids, classes, gt, np.clip(x, 0, 1)


def test_psds1_matches_sed_scores_eval(rng):
    from sed_scores_eval.base_modules.scores import create_score_dataframe
    ids, classes, gt, x = _random_sed(rng)
    x = median_filter(x, 12)
    res = psds1(gt, x, ids=ids, classes=classes, details=True)
    # the same evaluation done by hand: drop clips without events and the class without events
    keep = [cid for cid in ids if gt[cid]]
    present = sorted({e[2] for cid in keep for e in gt[cid]})
    stamps = np.round(np.arange(251) * 0.04, 6)
    sc = {cid: ScoreFrame(create_score_dataframe(x[ids.index(cid)][:, [classes.index(c) for c in present]], stamps, present))
          for cid in keep}
    want = _direct_psds({cid: gt[cid] for cid in keep}, sc, {cid: 10.0 for cid in keep})
    assert res["psds"] == pytest.approx(want[0], abs=1e-12)
    assert res["classes"] == present and "/m/c5" not in res["classes"] and res["n_files"] == len(keep)
    assert res["psds"] == pytest.approx(np.mean(list(res["per_class"].values())), abs=1e-12)
    assert res["hours"] == pytest.approx(len(keep) * 10 / 3600)
    # the variance penalty and other settings are passed through
    want_st = _direct_psds({cid: gt[cid] for cid in keep}, sc, {cid: 10.0 for cid in keep}, alpha_st=1.0)
    assert psds1(gt, x, ids=ids, classes=classes, alpha_st=1.0) == pytest.approx(want_st[0], abs=1e-12)
    # keeping event-free clips adds their duration to the false-positive budget
    all_files = psds1(gt, x, ids=ids, classes=classes, drop_empty_files=False, details=True)
    assert all_files["n_files"] == len(ids)
    sc_all = {cid: ScoreFrame(create_score_dataframe(x[b][:, [classes.index(c) for c in present]], stamps, present))
              for b, cid in enumerate(ids)}
    want_all = _direct_psds(gt, sc_all, {cid: 10.0 for cid in ids})
    assert all_files["psds"] == pytest.approx(want_all[0], abs=1e-12)


def test_psds1_input_forms_agree(rng):
    ids, classes, gt, x = _random_sed(rng, B=20)
    ref = psds1(gt, x, ids=ids, classes=classes)
    # plain pandas DataFrames (as sed_scores_eval builds them) are accepted too
    plain = {k: pd.DataFrame(v) for k, v in frames_to_scores(x, ids, classes).items()}
    assert psds1(gt, plain) == pytest.approx(ref, abs=1e-12)
    # explicit durations equal to the frame span give the same value; dicts and lists both work
    assert psds1(gt, x, {cid: 10.0 for cid in ids}, ids=ids, classes=classes) == pytest.approx(ref, abs=1e-12)
    assert psds1(gt, x, [10.0] * len(ids), ids=ids, classes=classes) == pytest.approx(ref, abs=1e-12)
    # ground truth as a strong-label table
    rows = [(cid, on, off, lab) for cid, evs in gt.items() for on, off, lab in evs]
    table = pd.DataFrame(rows, columns=["segment_id", "start_time_seconds", "end_time_seconds", "label"])
    assert psds1(table, x, ids=ids, classes=classes) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="must be a dict"): psds1(gt, plain, [10.0] * len(ids))
    with pytest.raises(ValueError, match="ids"): psds1(gt, x)


def test_frames_to_events_roundtrip(rng):
    ids, classes = ["a", "b"], ["x", "y", "z"]
    targets = (rng.random((2, 250, 3)) < 0.03).astype(np.float32)
    targets = median_filter(targets, 1)
    ev = frames_to_events(targets, ids, classes)
    back = np.zeros_like(targets)
    for b, cid in enumerate(ids):
        for on, off, lab in ev[cid]:
            back[b, round(on / 0.04):round(off / 0.04), classes.index(lab)] = 1
    np.testing.assert_array_equal(back, targets)
    for evs in ev.values():  # sed_scores_eval needs non-touching events per class
        for lab in classes:
            spans = sorted((a, z) for a, z, l in evs if l == lab)
            assert all(z1 < a2 for (_, z1), (a2, _) in zip(spans, spans[1:]))


def test_frames_to_scores_format(rng):
    from sed_scores_eval.base_modules.scores import validate_score_dataframe
    x = rng.random((3, 250, 4))
    sc = frames_to_scores(torch.tensor(x), ["a", "b", "c"], list("wxyz"), durations={"a": 10.0, "b": 9.97, "c": 3.0})
    for cid, n, end in (("a", 250, 10.0), ("b", 250, 9.97), ("c", 75, 3.0)):
        ts, cls = validate_score_dataframe(sc[cid])
        assert cls == list("wxyz") and len(sc[cid]) == n and ts[-1] == end
        np.testing.assert_array_equal(sc[cid][list("wxyz")].to_numpy(), x[["a", "b", "c"].index(cid), :n])
        assert sc[cid][["w"]].to_numpy().flags.writeable
    with pytest.raises(ValueError, match="2 ids"): frames_to_scores(x, ["a", "b"], list("wxyz"))
    with pytest.raises(ValueError, match="not unique"): frames_to_scores(x, ["a", "a", "b"], list("wxyz"))


def test_events_from_real_strong_labels(audioset_meta, rng):
    path = audioset_meta / "strong_eval_sample.tsv"
    table = pd.read_csv(path, sep="\t")
    gt = events_from_table(path)
    assert len(gt) == table.segment_id.nunique()
    assert sum(map(len, gt.values())) == len(table)  # no overlapping same-class events in this sample
    # scores that copy the ground truth at 40 ms resolution detect every event: PSDS1 close to 1
    ids, classes = sorted(gt), sorted(table.label.unique())
    x = np.zeros((len(ids), 250, len(classes)))
    for b, cid in enumerate(ids):
        for on, off, lab in gt[cid]:
            x[b, int(round(on / 0.04)):int(round(off / 0.04)), classes.index(lab)] = 1.0
    assert psds1(gt, x, ids=ids, classes=classes) > 0.95


def test_events_from_table_errors(tmp_path):
    p = tmp_path / "strong.tsv"
    p.write_text("segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
                 "a\t0.0\t1.0\t/m/x\na\t0.5\t2.0\t/m/x\na\t2.0\t3.0\t/m/x\nb\tfoo\t1.0\t/m/x\n")
    with pytest.raises(DataError, match=r"strong.tsv: line 5"): events_from_table(p)
    p.write_text("segment_id\tonset\tlabel\na\t0.0\t/m/x\n")
    with pytest.raises(DataError, match="missing column"): events_from_table(p)
    table = pd.DataFrame({"segment_id": ["a"] * 3, "start_time_seconds": [0.0, 0.5, 2.0],
                          "end_time_seconds": [1.0, 2.0, 3.0], "label": ["/m/x"] * 3})
    assert events_from_table(table) == {"a": [(0.0, 3.0, "/m/x")]}  # overlapping and touching → merged
    assert len(events_from_table(table, merge=False)["a"]) == 3
    with pytest.warns(UserWarning, match="zero-length"):
        assert events_from_table(table.assign(end_time_seconds=[0.0, 2.0, 3.0]))["a"] == [(0.5, 3.0, "/m/x")]


# ---------------------------------------------------------------------------------------------- registry, fastai
def test_registry():
    for name in ("uar", "uaf1", "accuracy", "mean_average_precision", "map", "mauc", "d_prime", "lwlrap",
                 "psds1", "onset_f_measure"):
        assert callable(get_metric(name)) and name in METRICS
    assert get_metric("map") is mean_average_precision
    with pytest.raises(UnknownNameError, match="Valid metric names"): get_metric("UAR_macro")
    with pytest.raises(UnknownNameError, match="Did you mean 'uar'"): get_metric("UAR")


def test_fastai_learner_tracks_multilabel_metrics():
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import BCEWithLogitsLossFlat
    torch.manual_seed(0)
    X = torch.randn(300, 10)
    Y = (X[:, :4] + 0.5 * torch.randn(300, 4) > 0.8).float()
    ds = list(zip(X, Y))
    dls = DataLoaders.from_dsets(ds[:200], ds[200:], bs=25, device="cpu")
    names = ["map", "uaf1", "mauc"]
    learn = Learner(dls, torch.nn.Linear(10, 4), loss_func=BCEWithLogitsLossFlat(),
                    metrics=[fastai_metric(n, "multi") for n in names])
    learn.fit(1, 0.05)
    got = dict(zip(learn.recorder.metric_names[1:-1], learn.recorder.values[-1]))
    probs, targs = learn.get_preds(ds_idx=1)  # sigmoid probabilities
    for n in names: assert got[n] == pytest.approx(get_metric(n)(targs, probs), abs=1e-6)
    assert all(n in CLIP_METRICS for n in names)
