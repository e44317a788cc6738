"""Spark SQL parity: the macros of queries/*.sql, expanded and transpiled by sqlglot, give DuckDB's rows on Spark.

One local Spark session serves the whole module (starting it is most of the time).
Rows are compared sorted, floats with rtol 1e-6, ids and counts exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

import warehouse
from queries import spark_transpile
from warehouse import catalog
from warehouse.errors import QueryError

from . import dictionaries
from .scenario_yaml import scenario_dict, write_yaml

pytestmark = pytest.mark.spark

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install 'whq[spark]')")
if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
    pytest.skip("Spark needs Java 17 (java not on PATH, JAVA_HOME unset)", allow_module_level=True)

from queries.spark import spark_session, spark_sql  # noqa: E402

RTOL = 1e-6

# One or more calls per table macro: MINILM_CALLS on the minilm_wh fixture (run 'r': mlp.act
# topk=8,examples=5; mlp.up nag=6; resid.out last), TINY_CALLS on tiny_wh below.
MINILM_CALLS = {
    "firing_rate": ["SELECT * FROM firing_rate('r', 'mlp.act', 3)"],
    "layer_summary": ["SELECT * FROM layer_summary('r', 'mlp.act')", "SELECT * FROM layer_summary('r', 'mlp.up')"],
    "selectivity": ["SELECT * FROM selectivity('r', 'mlp.act', 3)"],
    "rate_histogram": ["SELECT * FROM rate_histogram('r', 'mlp.act', 3, bins := 10)"],
    "selectivity_histogram": [
        "SELECT * FROM selectivity_histogram('r', 'mlp.act', 5)",
        "SELECT * FROM selectivity_histogram('r', 'mlp.act', 5, bins := 12, log := true)",
    ],
    "top_contexts": ["SELECT * FROM top_contexts('r', 'mlp.act', 3, {neuron}, k := 3)"],
    "bottom_contexts": ["SELECT * FROM bottom_contexts('r', 'mlp.act', 3, {neuron}, k := 3)"],
    "random_examples": ["SELECT * FROM random_examples('r', 'mlp.act', 3, {neuron}, n := 4, seed := 1)"],
    "whq_examples": ["SELECT * FROM whq_examples('r', 'mlp.act', 2, NULL, 'top', 2, 3, 2, 0)"],
    "activation_frequency": ["SELECT * FROM activation_frequency('r', 'mlp.act')"],
    "activation_frequency_by_dataset": ["SELECT * FROM activation_frequency_by_dataset('r', 'mlp.act')"],
    "neuron_contexts_bytes": ["SELECT * FROM neuron_contexts_bytes('r', 'mlp.act', 3, {neuron})"],
}
TINY_CALLS = {
    "whq_scenario_vectors": ["SELECT * EXCLUDE (vec) FROM whq_scenario_vectors('chat')"],
    "whq_scenario_states": ["SELECT source, layer, doc, step, top FROM whq_scenario_states('chat')"],
    "whq_ref_pairs": ["SELECT * FROM whq_ref_pairs('chat')"],
    "ref_similarity": [
        "SELECT * FROM ref_similarity('chat')",
        "SELECT * FROM ref_similarity('chat', source := 'mlp_out')",
    ],
    "ref_summary": ["SELECT * FROM ref_summary('chat')"],
    "ref_by_role": ["SELECT * FROM ref_by_role('chat')"],
    "drift": ["SELECT * FROM drift('chat')"],
    "run_compare": ["SELECT * FROM run_compare('chat', 'again')"],
    "cross_layer_cosine": ["SELECT * FROM cross_layer_cosine('chat', '{doc_id}')"],
    "neuron_trajectory": [
        "SELECT * FROM neuron_trajectory('chat', 'hidden_out', 1, 7)",
        "SELECT * FROM neuron_trajectory('chat', 'mlp.act', 0, {chat_neuron})",
    ],
    "residual_decomposition": ["SELECT * FROM residual_decomposition('chat')"],
    "neuron_logit_lens": ["SELECT * FROM neuron_logit_lens('lm2', 'mlp.act', 1, 5)"],
    "nag_profile": [
        "SELECT * FROM nag_profile('lm2', 'mlp.up', target_dataset := 'animals', layers := [1, 3], power := 0.5)"
    ],
    "nag_unit_weights": [
        "SELECT * FROM nag_unit_weights('lm2', 'lm2', 'mlp.up', target_dataset := 'animals', power := 0.5)"
    ],
    "nag_distance": [
        "SELECT * FROM nag_distance('lm2', 'lm2', 'mlp.up', target_dataset := 'animals', pool_dataset := 'finance')",
        "SELECT * FROM nag_distance('lm2', 'lm2', 'mlp.up', layers := [0, 0, 2])",
    ],
    "nag_select": ["SELECT * FROM nag_select('lm2', 'lm2', 'mlp.up', target_dataset := 'finance', fraction := 0.5)"],
    "nag_quality": [
        "SELECT * FROM nag_quality('lm2', 'lm2', 'mlp.up', 'score', target_dataset := 'animals', fraction := 0.6, invert := true)"
    ],
    "dictionary_quality": ["SELECT * FROM dictionary_quality('lm2')"],
    "unit_stats": ["SELECT * FROM unit_stats('lm2', 'mlp.act', 1)"],
    "unit_histogram": ["SELECT * FROM unit_histogram('lm2', 'mlp.act', 1, 5)"],
    "units_for_token": ["SELECT * FROM units_for_token('lm2', 'mlp.act', 't')"],
    "similar_units": [
        "SELECT * FROM similar_units('lm2', 'mlp.act', 1, 5)",
        "SELECT * FROM similar_units('lm2', 'mlp.act', 1, 5, k := 40)",  # above the 32 stored: computed
    ],
    "quantile_examples": ["SELECT * FROM quantile_examples('lm2', 'mlp.act', 1, 5)"],
}
# On explained_wh: run 'r' of minilm_wh with top-tokens explanations and embedding scores (no model needed).
EXPLAIN_CALLS = {
    "explanation_scores": ["SELECT * FROM explanation_scores('r', 'mlp.act', 3)"],
    "scorer_summary": ["SELECT * FROM scorer_summary('r', 'mlp.act')"],
    "search_explanations": ["SELECT * FROM search_explanations('r', 'mlp.act', 'fires')"],
    "scorer_verdicts": ["SELECT * FROM scorer_verdicts('r', 'mlp.act', 3, {explained_neuron})"],
}


@pytest.fixture(scope="module")
def spark():
    session = spark_session("whq-tests")
    # Tiny data: compiling whole-stage code and re-planning adaptively cost more than they save.
    session.conf.set("spark.sql.codegen.wholeStage", "false")
    session.conf.set("spark.sql.adaptive.enabled", "false")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def wh(minilm_wh):
    with warehouse.open(minilm_wh) as opened:
        yield opened


@pytest.fixture(scope="module")
def tiny_wh(tmp_path_factory, tiny_lm_dir):
    """The tiny causal LM: two greedy runs of a short chat scenario ('chat', 'again') and a plain
    run 'lm2' over two datasets with a numeric meta column, NAG, the neuron logit lens, unit data (hist, quantiles,
    similar) and an SAE site."""
    from ingest.chat import run_scenario
    from ingest.pipeline import ingest

    folder = tmp_path_factory.mktemp("spark-tiny")
    path = write_yaml(
        folder / "s.yaml",
        scenario_dict(
            str(tiny_lm_dir),
            name="spark_parity",
            generation={"max_new_tokens": 3, "do_sample": False, "seed": 7},
            capture={"top_k_probs": 3, "sites": ["mlp.act:topk=8"]},
        ),
    )
    for run_id in ("chat", "again"):
        run_scenario(folder / "wh", path, run_id=run_id, progress=False)

    texts = [
        "The cat sat on the mat.",
        "Dogs bark at night.",
        "Stocks fell sharply today.",
        "The market rallied.",
        "A cat and a dog.",
        "Bonds and stocks.",
        "",
        "Night falls on the city.",
    ]
    with open(folder / "pool.jsonl", "w") as fh:
        for i, text in enumerate(texts):
            record = {"doc_id": f"x{i}", "text": text, "dataset": "animals" if i % 2 == 0 else "finance"}
            if i != 3:  # one document without a quality score
                record["score"] = round(0.1 * i + 0.05, 2)
            fh.write(json.dumps(record) + "\n")
    sae = dictionaries.sparsify(folder / "sae" / "layers.1", k=4)
    ingest(
        folder / "wh",
        str(tiny_lm_dir),
        [str(folder / "pool.jsonl")],
        ["mlp.act:topk=8,examples=5,hist,quantiles=4,similar=5", "mlp.up:nag=6", f"resid.out+sae={sae.parent}:topk=4"],
        run_id="lm2",
        logit_lens=True,
        device="cpu",
        progress=False,
    )
    with warehouse.open(folder / "wh") as opened:
        yield opened


def _plain(value):
    """Nested lists/structs as tuples, so rows sort and compare."""
    if isinstance(value, dict):
        return tuple((k, _plain(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _sort_key(value):
    if isinstance(value, tuple):
        return (2, tuple(_sort_key(v) for v in value))
    if value is None:
        return (0, "")
    if isinstance(value, float):
        return (1, "nan" if math.isnan(value) else f"{value:.5e}")
    return (1, str(value))


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12)
    return a == b


def assert_same_rows(duck, spark_frame, query):
    assert duck.columns == spark_frame.columns, query
    rows_duck = sorted((_plain(r) for r in duck.rows()), key=_sort_key)
    rows_spark = sorted((_plain(r) for r in spark_frame.rows()), key=_sort_key)
    assert len(rows_duck) == len(rows_spark), f"{query}: {len(rows_duck)} rows in DuckDB, {len(rows_spark)} on Spark"
    for row_duck, row_spark in zip(rows_duck, rows_spark):
        assert _same(row_duck, row_spark), f"{query}:\n duckdb {row_duck}\n spark  {row_spark}"


def _parity(wh, spark, query) -> int:
    duck = wh.pl(query)
    assert_same_rows(duck, spark_sql(wh, query, spark=spark), query)
    return len(duck)


@pytest.fixture(scope="module")
def placeholders(request, wh, tiny_wh) -> dict:
    """A unit with stored examples (layer 3 of run 'r'), a generated document of run 'chat', and
    a unit in the top-k of the generation's last token in run 'chat' (so its trajectory has a value)."""
    neuron = wh.sql(
        "SELECT min(neuron) FROM neuron_examples WHERE run_id = 'r' AND layer = 3 AND kind = 'random'"
    ).fetchall()[0][0]
    doc_id = tiny_wh.sql("SELECT min(doc_id) FROM documents WHERE run_id = 'chat' AND role = 'generated'").fetchall()[
        0
    ][0]
    chat_neuron = tiny_wh.sql(
        "SELECT t.neuron FROM token_neurons t JOIN documents d ON d.run_id = t.run_id AND d.doc = t.doc WHERE t.run_id = 'chat' "
        "AND t.site = 'mlp.act' AND t.layer = 0 AND d.role = 'generated' ORDER BY t.pos DESC, t.neuron LIMIT 1"
    ).fetchall()[0][0]
    explained = "SELECT min(neuron) FROM explanation_examples WHERE run_id = 'r' AND scorer IS NOT NULL AND layer = 3"
    explained_neuron = request.getfixturevalue("explained_wh").sql(explained).fetchall()[0][0]
    return {"neuron": neuron, "doc_id": doc_id, "chat_neuron": chat_neuron, "explained_neuron": explained_neuron}


