"""Untrusted SQL: two walls. sqlglot refuses anything but queries; DuckDB's own settings refuse the rest.

Each attack is tried through the read-only path (`wh.sql(..., read_only=True)` and
`whq sql --read-only`), and again on the guarded connection alone, as if the first
wall had a hole: both must refuse it.
"""

from __future__ import annotations

import duckdb
import pytest

import warehouse
from warehouse.errors import QueryError

from .cli_runner import run_whq

ATTACKS = {
    "read /etc/passwd": "SELECT * FROM read_csv('/etc/passwd')",
    "read /etc/passwd as a table": "SELECT * FROM '/etc/passwd'",
    "read a file as text": "SELECT content FROM read_text('/etc/passwd')",
    "list files": "SELECT * FROM glob('/etc/*')",
    "write a file": "COPY (SELECT 1 AS x) TO '{out}'",
    "write over a committed part": "COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet)",
    "attach another database": "ATTACH '{other}' AS other",
    "install an extension": "INSTALL httpfs",
    "load an extension": "LOAD httpfs",
    "turn the guard off": "SET enable_external_access = true",
    "widen the allowed paths": "SET allowed_paths = ['/']",
    "export the database": "EXPORT DATABASE '{out_dir}'",
    "drop a view": "DROP VIEW runs",
    "create a table": "CREATE TABLE t AS SELECT 1",
    "pragma": "PRAGMA enable_profiling",
    "call": "CALL pragma_version()",
    "explain analyze a write": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
    "a write after a query": "SELECT 1; DROP VIEW runs",
    "run serialized SQL": "SELECT * FROM json_execute_serialized_sql(json_serialize_sql("
    "'SELECT content FROM read_text(''.tmp/secret.txt'')'))",
    "run serialized SQL as a scalar": "SELECT json_execute_serialized_sql(json_serialize_sql("
    "'SELECT * FROM read_text(''.tmp/secret.txt'')'))",
    "read DuckDB's temp directory": "SELECT content FROM read_text('.tmp/secret.txt')",
    "list DuckDB's temp directory": "SELECT * FROM glob('.tmp/*')",
    "summarize a file": "SUMMARIZE '/etc/passwd'",
    "describe a file": "DESCRIBE '/etc/passwd'",
    "show a file": "SHOW '/etc/passwd'",
    "a path as a macro argument": "SELECT * FROM nag_distance('r', 'r', 'mlp.up', weights := '/etc/passwd')",
    "a temp file as a macro argument": "SELECT * FROM nag_select('r', 'r', 'mlp.up', weights := '.tmp/secret.txt')",
    "a path built in a macro argument": "SELECT * FROM nag_distance('r', 'r', 'mlp.up', weights := '/etc/' || 'passwd')",
    "a table function that checkpoints": "SELECT * FROM checkpoint()",
    "log to a file": "CALL enable_logging(storage := 'file', storage_path := '{out_dir}')",
    "spill into a user folder": "SET temp_directory = '{out_dir}'",
    "explain a file read": "EXPLAIN SELECT * FROM read_text('/etc/passwd')",
    "show a query that reads a file": "SHOW SELECT * FROM read_text('/etc/passwd')",
    "describe a query that reads a file": "DESCRIBE SELECT * FROM read_text('/etc/passwd')",
}
# What DuckDB itself must refuse when the first wall is bypassed (the others only sqlglot stops:
# they cannot touch a file from a read-only catalog connection).
SECOND_WALL = [
    "read /etc/passwd",
    "read /etc/passwd as a table",
    "read a file as text",
    "list files",
    "write a file",
    "write over a committed part",
    "attach another database",
    "install an extension",
    "load an extension",
    "turn the guard off",
    "widen the allowed paths",
    "export the database",
    "drop a view",
    "create a table",
    "run serialized SQL",
    "read DuckDB's temp directory",
    "list DuckDB's temp directory",
    "summarize a file",
    "describe a file",
    "show a file",
    "a path as a macro argument",
    "a temp file as a macro argument",
    "a path built in a macro argument",
    "log to a file",
    "spill into a user folder",
    "explain a file read",
    "show a query that reads a file",
    "describe a query that reads a file",
]


@pytest.fixture
def targets(minilm_wh, tmp_path, monkeypatch):
    # DuckDB's default temp directory is `.tmp` under the working directory: a secret there
    # must stay unread, as in a user's project folder.
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("the-secret-content\n")
    monkeypatch.chdir(tmp_path)
    wh = warehouse.open(minilm_wh)
    part = wh.files("tokens")[0]
    values = {
        "out": tmp_path / "out.csv",
        "out_dir": tmp_path / "export",
        "other": tmp_path / "other.duckdb",
        "part": part,
    }
    duckdb.connect(str(values["other"])).close()
    yield wh, values
    wh.close()


@pytest.mark.parametrize("name", ATTACKS)
def test_first_wall_refuses_with_a_clear_message(name, targets):
    wh, values = targets
    with pytest.raises(QueryError, match="^read-only mode (refuses|needs constant arguments)"):
        wh.sql(ATTACKS[name].format(**values), read_only=True)
    assert not values["out"].exists() and not values["out_dir"].exists()


