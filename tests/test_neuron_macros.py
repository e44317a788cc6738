"""The neuron macros (queries/neurons.sql) against pure Python over the raw Parquet (read with
pyarrow, neither DuckDB nor Polars), against numpy on the model's own dense activations,
and against their Polars twins (queries/neuron_frames.py).

Two real warehouses: MiniLM (conftest `minilm_wh`: mlp.act topk=8,examples=5, special
tokens [CLS]/[SEP]) and a tiny Qwen3 with a threshold capture over two datasets and a
non-ASCII document (mlp.act threshold=0,examples=4; mlp.up topk=5; --logit-lens).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import warehouse
from queries import neuron_frames as nf
from warehouse.errors import BadInput, QueryError, UnknownRun

from . import docgen, reference

LM_TEXTS = {
    "plays": [
        "First Citizen: Before we proceed any further, hear me speak.",
        "You are all resolved rather to die than to famish? " * 3,
        "Café naïve — “quoted” ✓ text.",
    ],
    "code": ["import os\nprint(os.getcwd())", "for i in range(3):\n    print(i * i)"],
}
LM_SITES = ["mlp.act:threshold=0,examples=4", "mlp.up:topk=5"]
RTOL = 1e-6


@pytest.fixture(scope="session")
def lm_wh(tmp_path_factory, tiny_lm_dir):
    """Tiny Qwen3, run 't': a threshold capture (every firing) plus examples, two datasets."""
    from ingest.pipeline import ingest
    from ingest.sources import Document

    documents = [
        Document(f"{name[0]}{i}", text, dataset=name)
        for name, texts in LM_TEXTS.items()
        for i, text in enumerate(texts)
    ]
    root = tmp_path_factory.mktemp("neurons") / "wh"
    ingest(
        root,
        str(tiny_lm_dir),
        sites=LM_SITES,
        documents=documents,
        run_id="t",
        batch_size=3,
        max_length=24,
        device="cpu",
        progress=False,
        logit_lens=True,
    )
    wh = warehouse.open(root)
    yield wh
    wh.close()


@pytest.fixture(scope="session")
def mini(minilm_wh):
    wh = warehouse.open(minilm_wh)
    yield wh
    wh.close()


# -- the raw Parquet, read with pyarrow ------------------------------------------------------


def raw(wh, table: str, run: str) -> list[dict]:
    """Every row of one run's table straight from its Parquet parts, hive columns from the path."""
    rows = []
    for path in wh.files(table, run):
        parts = dict(p.split("=", 1) for p in path.relative_to(wh.root).parts if "=" in p)
        extra = {k: (int(v) if k == "layer" else v) for k, v in parts.items() if k in ("site", "layer")}
        rows.extend({**row, **extra} for row in pq.read_table(path).to_pylist())
    return rows


def stats_rows(wh, run, site, layer=None):
    return sorted(
        (r for r in raw(wh, "neuron_stats", run) if r["site"] == site and (layer is None or r["layer"] == layer)),
        key=lambda r: (r["layer"], r["neuron"]),
    )


def macro(wh, sql: str) -> list[dict]:
    return wh.pl(sql).to_dicts()


def assert_rows(actual: list[dict], expected: list[dict]):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        for key in want:
            if isinstance(want[key], float) and want[key] is not None and got[key] is not None:
                assert got[key] == pytest.approx(want[key], rel=RTOL), key
            else:
                assert got[key] == want[key], key


CASES = [("mini", "r", "mlp.act"), ("lm_wh", "t", "mlp.act")]


@pytest.fixture(params=CASES, ids=lambda c: c[0])
def case(request):
    name, run, site = request.param
    return request.getfixturevalue(name), run, site


# -- neuron_stats macros ---------------------------------------------------------------------


def test_firing_rate_and_activation_frequency(case):
    wh, run, site = case
    everything = stats_rows(wh, run, site)
    for layer in (0, 1):
        expected = [
            {
                "neuron": r["neuron"],
                "n_tokens": r["n_tokens"],
                "n_fired": r["n_fired"],
                "rate": r["n_fired"] / r["n_tokens"],
            }
            for r in everything
            if r["layer"] == layer
        ]
        assert_rows(macro(wh, f"SELECT * FROM firing_rate('{run}', '{site}', {layer})"), expected)
    expected = [
        {"layer": r["layer"], "neuron": r["neuron"], "frequency": r["n_fired"] / r["n_tokens"]} for r in everything
    ]
    assert_rows(macro(wh, f"SELECT * FROM activation_frequency('{run}', '{site}')"), expected)


