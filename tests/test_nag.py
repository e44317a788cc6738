"""NAG (queries/nag.sql, queries/nag_frames.py, queries/nag.py) against pure Python/numpy.

Real captures: MiniLM and a tiny random Qwen3 over Tiny Shakespeare speeches (speaker =
dataset), Python snippets, a duplicated text (ties) and an empty text (no tokens for the
Qwen tokenizer). The reference reads the raw Parquet parts with pyarrow and applies the
issue's definitions directly; SQL and Polars must give its document ids exactly and its
distances within 1e-9, and each other's rows exactly.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import warehouse
from ingest.demo import DEMO_TEXT, speeches
from ingest.sources import Document
from queries import nag, nag_frames
from warehouse.errors import BadInput, QueryError

from .cli_runner import run_cli

K = 6
CODE = [
    "import os\nprint(os.getcwd())",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y",
    "with open('f.txt') as fh:\n    data = fh.read()",
    "import json\nprint(json.dumps({'a': 1}))",
]
DUPLICATE = "MENENIUS:\nWhat work's, my countrymen, in hand? where go you?"


def documents() -> list[Document]:
    docs = []
    for i, doc in enumerate(speeches(DEMO_TEXT)[:48]):
        meta = {"edu": round((i * 7 % 11) / 10, 1)} if i % 5 else {}
        docs.append(Document(doc.doc_id, doc.text, dataset=doc.dataset, role="pool", meta=meta))
    docs += [
        Document(f"code:{i}", text, dataset="python", role="pool", meta={"edu": 0.5}) for i, text in enumerate(CODE)
    ]
    docs += [Document(f"dup:{i}", DUPLICATE, dataset="dup", role="pool") for i in (1, 0)]
    docs.append(Document("empty:0", "", dataset="empty", role="pool"))
    return docs


@pytest.fixture(scope="module")
def wh(tmp_path_factory, tiny_lm_dir):
    from ingest.pipeline import ingest

    root = tmp_path_factory.mktemp("nag") / "wh"
    for run, model in (("m", "minilm"), ("q", str(tiny_lm_dir))):
        ingest(
            root,
            model,
            sites=[f"mlp.up:nag={K}"],
            documents=documents(),
            run_id=run,
            batch_size=8,
            max_length=24,
            device="cpu",
            progress=False,
        )
    with warehouse.open(root) as opened:
        yield opened


# -- the reference ------------------------------------------------------------------
def raw(wh, run):
    """(documents as dicts by doc, {(layer, doc): [units in rank order]}) straight from the Parquet parts."""
    docs = {r["doc"]: r for r in pq.read_table([str(p) for p in wh.files("documents", run)]).to_pylist()}
    ranked = defaultdict(list)
    for part in wh.manifest(run)["parts"]:
        if part["table"] == "doc_neurons":
            for row in pq.read_table(wh.root / part["path"]).to_pylist():
                ranked[(part["layer"], row["doc"])].append((row["rank"], row["neuron"]))
    return docs, {key: [n for _, n in sorted(v)] for key, v in ranked.items()}


def all_layers(nags):
    return sorted({layer for layer, _ in nags})


def ref_profile(nags, targets, layers, power=1.0):
    weights = {}
    for layer in layers:
        counts = Counter(n for doc in targets for n in nags.get((layer, doc), []))
        total = sum(c**power for c in counts.values())
        weights[layer] = {n: c**power / total for n, c in counts.items()}
    return weights


def ref_distance(docs, nags, targets, pool, layers, power=1.0):
    weights = ref_profile(nags, targets, layers, power)
    out = {}
    for doc in pool:
        total = sum(weights[layer].get(n, 0.0) for layer in layers for n in nags.get((layer, doc), []))
        out[doc] = 1.0 - total / len(layers)
    return out


def ref_budget(docs, key, fraction):
    order = sorted(key, key=lambda d: (round(key[d], 12), docs[d]["doc_id"], d))
    budget = math.floor(fraction * sum(docs[d]["n_tokens"] for d in key))
    kept, used = [], 0
    for doc in order:
        used += docs[doc]["n_tokens"]
        if used > budget:
            break
        kept.append(doc)
    return kept or order[:1]


def pick(docs, **where):
    return [d for d, r in docs.items() if all(r[k] == v for k, v in where.items())]


def sql(wh, macro, *args, **named):
    listed = [nag._sql_literal(a) for a in args] + [f"{k} := {nag._sql_literal(v)}" for k, v in named.items()]
    return wh.pl(f"SELECT * FROM {macro}({', '.join(listed)})")


def both(wh, macro, *args, **named):
    """The macro's rows and its Polars twin's rows, which must be equal."""
    from_sql = sql(wh, macro, *args, **named)
    twin = getattr(nag_frames, macro)(wh, *args, **named).collect()
    if macro == "nag_distance":  # the only macro without an ORDER BY
        from_sql, twin = from_sql.sort("doc"), twin.sort("doc")
    assert from_sql.columns == twin.columns
    assert from_sql.equals(twin), f"{macro}: SQL and Polars differ"
    return from_sql


# -- formulas -------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["m", "q"])
@pytest.mark.parametrize("power,layers", [(1.0, None), (2.0, None), (1.0, [0, 1])])
def test_profile_matches_reference(wh, run, power, layers):
    docs, nags = raw(wh, run)
    used = layers or all_layers(nags)
    targets = pick(docs, dataset="MENENIUS")
    got = both(wh, "nag_profile", run, "mlp.up", target_dataset="MENENIUS", layers=layers, power=power)
    ref = ref_profile(nags, targets, used, power)
    assert sorted(zip(got["layer"], got["neuron"])) == sorted((lyr, n) for lyr in ref for n in ref[lyr])
    for layer, neuron, n_docs, weight in got.iter_rows():
        assert n_docs == sum(neuron in nags.get((layer, d), []) for d in targets)
        assert weight == pytest.approx(ref[layer][neuron], abs=1e-12)
    assert got.group_by("layer").agg(pl.col("weight").sum())["weight"].to_list() == pytest.approx([1.0] * len(used))


@pytest.mark.parametrize("run", ["m", "q"])
@pytest.mark.parametrize("layers", [None, [1], [0, 1]])
def test_distance_matches_reference(wh, run, layers):
    docs, nags = raw(wh, run)
    used = layers or all_layers(nags)
    got = both(wh, "nag_distance", run, run, "mlp.up", target_dataset="MENENIUS", layers=layers)
    ref = ref_distance(docs, nags, pick(docs, dataset="MENENIUS"), list(docs), used)
    assert sorted(got["doc"].to_list()) == sorted(docs)
    for doc, doc_id, dataset, n_tokens, similarity, distance in got.iter_rows():
        assert (doc_id, dataset, n_tokens) == (docs[doc]["doc_id"], docs[doc]["dataset"], docs[doc]["n_tokens"])
        assert distance == pytest.approx(ref[doc], abs=1e-9)
        assert similarity + distance == pytest.approx(1.0, abs=1e-15)
    targets = got.filter(pl.col("dataset") == "MENENIUS")["distance"].mean()
    assert targets < got.filter(pl.col("dataset") == "python")["distance"].mean()


@pytest.mark.parametrize("run", ["m", "q"])
@pytest.mark.parametrize("fraction,layers", [(0.2, None), (0.5, None), (0.3, [0, 1]), (1.0, None)])
def test_select_matches_reference(wh, run, fraction, layers):
    docs, nags = raw(wh, run)
    used = layers or all_layers(nags)
    pool = pick(docs, role="pool")
    ref = ref_budget(docs, ref_distance(docs, nags, pick(docs, dataset="First Citizen"), pool, used), fraction)
    got = both(wh, "nag_select", run, run, "mlp.up", target_dataset="First Citizen", layers=layers, fraction=fraction)
    assert got["doc"].to_list() == ref
    assert got["rank"].to_list() == list(range(1, len(ref) + 1))
    assert got["cum_tokens"].to_list() == np.cumsum([docs[d]["n_tokens"] for d in ref]).tolist()


@pytest.mark.parametrize("run", ["m", "q"])
@pytest.mark.parametrize("invert", [False, True])
def test_quality_matches_reference(wh, run, invert):
    docs, nags = raw(wh, run)
    distance = ref_distance(docs, nags, pick(docs, dataset="MENENIUS"), list(docs), all_layers(nags))
    quality = {d: json.loads(r["meta"]).get("edu") if r["meta"] else None for d, r in docs.items()}

    def minmax(values):
        known = [v for v in values.values() if v is not None]
        low, high = min(known), max(known)
        return {d: None if v is None else ((v - low) / (high - low) if high > low else 0.0) for d, v in values.items()}

    dist, qual = minmax(distance), minmax(quality)
    score = {d: dist[d] + (1.0 if qual[d] is None else (1 - qual[d] if invert else qual[d])) for d in docs}
    got = both(wh, "nag_quality", run, run, "mlp.up", "edu", target_dataset="MENENIUS", invert=invert, fraction=0.3)
    assert got["doc"].to_list() == ref_budget(docs, score, 0.3)
    for doc, q, s in zip(got["doc"], got["quality"], got["score"]):
        assert q == quality[doc] and s == pytest.approx(score[doc], abs=1e-9)


@pytest.mark.parametrize("run", ["m", "q"])
@pytest.mark.parametrize("power,layers", [(1.0, None), (0.5, [0, 1])])
def test_unit_weights_match_the_profile(wh, run, power, layers):
    docs, nags = raw(wh, run)
    used = layers or all_layers(nags)
    got = both(wh, "nag_unit_weights", run, run, "mlp.up", target_dataset="MENENIUS", layers=layers, power=power)
    ref = ref_profile(nags, pick(docs, dataset="MENENIUS"), used, power)
    stride = wh.pl(f"SELECT width FROM sites WHERE run_id = '{run}' AND site = 'mlp.up'")["width"][0]
    assert sorted(got["unit_key"].to_list()) == sorted(layer * stride + n for layer in used for n in ref[layer])
    for key, units, per_unit in got.iter_rows():
        assert units * per_unit * len(used) == pytest.approx(ref[key // stride][key % stride], abs=1e-9)


@pytest.mark.parametrize(
    "macro,named",
    [("nag_distance", {}), ("nag_select", {"fraction": 0.3}), ("nag_quality", {"fraction": 0.3, "invert": True})],
)
def test_staged_weights_give_the_same_rows(wh, macro, named):
    """weights := a table of nag_unit_weights is the fast path for big pools: same rows, bit for bit."""
    quality = ["edu"] if macro == "nag_quality" else []
    args = ["q", "q", "mlp.up", *quality]
    inline = both(wh, macro, *args, target_dataset="MENENIUS", **named)
    with nag.staged_weights(wh, "q", "q", "mlp.up", target_dataset="MENENIUS") as table:
        staged = sql(wh, macro, *args, target_dataset="MENENIUS", weights=table, **named)
    weights = nag_frames.nag_unit_weights(wh, "q", "q", "mlp.up", target_dataset="MENENIUS").collect()
    twin = getattr(nag_frames, macro)(wh, *args, target_dataset="MENENIUS", weights=weights, **named).collect()
    if macro == "nag_distance":
        staged, twin = staged.sort("doc"), twin.sort("doc")
    assert staged.equals(inline) and twin.equals(inline)
    assert wh.pl(f"SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = '{table}'")["n"][0] == 0  # dropped


def test_select_sums_by_array_and_restores_the_setting(wh):
    """nag.select lets DuckDB sum per document into an array (perfect hash aggregate), with
    the rows of the default plan, and leaves the connection's setting as it found it."""
    threshold = "SELECT current_setting('perfect_ht_threshold') AS t"
    before = wh.pl(threshold)["t"][0]
    picked = nag.select(wh, "m", "m", "mlp.up", target_dataset="MENENIUS", fraction=0.3)
    assert wh.pl(threshold)["t"][0] == before
    assert picked.equals(both(wh, "nag_select", "m", "m", "mlp.up", target_dataset="MENENIUS", fraction=0.3))
    with pytest.raises(QueryError, match="no pool document has a number"):  # fails inside the query
        nag.select(wh, "m", "m", "mlp.up", target_dataset="MENENIUS", quality_column="nothing")
    assert wh.pl(threshold)["t"][0] == before