@pytest.mark.parametrize("name", SECOND_WALL)
def test_second_wall_refuses_what_the_first_would_miss(name, targets):
    wh, values = targets
    before = values["part"].read_bytes()
    con = wh.connect(guarded=True, memory_limit="1GB")
    try:
        with pytest.raises(duckdb.Error) as refused:
            con.execute(ATTACKS[name].format(**values)).fetchall()
    finally:
        con.close()
    # (a quoted file name is not even looked up as a file with external access off: "does not exist")
    assert any(
        word in str(refused.value)
        for word in ("Permission", "locked", "read-only", "disabled", "Cannot", "does not exist")
    ), refused.value
    assert not values["out"].exists() and not values["out_dir"].exists()
    assert values["part"].read_bytes() == before
    assert "the-secret-content" not in str(refused.value)


def test_queries_and_macros_still_run_read_only(targets):
    wh, _ = targets
    n = wh.sql("SELECT count(*) FROM token_neurons WHERE run_id = 'r'", read_only=True).fetchall()[0][0]
    assert n == wh.sql("SELECT count(*) FROM token_neurons WHERE run_id = 'r'").fetchall()[0][0] > 0
    assert wh.sql("WITH t AS (SELECT * FROM tokens) SELECT count(*) FROM t", read_only=True).fetchall()[0][0] > 0
    assert wh.sql("DESCRIBE tokens", read_only=True).fetchall()
    assert wh.sql("SELECT whq_known_run('r')", read_only=True).fetchall() == [(True,)]
    assert wh.sql("SHOW tokens", read_only=True).fetchall() == wh.sql("DESCRIBE tokens", read_only=True).fetchall()
    assert wh.sql("SELECT count(*) FROM range(3)", read_only=True).fetchall() == [(3,)]
    histogram = "SELECT histogram(layer) FROM token_neurons"  # an aggregate that shares a table function's name
    assert wh.sql(histogram, read_only=True).fetchall() == wh.sql(histogram).fetchall()
    assert {
        "nag_distance",
        "nag_select",
    } <= wh.name_resolving_macros() and "layer_summary" not in wh.name_resolving_macros()
    nag = (
        "SELECT count(*) FROM nag_select('r', 'r', 'mlp.up', layers := [0, 1], power := 1.0)"  # a name-resolving macro
    )
    assert wh.sql(nag, read_only=True).fetchall() == wh.sql(nag).fetchall()
    with pytest.raises((QueryError, duckdb.Error), match="no committed run .nope."):
        wh.sql("SELECT whq_known_run('nope')", read_only=True).fetchall()


def test_cli_read_only_refusal_is_one_line(minilm_wh):
    code, _, err = run_whq("sql", minilm_wh, "SELECT * FROM read_csv('/etc/passwd')", "--read-only")
    assert code == 2 and err.count("\n") == 1
    assert err == (
        "error: read-only mode refuses read_csv(), which reads files or runs SQL text: "
        "query the warehouse's tables and macros instead\n"
    )
    code, _, err = run_whq("sql", minilm_wh, "LOAD httpfs", "--read-only")
    assert (code, err) == (
        2,
        "error: read-only mode refuses LOAD statements: only SELECT/WITH/VALUES/DESCRIBE/SUMMARIZE/SHOW "
        "queries are allowed\n",
    )


def test_sql_nested_too_deeply_for_the_parser_is_one_line(minilm_wh):
    code, _, err = run_whq("sql", minilm_wh, "SELECT " + "abs(" * 300 + "1" + ")" * 300, "--read-only")
    assert (code, err) == (
        2,
        "error: read-only mode could not parse the SQL: it is nested too deeply; flatten it (WITH ...)\n",
    )


FUNCTION_POSITIONS = [
    "SELECT * FROM {f}()",
    "SELECT * FROM main.{f}()",
    'SELECT * FROM "{f}"()',
    "SELECT * FROM tokens, LATERAL {f}()",
    "WITH x AS (SELECT * FROM {f}()) SELECT * FROM x",
    "SELECT * FROM tokens WHERE doc IN (SELECT 1 FROM {f}())",
    "SELECT 1 UNION ALL SELECT 1 FROM {f}()",
    "EXPLAIN SELECT * FROM {f}()",
    "SHOW SELECT * FROM {f}()",
    "DESCRIBE SELECT * FROM {f}()",
]


@pytest.mark.parametrize("position", FUNCTION_POSITIONS)
def test_every_duckdb_table_function_outside_the_read_only_list_is_refused_anywhere(position):
    """checkpoint(), enable_logging(), which_secret(), read_duckdb(), ... and whatever a new DuckDB adds."""
    from warehouse.safesql import _READ_ONLY_TABLE_FUNCTIONS, check_read_only

    with duckdb.connect() as con:
        shipped = {
            name
            for (name,) in con.execute(
                "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type IN ('table', 'table_macro')"
            ).fetchall()
        }
    refused = sorted(shipped - _READ_ONLY_TABLE_FUNCTIONS)
    assert len(refused) > 50 and "checkpoint" in refused
    passed = []
    for name in refused:
        try:
            check_read_only(position.format(f=name))
            passed.append(name)
        except QueryError:
            pass
    assert passed == []