def test_layer_summary(case):
    wh, run, site = case
    by_layer = defaultdict(list)
    for r in stats_rows(wh, run, site):
        by_layer[r["layer"]].append(r["n_fired"] / r["n_tokens"])
    expected = [
        {
            "layer": layer,
            "n_neurons": len(rates),
            "mean_rate": math.fsum(rates) / len(rates),
            "median_rate": statistics.median(rates),
            "rare_share": sum(r < 0.01 for r in rates) / len(rates),
            "dead_share": sum(r == 0 for r in rates) / len(rates),
        }
        for layer, rates in sorted(by_layer.items())
    ]
    assert_rows(macro(wh, f"SELECT * FROM layer_summary('{run}', '{site}')"), expected)


def _selectivity_reference(wh, run, site, layer):
    rows = []
    for r in stats_rows(wh, run, site, layer):
        mean = r["sum"] / r["n_tokens"]
        positive = r["sum_pos"] if r.get("sum_pos") is not None else r["sum"]  # max / mean positive part
        sel = None if positive == 0 else float(np.float32(r["max"])) / (positive / r["n_tokens"])
        rows.append(
            {
                "neuron": r["neuron"],
                "rate": r["n_fired"] / r["n_tokens"],
                "mean": mean,
                "max": r["max"],
                "selectivity": sel,
            }
        )
    return sorted(rows, key=lambda r: (r["selectivity"] is None, -(r["selectivity"] or 0), r["neuron"]))


def test_selectivity(case):
    wh, run, site = case
    expected = _selectivity_reference(wh, run, site, 1)
    got = macro(wh, f"SELECT * FROM selectivity('{run}', '{site}', 1)")
    assert [r["neuron"] for r in got] == [r["neuron"] for r in expected]
    assert_rows(got, expected)


@pytest.mark.parametrize("bins", [1, 7, 50])
def test_rate_histogram(case, bins):
    wh, run, site = case
    rows = stats_rows(wh, run, site, 2)
    n = rows[0]["n_tokens"]
    counts = defaultdict(int)
    for r in rows:
        f = r["n_fired"]
        counts[0 if f == 0 else min(bins, 1 + math.floor(bins * math.log(f) / math.log(n)))] += 1
        rate = f / n
        if f:  # the documented edges hold the rate
            b = min(bins, 1 + math.floor(bins * math.log(f) / math.log(n)))
            assert n ** ((b - 1) / bins - 1) * (1 - 1e-9) <= rate <= n ** (b / bins - 1) * (1 + 1e-9)
    expected = [
        {
            "bin": b,
            "lo": 0.0 if b == 0 else n ** ((b - 1) / bins - 1),
            "hi": 0.0 if b == 0 else n ** (b / bins - 1),
            "n_neurons": counts[b],
        }
        for b in range(bins + 1)
    ]
    assert_rows(macro(wh, f"SELECT * FROM rate_histogram('{run}', '{site}', 2, bins := {bins})"), expected)


@pytest.mark.parametrize("bins", [1, 9])
@pytest.mark.parametrize("log", [False, True])
def test_selectivity_histogram(case, bins, log):
    wh, run, site = case
    to, back = (math.log, math.exp) if log else (float, float)
    sels = [r["selectivity"] for r in _selectivity_reference(wh, run, site, 2)]
    known = [to(s) for s in sels if s is not None]
    lo, hi = min(known), max(known)
    counts = defaultdict(int)
    for s in sels:
        t = None if s is None else to(s)
        counts[0 if t is None else 1 if hi == lo else min(bins, 1 + math.floor((t - lo) / (hi - lo) * bins))] += 1
    expected = [
        {
            "bin": b,
            "lo": None if b == 0 else back(lo + (hi - lo) * (b - 1) / bins),
            "hi": None if b == 0 else back(lo + (hi - lo) * b / bins),
            "n_neurons": counts[b],
        }
        for b in range(bins + 1)
    ]
    got = macro(wh, f"SELECT * FROM selectivity_histogram('{run}', '{site}', 2, bins := {bins}, log := {log})")
    assert_rows(got, expected)
    assert sum(r["n_neurons"] for r in got) == len(sels)
    if log and bins > 1:  # log bins spread the heavy tail: no single bin holds almost every unit
        assert max(r["n_neurons"] for r in got[1:]) < len(known)


