"""The catalog build (warehouse/catalog.py): one transaction, macros bound over empty views, and parts
written before a column of schema.sql existed read that column as NULL."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq

import warehouse
from warehouse import schema


def _macros(wh) -> list[tuple]:
    return wh.sql(
        "SELECT function_name, macro_definition FROM duckdb_functions() "
        "WHERE database_name = current_database() AND NOT internal ORDER BY 1, 2"
    ).fetchall()


def test_parts_older_than_a_column_read_it_as_null(golden_root, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(golden_root, root)
    with warehouse.open(root) as wh:
        before = wh.sql("SELECT * FROM documents ORDER BY doc").fetchall()
        macros = _macros(wh)
        part = wh.files("documents")[0]
    columns = [c.name for c in schema.tables()["documents"].columns]
    table = pq.read_table(part)
    # the last stored column that holds values (the partition keys live in the path)
    dropped = [c for c in columns if c in table.column_names and table[c].null_count < len(table)][-1]
    assert dropped in table.column_names
    pq.write_table(table.drop_columns([dropped]), part)
    with warehouse.open(root) as wh:
        wh.refresh(force=True)
        after = wh.sql("SELECT * FROM documents ORDER BY doc").fetchall()
        assert _macros(wh) == macros and len(macros) > 10
    at = columns.index(dropped)
    assert [row[at] for row in after] == [None] * len(before)
    assert [row[:at] + row[at + 1 :] for row in after] == [row[:at] + row[at + 1 :] for row in before]
