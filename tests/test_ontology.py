"""audiotl_nb.ontology against the real AudioSet metadata and small fixtures written in the official formats."""
import csv
import hashlib
import http.server
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audiotl_nb import ontology as O
from audiotl_nb.cli import main as cli_main
from audiotl_nb.core import DataError, UnknownNameError

EXPECTED = {"all": 527, "speech": 8, "humansounds": 72, "things": 176, "animal": 65, "naturalsounds": 18,
            "nature": 82, "nonhuman": 256, "naturalsources": 154}


@pytest.fixture(scope="module")
def real(audioset_meta):
    ont = O.Ontology.from_json(audioset_meta / "ontology.json")
    labels = O.LabelSpace.from_csv(audioset_meta / "class_labels_indices.csv")
    bal = O.read_segments(audioset_meta / "balanced_train_segments.csv")
    return ont, labels, bal


@pytest.fixture(scope="module")
def raw_nodes(audioset_meta):
    return {n["id"]: n for n in json.loads((audioset_meta / "ontology.json").read_text())}


def _bfs(nodes, root):
    "Independent descendants-or-self of `root` over child_ids."
    seen, todo = {root}, [root]
    while todo:
        for c in nodes[todo.pop()]["child_ids"]:
            if c not in seen: seen.add(c); todo.append(c)
    return seen


# ---------------------------------------------------------------- ontology and labels
@pytest.mark.parametrize("name,n", list(EXPECTED.items()))
def test_preset_class_counts(real, name, n):
    ont, labels, _ = real
    assert len(O.subset_classes(name, ont, labels)) == n


def test_class_counts_independent_of_the_module(raw_nodes, audioset_meta):
    ids = [r["mid"] for r in csv.DictReader(open(audioset_meta / "class_labels_indices.csv"))]
    roots = {"speech": ["/m/09x0r"], "humansounds": ["/m/0dgw9r"], "things": ["/t/dd00041"], "animal": ["/m/0jbk"],
             "naturalsounds": ["/m/059j3w"]}
    roots.update(nature=roots["animal"] + roots["naturalsounds"], nonhuman=roots["animal"] + roots["naturalsounds"] + roots["things"],
                 naturalsources=roots["humansounds"] + roots["animal"] + roots["naturalsounds"])
    for name, rs in roots.items():
        assert len(set(ids) & set().union(*(_bfs(raw_nodes, r) for r in rs))) == EXPECTED[name]
        assert O.AUDIOSET_SUBSETS[name].roots == tuple(rs)


def test_ontology_structure(real, raw_nodes):
    ont, _, _ = real
    assert (len(ont), len(ont.roots)) == (632, 7)
    assert sum(n.abstract for n in ont.nodes.values()) == 23 and sum(n.blacklist for n in ont.nodes.values()) == 67
    parents = {i: set() for i in raw_nodes}
    for i, n in raw_nodes.items():
        for c in n["child_ids"]: parents[c].add(i)
    for i in raw_nodes:
        assert set(ont.parents(i)) == parents[i]
        assert ont.children(i) == raw_nodes[i]["child_ids"]
        assert ont.descendants(i, include_self=True) == _bfs(raw_nodes, i)
    some = list(raw_nodes)[::37]
    for i in some:
        assert ont.ancestors(i) == {a for a in raw_nodes if a != i and i in _bfs(raw_nodes, a)}
    assert set(ont.roots) == {i for i, p in parents.items() if not p}
    assert ont.depth("/m/09x0r") == 2 and ont.branches("Cowbell") == {"/m/0jbk", "/m/04rlf", "/t/dd00041"}


def test_lookup_and_unknown_names(real):
    ont, labels, _ = real
    assert ont.resolve("  dog ") == ont.resolve("Dog") == "/m/0bt9lr"
    with pytest.raises(UnknownNameError) as e: ont.resolve("Dogg")
    assert "Did you mean 'Dog'" in str(e.value) and len(str(e.value)) < 400
    with pytest.raises(KeyError): ont["no such sound"]
    assert ont.search("speech")[:2] == ["/m/09x0r", "/m/05zppz"]
    assert (labels.index("speech"), labels.id(526), len(labels)) == (0, labels.ids[-1], 527)
    with pytest.raises(UnknownNameError, match="Unknown class"): labels.index("/m/nothing")