# -- examples --------------------------------------------------------------------------------

M31 = 2**31 - 1


def sample_key(seed, neuron, doc, pos):
    h = 0
    for v in (seed & M31, neuron, doc, pos):
        h = ((h ^ v) * 2654435761) & M31
    for m in (739982445, 695872825):
        h = ((h ^ (h >> 15)) * m) & M31
    return h ^ (h >> 13)


class RawRun:
    """One run's tables as Python dicts, for the examples reference."""

    def __init__(self, wh, run):
        self.sites = {r["site"]: r for r in raw(wh, "sites", run)}
        self.docs = {r["doc"]: r for r in raw(wh, "documents", run)}
        self.tokens = {(r["doc"], r["pos"]): r for r in raw(wh, "tokens", run)}
        self.examples = raw(wh, "neuron_examples", run)
        self.token_neurons = raw(wh, "token_neurons", run)

    def stored(self, site, layer):
        return {
            (r["doc"], r["pos"], r["neuron"]): r["value"]
            for r in self.token_neurons
            if r["site"] == site and r["layer"] == layer
        }

    def examples_of(self, site, layer, kind, k, before, after, seed=0, neuron=None):
        reductions = self.sites[site]["reductions"]
        has_threshold = re.search(r"(^|,)threshold=", reductions) is not None
        n_stored = re.search(r"(^|,)examples=(\d+)", reductions)
        if n_stored and (k <= int(n_stored.group(2)) or not has_threshold):
            candidates = [
                (r["neuron"], r["doc"], r["pos"], r["value"], r["rank"], r.get("window_values"))
                for r in self.examples
                if r["site"] == site and r["layer"] == layer and r["kind"] == kind
            ]
        else:
            assert has_threshold
            candidates = [
                (r["neuron"], r["doc"], r["pos"], r["value"], 0, None)
                for r in self.token_neurons
                if r["site"] == site and r["layer"] == layer
            ]
        per_unit = defaultdict(list)
        for c in candidates:
            if neuron is None or c[0] == neuron:
                per_unit[c[0]].append(c)
        stored = self.stored(site, layer)
        out = []
        for unit in sorted(per_unit):

            def order(c):
                first = (sample_key(seed, *c[:3]),) if kind == "random" else ()
                return (*first, c[4], -c[3], c[1], c[2])

            for rank, (_, doc, pos, value, _, captured) in enumerate(sorted(per_unit[unit], key=order)[:k]):
                out.append(
                    {
                        "neuron": unit,
                        "rank": rank,
                        "doc_id": self.docs[doc]["doc_id"],
                        "pos": pos,
                        "value": value,
                        **self.window(unit, doc, pos, value, before, after, stored, captured),
                    }
                )
        return out

    def window(self, unit, doc, at, value, before, after, stored, captured=None):
        """The window's tokens; a value is the example's own at its token, else the one captured with the
        example (window_values: 50 before .. 20 after), else token_neurons' (None where not stored)."""

        def value_at(p):
            if p == at:
                return value
            if captured is not None and -50 <= p - at <= 20 and captured[p - at + 50] is not None:
                return captured[p - at + 50]
            return stored.get((doc, p, unit))

        window = [self.tokens[(doc, p)] for p in range(at - before, at + after + 1) if (doc, p) in self.tokens]
        tokens = [
            {
                "piece": t["piece"],
                "text": t["piece"] if t.get("text") is None else t["text"],
                "value": value_at(t["pos"]),
            }
            for t in window
        ]
        starts = [t["char_start"] for t in window if t["char_start"] is not None]
        ends = [t["char_end"] for t in window if t["char_end"] is not None]
        ends_before = [t["char_end"] for t in window if t["pos"] < at and t["char_end"] is not None]
        me = self.tokens[(doc, at)]
        text = self.docs[doc]["text"]
        if me["special"]:  # marked where it sits: after the text of the tokens before it
            mark_start = mark_end = max(ends_before) if ends_before else (min(starts) if starts else 0)
            inner = me["piece"]
        else:
            mark_start, mark_end = me["char_start"], me["char_end"]
            inner = text[mark_start:mark_end]
        first, last = (min(starts) if starts else mark_start), (max(ends) if ends else mark_end)
        return {"context": text[first:mark_start] + "«" + inner + "»" + text[mark_end:last], "tokens": tokens}