PARITY_CASES = (
    [("wh", name, query) for name, queries in MINILM_CALLS.items() for query in queries]
    + [("tiny_wh", name, query) for name, queries in TINY_CALLS.items() for query in queries]
    + [("explained_wh", name, query) for name, queries in EXPLAIN_CALLS.items() for query in queries]
)


@pytest.fixture(scope="module")
def explained_wh(minilm_wh, tmp_path_factory):
    from explain.examples import select_units
    from explain.pipeline import Recipe, plan_explain, plan_score, run_plan

    root = tmp_path_factory.mktemp("spark-explained") / "wh"
    shutil.copytree(minilm_wh, root)
    opened = warehouse.open(root)
    recipe = Recipe(n_explain=3, n_test=3, n_non_activating=3)
    units = select_units(opened, "r", "mlp.act", [3], None, 2)
    plan = plan_explain(opened, "r", "mlp.act", units, explainer="top-tokens", model="top-tokens", recipe=recipe)
    run_plan(opened, "r", plan, llm="top-tokens")
    plan = plan_score(opened, "r", "mlp.act", [3], scorers=["embedding"], model="top-tokens", recipe=recipe)
    run_plan(opened, "r", plan, llm="top-tokens")
    yield opened
    opened.close()


@pytest.mark.parametrize(
    "fixture, macro, query", PARITY_CASES, ids=[f"{m}-{i}" for i, (_, m, _) in enumerate(PARITY_CASES)]
)
def test_macro_gives_duckdb_rows_on_spark(request, spark, placeholders, fixture, macro, query):
    wh = request.getfixturevalue(fixture)
    query = query.format(**placeholders)
    assert f"{macro}(" in query
    rows = _parity(wh, spark, query)
    assert rows > 0, f"{query} returned no rows: the parity check needs data"


