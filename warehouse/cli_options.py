"""Options shared by several `whq` commands, declared once (typer `Annotated` aliases)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class SqlEngine(StrEnum):
    duckdb = "duckdb"
    spark = "spark"


class FrameEngine(StrEnum):
    sql = "sql"
    polars = "polars"


WarehouseArg = Annotated[str, typer.Argument(help="Warehouse folder, or a URL (s3://bucket/prefix) to read in place.")]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="How to print the rows: table, csv or json.")]
SqlEngineOption = Annotated[SqlEngine, typer.Option("--engine", help="duckdb, or spark to run the same SQL on Spark.")]
FrameEngineOption = Annotated[FrameEngine, typer.Option("--engine", help="sql (DuckDB) or polars.")]
# Free-form (cuda:N), so checked by ingest.options.check_device / check_dtype, whose errors name the choices.
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")]