@pytest.fixture(scope="module")
def raw_runs(mini, lm_wh):
    return {"r": RawRun(mini, "r"), "t": RawRun(lm_wh, "t")}


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "neuron"} for r in rows]


@pytest.mark.parametrize("k,before,after", [(5, 50, 20), (3, 4, 2), (30, 3, 1)])
def test_top_contexts_match_python(case, raw_runs, k, before, after):
    wh, run, site = case
    neuron = 17
    expected = raw_runs[run].examples_of(site, 1, "top", k, before, after, neuron=neuron)
    got = macro(
        wh,
        f"SELECT * FROM top_contexts('{run}', '{site}', 1, {neuron}, k := {k}, before := {before}, after := {after})",
    )
    assert got == _strip(expected)  # exact: ids, positions, float32 values, strings


def test_every_unit_of_a_layer_matches_python(case, raw_runs):
    """All units at once (what the export reads): covers firing [CLS]/[SEP] tokens and non-ASCII text."""
    wh, run, site = case
    for kind in ("top", "random"):
        expected = raw_runs[run].examples_of(site, 0, kind, 4, 6, 3, seed=11)
        got = macro(wh, f"SELECT * FROM whq_examples('{run}', '{site}', 0, NULL, '{kind}', 4, 6, 3, 11)")
        assert got == expected
    if run == "r":
        assert any("«[CLS]»" in r["context"] or "«[SEP]»" in r["context"] for r in got)
    else:
        assert any("é" in r["context"] or "✓" in r["context"] for r in got)


@pytest.mark.parametrize("n,seed", [(3, 0), (3, 1), (40, 5)])
def test_random_examples_match_python(case, raw_runs, n, seed):
    wh, run, site = case
    expected = raw_runs[run].examples_of(site, 1, "random", n, 50, 20, seed=seed, neuron=17)
    got = macro(wh, f"SELECT * FROM random_examples('{run}', '{site}', 1, 17, n := {n}, seed := {seed})")
    assert got == _strip(expected)
    assert got == macro(wh, f"SELECT * FROM random_examples('{run}', '{site}', 1, 17, n := {n}, seed := {seed})")


def test_random_examples_cover_every_firing_with_a_threshold_capture(lm_wh):
    stats = {r["neuron"]: r["n_fired"] for r in macro(lm_wh, "SELECT * FROM firing_rate('t', 'mlp.act', 1)")}
    neuron = min(stats, key=lambda u: (stats[u], u))  # the rarest unit: every firing fits
    everything = macro(lm_wh, f"SELECT * FROM random_examples('t', 'mlp.act', 1, {neuron}, n := 100000)")
    assert len(everything) == stats[neuron]
    seeds = [
        [r["pos"] for r in macro(lm_wh, f"SELECT * FROM random_examples('t', 'mlp.act', 1, 3, n := 5, seed := {s})")]
        for s in range(3)
    ]
    assert len({tuple(s) for s in seeds}) > 1  # seeds draw different samples


def test_sample_key_is_uniform():
    keys = np.array([sample_key(0, 5, doc, pos) for doc in range(40) for pos in range(250)])
    assert 0 <= keys.min() and keys.max() < 2**31
    counts = np.bincount(keys >> 27, minlength=16)  # 16 equal buckets
    chi2 = ((counts - keys.size / 16) ** 2 / (keys.size / 16)).sum()
    assert chi2 < 45  # p ~ 1e-4 for 15 degrees of freedom
    assert abs((keys & 1).mean() - 0.5) < 0.03


@pytest.fixture(scope="module")
def lm_dense(lm_wh, tiny_lm_dir):
    """{layer: {doc: [tokens, units]}} of mlp.act, re-run on the stored token ids without padding."""
    from ingest.models import load
    from ingest.sites import parse_spec, resolve

    loaded = load(str(tiny_lm_dir), "cpu", "float32")
    tokens = lm_wh.pl('SELECT doc, "window", token_id FROM tokens ORDER BY doc, pos')
    windows = {}
    for (doc, _), group in tokens.group_by(["doc", "window"], maintain_order=True):
        windows.setdefault(doc, []).append(group["token_id"].to_list())
    site = resolve(parse_spec("mlp.act"), loaded.module_names, loaded.aliases)
    return {
        layer: reference.dense_activations(loaded.model, module, site.hook, windows) for layer, module in site.modules
    }


