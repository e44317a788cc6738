"""The warehouse on Spark SQL: the same committed Parquet parts, the same macros.

`register(spark, source)` makes every table of schema.sql a temporary view over the
committed parts (listed by the manifests, never a glob; hive columns run_id/site/layer
from the paths; cast to schema.sql's types), and `sql(spark, query)` runs a query that
may call the macros of queries/*.sql, expanded and transpiled by queries.spark_transpile.
`spark_sql(wh, query)` does both on a local session, for `whq sql --engine spark`.

Spark (4.x) cannot read Parquet's FLOAT16 logical type, which the compact tables use;
those columns are read as their raw 2 bytes and decoded to FLOAT in Spark SQL itself,
so the same code runs on a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa

from warehouse import catalog, schema
from warehouse.errors import QueryError

from .spark_transpile import load_macros, to_spark

_SPARK_TYPES = {
    "VARCHAR": "string",
    "JSON": "string",
    "INTEGER": "int",
    "BIGINT": "bigint",
    "SMALLINT": "smallint",
    "FLOAT": "float",
    "DOUBLE": "double",
    "BOOLEAN": "boolean",
    "TIMESTAMP": "timestamp_ntz",
}

REGISTERED_CONF = "whq.registered"  # the warehouse state the session's views show


def spark_type(duck_type: str) -> str:
    if duck_type.endswith("[]"):
        return f"array<{spark_type(duck_type[:-2])}>"
    return _SPARK_TYPES[duck_type]


_LOG4J2 = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = stderr
appender.console.type = Console
appender.console.name = stderr
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
"""


def _log4j2_file() -> str:
    """A log4j2 configuration for the local JVM: errors only (Spark's default prints a page of start-up notes)."""
    path = Path(tempfile.gettempdir()) / "whq-spark-log4j2.properties"
    if not path.exists() or path.read_text() != _LOG4J2:
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(_LOG4J2)
        os.replace(tmp, path)  # another whq process may be starting Spark too
    return str(path)