def test_tree_distance_matches_undirected_shortest_path(real, raw_nodes):
    ont, _, _ = real
    import networkx as nx
    g = nx.Graph()
    for i, n in raw_nodes.items():
        g.add_node(i)
        for c in n["child_ids"]: g.add_edge(i, c)
    for r in ont.roots: g.add_edge("TOP", r)
    for a, b in [("Dog", "Cat"), ("Dog", "Speech"), ("Cowbell", "Bell"), ("Wind", "Engine"), ("Speech", "Speech")]:
        assert ont.distance(a, b) == nx.shortest_path_length(g, ont.resolve(a), ont.resolve(b))


@pytest.mark.parametrize("text,msg", [
    ('[{"id": "/x/a", "name": "A", "child_ids": ["/x/b"]}, {"id": "/x/b", "name": "B", "child_ids": ["/x/a"]}]', "cycle"),
    ('[{"id": "/x/a", "name": "A", "child_ids": ["/x/q"]}]', "unknown child id '/x/q'"),
    ('[{"id": "/x/a", "name": "A"}, {"id": "/x/a", "name": "B"}]', "entry 1: duplicate node id"),
    ('[{"id": "/x/a"}]', "entry 0: missing or empty name"),
    ('{"id": "/x/a"}', "expected a JSON list"),
    ('[\n{"id": "/x/a",\n"name": }]', "line 3: invalid JSON"),
])
def test_bad_ontology_files(tmp_path, text, msg):
    p = tmp_path / "ontology.json"
    p.write_text(text)
    with pytest.raises(DataError, match=re.escape(msg)) as e: O.Ontology.from_json(p)
    assert "ontology.json" in str(e.value)


@pytest.mark.parametrize("text,msg", [
    ("index,mid\n0,/m/a\n", "line 1: expected the header index,mid,display_name"),
    ('index,mid,display_name\n0,/m/a,"A"\nx,/m/b,"B"\n', "line 3: index 'x' should be 1"),
    ('index,mid,display_name\n0,/m/a,"A"\n1,,"B"\n', "line 3: empty mid"),
    ('index,mid,display_name\n0,/m/a,"A"\n1,/m/b,"B",extra\n', "cannot be read as CSV"),
])
def test_bad_label_files(tmp_path, text, msg):
    p = tmp_path / "class_labels_indices.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=re.escape(msg)) as e: O.LabelSpace.from_csv(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("reader", [O.Ontology.from_json, O.LabelSpace.from_csv, O.read_segments, O.read_strong, O.read_mid_names])
def test_missing_files(tmp_path, reader):
    with pytest.raises(DataError, match="nope.txt: file not found"): reader(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="is a folder"): reader(tmp_path)


# ---------------------------------------------------------------- readers
@pytest.mark.parametrize("fname", ["balanced_train_segments.csv", "eval_segments.csv"])
def test_read_segments_equals_csv_module(audioset_meta, fname):
    df = O.read_segments(audioset_meta / fname)
    lines = (audioset_meta / fname).read_text().splitlines()
    ref = [(n, r) for n, l in enumerate(lines, 1) if not l.startswith("#")
           for r in csv.reader([l], skipinitialspace=True)]
    assert list(df.columns) == list(O.SEGMENT_COLUMNS)
    assert df["line"].tolist() == [n for n, _ in ref]
    assert df["ytid"].tolist() == [r[0] for _, r in ref]
    assert df["labels"].tolist() == [r[3] for _, r in ref]
    np.testing.assert_array_equal(df["start"].to_numpy(), [float(r[1]) for _, r in ref])
    np.testing.assert_array_equal(df["end"].to_numpy(), [float(r[2]) for _, r in ref])
    stated = dict(re.findall(r"(num_\w+)=(\d+)", lines[1]))
    assert len(df) == int(stated["num_segs"])
    assert df["labels"].str.count(",").sum() + len(df) == int(stated["num_positive_labels"])


GOOD = ['--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"', '--ZhevVpy1s, 50.000, 60.000, "/m/012xff"']


