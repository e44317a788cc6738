"""Bounds on untrusted SQL (timeout, memory, rows) and the trusted `whq sql`'s refusal to write into the warehouse.

The bounds are enforced by DuckDB itself (an interrupt from a timer, its memory_limit),
so each test runs a query that would otherwise run on: small limits keep them fast.
"""

from __future__ import annotations

import os
import shutil
import threading

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import warehouse
from warehouse.errors import QueryError
from warehouse.safesql import SqlLimits, check_no_warehouse_writes, default_memory_limit, run_read_only

from .cli_runner import run_whq

RUNAWAY = {
    "a count over a trillion rows": "SELECT count(*) FROM range(1000000000000)",
    "an infinite recursive CTE": "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
}
GREEDY = "SELECT length(string_agg(repeat('x', 1000000), ',')) FROM range(100000)"  # 100 GB of text


@pytest.fixture
def wh(minilm_wh):
    opened = warehouse.open(minilm_wh)
    yield opened
    opened.close()


@pytest.mark.parametrize("name", RUNAWAY)
def test_a_runaway_query_stops_at_the_timeout_with_one_line(name, wh):
    with pytest.raises(QueryError) as stopped:
        run_read_only(wh, RUNAWAY[name], SqlLimits(timeout_s=0.5))
    assert str(stopped.value) == (
        "the query ran past the 0.5 s timeout and was stopped: narrow it (WHERE, LIMIT), or raise --timeout"
    )
    assert run_read_only(wh, "SELECT 42 AS x").frame["x"].to_list() == [42]  # the connection still serves


def test_a_greedy_query_stops_at_the_memory_limit_with_one_line(wh):
    with pytest.raises(QueryError) as stopped:
        run_read_only(wh, GREEDY, SqlLimits(memory_limit="100MB"))
    assert str(stopped.value) == (
        "the query needed more than the 100MB memory limit and was stopped: narrow it "
        "(WHERE, LIMIT), or raise --memory-limit"
    )


def test_the_timeout_interrupts_only_its_own_query(wh):
    """A server runs several queries on one guarded connection: each has its own cursor and timer."""
    stopped = []

    def runaway():
        try:
            run_read_only(wh, RUNAWAY["a count over a trillion rows"], SqlLimits(timeout_s=1.5))
        except QueryError as err:
            stopped.append(str(err))

    thread = threading.Thread(target=runaway)
    thread.start()
    counts = [run_read_only(wh, "SELECT count(*) AS n FROM tokens").frame["n"][0] for _ in range(3)]
    thread.join()
    assert len(stopped) == 1 and "timeout" in stopped[0]
    assert counts[0] > 0 and len(set(counts)) == 1


def test_default_limits_are_30_s_and_a_quarter_of_memory_and_reach_duckdb(wh):
    limits = SqlLimits()
    assert (limits.timeout_s, limits.max_rows) == (30.0, 10_000)
    quarter = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
    assert (
        limits.memory_limit == default_memory_limit() and abs(int(limits.memory_limit[:-3]) * 2**20 - quarter) < 2**20
    )
    settings = run_read_only(
        wh,
        "SELECT current_setting('memory_limit') AS memory, current_setting('temp_directory') AS temp",
        SqlLimits(memory_limit="123MB"),
    ).frame.row(0)
    with duckdb.connect() as plain:
        plain.execute("SET memory_limit = '123MB'")
        expected = plain.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert settings == (expected, "")  # and nothing spills: no temp directory for a user path to match


def test_rows_beyond_max_rows_are_cut_and_marked(wh):
    cut = run_read_only(wh, "SELECT * FROM range(25) ORDER BY 1", SqlLimits(max_rows=10))
    assert (cut.frame.height, cut.truncated, cut.frame[:, 0].to_list()) == (10, True, list(range(10)))
    whole = run_read_only(wh, "SELECT * FROM range(10)", SqlLimits(max_rows=10))
    assert (whole.frame.height, whole.truncated) == (10, False)
    with pytest.raises(QueryError, match=r"^the query returned more than 10 rows: add a LIMIT, or raise max_rows"):
        wh.sql("SELECT * FROM range(11)", read_only=True, limits=SqlLimits(max_rows=10))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"timeout_s": 0}, "--timeout 0 must be a positive number of seconds"),
        ({"timeout_s": float("inf")}, "--timeout inf must be a positive number of seconds"),
        ({"timeout_s": float("nan")}, "--timeout nan must be a positive number of seconds"),
        ({"timeout_s": 1e300}, "--timeout 1e+300 is longer than 1,000,000,000 seconds: give a shorter one"),
        ({"memory_limit": "lots"}, "--memory-limit 'lots' must be a size such as 512MB or 4GB"),
        ({"memory_limit": "0GB"}, "--memory-limit '0GB' must be a size such as 512MB or 4GB"),
        ({"max_rows": 0}, "--max-rows 0 must be a whole number of at least 1"),
    ],
)
def test_limits_out_of_range_are_refused_naming_the_option(bad, message):
    with pytest.raises(QueryError) as refused:
        SqlLimits(**bad)
    assert str(refused.value) == message