def spark_session(app_name: str = "whq", **conf: str):
    """A local Spark session on 2 cores: small shuffles, no UI, bound to localhost, quiet; `conf` adds settings."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise QueryError("the spark engine needs pyspark and Java 17: pip install 'whq[spark]'") from None
    builder = (
        SparkSession.builder.master("local[2]")
        .appName(app_name)
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_log4j2_file()}")
        .config("spark.sql.session.timeZone", "UTC")
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # the local JVM binds to loopback, without a warning
    try:
        spark = builder.getOrCreate()
    except Exception as err:  # py4j/JVM start-up failures have no common base class
        raise QueryError(
            f"cannot start Spark ({str(err).splitlines()[0]}): check that Java 17 is installed and JAVA_HOME is set"
        ) from None
    spark.sparkContext.setLogLevel("OFF")  # errors reach the caller as QueryError, with one line
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):  # pyspark logs each failed query too
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return spark


# -- tables ----------------------------------------------------------------------


def _decode_float16(column: str) -> str:
    """Spark SQL turning a little-endian IEEE half (2 raw bytes) into its exact value."""
    bits = f"cast(conv(concat(substr(hex({column}), 3, 2), substr(hex({column}), 1, 2)), 16, 10) as int)"
    sign = f"(CASE WHEN {bits} >= 32768 THEN -1.0D ELSE 1.0D END)"
    exponent = f"(shiftright({bits}, 10) & 31)"
    mantissa = f"({bits} & 1023)"
    return (
        f"CASE WHEN {column} IS NULL THEN NULL "
        f"WHEN {exponent} = 0 THEN {sign} * {mantissa} * power(2, -24) "
        f"WHEN {exponent} = 31 THEN CASE WHEN {mantissa} = 0 THEN {sign} * double('inf') ELSE double('NaN') END "
        f"ELSE {sign} * (1024 + {mantissa}) * power(2, {exponent} - 25) END"
    )


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def table_frame(spark, table: schema.Table, base: str, files: list[str]):
    """A DataFrame of `table` over its parts under `base` (the table's folder), with schema.sql's columns and types."""
    columns = ", ".join(f"{_quoted(c.name)} {spark_type(c.type)}" for c in table.columns)
    if not files:
        return spark.createDataFrame([], columns)
    arrow = table.arrow_schema()
    # Spark reads no Parquet float16: such columns (and lists of them) are read as raw bytes and decoded in SQL.
    half = {f.name for f in arrow if pa.types.is_float16(f.type)}
    half_lists = {f.name for f in arrow if pa.types.is_list(f.type) and pa.types.is_float16(f.type.value_type)}

    def stored_type(c) -> str:
        if c.name in half:
            return "binary"
        return "array<binary>" if c.name in half_lists else spark_type(c.type)

    def selected(c) -> str:
        name = _quoted(c.name)
        if c.name in half:
            return f"cast(({_decode_float16(name)}) as float) AS {name}"
        if c.name in half_lists:
            return f"transform({name}, h -> cast(({_decode_float16('h')}) as float)) AS {name}"
        return f"cast({name} as {spark_type(c.type)}) AS {name}"

    read = ", ".join(
        f"{_quoted(c.name)} {stored_type(c)}"
        for c in (*table.stored_columns, *(table.column(p) for p in table.partitions))
    )
    frame = spark.read.schema(read).option("basePath", base).parquet(*files)
    return frame.selectExpr(*(selected(c) for c in table.columns))


def _parts_from_manifests(spark, root: str) -> dict[str, list[str]]:
    """Committed part paths by table, read from <root>/runs/*.json through Spark (any filesystem Spark reads)."""
    from pyspark.errors import AnalysisException

    def texts(pattern: str) -> list[str]:
        try:
            return [row.value for row in spark.read.text(pattern, wholetext=True).collect()]
        except AnalysisException:  # no such file: an empty warehouse, or no quarantine
            return []

    quarantined = {run for text in texts(f"{root}/quarantine.json") for run in json.loads(text)}
    files: dict[str, list[str]] = {t: [] for t in schema.tables()}
    for text in texts(f"{root}/runs/*.json"):
        manifest = json.loads(text)
        if manifest["run_id"] not in quarantined:
            for part in manifest["parts"]:
                files.setdefault(part["table"], []).append(f"{root}/{part['path']}")
    return files


def register(spark, source) -> None:
    """Register every warehouse table as a temporary view of `spark`.

    `source` is an open Warehouse, or the root of one as a path or URI that this Spark
    session reads (/shared/wh, hdfs://..., s3a://bucket/wh): the committed parts are
    those its manifests list, so a run being written stays invisible.
    """
    if hasattr(source, "files"):
        root, state = str(source.root), _state(source)
        files = {name: [str(p) for p in source.files(name)] for name in schema.tables()}
    else:
        root = state = str(source).rstrip("/")
        files = _parts_from_manifests(spark, root)
    for name, table in schema.tables().items():
        table_frame(spark, table, f"{root}/data/{name}", files.get(name, [])).createOrReplaceTempView(name)
    spark.conf.set(REGISTERED_CONF, state)


def _state(wh) -> str:
    return f"{wh.root}@{catalog.fingerprint(wh.layout)}"


# -- queries ---------------------------------------------------------------------


def _message(err: Exception) -> str:
    """One line from a Spark error: a macro's error() text as written, else the error's first line."""
    text = str(err).strip()
    raised = re.search(r"\[USER_RAISED_EXCEPTION\]\s*(.*?)\s*(SQLSTATE: \w+)?$", text, re.MULTILINE)
    if raised:
        return raised.group(1)
    line = text.splitlines()[0] if text else type(err).__name__
    line = re.sub(r"^\[[A-Z_.]+\]\s*", "", line)
    return re.sub(r"\s*SQLSTATE: \w+.*$", "", line)


def _spark_errors():
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    return (PySparkException, Py4JJavaError)


def sql(spark, query: str, macro_files=None):
    """Run a DuckDB-dialect query (macros allowed) on `spark`'s registered views; returns a Spark DataFrame."""
    macros = load_macros(catalog.macro_files() if macro_files is None else macro_files)
    text = to_spark(query, macros)
    try:
        return spark.sql(text)
    except _spark_errors() as err:
        raise QueryError(f"Spark SQL error: {_message(err)}") from None


def to_polars(frame) -> pl.DataFrame:
    """Collect a Spark DataFrame (through Arrow) as a polars DataFrame."""
    try:
        return pl.from_arrow(frame.toArrow())
    except _spark_errors() as err:
        raise QueryError(f"Spark SQL error: {_message(err)}") from None


def spark_sql(wh, query: str, spark=None, macro_files=None) -> pl.DataFrame:
    """Run `query` (DuckDB dialect, macros allowed) on Spark over warehouse `wh`; returns a polars DataFrame."""
    spark = spark or spark_session()
    if spark.conf.get(REGISTERED_CONF, None) != _state(
        wh
    ):  # re-register only when runs were committed, repaired or deleted
        register(spark, wh)
    return to_polars(sql(spark, query, macro_files))