@pytest.mark.parametrize("k", [3, 12])  # 3 <= examples=4 reads neuron_examples; 12 reads every firing
def test_top_contexts_are_exact_over_all_tokens(lm_wh, lm_dense, k):
    dense = lm_dense[2]
    owner = [(d, p) for d in sorted(dense) for p in range(len(dense[d]))]
    flat = np.concatenate([dense[d] for d in sorted(dense)])
    doc_ids = dict(lm_wh.sql("SELECT doc, doc_id FROM documents").fetchall())
    for unit in (0, 9, 77):
        got = macro(lm_wh, f"SELECT * FROM top_contexts('t', 'mlp.act', 2, {unit}, k := {k})")
        column = flat[:, unit]
        order = np.argsort(-column, kind="stable")[:k]
        np.testing.assert_allclose(
            [r["value"] for r in got], column[order], rtol=2e-3, atol=1e-4
        )  # FLOAT16 where from token_neurons
        clear = [
            i
            for i in range(len(order))
            if i + 1 >= len(column) or column[order[i]] - column[np.argsort(-column)[i + 1]] > 1e-3
        ]
        for i in clear:
            doc, pos = owner[order[i]]
            assert (got[i]["doc_id"], got[i]["pos"]) == (doc_ids[doc], pos)


def test_bottom_contexts_are_the_most_negative_values_over_all_tokens(lm_wh, lm_dense):
    """examples=4 keeps each unit's 4 most negative values (SiLU is signed), most negative first."""
    dense = lm_dense[2]
    owner = [(d, p) for d in sorted(dense) for p in range(len(dense[d]))]
    flat = np.concatenate([dense[d] for d in sorted(dense)])
    doc_ids = dict(lm_wh.sql("SELECT doc, doc_id FROM documents").fetchall())
    for unit in (0, 9, 77):
        got = macro(lm_wh, f"SELECT * FROM bottom_contexts('t', 'mlp.act', 2, {unit}, k := 20)")
        column = flat[:, unit]
        order = np.argsort(column, kind="stable")[:4]
        assert column[order].max() < 0 and len(got) == 4  # capped at examples=4
        np.testing.assert_allclose([r["value"] for r in got], column[order], rtol=1e-5, atol=1e-6)
        for i in range(4):  # a padded batch moves values by ulps: positions where the order is clear
            if column[np.argsort(column)[i + 1]] - column[order[i]] > 1e-4:
                doc, pos = owner[order[i]]
                assert (got[i]["doc_id"], got[i]["pos"]) == (doc_ids[doc], pos)
                assert "«" in got[i]["context"] and got[i]["tokens"]


def test_layer_summary_matches_dense(lm_wh, lm_dense):
    summary = macro(lm_wh, "SELECT * FROM layer_summary('t', 'mlp.act')")
    for row in summary:
        acts = np.concatenate(list(lm_dense[row["layer"]].values()))
        rates = (acts > 0).mean(axis=0)
        assert row["n_neurons"] == acts.shape[1]
        assert abs(row["mean_rate"] - rates.mean()) <= 1 / len(acts)  # a value within float noise of 0 may differ


def test_activation_frequency_by_dataset(lm_wh, raw_runs):
    run = raw_runs["t"]
    tokens_per = defaultdict(int)
    for d in run.docs.values():
        tokens_per[d["dataset"]] += d["n_tokens"]
    fired = defaultdict(int)
    for r in run.token_neurons:
        if r["site"] == "mlp.act":
            fired[(r["layer"], r["neuron"], run.docs[r["doc"]]["dataset"])] += 1
    totals = defaultdict(int)
    for (layer, unit, _), n in fired.items():
        totals[(layer, unit)] += n
    expected = [
        {
            "layer": layer,
            "neuron": unit,
            "dataset": ds,
            "n_tokens": tokens_per[ds],
            "n_fired": n,
            "density": n / tokens_per[ds],
            "fraction": n / totals[(layer, unit)],
        }
        for (layer, unit, ds), n in sorted(fired.items())
    ]
    got = macro(lm_wh, "SELECT * FROM activation_frequency_by_dataset('t', 'mlp.act')")
    assert_rows(got, expected)
    assert {r["dataset"] for r in got} == {"plays", "code"}
    # a threshold capture holds every firing: the datasets add up to the exact neuron_stats counts
    exact = {(r["layer"], r["neuron"]): r["n_fired"] for r in stats_rows(lm_wh, "t", "mlp.act") if r["n_fired"]}
    assert dict(totals) == exact


