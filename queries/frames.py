"""Polars twins of the SQL macros: same names, same columns, built by Polars itself.

Each twin takes an open Warehouse first, then the macro's arguments, and returns a
polars.LazyFrame read straight from the committed Parquet parts (never through
DuckDB), so the two engines check each other. `scan` is the one entry point to the
files: it adds the hive partition columns and widens the compact physical types to
the types of schema.sql, exactly as the catalog's views do.
"""

from __future__ import annotations

import polars as pl

from warehouse import schema
from warehouse.errors import UnknownSite

_POLARS = {
    "VARCHAR": pl.String,
    "JSON": pl.String,
    "INTEGER": pl.Int32,
    "BIGINT": pl.Int64,
    "SMALLINT": pl.Int16,
    "FLOAT": pl.Float32,
    "DOUBLE": pl.Float64,
    "BOOLEAN": pl.Boolean,
    "TIMESTAMP": pl.Datetime("us"),
}


def polars_type(duck_type: str) -> pl.DataType:
    if duck_type.endswith("[]"):
        return pl.List(polars_type(duck_type[:-2]))
    return _POLARS[duck_type]


def schema_of(table: str) -> dict[str, pl.DataType]:
    return {c.name: polars_type(c.type) for c in schema.table(table).columns}


def scan(wh, table: str, run: str | None = None) -> pl.LazyFrame:
    """The committed rows of `table` (of one run, or all runs) as a LazyFrame with schema.sql's columns and types."""
    target = schema_of(table)
    files = [str(f) for f in wh.files(table, run)]
    if not files:
        return pl.LazyFrame(schema=target)
    hive = {k: target[k] for k in schema.table(table).partitions}
    frame = pl.scan_parquet(
        files,
        hive_partitioning=True,
        hive_schema=hive,
        missing_columns="insert",
        storage_options=wh.layout.storage_options,  # credentials and endpoint of an s3:// root
    )
    return frame.select(pl.col(name).cast(dtype) for name, dtype in target.items())


def site_row(wh, run: str, site: str, *, reduction: str | None = None, fix: str | None = None) -> dict:
    """The sites row of (run, site), optionally one that kept `reduction`; UnknownSite naming the fix otherwise."""
    rows = scan(wh, "sites", run).filter(pl.col("site") == site)
    if reduction is not None:
        rows = rows.filter(pl.col("reductions").str.contains(reduction))
    found = rows.collect()
    if found.is_empty():
        raise UnknownSite(
            fix
            or f"run {run!r} has no site {site!r}: list its sites with "
            f"SELECT site, layers, reductions FROM sites WHERE run_id = '{run}'"
        )
    return found.row(0, named=True)


def kept_reductions(info: dict) -> dict[str, str | None]:
    """A sites row's reductions text ("topk=20,examples=20,hist") as {name: value, None for a bare flag}."""
    parts = (part.partition("=") for part in (info["reductions"] or "").split(",") if part)
    return {name: value if sep else None for name, sep, value in parts}


# The twins live in one module per topic and are re-exported here: `frames.firing_rate(wh, ...)`.
# Looked up lazily, because those modules import `scan` from this one.
TWIN_MODULES = ["neuron_frames", "nag_frames", "scenario_frames", "dictionary_frames", "unit_frames"]


def __getattr__(name: str):
    import importlib

    for module in TWIN_MODULES:
        twins = importlib.import_module(f"{__package__}.{module}")
        if name in getattr(twins, "__all__", ()):
            return getattr(twins, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
