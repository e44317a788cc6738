"""Query results as text: every value a query can return, in every format `whq sql` prints.

result_frame turns a DuckDB relation into a Polars frame that every format can show: Polars
cannot import some DuckDB types (INTERVAL, UNION, fixed-size ARRAY: a ComputeError) and
panics displaying others (an infinite or year-50000 TIMESTAMP), so each column whose type,
at any depth, is not one Polars holds faithfully is cast by DuckDB to its own text ('1 day',
'infinity', '\\xAA\\x00' for a BLOB); a fixed-size ARRAY becomes a LIST of the same values.
The SQL box of `whq serve` and `whq sql` (duckdb engine) both read results through it.

Formats (docs/output-format.md):
- table: for a terminal; control characters (ESC, CR, newline, bidirectional overrides, ...)
  in values and column names are printed as escapes (\\x1b, \\n, \\u202e), so a value can
  neither move the cursor, recolour, retitle the terminal nor write its clipboard;
- csv: the values as they are (nested values as strict JSON text; NaN, inf, -inf as such);
- json: strict JSON (warehouse/jsonio.py: NaN and infinities as null).
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from . import jsonio

if TYPE_CHECKING:
    import duckdb
    import polars as pl

# DuckDB types Polars imports and displays for every value; everything else is shown as text.
_KEPT = frozenset(
    """boolean tinyint smallint integer bigint utinyint usmallint uinteger ubigint float double varchar
    decimal null""".split()
)
_ZERO_WIDTH_JOINER = "\u200d"  # inside emoji sequences; harmless to a terminal


def _escaped(match: re.Match) -> str:
    char = match[0]
    category = unicodedata.category(char)
    if char == _ZERO_WIDTH_JOINER or category not in ("Cc", "Cf", "Zl", "Zp"):
        return char
    return _NAMED.get(char) or char.encode("unicode_escape").decode("ascii")


_CANDIDATE = re.compile(r"[^\x20-\x7e]")  # printable ASCII is never escaped: the common case stays fast
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def terminal_safe(text: str) -> str:
    """`text` with every control, format and line-separator character written as an escape."""
    return _CANDIDATE.sub(_escaped, text)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _display_type(duck_type) -> str | None:
    """The DuckDB type to cast a column of `duck_type` to for display, None to keep it."""
    kind = duck_type.id
    if kind in _KEPT and str(duck_type) != "JSON":
        return None
    if kind in ("list", "array"):
        child = dict(duck_type.children)["child"]
        shown = _display_type(child)
        return f"{shown or child}[]" if shown or kind == "array" else None
    if kind == "map":
        return None if all(_display_type(child) is None for _, child in duck_type.children) else "VARCHAR"
    if kind == "struct":
        fields = [(name, child, _display_type(child)) for name, child in duck_type.children]
        if all(shown is None for _, _, shown in fields):
            return None
        return "STRUCT(" + ", ".join(f"{_quoted(name)} {shown or child}" for name, child, shown in fields) + ")"
    return "VARCHAR"


def displayable(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """`rel` with every column Polars cannot import or show cast to DuckDB's own text (see the module docstring)."""
    casts = [_display_type(t) for t in rel.types]
    if not any(casts):
        return rel
    return rel.project(
        ", ".join(
            f"{'#' + str(i) if cast is None else f'CAST(#{i} AS {cast})'} AS {_quoted(name)}"
            for i, (name, cast) in enumerate(zip(rel.columns, casts), start=1)
        )
    )


def result_frame(rel: duckdb.DuckDBPyRelation) -> pl.DataFrame:
    """The rows of `rel` as a Polars frame every format shows (see the module docstring)."""
    return displayable(rel).pl()


def _safe_value(value):
    if isinstance(value, str):
        return terminal_safe(value)
    if isinstance(value, dict):
        return {_safe_value(k): _safe_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_value(v) for v in value]
    return value


def _safe_column(series: pl.Series) -> pl.Series:
    """A column with its text (top level or nested) escaped by terminal_safe, and its name too."""
    import polars as pl

    name = terminal_safe(series.name)
    if series.dtype == pl.Categorical or isinstance(series.dtype, pl.Enum):
        series = series.cast(pl.String)
    if series.dtype != pl.String and not series.dtype.is_nested():
        return series.rename(name)
    return pl.Series(name, [_safe_value(v) for v in series.to_list()], series.dtype)


def table_text(frame: pl.DataFrame, *, rows: int = 50, columns: int = 20) -> str:
    """`frame` as an aligned text table for a terminal, control characters escaped."""
    import polars as pl

    safe = pl.DataFrame([_safe_column(frame.to_series(i)) for i in range(frame.width)])
    with pl.Config(tbl_rows=rows, tbl_cols=columns, fmt_str_lengths=60, tbl_width_chars=160):
        return str(safe)


def csv_text(frame: pl.DataFrame, *, terminal: bool = False) -> str:
    """`frame` as CSV: values as they are, nested values as strict JSON text; for a `terminal`,
    control characters in values and names escaped as table_text escapes them."""
    import polars as pl

    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    flat = frame.with_columns(
        pl.Series(name, [None if v is None else jsonio.dumps(v) for v in frame[name].to_list()], pl.String)
        for name in nested
    )
    if terminal:
        flat = pl.DataFrame([_safe_column(flat.to_series(i)) for i in range(flat.width)])
    return flat.write_csv()


def json_text(frame: pl.DataFrame) -> str:
    """`frame` as a strict JSON list of row objects."""
    return jsonio.dumps(frame.to_dicts(), indent=1)


FORMATS = {"table": table_text, "csv": csv_text, "json": json_text}


def formatted(frame: pl.DataFrame, fmt: str, *, terminal: bool = False) -> str:
    """`frame` in one of FORMATS (table, csv, json). Table and JSON text escape control characters
    always; CSV escapes them when the text goes to a `terminal`, and keeps the values exact for a pipe."""
    fmt = str(getattr(fmt, "value", fmt))
    return csv_text(frame, terminal=terminal) if fmt == "csv" else FORMATS[fmt](frame)
