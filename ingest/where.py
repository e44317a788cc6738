"""`--where`: a row filter over a dataset's other columns, as a SQL boolean expression.

    --where "lang = 'en' AND length(text) BETWEEN 100 AND 5000"

The grammar is a pure expression: column names, literals, comparisons (= <> < <= > >=),
AND / OR / NOT, IN (...), BETWEEN, LIKE / ILIKE, IS [NOT] NULL, arithmetic, CAST, and the
functions in FUNCTIONS. sqlglot parses it and every node must be one of those kinds, so no
subquery, table, file reader, statement or other function can get through; the expression
DuckDB then evaluates over each Arrow batch is the one sqlglot writes back from that tree.
"""

from __future__ import annotations

from sqlglot import exp

from warehouse.errors import BadInput

NODES = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Paren,
    exp.Tuple,
    exp.And,
    exp.Or,
    exp.Not,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Like,
    exp.ILike,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.Mod,
    exp.Neg,
    exp.Cast,
    exp.DataType,
)
FUNCTIONS = (
    exp.Length,
    exp.Lower,
    exp.Upper,
    exp.Trim,
    exp.Abs,
    exp.Coalesce,
    exp.StartsWith,
    exp.RegexpLike,
)
GRAMMAR = (
    "columns and literals with = <> < <= > >=, AND, OR, NOT, IN, BETWEEN, LIKE, IS NULL, + - * / %, CAST "
    "and length, lower, upper, trim, abs, coalesce, starts_with, regexp_matches"
)


def check(text: str, columns: list[str], source: str) -> str:
    """The expression as DuckDB SQL, once it is a pure boolean expression over `columns`; else one BadInput."""
    import sqlglot

    try:
        tree = sqlglot.parse_one(text, dialect="duckdb")
    except sqlglot.errors.ParseError as err:
        first = str(err).splitlines()[0][:120]
        raise BadInput(f"--where {text!r} is not a SQL expression ({first}): write e.g. \"lang = 'en'\"") from None
    for node in tree.walk():
        if not isinstance(node, NODES + FUNCTIONS):
            raise BadInput(f"--where {text!r}: {node.key.upper()} is not allowed; use {GRAMMAR}")
    for column in tree.find_all(exp.Column):
        if column.table or column.name not in columns:
            raise BadInput(f"--where names {column.sql()!r}, not a column of {source}: use one of {', '.join(columns)}")
    return tree.sql(dialect="duckdb")


class RowFilter:
    """--where applied to Arrow batches by DuckDB (one in-memory connection, no file access)."""

    def __init__(self, text: str, columns: list[str], source: str):
        import duckdb

        self.sql = check(text, columns, source)
        self._con = duckdb.connect(":memory:", config={"enable_external_access": False})

    def apply(self, batch):
        """The rows of `batch` (an Arrow table with the ROW_COLUMN) the expression keeps, in order."""
        import duckdb

        from .dataset_sources import ROW_COLUMN

        self._con.register("batch", batch)
        try:
            kept = self._con.execute(
                f'SELECT "{ROW_COLUMN}" FROM batch WHERE ({self.sql}) ORDER BY "{ROW_COLUMN}"'
            ).fetchnumpy()[ROW_COLUMN]
        except duckdb.Error as err:
            first = str(err).splitlines()[0][:160]
            raise BadInput(f"--where {self.sql!r} fails on the data ({first}): fix the expression") from None
        finally:
            self._con.unregister("batch")
        first_row = batch.column(ROW_COLUMN)[0].as_py() if batch.num_rows else 0
        return batch.take(kept - first_row)