def test_topk_capture_counts_firings_in_the_top_k(mini, raw_runs):
    run = raw_runs["r"]
    threshold = run.sites["mlp.act"]["threshold"]
    fired = defaultdict(int)
    for r in run.token_neurons:
        if r["site"] == "mlp.act" and r["value"] > threshold:
            fired[(r["layer"], r["neuron"])] += 1
    got = macro(
        mini,
        "SELECT layer, neuron, sum(n_fired) AS n FROM activation_frequency_by_dataset('r', 'mlp.act') GROUP BY ALL",
    )
    assert {(r["layer"], r["neuron"]): r["n"] for r in got} == dict(fired)


def test_neuron_contexts_bytes(lm_wh, raw_runs):
    run = raw_runs["t"]
    for row in stats_rows(lm_wh, "t", "mlp.act", 3)[:20]:
        doc, at = row["max_doc"], row["max_pos"]
        pieces = [
            ("[" + t["piece"] + "]" if p == at else t["piece"])
            for p in range(at - 24, at + 5)
            if (t := run.tokens.get((doc, p)))
        ]
        got = macro(lm_wh, f"SELECT * FROM neuron_contexts_bytes('t', 'mlp.act', 3, {row['neuron']})")
        assert got == [{"doc_id": run.docs[doc]["doc_id"], "pos": at, "value": row["max"], "context": "".join(pieces)}]


def test_neuron_logit_lens(lm_wh, tiny_lm_dir):
    from ingest.models import load

    model = load(str(tiny_lm_dir), "cpu", "float32").model
    unembed = model.get_output_embeddings().weight.detach().double().numpy()
    down = model.model.layers[1].mlp.down_proj.weight.detach().double().numpy()
    for unit in (0, 5, 100):
        got = macro(lm_wh, f"SELECT * FROM neuron_logit_lens('t', 'mlp.act', 1, {unit})")
        logits = unembed @ down[:, unit]
        assert [r["direction"] for r in got] == ["top"] * 10 + ["bottom"] * 10
        assert [r["rank"] for r in got] == list(range(10)) * 2
        expected = np.concatenate([np.sort(logits)[::-1][:10], np.sort(logits)[:10]])
        np.testing.assert_allclose([r["logit"] for r in got], expected, rtol=1e-4, atol=1e-6)
        assert [r["token_id"] for r in got][:3] == np.argsort(-logits)[:3].tolist()


# -- Polars twins -----------------------------------------------------------------------------

TWIN_CALLS = [
    ("firing_rate", "{site}, 1", dict(layer=1)),
    ("layer_summary", "{site}", {}),
    ("selectivity", "{site}, 2", dict(layer=2)),
    ("rate_histogram", "{site}, 2, bins := 12", dict(layer=2, bins=12)),
    ("selectivity_histogram", "{site}, 0", dict(layer=0)),
    ("selectivity_histogram", "{site}, 2, bins := 7, log := true", dict(layer=2, bins=7, log=True)),
    ("top_contexts", "{site}, 1, 17", dict(layer=1, neuron=17)),
    ("top_contexts", "{site}, 1, 5, k := 9, before := 3, after := 2", dict(layer=1, neuron=5, k=9, before=3, after=2)),
    ("bottom_contexts", "{site}, 1, 17", dict(layer=1, neuron=17)),
    (
        "bottom_contexts",
        "{site}, 2, 5, k := 9, before := 3, after := 2",
        dict(layer=2, neuron=5, k=9, before=3, after=2),
    ),
    ("random_examples", "{site}, 1, 17, n := 3, seed := 4", dict(layer=1, neuron=17, n=3, seed=4)),
    ("activation_frequency", "{site}", {}),
    ("activation_frequency_by_dataset", "{site}", {}),
    ("neuron_contexts_bytes", "{site}, 2, 30", dict(layer=2, neuron=30)),
]


@pytest.mark.parametrize("name,args,kwargs", TWIN_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(TWIN_CALLS)])
def test_macro_equals_polars_twin(case, name, args, kwargs):
    wh, run, site = case
    sql = wh.pl(f"SELECT * FROM {name}('{run}', {args.format(site=repr(site))})")
    twin = getattr(nf, name)(wh, run, site, **kwargs)
    assert isinstance(twin, pl.LazyFrame)
    assert_frame_equal(sql, twin.collect(), check_exact=False, rel_tol=RTOL)


