"""schema.sql, parsed once: the tables, their columns, types and comments.

The file is executed in an in-memory DuckDB and read back from duckdb_columns(), so
DuckDB itself is the parser and schema.sql stays the single source of truth.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

SCHEMA_SQL = Path(__file__).with_name("schema.sql")
HIVE_TYPES = {"run_id": "VARCHAR", "site": "VARCHAR", "layer": "INTEGER"}
# The residual-stream states a chat scenario captures per layer, in report order (the sites of scenario runs).
SCENARIO_SOURCES = ("hidden_in", "hidden_out", "attn_out", "mlp_out")

_ARROW = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "SMALLINT": pa.int16(),
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us"),
}

# Narrower physical types for the big tables (see docs/bench-ingest.md, "Storage"): the views widen
# them back to the schema types, so queries never see the difference.
_COMPACT = {
    ("token_neurons", "value"): pa.float16(),
    ("neuron_examples", "value"): pa.float32(),
    ("neuron_examples", "window_values"): pa.list_(pa.float16()),
    ("doc_neurons", "rank"): pa.int16(),
}
_NEURON_ID_COLUMNS = {("token_neurons", "neuron"), ("doc_neurons", "neuron")}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    comment: str | None


@dataclass(frozen=True)
class Table:
    name: str
    comment: str | None
    columns: tuple[Column, ...]

    @property
    def partitions(self) -> tuple[str, ...]:
        names = {c.name for c in self.columns}
        return ("run_id", "site", "layer") if {"site", "layer"} <= names else ("run_id",)

    @property
    def stored_columns(self) -> tuple[Column, ...]:
        """Columns inside the Parquet files (partition keys live in the path)."""
        return tuple(c for c in self.columns if c.name not in self.partitions)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def arrow_schema(self, neuron_width: int | None = None) -> pa.Schema:
        """Physical Parquet schema of this table's parts."""
        fields = []
        for col in self.stored_columns:
            fields.append(pa.field(col.name, _physical(self.name, col, neuron_width)))
        return pa.schema(fields)


def _physical(table: str, col: Column, neuron_width: int | None) -> pa.DataType:
    if (table, col.name) in _COMPACT:
        return _COMPACT[(table, col.name)]
    if (table, col.name) in _NEURON_ID_COLUMNS and neuron_width is not None and neuron_width <= 32767:
        return pa.list_(pa.int16()) if col.type.endswith("[]") else pa.int16()
    return arrow_type(col.type)


def arrow_type(duck_type: str) -> pa.DataType:
    if duck_type.endswith("[]"):
        return pa.list_(arrow_type(duck_type[:-2]))
    return _ARROW[duck_type]


@functools.cache
def tables() -> dict[str, Table]:
    import duckdb

    con = duckdb.connect()
    con.execute(SCHEMA_SQL.read_text())
    comments = dict(con.execute("SELECT table_name, comment FROM duckdb_tables()").fetchall())
    rows = con.execute(
        "SELECT table_name, column_name, data_type, comment FROM duckdb_columns() ORDER BY table_name, column_index"
    ).fetchall()
    con.close()
    columns: dict[str, list[Column]] = {}
    for table, name, dtype, comment in rows:
        columns.setdefault(table, []).append(Column(name, dtype, comment))
    order = [line.split()[2] for line in SCHEMA_SQL.read_text().splitlines() if line.startswith("CREATE TABLE")]
    return {t: Table(t, comments.get(t), tuple(columns[t])) for t in order}


def table(name: str) -> Table:
    try:
        return tables()[name]
    except KeyError:
        from .errors import WarehouseError

        raise WarehouseError(f"unknown table {name!r}: the tables are {', '.join(tables())}") from None