# -- edge cases ------------------------------------------------------------------------
def test_ties_break_by_doc_id(wh):
    got = both(wh, "nag_distance", "m", "m", "mlp.up", target_dataset="MENENIUS").filter(pl.col("dataset") == "dup")
    assert got["distance"][0] == got["distance"][1]  # identical NAGs tie exactly
    ranked = both(wh, "nag_select", "m", "m", "mlp.up", target_dataset="MENENIUS", fraction=1.0)
    dup = ranked.filter(pl.col("dataset") == "dup")
    assert dup["doc_id"].to_list() == ["dup:0", "dup:1"] and dup["rank"][1] == dup["rank"][0] + 1


def test_zero_token_document(wh):
    docs, _ = raw(wh, "q")
    empty = pick(docs, dataset="empty")
    assert [docs[d]["n_tokens"] for d in empty] == [0]
    got = both(wh, "nag_distance", "q", "q", "mlp.up", target_dataset="MENENIUS").filter(pl.col("dataset") == "empty")
    assert got.select("n_tokens", "similarity", "distance").row(0) == (0, 0.0, 1.0)


def test_empty_target_gives_distance_one(wh):
    got = both(wh, "nag_distance", "q", "q", "mlp.up", target_dataset="empty")
    assert set(got["distance"]) == {1.0}
    picked = both(wh, "nag_select", "q", "q", "mlp.up", target_dataset="empty", fraction=0.2)
    assert picked["doc_id"].to_list() == sorted(picked["doc_id"].to_list())  # all tie: doc_id order