def test_every_macro_has_a_parity_case():
    table_macros = {m.name for m in spark_transpile.load_macros(catalog.macro_files()).values() if m.is_table}
    internal = {name for name in table_macros if name.startswith("whq_")}
    missing = table_macros - internal - set(MINILM_CALLS) - set(TINY_CALLS) - set(EXPLAIN_CALLS)
    assert not missing, (
        f"add a Spark parity call for {sorted(missing)} to MINILM_CALLS or TINY_CALLS in tests/test_spark.py"
    )


def test_tables_match_duckdb(wh, spark):
    """Every column of the sparse tables, FLOAT16 values decoded on Spark, and the row count of every table."""
    from warehouse import schema

    counts = " UNION ALL ".join(f"SELECT '{name}' AS name, count(*) AS n FROM {name}" for name in schema.tables())
    _parity(wh, spark, counts)
    for table in ("token_neurons", "doc_neurons", "vectors", "runs", "sites"):
        _parity(wh, spark, f"SELECT * FROM {table}")


def test_unknown_run_fails_with_the_macro_message(wh, spark):
    query = "SELECT * FROM firing_rate('nope', 'mlp.act', 3)"
    with pytest.raises(QueryError) as duck:
        wh.pl(query)
    with pytest.raises(QueryError) as on_spark:
        spark_sql(wh, query, spark=spark)
    assert "no committed run 'nope'" in str(duck.value)
    assert "no committed run 'nope' in this warehouse: list the runs with SELECT run_id FROM runs" in str(
        on_spark.value
    )
    assert "\n" not in str(on_spark.value) and "SQLSTATE" not in str(on_spark.value)


