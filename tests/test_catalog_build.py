"""The catalog build (warehouse/catalog.py): one transaction, macros bound over empty views, and parts
written before a column of schema.sql existed read that column as NULL."""

from __future__ import annotations

import shutil
import stat

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


def _catalog_dump(path) -> tuple:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return tuple(
            con.execute(query).fetchall()
            for query in (
                "SELECT view_name, comment, sql FROM duckdb_views() WHERE NOT internal ORDER BY 1",
                "SELECT function_name, function_type, macro_definition, comment FROM duckdb_functions() "
                "WHERE NOT internal ORDER BY 1, 3",
                "SELECT table_name, column_name, data_type, comment FROM duckdb_columns() WHERE NOT internal ORDER BY 1, 2",
            )
        )
    finally:
        con.close()


def test_the_shared_base_builds_the_same_catalog_and_only_from_a_private_folder(golden_root, tmp_path, monkeypatch):
    """Builds copy the macros bound once into this user's own folder; without it they bind them themselves."""
    root = tmp_path / "wh"
    shutil.copytree(golden_root, root)
    folder = tmp_path / "cache"
    monkeypatch.setenv("WHQ_CACHE", str(folder))
    with warehouse.open(root) as wh:
        wh.refresh(force=True)
    assert len(list(folder.glob("catalog-base-*.duckdb"))) == 1 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    shared = _catalog_dump(root / "whq.duckdb")
    shutil.rmtree(folder)
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)  # another user could write here: not used
    with warehouse.open(root) as wh:
        wh.refresh(force=True)
    assert not list(folder.iterdir())
    assert _catalog_dump(root / "whq.duckdb") == shared and len(shared[1]) > 10


def test_a_commit_replaces_only_its_views_and_builds_the_catalog_a_whole_build_would(minilm_wh, tmp_path, monkeypatch):
    from explain import examples as ex
    from explain.pipeline import Recipe, plan_explain, run_plan
    from warehouse import catalog
    from warehouse.locks import locked

    root = tmp_path / "wh"
    shutil.copytree(minilm_wh, root)
    replaced = []
    real = catalog._replace_view
    monkeypatch.setattr(
        catalog,
        "_replace_view",
        lambda con, layout, tmp, table, *a: (replaced.append(table.name), real(con, layout, tmp, table, *a)),
    )
    wh = warehouse.open(root)  # the copy's catalog is rebuilt for its new root
    replaced.clear()
    chosen = ex.select_units(wh, "r", "mlp.act", [3], None, 2)
    plan = plan_explain(
        wh,
        "r",
        "mlp.act",
        chosen,
        explainer="top-tokens",
        model="top-tokens",
        recipe=Recipe(n_explain=3, n_test=2, n_non_activating=2),
    )
    run_plan(wh, "r", plan, llm="top-tokens")
    assert sorted(replaced) == ["explanation_examples", "explanations"]
    incremental = _catalog_dump(root / "whq.duckdb")
    assert wh.sql("SELECT count(*) FROM explanations").fetchall() == [(2,)]
    wh.close()
    replaced.clear()
    with warehouse.open(root) as again:
        again.refresh(force=True)
    assert sorted(replaced) == sorted(schema.tables())
    assert _catalog_dump(root / "whq.duckdb") == incremental
    # a catalog that is no longer the one the commit started from (another commit came between) is built whole
    replaced.clear()
    layout = warehouse.open(root).layout
    with locked(layout.commit_lock):
        catalog.build(layout, changed=("0" * 16, {"scores"}))
    assert sorted(replaced) == sorted(schema.tables()) and _catalog_dump(root / "whq.duckdb") == incremental
