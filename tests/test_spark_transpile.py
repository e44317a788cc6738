"""DuckDB macros to Spark SQL, without Spark: parsing the macro files, expanding calls, the dialect fixes.

Spark itself runs the results in tests/test_spark.py; here the generated text is checked,
so these run everywhere in well under a second.
"""

from __future__ import annotations

import re

import pytest

from queries.spark_transpile import load_macros, to_spark
from warehouse import catalog
from warehouse.errors import QueryError

MACROS_SQL = """
-- a comment; with a semicolon
CREATE OR REPLACE MACRO twice(x) AS x * 2;
COMMENT ON MACRO twice IS 'x times 2; a semicolon in a string';
CREATE OR REPLACE TEMP MACRO top_units(run, site, layer, k := 5, floor := 0.5) AS TABLE
SELECT t.neuron, t.value FROM token_neurons t
WHERE t.run_id = run AND t.site = site AND t.layer = layer AND t.value > floor
ORDER BY t.value DESC LIMIT k;
COMMENT ON MACRO TABLE top_units IS 'test';
CREATE MACRO staged(run) AS TABLE
WITH picked AS (SELECT u.neuron FROM top_units(run, 'mlp.act', 0) u) SELECT p.neuron FROM picked p;
"""


@pytest.fixture()
def macros(tmp_path):
    path = tmp_path / "10_test.sql"
    path.write_text(MACROS_SQL)
    return load_macros([path])


def spark(query: str, macros) -> str:
    return to_spark(query, macros)


def test_macro_files_parse_with_kinds_and_defaults(macros):
    assert set(macros) == {"twice", "top_units", "staged"}
    assert not macros["twice"].is_table and macros["top_units"].is_table
    assert macros["top_units"].params == ("run", "site", "layer", "k", "floor")
    assert macros["top_units"].defaults["k"].sql() == "5"


def test_every_project_macro_file_parses():
    found = load_macros(catalog.macro_files())
    assert "whq_known_run" in found
    for macro in found.values():
        to_spark(
            f"SELECT {macro.name}({', '.join('NULL' for _ in macro.params)})" if not macro.is_table else "SELECT 1",
            found,
        )


def test_parameters_bind_positionally_by_name_and_by_default(macros):
    text = spark("SELECT * FROM top_units('r', 'mlp.act', 3, floor := 0.25)", macros)
    assert "t.run_id = 'r' AND t.site = 'mlp.act' AND t.layer = 3 AND t.value > 0.25" in text
    assert "LIMIT 5" in text and ") AS top_units" in text
    assert "LIMIT 7" in spark("SELECT * FROM top_units('r', 'mlp.act', 3, 7)", macros)


def test_scalar_macros_inline_with_their_precedence(macros):
    assert spark("SELECT twice(1 + 2) AS y", macros) == "SELECT ((1 + 2) * 2) AS y"


@pytest.mark.parametrize(
    "query, message",
    [
        ("SELECT * FROM top_units('r', 'mlp.act')", "needs the argument 'layer'"),
        ("SELECT * FROM top_units('r', 'mlp.act', 1, kk := 2)", "has no parameter 'kk'"),
        ("SELECT * FROM top_units('r', 'a', 1, 2, 3, 4)", "takes 5 arguments"),
        ("SELECT * FROM twice(1)", "scalar macro"),
        ("SELECT top_units('r', 'a', 1)", "table macro"),
        ("CREATE TABLE x AS SELECT 1", "runs one query"),
        ("SELECT 1; SELECT 2", "runs one query"),
    ],
)
def test_bad_calls_name_the_fix(macros, query, message):
    with pytest.raises(QueryError, match=message):
        spark(query, macros)


def test_each_expansion_gets_its_own_cte_names(macros):
    text = spark("SELECT * FROM staged('a') x JOIN staged('b') y ON x.neuron = y.neuron", macros)
    defined = re.findall(r"(picked__staged\d+) AS \(", text)
    assert len(defined) == len(set(defined)) == 2