def test_layer_examples_and_logit_lens_twins(lm_wh):
    assert_frame_equal(
        lm_wh.pl("SELECT * FROM whq_examples('t', 'mlp.act', 3, NULL, 'random', 6, 5, 5, 2)"),
        nf.layer_examples(lm_wh, "t", "mlp.act", 3, None, "random", 6, 5, 5, 2).collect(),
        check_exact=False,
        rel_tol=RTOL,
    )
    assert_frame_equal(
        lm_wh.pl("SELECT * FROM neuron_logit_lens('t', 'mlp.up', 2, 9)"),
        nf.neuron_logit_lens(lm_wh, "t", "mlp.up", 2, 9).collect(),
    )


# -- errors -------------------------------------------------------------------------------------


def test_unknown_run_or_site_is_a_clear_error(lm_wh):
    with pytest.raises(QueryError, match="no committed run 'nope'.*SELECT run_id FROM runs"):
        lm_wh.pl("SELECT * FROM layer_summary('nope', 'mlp.act')")
    with pytest.raises(QueryError, match="no committed run 'nope'"):
        lm_wh.pl("SELECT * FROM top_contexts('nope', 'mlp.act', 0, 1)")
    with pytest.raises(QueryError, match="run 't' has no site 'mlp.nope'"):
        lm_wh.pl("SELECT * FROM firing_rate('t', 'mlp.nope', 0)")
    with pytest.raises(UnknownRun, match="no committed run 'nope'"):
        nf.layer_summary(lm_wh, "nope", "mlp.act").collect()
    with pytest.raises(BadInput, match="run 't' has no site 'mlp.nope'"):
        nf.top_contexts(lm_wh, "t", "mlp.nope", 0, 1)


def test_examples_need_a_capture_that_holds_them(lm_wh):
    with pytest.raises(
        QueryError, match="kept neither examples=N nor a threshold capture: re-ingest with --site mlp.up:examples=20"
    ):
        lm_wh.pl("SELECT * FROM top_contexts('t', 'mlp.up', 0, 1)")
    with pytest.raises(BadInput, match="re-ingest with --site mlp.up:examples=20"):
        nf.random_examples(lm_wh, "t", "mlp.up", 0, 1)
    negative = (
        "kept no examples=N, which the most negative examples come from: re-ingest with --site mlp.up:examples=20"
    )
    with pytest.raises(QueryError, match=negative):
        lm_wh.pl("SELECT * FROM bottom_contexts('t', 'mlp.up', 0, 1)")
    with pytest.raises(BadInput, match=negative):
        nf.bottom_contexts(lm_wh, "t", "mlp.up", 0, 1)


def test_every_macro_is_documented(lm_wh):
    comments = dict(
        lm_wh.sql(
            "SELECT function_name, comment FROM duckdb_functions() WHERE function_type IN ('table_macro', 'macro')"
        ).fetchall()
    )
    for name in docgen.macro_names():  # parsed from queries/*.sql, so a new macro or file is covered
        assert comments.get(name), name


# -- golden outputs -----------------------------------------------------------------------------

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = {
    "firing_rate": "SELECT * FROM firing_rate('g', 'mlp.act', 1)",
    "layer_summary": "SELECT * FROM layer_summary('g', 'mlp.act')",
    "selectivity": "SELECT * FROM selectivity('g', 'mlp.up', 2)",
    "rate_histogram": "SELECT * FROM rate_histogram('g', 'mlp.act', 0, bins := 10)",
    "selectivity_histogram": "SELECT * FROM selectivity_histogram('g', 'mlp.up', 0, bins := 10)",
    "top_contexts": "SELECT * FROM top_contexts('g', 'mlp.act', 1, 7, k := 5, before := 6, after := 3)",
    "top_contexts_examples": "SELECT * FROM top_contexts('g', 'mlp.up', 3, 40, before := 4, after := 2)",
    "random_examples": "SELECT * FROM random_examples('g', 'mlp.act', 2, 11, n := 4, seed := 3)",
    "activation_frequency": "SELECT * FROM activation_frequency('g', 'mlp.up')",
    "activation_frequency_by_dataset": "SELECT * FROM activation_frequency_by_dataset('g', 'mlp.act') WHERE neuron < 8",
    "neuron_contexts_bytes": "SELECT * FROM neuron_contexts_bytes('g', 'mlp.act', 3, 5)",
    "neuron_logit_lens": "SELECT * FROM neuron_logit_lens('g', 'mlp.act', 0, 3)",
}