def test_budget_smaller_than_first_document_keeps_it(wh):
    got = both(wh, "nag_select", "m", "m", "mlp.up", target_dataset="MENENIUS", fraction=1e-9)
    assert got.height == 1 and got["rank"].to_list() == [1]
    first = both(wh, "nag_distance", "m", "m", "mlp.up", target_dataset="MENENIUS").sort("distance", "doc_id")
    assert got["doc"][0] == first["doc"][0]


BAD = [
    (dict(target_dataset="NOBODY"), "has no documents of dataset 'NOBODY'"),
    (dict(pool_dataset="NOBODY"), "has no documents of dataset 'NOBODY'"),
    (dict(layers=[0, 99]), "layers [99] are not layers of site 'mlp.up'"),
    (dict(layers=[]), "selects no layer"),
    (dict(target_role="nobody"), "has no documents of role 'nobody'"),
]


@pytest.mark.parametrize("named,message", BAD, ids=[m[:28] for _, m in BAD])
def test_bad_input_names_the_fix(wh, named, message):
    with pytest.raises(QueryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sql(wh, "nag_distance", "m", "m", "mlp.up", **named)
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        nag_frames.nag_distance(wh, "m", "m", "mlp.up", **named).collect()


def test_bad_site_run_fraction_quality(wh):
    for call, message in [
        (lambda: nag_frames.nag_distance(wh, "m", "m", "mlp.act"), "has no NAG site 'mlp.act'"),
        (lambda: nag_frames.nag_select(wh, "m", "m", "mlp.up", fraction=0), "fraction must be in"),
        (lambda: nag_frames.nag_quality(wh, "m", "m", "mlp.up", "nothing").collect(), "no pool document has a number"),
    ]:
        with pytest.raises(BadInput, match=message):
            call()
    for query, message in [
        ("SELECT * FROM nag_distance('m', 'm', 'mlp.act')", "has no NAG site 'mlp.act'"),
        ("SELECT * FROM nag_distance('nope', 'm', 'mlp.up')", "no committed run 'nope'"),
        ("SELECT * FROM nag_select('m', 'm', 'mlp.up', fraction := 0)", "fraction must be in"),
        ("SELECT * FROM nag_quality('m', 'm', 'mlp.up', 'nothing')", "no pool document has a number"),
    ]:
        with pytest.raises(QueryError, match=message):
            wh.pl(query)
    with pytest.raises(BadInput, match="--layers 0-13"):
        nag.parse_layers("zero")


def test_parse_layers():
    assert nag.parse_layers("0-3") == [0, 1, 2, 3]
    assert nag.parse_layers("5, 0,2") == [0, 2, 5]
    assert nag.parse_layers("0-1,4") == [0, 1, 4]
    assert nag.parse_layers(None) is None


def test_demo_query_runs(wh):
    rows = wh.pl(
        "SELECT doc_id, dataset, distance FROM nag_distance('m', 'm', 'mlp.up', target_dataset := 'MENENIUS') "
        "WHERE dataset <> 'MENENIUS' ORDER BY distance LIMIT 5"
    )
    assert rows.height == 5 and rows["distance"].is_sorted()


# -- library: merge, keys, deactivation, PCA -------------------------------------------------
def test_multi_target_merge(wh):
    merged, note = nag.select_targets(wh, [("m", "MENENIUS"), ("m", "First Citizen")], "m", "mlp.up", fraction=0.4)
    separate = [
        nag.select(wh, "m", "m", "mlp.up", target_dataset=t, fraction=0.2) for t in ("MENENIUS", "First Citizen")
    ]
    assert merged.height == sum(s.height for s in separate) and "not de-duplicated" in note
    assert merged["doc_id"].to_list() == [i for s in separate for i in s["doc_id"].to_list()]
    deduped, note = nag.select_targets(
        wh, [("m", "MENENIUS"), ("m", "First Citizen")], "m", "mlp.up", fraction=0.4, dedup=True
    )
    assert deduped["doc_id"].n_unique() == deduped.height and "de-duplicated" in note
    best = (
        pl.concat([s.select("doc_id", "distance") for s in separate]).group_by("doc_id").agg(pl.col("distance").min())
    )
    assert dict(zip(deduped["doc_id"], deduped["nag_distance"])) == dict(zip(best["doc_id"], best["distance"]))


@pytest.mark.parametrize("rule", [dict(top=3), dict(share=0.01)])
def test_deactivation_keys_match_reference(wh, rule):
    docs, nags = raw(wh, "q")
    targets = pick(docs, dataset="MENENIUS")
    counts = [
        (-sum(n in nags.get((lyr, d), []) for d in targets), lyr, n)
        for lyr in all_layers(nags)
        for n in {n for d in targets for n in nags.get((lyr, d), [])}
    ]
    counts.sort()
    if "top" in rule:
        chosen = [(lyr, n) for lyr in all_layers(nags) for _, _, n in [c for c in counts if c[1] == lyr][: rule["top"]]]
    else:
        width = wh.sql("SELECT width FROM sites WHERE run_id = 'q' AND site = 'mlp.up'").fetchall()[0][0]
        chosen = [(lyr, n) for _, lyr, n in counts[: math.ceil(rule["share"] * len(all_layers(nags)) * width)]]
    keys = nag.deactivation_keys(wh, "q", "mlp.up", target_dataset="MENENIUS", **rule)
    assert sorted((int(lyr), n) for lyr, units in keys["layers"].items() for n in units) == sorted(chosen)
    assert keys["n_targets"] == len(targets)


def test_deactivation_keys_past_the_width_keep_every_unit_seen(wh):
    """A --top beyond a layer's units (beyond 64 bits, even) is every unit the targets fired, not an overflow."""
    every = nag.deactivation_keys(wh, "q", "mlp.up", target_dataset="MENENIUS", share=1.0)
    huge = nag.deactivation_keys(wh, "q", "mlp.up", target_dataset="MENENIUS", top=10**20)
    assert huge["layers"] == every["layers"] and huge["rule"] == f"top {10**20} per layer"


def test_deactivate_zeroes_up_proj_rows(wh, tiny_lm_dir):
    import torch

    from ingest.deactivate import deactivate
    from ingest.models import load

    keys = nag.deactivation_keys(wh, "q", "mlp.up", target_dataset="MENENIUS", top=2)
    model = load(str(tiny_lm_dir), "cpu", "float32").model
    assert deactivate(model, keys) == sum(len(v) for v in keys["layers"].values())
    outputs = {}
    hooks = [
        model.model.layers[int(lyr)].mlp.up_proj.register_forward_hook(
            lambda m, a, o, lyr=lyr: outputs.__setitem__(lyr, o)
        )
        for lyr in keys["layers"]
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for handle in hooks:
        handle.remove()
    for layer, units in keys["layers"].items():
        assert torch.all(outputs[layer][..., units] == 0)
        assert torch.all(model.model.layers[int(layer)].mlp.up_proj.weight[units] == 0)
    with pytest.raises(BadInput, match="another model"):
        deactivate(model, {"layers": {"0": [10**6]}})


def test_pca_chart(wh):
    frame = nag.vectors(wh, "m", "mlp.up")
    points = nag.pca(frame)
    assert points.height == frame["doc"].n_unique() and points["pc1"].is_finite().all()
    matrix = (
        frame.pivot(on=["layer", "neuron"], index="doc", values="neuron", aggregate_function="len")
        .fill_null(0)
        .sort("doc")
    )
    dense = matrix.drop("doc").to_numpy().astype(float)
    variance = np.linalg.svd(dense - dense.mean(axis=0), compute_uv=False)[0] ** 2
    assert float((points["pc1"] ** 2).sum()) == pytest.approx(variance, rel=1e-9)
    spec = nag.pca_chart(frame).to_dict()
    assert spec["mark"]["type"] == "circle" and spec["encoding"]["color"]["field"] == "dataset"


# -- CLI ------------------------------------------------------------------------------------


def test_cli_select_merge_keys(wh, tmp_path, capsys, monkeypatch):
    root = wh.root
    a, b = tmp_path / "menenius.parquet", tmp_path / "citizen.parquet"
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "nag",
        "select",
        root,
        "--target",
        "m:MENENIUS",
        "--pool",
        "m",
        "--site",
        "mlp.up",
        "--fraction",
        "0.2",
        "--layers",
        "0-1",
        "--out",
        a,
    )
    assert code == 0, err
    written = pl.read_parquet(a)
    expected = nag.select(wh, "m", "m", "mlp.up", target_dataset="MENENIUS", fraction=0.2, layers=[0, 1])
    assert written["doc_id"].to_list() == expected["doc_id"].to_list()
    assert written["nag_distance"].to_list() == expected["distance"].to_list()
    assert {"text", "dataset", "n_tokens", "meta"} <= set(written.columns) and "selected" in out
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "nag",
        "select",
        root,
        "--target",
        "m:First Citizen",
        "--pool",
        "m",
        "--quality-col",
        "edu",
        "--invert",
        "--engine",
        "polars",
        "--out",
        b,
    )
    assert code == 0, err and "nag_score" in pl.read_parquet(b).columns
    merged = tmp_path / "merged.parquet"
    code, out, err = run_cli(capsys, monkeypatch, "nag", "merge", a, b, "--dedup", "--out", merged)
    assert code == 0 and "de-duplicated" in out
    assert set(pl.read_parquet(merged)["target"]) <= {"menenius", "citizen"}
    keys = tmp_path / "keys.json"
    code, out, err = run_cli(
        capsys, monkeypatch, "nag", "keys", root, "--target", "m:MENENIUS", "--top", "4", "--out", keys
    )
    assert code == 0 and all(len(v) == 4 for v in json.loads(keys.read_text())["layers"].values())
    for args, message in [
        (["nag", "select", root, "--target", "m:NOBODY", "--pool", "m", "--out", a], "has no documents of dataset"),
        (
            ["nag", "select", root, "--target", "m", "--pool", "m", "--layers", "0-40", "--out", a],
            "are not layers of site",
        ),
        (
            ["nag", "select", root, "--target", "m", "--pool", "m", "--invert", "--out", a],
            "--invert applies to --quality-col",
        ),
        (["nag", "keys", root, "--target", "m", "--out", keys], "exactly one of top"),
    ]:
        code, out, err = run_cli(capsys, monkeypatch, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