def test_cli_bounds_give_one_line_and_a_truncation_note(minilm_wh):
    code, _, err = run_whq("sql", minilm_wh, RUNAWAY["an infinite recursive CTE"], "--read-only", "--timeout", "0.5")
    assert (code, err) == (
        2,
        "error: the query ran past the 0.5 s timeout and was stopped: narrow it (WHERE, LIMIT), or raise --timeout\n",
    )
    code, _, err = run_whq("sql", minilm_wh, GREEDY, "--read-only", "--memory-limit", "100MB")
    assert code == 2 and err.count("\n") == 1 and "raise --memory-limit" in err
    for read_only in ([], ["--read-only"]):
        code, out, err = run_whq(
            "sql", minilm_wh, "SELECT * FROM range(7)", "--format", "csv", "--max-rows", "5", *read_only
        )
        assert (code, out.split(), err) == (
            0,
            ["range", "0", "1", "2", "3", "4"],
            "note: printed the first 5 rows; more were cut: add a LIMIT, or raise --max-rows\n",
        )
    code, out, err = run_whq("sql", minilm_wh, "SELECT * FROM range(5)", "--format", "csv", "--max-rows", "5")
    assert (code, len(out.split()), err) == (0, 6, "")


# -- trusted SQL: no writes into the warehouse -----------------------------------

INTO_THE_WAREHOUSE = {
    "COPY over a committed part": "COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet)",
    "COPY to a relative path": "COPY (SELECT 1 AS x) TO 'wh/data/tokens/extra.parquet' (FORMAT parquet)",
    "COPY to an absolute path": "COPY (SELECT 1 AS x) TO '{wh}/extra.csv'",
    "COPY of partitions into data/": "COPY (SELECT 1 AS x, 'r' AS run_id) TO 'wh/data' (FORMAT parquet, PARTITION_BY (run_id), OVERWRITE_OR_IGNORE)",
    "COPY to a dollar-quoted path": "COPY (SELECT 1 AS x) TO $$wh/extra.csv$$",
    "COPY through a symlink": "COPY (SELECT 1 AS x) TO 'link/extra.csv'",
    "COPY after a query": "SELECT 1; COPY (SELECT 1 AS x) TO 'wh/extra.csv'",
    "EXPLAIN ANALYZE of a COPY": "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO 'wh/extra.csv'",
    "EXPORT DATABASE": "EXPORT DATABASE 'wh/export'",
    "ATTACH a new database file": "ATTACH 'wh/extra.duckdb' AS extra",
    "ATTACH a sqlite file": "ATTACH 'sqlite:wh/extra.db' AS extra",
    "spill into it": "SET temp_directory = 'wh/spill'",
    "log queries into it": "SET log_query_path = 'wh/queries.log'",
    "profile into it": "PRAGMA profiling_output = 'wh/profile.json'",
    "log into it": "CALL enable_logging(storage := 'file', storage_path := 'wh/logs')",
}


@pytest.fixture
def wh_copy(minilm_wh, tmp_path, monkeypatch):
    root = tmp_path / "wh"
    shutil.copytree(minilm_wh, root)
    (tmp_path / "link").symlink_to(root / "data")
    monkeypatch.chdir(tmp_path)  # relative paths as a user types them, next to the warehouse
    return root


def _listing(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "whq.duckdb"
    }


@pytest.mark.parametrize("name", INTO_THE_WAREHOUSE)
def test_trusted_sql_refuses_writing_into_the_warehouse(name, wh_copy):
    part = warehouse.open(wh_copy).files("tokens")[0]
    before = _listing(wh_copy)
    query = INTO_THE_WAREHOUSE[name].format(wh=wh_copy, part=part)
    code, _, err = run_whq("sql", wh_copy, query)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: whq sql refuses writing '") and err.endswith(
        f"', inside the warehouse {wh_copy.resolve()}: its files change only through whq; write elsewhere, or pass --allow-writes\n"
    )
    assert _listing(wh_copy) == before