@pytest.mark.parametrize(
    "duckdb, spark_sql",
    [
        (
            "SELECT l[1], l[-1], l[i + 1] FROM t",
            "SELECT TRY_ELEMENT_AT(l, 1), TRY_ELEMENT_AT(l, -1), TRY_ELEMENT_AT(l, i + 1) FROM t",
        ),
        ("SELECT l[2:3], l[:2] FROM t", "SELECT SLICE(l, 2, 3 - 2 + 1), SLICE(l, 1, 2 - 1 + 1) FROM t"),
        (
            "SELECT len(v.vec), len(d.text), len(CAST(x AS INTEGER[])) FROM t",
            "SELECT SIZE(v.vec), LENGTH(d.text), SIZE(CAST(x AS ARRAY<INT>)) FROM t",
        ),
        ("SELECT log(x), ln(x) FROM t", "SELECT LOG(10, x), LN(x) FROM t"),
        ("SELECT xor(a, b) * 3 FROM t", "SELECT (a ^ b) * 3 FROM t"),
        ("SELECT error('bad') FROM t", "SELECT RAISE_ERROR('bad') FROM t"),
        ("SELECT quantile_cont(x, 0.25), median(x) FROM t", "SELECT PERCENTILE(x, 0.25), MEDIAN(x) FROM t"),
        (
            "SELECT list_transform(a, lambda x, i: x - b[i]) FROM t",
            "SELECT TRANSFORM(a, (x, i) -> x - TRY_ELEMENT_AT(b, (i + 1))) FROM t",
        ),
        ("SELECT * FROM range(0, 3) g(bin)", "SELECT * FROM RANGE(0, 3) AS g(bin)"),
        ("SELECT * FROM generate_series(1, 3) g(i)", "SELECT * FROM RANGE(1, 3 + 1) AS g(i)"),
    ],
)
def test_duckdb_meaning_in_spark_spelling(duckdb, spark_sql):
    assert to_spark(duckdb, {}) == spark_sql


def test_ordered_list_sorts_collected_structs():
    text = to_spark("SELECT list(x ORDER BY y DESC) FROM t", {})
    assert "ARRAY_SORT(COLLECT_LIST(STRUCT(y AS k0, x AS v))" in text
    assert "WHEN _whq_l.k0 < _whq_r.k0 THEN 1" in text  # descending


def test_unnest_with_subscripts_becomes_one_posexplode():
    text = to_spark("SELECT unnest(v.vec) AS x, generate_subscripts(v.vec, 1) AS i FROM vectors v", {})
    assert (
        text
        == "SELECT _whq_u._whq_val AS x, (_whq_u._whq_pos + 1) AS i FROM vectors AS v LATERAL VIEW POSEXPLODE(v.vec) _whq_u AS _whq_pos, _whq_val"
    )
    with pytest.raises(QueryError, match="one generator"):
        to_spark("SELECT unnest(a) AS x, unnest(b) AS y FROM t", {})


def test_named_windows_are_written_out():
    text = to_spark(
        "SELECT sum(x) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) FROM t WINDOW w AS (ORDER BY y)", {}
    )
    assert text == "SELECT SUM(x) OVER (ORDER BY y NULLS LAST ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) FROM t"


def test_qualify_filters_before_order_and_limit():
    text = to_spark(
        "SELECT t.id FROM t QUALIFY row_number() OVER (PARTITION BY t.g ORDER BY t.x) = 1 ORDER BY t.x LIMIT 2", {}
    )
    assert text == (
        "SELECT * EXCEPT (_whq_keep, _whq_o0) FROM (SELECT t.id, ROW_NUMBER() OVER (PARTITION BY t.g ORDER BY t.x NULLS LAST) = 1 "
        "AS _whq_keep, t.x AS _whq_o0 FROM t) AS _whq_q WHERE _whq_keep ORDER BY _whq_o0 NULLS LAST LIMIT 2"
    )


def test_cli_keeps_untrusted_sql_off_spark(tmp_path, capsys, monkeypatch):
    """Spark SQL reads any file (csv.`/etc/passwd`) and calls Java (reflect): --read-only stays on DuckDB."""
    import sys

    import warehouse
    from warehouse import cli

    warehouse.init(tmp_path / "wh")
    monkeypatch.setattr(
        sys, "argv", ["whq", "sql", str(tmp_path / "wh"), "SELECT 1", "--engine", "spark", "--read-only"]
    )
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --read-only runs on the duckdb engine only: drop --engine spark for untrusted SQL"
    )