@pytest.mark.parametrize("bad,msg", [
    ('--aaILOrkII, 0.000, 10.000, /m/09x0r,/m/0jbk', "expected 4 fields"),
    ('--aaILOrkII, 0.000, 10.000', "found 3"),
    ('--aaILOrkII, zero, 10.000, "/m/09x0r"', "start_seconds 'zero' is not a number"),
    ('--aaILOrkII, 0.000, , "/m/09x0r"', "end_seconds '' is not a number"),
    ('--aaILOrkII, 20.000, 10.000, "/m/09x0r"', "is after end_seconds"),
    ('--aaILOrkII, 0.000, 10.000, ""', "no positive labels"),
    ('--aaILOrkII, 0.000, 10.000, "/m/09x0r,"', "empty label"),
    (', 0.000, 10.000, "/m/09x0r"', "empty YTID"),
    ('--aaILOrkII, 0.000, 10.000, "/m/09x0r', "cannot be parsed"),
])
def test_malformed_segment_line(tmp_path, bad, msg):
    p = tmp_path / "segs.csv"
    p.write_text("# a comment\n# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join(GOOD[:1] + [bad] + GOOD[1:]) + "\n")
    with pytest.raises(DataError) as e: O.read_segments(p)
    assert f"{p}, line 4: " in str(e.value) and msg in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        ok = O.read_segments(p, on_bad="skip")
    assert ok["line"].tolist() == [3, 5] and ok.attrs["bad_lines"][0][0] == 4


def test_fast_and_careful_paths_agree(audioset_meta, tmp_path):
    src = (audioset_meta / "eval_segments.csv").read_text().splitlines()
    p = tmp_path / "s.csv"
    p.write_text("\n".join(src[:1000] + ["broken line"] + src[1000:]) + "\n")
    with pytest.warns(UserWarning): careful = O.read_segments(p, on_bad="skip")
    fast = O.read_segments(audioset_meta / "eval_segments.csv")
    pd.testing.assert_frame_equal(careful.drop(columns="line").reset_index(drop=True), fast.drop(columns="line"))
    assert careful["line"].iloc[996] == 1000 and careful["line"].iloc[997] == 1002


def test_empty_and_comment_only_segments(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("# nothing here\n")
    df = O.read_segments(p)
    assert len(df) == 0 and list(df.columns) == list(O.SEGMENT_COLUMNS)


def test_strong_reader_and_unknown_ids(audioset_meta, real, tmp_path):
    ont, labels, _ = real
    mids = O.read_mid_names(audioset_meta / "mid_to_display_name.tsv")
    missing = mids[~mids["id"].isin(list(ont.nodes))]["id"].tolist()
    assert (len(mids), len(missing)) == (456, 32)
    rows = (audioset_meta / "strong_train_sample.tsv").read_text().splitlines()
    extra = [f"Abc_{k}000\t{k % 10}.0\t10.000\t{m}" for k, m in enumerate(missing)] + [f"Abc_0\t0.5\t10.0\t{missing[0]}"]
    p = tmp_path / "audioset_train_strong.tsv"
    p.write_text("\n".join(rows + extra) + "\n")
    df = O.read_strong(p, ont)
    assert len(df) == len(rows) - 1 + 33
    assert df.attrs["unknown_ids"] == {m: (2 if m == missing[0] else 1) for m in missing}
    assert int((~df["in_ontology"]).sum()) == 33
    assert (df["end"].iloc[-33:] == 10.0).all()
    summ = O.strong_summary(df, ont, labels)
    assert summ.loc[missing[0], "events"] == 2 and not summ.loc[missing[0], "in_ontology"]
    ref = pd.read_csv(p, sep="\t")
    np.testing.assert_array_equal(df["start"].to_numpy(), ref["start_time_seconds"].to_numpy())
    assert df["label"].tolist() == ref["label"].tolist()


def test_strong_malformed(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("segment_id\tstart_time_seconds\tend_time_seconds\tlabel\na_0\t0.0\t1.0\t/m/x\na_0\t0.0\tlate\t/m/x\n")
    with pytest.raises(DataError, match=r"s\.tsv, line 3: end_time_seconds 'late' is not a number"): O.read_strong(p)


# ---------------------------------------------------------------- selection and statistics
def _naive_propagate(raw_nodes, labelset):
    parents = {}
    for i, n in raw_nodes.items():
        for c in n["child_ids"]: parents.setdefault(c, set()).add(i)
    def anc(i):
        out, todo = set(), [i]
        while todo:
            for p in parents.get(todo.pop(), ()):
                if p not in out: out.add(p); todo.append(p)
        return out
    return {i: {a for a in anc(i) if a in labelset} for i in labelset}


@pytest.mark.parametrize("propagate", [False, True])
def test_select_and_stats_match_naive_sets(real, raw_nodes, propagate):
    ont, labels, bal = real
    lab = set(labels.ids)
    up = _naive_propagate(raw_nodes, lab)
    clips = []
    for ls in bal["labels"]:
        s = set(ls.split(","))
        clips.append(s | set().union(*(up[i] for i in s)) if propagate else s)
    idx = O.segment_labels(bal, labels)
    for name in EXPECTED:
        S = set(O.subset_classes(name, ont, labels))
        kept = [(r, c & S) for r, c in enumerate(clips) if c & S]
        sel = O.select_subset(bal, name, ont, labels, propagate=propagate, index=idx)
        assert sel.index.tolist() == [r for r, _ in kept]
        assert [set(t.split(",")) for t in sel["targets"]] == [k for _, k in kept]
        st = O.subset_stats(bal, name, ont, labels, propagate, idx)
        assert (st.n_samples, st.n_targets) == (len(kept), sum(len(k) for _, k in kept))
        Y = O.multi_hot(sel["targets"], sel.attrs["classes"])
        np.testing.assert_array_equal(Y.sum(0).astype(int), st.per_class.to_numpy())


def test_random_fractions_and_size_matched(real):
    ont, labels, bal = real
    idx = O.segment_labels(bal, labels)
    for name, frac in O.RANDOM_FRACTIONS.items():
        a, b = O.pretraining_set(bal, name, ont, labels, index=idx), O.pretraining_set(bal, name, ont, labels)
        assert len(a) == round(frac * len(bal)) and a.index.equals(b.index)
        assert [set(t.split(",")) for t in a["targets"]] == [set(t.split(",")) for t in a["labels"]]
    other = O.random_fraction(bal, 0.3, seed=0)
    assert len(set(other.index) ^ set(O.random_fraction(bal, 0.3).index)) > 0
    for s in ["speech", "animal"]:
        m = O.pretraining_set(bal, f"matched-{s}", ont, labels, index=idx)
        assert len(m) == O.subset_stats(bal, s, ont, labels, index=idx).n_samples
        assert m.attrs["classes"] == labels.ids and m.attrs["subset"] == f"matched-{s}"
    with pytest.raises(UnknownNameError, match="random30"): O.pretraining_set(bal, "random50", ont, labels)


def test_table_i(real, audioset_meta):
    ont, labels, bal = real
    tab = O.subset_table(bal, ont, labels)
    assert tab["classes"].to_dict() == EXPECTED
    assert tab.loc["all", "samples"] == len(bal)
    assert (tab["paper_classes"].drop("things") == tab["classes"].drop("things")).all()
    assert tab.loc["things", "paper_classes"] == 167


def test_unknown_subset_lists_valid_names(real):
    ont, labels, bal = real
    with pytest.raises(UnknownNameError) as e: O.select_subset(bal, "birds", ont, labels)
    for k in EXPECTED: assert k in str(e.value)


# ---------------------------------------------------------------- a different ontology
TOY_NODES = [
    {"id": "/t/wild", "name": "Wildlife", "child_ids": ["/t/bird", "/t/frog"], "restrictions": ["abstract"]},
    {"id": "/t/bird", "name": "Bird", "child_ids": ["/t/song", "/t/bell"]},
    {"id": "/t/song", "name": "Bird song"},
    {"id": "/t/frog", "name": "Frog"},
    {"id": "/t/mach", "name": "Machines", "child_ids": ["/t/engine", "/t/bell"]},
    {"id": "/t/engine", "name": "Engine"},
    {"id": "/t/bell", "name": "Bell"},
]
TOY_CLASSES = [("/t/bird", "Bird"), ("/t/song", "Bird song"), ("/t/frog", "Frog"), ("/t/engine", "Engine"), ("/t/bell", "Bell")]


@pytest.fixture
def toy(tmp_path):
    o, l = O.write_ontology(tmp_path, TOY_NODES, TOY_CLASSES)
    (tmp_path / "balanced_train_segments.csv").write_text(
        "# toy\n# YTID, start_seconds, end_seconds, positive_labels\n"
        'a, 0.000, 10.000, "/t/song"\nb, 0.000, 10.000, "/t/engine,/t/bell"\nc, 0.000, 10.000, "/t/frog,/t/song"\n')
    return tmp_path, O.Ontology.from_json(o), O.LabelSpace.from_csv(l)


def test_presets_on_a_different_ontology(toy):
    root, ont, labels = toy
    assert O.available_subsets(ont) == ["all"]
    with pytest.raises(UnknownNameError) as e: O.subset_classes("speech", ont, labels)
    assert "Subset 'speech' needs it" in str(e.value) and "presets available there: all" in str(e.value)
    assert O.subset_classes("nonhuman", ont, labels, missing="empty") == []
    assert O.subset_classes("all", ont, labels) == [c for c, _ in TOY_CLASSES]
    seg = O.read_segments(root / "balanced_train_segments.csv")
    tab = O.subset_table(seg, ont, labels, subsets=["all", O.make_subset("Machines", ontology=ont)])
    assert tab["classes"].tolist() == [5, 2] and tab["samples"].tolist() == [3, 1]
    sel = O.select_subset(seg, ["Wildlife"], ont, labels)
    assert sel["targets"].tolist() == ["/t/song", "/t/bell", "/t/song,/t/frog"]
    assert sel.attrs["classes"] == ["/t/bird", "/t/song", "/t/frog", "/t/bell"]


def test_cli_table_on_a_different_ontology(toy, capsys):
    root, _, _ = toy
    rc = cli_main(["ontology-table", "--ontology", str(root / "ontology.json"), "--labels", str(root / "class_labels_indices.csv"),
                   "--segments", str(root / "balanced_train_segments.csv"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out) == {"all": {"classes": 5, "samples": 3}}
    rc = cli_main(["ontology-table", "--ontology", str(root / "ontology.json"), "--labels", str(root / "class_labels_indices.csv"),
                   "--subsets", "animal"])
    assert rc == 2 and "Unknown ontology node '/m/0jbk'" in capsys.readouterr().err


def test_synthetic_world_ontology(tmp_path, monkeypatch):
    synth = pytest.importorskip("audiotl_nb.synth")
    monkeypatch.setenv("AUDIOTL_CACHE", str(tmp_path / "cache"))
    world = synth.make_world(tmp_path / "world")
    root = Path(world.audioset)
    ont, labels = O.Ontology.from_json(root / "ontology.json"), O.LabelSpace.from_csv(root / "class_labels_indices.csv")
    seg = O.read_segments(root / "balanced_train_segments.csv")
    tab = O.subset_table(seg, ont, labels)
    assert tab.loc["all", "classes"] == len(labels) and tab.loc["all", "samples"] == len(seg)
    for name in O.available_subsets(ont):
        sel = O.select_subset(seg, name, ont, labels)
        assert set(",".join(sel["targets"]).split(",")) <= set(sel.attrs["classes"]) | {""}


def test_similarity_hand_computed(toy):
    _, ont, labels = toy
    s = O.ontology_similarity(O.make_subset("Machines", ontology=ont), ["Bird song", "Engine", "Frog"], ont, labels)
    # Song-Bird-Bell = 2; Engine in the subset; Frog-Bird-Bell = 3 (not via the top node: Frog-Wildlife-top-Machines-Engine = 4)
    assert s["mean_distance"] == pytest.approx(5 / 3)
    assert s["score"] == pytest.approx((1 / 3 + 1 + 1 / 4) / 3)
    assert s["coverage"] == pytest.approx(1 / 3)


def test_explorer_headless(real):
    ont, labels, bal = real
    ex = O.OntologyExplorer(ont, labels, bal)
    for name, n in EXPECTED.items():
        ex.preset.value = name
        assert ex.n_classes == n
        assert ex.n_samples == O.subset_stats(bal, name, ont, labels).n_samples
    ex.include.value = ("/m/0jbk", "/m/059j3w")
    assert ex.preset.value == "(custom)" and ex.n_classes == 82
    assert f"<b>82</b> classes" in ex.summary.value and "Natural sounds" in ex.details.value


# ---------------------------------------------------------------- CLI and downloads
def test_cli_ontology_table_json(audioset_meta, capsys):
    args = ["ontology-table", "--ontology", str(audioset_meta / "ontology.json"), "--labels",
            str(audioset_meta / "class_labels_indices.csv"), "--json"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out) == {k: {"classes": v} for k, v in EXPECTED.items()}
    segs = [str(audioset_meta / "balanced_train_segments.csv"), str(audioset_meta / "eval_segments.csv")]
    assert cli_main(args + ["--segments", *segs]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["all"] == {"classes": 527, "samples": 22160 + 20371}
    assert cli_main(args + ["--subsets", "spech"]) == 2
    assert "Did you mean 'speech'" in capsys.readouterr().err
    assert cli_main(["ontology-table", "--ontology", "/nonexistent/ontology.json", "--labels", "x"]) == 2
    assert "/nonexistent/ontology.json: file not found" in capsys.readouterr().err


META = ["balanced_train_segments.csv", "eval_segments.csv", "class_labels_indices.csv", "ontology.json"]


@pytest.fixture
def mirror(audioset_meta, tmp_path):
    d = tmp_path / "mirror"
    d.mkdir()
    for f in META: shutil.copy(audioset_meta / f, d / f)
    return d


def _sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    "The standard library's handler: no Range support (always 200 with the whole file)."
    def log_message(self, *a): pass


def test_download_cli_against_local_server(mirror, tmp_path, capsys):
    dest = tmp_path / "meta"
    with O.local_mirror(mirror) as url:
        assert url.startswith("http://127.0.0.1:")
        rc = cli_main(["audioset", "download-meta", str(dest), "--base-url", url, "--files", *META])
    assert rc == 0
    out = capsys.readouterr().out
    assert "4 of 4 files ready" in out
    sums = dict(l.split("  ")[::-1] for l in (dest / "SHA256SUMS").read_text().splitlines())
    assert sums == {f: _sha(mirror / f) for f in META}
    for f in META: assert (dest / f).read_bytes() == (mirror / f).read_bytes()
    assert not list(dest.glob("*.part"))
    with O.local_mirror(mirror) as url:
        assert cli_main(["audioset", "download-meta", str(dest), "--base-url", url, "--files", "audioset_eval_strong.tsv"]) == 1
    assert "HTTP 404" in capsys.readouterr().out
    assert cli_main(["audioset", "download-meta", str(dest), "--files", "ontology"]) == 2
    assert "Did you mean 'ontology.json'" in capsys.readouterr().err


def test_resume_with_range(mirror, tmp_path):
    seen = []
    class Logged(O._RangeHandler):
        def send_head(self):
            seen.append(self.headers.get("Range")); return super().send_head()
    dest = tmp_path / "meta"; dest.mkdir()
    full = (mirror / "eval_segments.csv").read_bytes()
    (dest / "eval_segments.csv.part").write_bytes(full[:100_000])
    with O.local_mirror(mirror, handler=Logged) as url:
        rep = O.download_meta(dest, url, ["eval_segments.csv"], log=None)
    assert seen == ["bytes=100000-"]
    assert rep.loc[0, "status"] == "resumed" and rep.loc[0, "resumed_from"] == 100_000
    assert (dest / "eval_segments.csv").read_bytes() == full and rep.loc[0, "sha256"] == _sha(mirror / "eval_segments.csv")


def test_server_without_range_support_restarts(mirror, tmp_path):
    dest = tmp_path / "meta"; dest.mkdir()
    (dest / "ontology.json.part").write_bytes(b"garbage that is not the start of the file")
    with O.local_mirror(mirror, handler=_Quiet) as url:
        rep = O.download_meta(dest, url, ["ontology.json"], log=None)
    assert rep.loc[0, "status"] == "downloaded" and rep.loc[0, "sha256"] == _sha(mirror / "ontology.json")


def test_dropped_connection_is_resumed(mirror, tmp_path):
    seen = []
    class Flaky(O._RangeHandler):
        def do_GET(self):
            seen.append(self.headers.get("Range"))
            if len(seen) > 1: return super().do_GET()
            data = (mirror / "balanced_train_segments.csv").read_bytes()
            self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data[:300_000]); self.wfile.flush()
            self.close_connection = True
    dest = tmp_path / "meta"
    with O.local_mirror(mirror, handler=Flaky) as url:
        rep = O.download_meta(dest, url, ["balanced_train_segments.csv"], retries=2, backoff=0, log=None)
    assert seen == [None, "bytes=300000-"]
    assert rep.loc[0, "status"] == "resumed" and rep.loc[0, "resumed_from"] == 300_000
    assert rep.loc[0, "sha256"] == _sha(mirror / "balanced_train_segments.csv")


def test_part_longer_than_file_restarts(mirror, tmp_path):
    dest = tmp_path / "meta"; dest.mkdir()
    size = (mirror / "class_labels_indices.csv").stat().st_size
    (dest / "class_labels_indices.csv.part").write_bytes(b"x" * (size + 10))
    with O.local_mirror(mirror) as url:
        rep = O.download_meta(dest, url, ["class_labels_indices.csv"], log=None)
    assert rep.loc[0, "status"] == "downloaded" and rep.loc[0, "sha256"] == _sha(mirror / "class_labels_indices.csv")