@pytest.fixture(scope="module")
def golden_wh(golden_root):
    wh = warehouse.open(golden_root)
    yield wh
    wh.close()


def _same(got, want, where: str):
    if isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=RTOL, abs=1e-12), where
    elif isinstance(want, dict) and isinstance(got, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list) and isinstance(got, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_output(golden_wh, name):
    """Each macro's output on the committed warehouse; WHQ_UPDATE_GOLDEN=1 rewrites the expected files."""
    path = GOLDEN_DIR / f"{name}.json"
    got = json.loads(json.dumps(golden_wh.pl(GOLDEN[name]).to_dicts()))
    if os.environ.get("WHQ_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps({"sql": GOLDEN[name], "rows": got}, indent=1, ensure_ascii=False) + "\n")
    expected = json.loads(path.read_text())
    assert expected["sql"] == GOLDEN[name], f"{path.name} was written for another query: rerun with WHQ_UPDATE_GOLDEN=1"
    assert got, "a golden query must return rows"
    _same(got, expected["rows"], name)


# -- charts and the frames re-export --------------------------------------------------------------


def test_charts_draw_the_macros_rows(lm_wh):
    import altair as alt

    from queries import charts

    rates = pl.concat(
        [
            lm_wh.pl(f"SELECT {layer} AS layer, * FROM rate_histogram('t', 'mlp.act', {layer}, bins := 8)")
            for layer in (0, 1)
        ]
    )
    sel = lm_wh.pl("SELECT * FROM selectivity_histogram('t', 'mlp.act', 0, bins := 8)")
    built = {
        "rate": charts.rate_histogram_chart(rates),
        "selectivity": charts.selectivity_histogram_chart(sel),
        "summary": charts.layer_summary_chart(lm_wh.pl("SELECT * FROM layer_summary('t', 'mlp.act')")),
        "context": charts.context_chart(
            lm_wh.pl("SELECT * FROM top_contexts('t', 'mlp.act', 1, 5, k := 1, before := 4, after := 2)")
        ),
        "histogram": charts.unit_histogram_chart(  # the open end bins too
            pl.DataFrame(
                {
                    "bin": [0, 70, 140],
                    "lo": [float("-inf"), 0.5, 8.0],
                    "hi": [-8.0, 0.6, float("inf")],
                    "count": [1, 5, 2],
                }
            )  # fmt: skip
        ),
    }
    for name, chart in built.items():
        assert isinstance(chart, alt.Chart), name
        spec = chart.to_dict()
        values = next(iter(spec["datasets"].values()))
        assert values, name
    rate_spec = built["rate"].to_dict()
    assert rate_spec["encoding"]["x"]["scale"]["type"] == "log" and rate_spec["encoding"]["color"]["field"] == "layer"
    drawn = next(iter(rate_spec["datasets"].values()))
    assert (
        len(drawn) == 2 * 8 and sum(v["n_neurons"] for v in drawn) == rates.filter(pl.col("bin") > 0)["n_neurons"].sum()
    )
    assert len(next(iter(built["summary"].to_dict()["datasets"].values()))) == 4 * 4  # 4 layers x 4 measures


def test_frames_re_exports_the_twins(lm_wh):
    from queries import frames

    assert frames.layer_summary is nf.layer_summary
    assert_frame_equal(
        frames.firing_rate(lm_wh, "t", "mlp.act", 0).collect(), lm_wh.pl("SELECT * FROM firing_rate('t', 'mlp.act', 0)")
    )


@pytest.mark.skipif(shutil.which("duckdb") is None, reason="the DuckDB shell (pip install duckdb-cli) is not on PATH")
def test_stock_duckdb_shell_runs_the_macros(golden_wh):
    import subprocess

    for name in (
        "layer_summary",
        "rate_histogram",
        "top_contexts",
        "random_examples",
        "activation_frequency_by_dataset",
    ):
        query = GOLDEN[name].replace("SELECT *", "SELECT to_json(list(t)) FROM (SELECT *") + ") t"
        shell = subprocess.run(
            ["duckdb", "-readonly", "-noheader", "-list", str(golden_wh.root / "whq.duckdb"), "-c", query],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shell.returncode == 0, shell.stderr
        _same(json.loads(shell.stdout), json.loads(json.dumps(golden_wh.pl(GOLDEN[name]).to_dicts())), name)
