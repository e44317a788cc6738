"""Spark SQL parity: the macros of queries/*.sql, expanded and transpiled by sqlglot, give DuckDB's rows on Spark.

One local Spark session serves the whole module (starting it is most of the time).
Rows are compared sorted, floats with rtol 1e-6, ids and counts exactly.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import yaml

import warehouse
from queries import spark_transpile
from warehouse import catalog
from warehouse.errors import QueryError

pytestmark = pytest.mark.spark

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install 'whq[spark]')")
if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
    pytest.skip("Spark needs Java 17 (java not on PATH, JAVA_HOME unset)", allow_module_level=True)

from queries.spark import spark_session, spark_sql  # noqa: E402

RTOL = 1e-6

# One or more calls per table macro, on the minilm_wh fixture (run 'r': mlp.act topk=8,examples=5;
# mlp.up nag=6; resid.out last) or on the scenario warehouse below (runs 'chat', 'again').
NEURON_CALLS = {
    "firing_rate": ["SELECT * FROM firing_rate('r', 'mlp.act', 3)"],
    "layer_summary": ["SELECT * FROM layer_summary('r', 'mlp.act')", "SELECT * FROM layer_summary('r', 'mlp.up')"],
    "selectivity": ["SELECT * FROM selectivity('r', 'mlp.act', 3)"],
    "rate_histogram": ["SELECT * FROM rate_histogram('r', 'mlp.act', 3, bins := 10)"],
    "selectivity_histogram": ["SELECT * FROM selectivity_histogram('r', 'mlp.act', 5)"],
    "top_contexts": ["SELECT * FROM top_contexts('r', 'mlp.act', 3, {neuron}, k := 3)"],
    "random_examples": ["SELECT * FROM random_examples('r', 'mlp.act', 3, {neuron}, n := 4, seed := 1)"],
    "whq_examples": ["SELECT * FROM whq_examples('r', 'mlp.act', 2, NULL, 'top', 2, 3, 2, 0)"],
    "activation_frequency": ["SELECT * FROM activation_frequency('r', 'mlp.act')"],
    "activation_frequency_by_dataset": ["SELECT * FROM activation_frequency_by_dataset('r', 'mlp.act')"],
    "neuron_contexts_bytes": ["SELECT * FROM neuron_contexts_bytes('r', 'mlp.act', 3, {neuron})"],
    "neuron_logit_lens": ["SELECT * FROM neuron_logit_lens('r', 'mlp.act', 3, {neuron})"],
}
SCENARIO_CALLS = {
    "whq_scenario_vectors": ["SELECT * EXCLUDE (vec) FROM whq_scenario_vectors('chat')"],
    "whq_scenario_states": ["SELECT source, layer, doc, step, top FROM whq_scenario_states('chat')"],
    "whq_ref_pairs": ["SELECT * FROM whq_ref_pairs('chat')"],
    "ref_similarity": ["SELECT * FROM ref_similarity('chat')", "SELECT * FROM ref_similarity('chat', source := 'mlp_out')"],
    "ref_summary": ["SELECT * FROM ref_summary('chat')"],
    "ref_by_role": ["SELECT * FROM ref_by_role('chat')"],
    "drift": ["SELECT * FROM drift('chat')"],
    "run_compare": ["SELECT * FROM run_compare('chat', 'again')"],
    "cross_layer_cosine": ["SELECT * FROM cross_layer_cosine('chat', '{doc_id}')"],
    "neuron_trajectory": ["SELECT * FROM neuron_trajectory('chat', 'hidden_out', 1, 7)", "SELECT * FROM neuron_trajectory('chat', 'mlp.act', 0, {neuron})"],
    "residual_decomposition": ["SELECT * FROM residual_decomposition('chat')"],
}


@pytest.fixture(scope="module")
def spark():
    session = spark_session("whq-tests")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def wh(minilm_wh):
    with warehouse.open(minilm_wh) as opened:
        yield opened


@pytest.fixture(scope="module")
def scenario_wh(tmp_path_factory, tiny_lm_dir):
    """Two greedy runs ('chat', 'again') of a short chat scenario with two reference states."""
    from ingest.chat import run_scenario

    folder = tmp_path_factory.mktemp("spark-scenario")
    scenario = {
        "name": "spark_parity",
        "model": {"id": str(tiny_lm_dir), "dtype": "float32", "device": "cpu"},
        "prompt": {"messages": [
            {"role": "system", "content": "You are kind."},
            {"role": "user", "content": "I am so happy today!"},
            {"role": "assistant", "content": "Wonderful."},
            {"role": "user", "content": "Now I am scared."},
        ]},
        "generation": {"max_new_tokens": 3, "do_sample": False, "seed": 7},
        "capture": {"top_k_probs": 3, "sites": ["mlp.act:topk=8"]},
        "reference_states": [
            {"label": "joy", "messages": [{"role": "user", "content": "Joy! Delight!"}]},
            {"label": "fear", "messages": [{"role": "user", "content": "Terror and dread."}]},
        ],
    }
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    for run_id in ("chat", "again"):
        run_scenario(folder / "wh", str(path), run_id=run_id, progress=False)
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