def test_register_from_a_root_path_reads_the_manifests(wh, spark):
    """What a cluster does: point register() at the warehouse root (a path or URI), no Warehouse object."""
    from queries.spark import register, sql, to_polars

    register(spark, f"file://{wh.root}")
    try:
        query = "SELECT site, layer, count(*) AS n, sum(value) AS total FROM token_neurons GROUP BY site, layer"
        assert_same_rows(wh.pl(query), to_polars(sql(spark, query)), query)
    finally:
        register(spark, wh)


def test_float16_values_decode_exactly(tmp_path, spark):
    """Spark cannot read Parquet FLOAT16: the raw bytes are decoded in SQL, subnormals, zeros, infinities and NaN included."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from queries.spark import table_frame
    from warehouse import schema

    table = schema.table("token_neurons")
    halves = np.array(
        [0.0, -0.0, 1.0, -2.5, 65504.0, 6e-8, -6.1e-5, 3.14159, np.inf, -np.inf, np.nan], dtype=np.float16
    )
    n = len(halves)
    columns = {f.name: pa.array(np.arange(n), type=f.type) for f in table.arrow_schema() if f.name != "value"}
    columns["value"] = pa.array(halves, type=pa.float16())
    folder = tmp_path / "token_neurons" / "run_id=t" / "site=s" / "layer=0"
    folder.mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=table.arrow_schema()), folder / "part.parquet")
    frame = table_frame(spark, table, str(tmp_path / "token_neurons"), [str(folder / "part.parquet")])
    rows = frame.orderBy("doc").select("run_id", "site", "layer", "value").collect()
    assert {(r.run_id, r.site, r.layer) for r in rows} == {("t", "s", 0)}
    got = np.array([r.value for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(got, halves.astype(np.float32))
    assert np.signbit(got[1])