def test_trusted_sql_refuses_a_relative_path_when_run_inside_the_warehouse(wh_copy, monkeypatch):
    monkeypatch.chdir(wh_copy / "data")
    code, _, err = run_whq("sql", wh_copy, "COPY (SELECT 1 AS x) TO 'extra.csv' (FORMAT 'csv')")
    assert code == 2 and "refuses writing 'extra.csv'" in err
    assert not (wh_copy / "data" / "extra.csv").exists()


@pytest.mark.parametrize(
    "query",
    [
        "COPY (SELECT 1 AS x) TO '{out}' (FORMAT 'csv')",
        "COPY (SELECT count(*) AS n FROM tokens) TO 'counts.csv'",
        "SELECT count(*) FROM read_parquet('wh/data/tokens/*/*.parquet')",
        "SET memory_limit = '1GB'",
        "ATTACH 'wh/whq.duckdb' AS again (READ_ONLY)",
        "SELECT 'wh/data/x.csv' AS just_a_string",
    ],
)
def test_trusted_sql_still_reads_the_warehouse_and_writes_elsewhere(query, wh_copy, tmp_path):
    code, _, err = run_whq("sql", wh_copy, query.format(out=tmp_path / "out.csv"))
    assert (code, err) == (0, "")
    assert "COPY" not in query or (tmp_path / "out.csv").exists() or (tmp_path / "counts.csv").exists()


def test_allow_writes_lets_trusted_sql_write_into_the_warehouse(wh_copy):
    code, _, err = run_whq("sql", wh_copy, "COPY (SELECT 1 AS x) TO 'wh/scratch.csv'", "--allow-writes")
    assert (code, err) == (0, "")
    assert (wh_copy / "scratch.csv").read_text() == "x\n1\n"
    code, _, err = run_whq("sql", wh_copy, "SELECT 1", "--allow-writes", "--read-only")
    assert (code, err) == (2, "error: --allow-writes contradicts --read-only: drop one of them\n")


def test_the_write_check_reads_targets_not_every_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_no_warehouse_writes("COPY (SELECT 'wh/a' AS x) TO 'elsewhere.csv' (FORMAT 'wh')", tmp_path / "wh")
    check_no_warehouse_writes("COPY tokens FROM 'wh/data.csv'", tmp_path / "wh")  # COPY ... FROM reads
    with pytest.raises(QueryError, match="refuses writing 'wh/out.csv'"):
        check_no_warehouse_writes("COPY (SELECT 'elsewhere.csv' AS x) TO 'wh/out.csv'", tmp_path / "wh")


SEGMENT = st.text(alphabet="abcXYZ019_-. ", min_size=1, max_size=8).filter(
    lambda s: s.strip(" ") not in ("", ".", "..")
)
WRITES = [
    "COPY (SELECT 1 AS x) TO {p}",
    "COPY (SELECT 1 AS x) TO {p} (FORMAT 'csv', HEADER true)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO {p}",
    "SELECT 1; COPY (SELECT 1 AS x) TO {p}",
    "EXPORT DATABASE {p}",
    "ATTACH {p} AS other",
    "SET temp_directory = {p}",
    "SET GLOBAL log_query_path = {p}",
]


@settings(max_examples=150, deadline=None)
@given(
    statement=st.sampled_from(WRITES),
    segments=st.lists(SEGMENT, min_size=1, max_size=3),
    inside=st.booleans(),
    absolute=st.booleans(),
    dollar=st.booleans(),
)
def test_writes_are_refused_exactly_inside_the_warehouse(
    statement, segments, inside, absolute, dollar, tmp_path_factory
):
    """Whatever the statement, quoting and path shape (relative, absolute, through `..`), the verdict is 'inside?'."""
    base = tmp_path_factory.getbasetemp() / "writes"
    root = base / "wh"
    (root / "data").mkdir(parents=True, exist_ok=True)
    parts = ["wh", "data", *segments] if inside else ["wh", "data", "..", "..", "elsewhere", *segments]
    path = os.path.join(str(base) if absolute else ".", *parts)
    quoted = f"$${path}$$" if dollar and "$" not in path else "'" + path.replace("'", "''") + "'"
    cwd = os.getcwd()
    os.chdir(base)
    try:
        if inside:
            with pytest.raises(QueryError, match="refuses writing"):
                check_no_warehouse_writes(statement.format(p=quoted), root)
        else:
            check_no_warehouse_writes(statement.format(p=quoted), root)
    finally:
        os.chdir(cwd)
