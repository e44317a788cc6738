"""Untrusted SQL, bounded and sealed; and trusted SQL kept from writing into the warehouse.

Untrusted SQL meets two walls. The first is check_read_only: sqlglot refuses anything but
queries, every function that reads files, runs SQL text or changes the database, and paths
where a name is expected. The second is the guarded connection (Warehouse.connect(guarded=True)):
DuckDB may open only the committed parts, writes nothing, spills nothing, loads no extension,
and its settings are locked. run_read_only then bounds what passes both walls: a timeout
(DuckDB interrupted from a timer), a memory limit (DuckDB's memory_limit) and a row limit.

Trusted SQL (`whq sql` without --read-only) may read and write anywhere, except files inside
the warehouse folder: check_no_warehouse_writes finds the paths a statement would write and
refuses those, against mistakes such as a COPY over a committed part.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.tokens import TokenType

from .display import displayable
from .errors import QueryError, sql_error
from .output import enclosing_warehouse, refusal

if TYPE_CHECKING:
    import polars


class GuardedCatalog(Protocol):
    """What run_read_only needs of a warehouse (core.Warehouse is one). A protocol, not an import of
    core: core runs untrusted SQL through this module, so this module must not depend on core."""

    def guarded_connection(self, memory_limit: str) -> duckdb.DuckDBPyConnection: ...

    def name_resolving_macros(self) -> frozenset[str]: ...


_ALLOWED = (exp.Query, exp.Values, exp.Describe, exp.Summarize, exp.Show)
_WRITES = (
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.Copy,
    exp.TruncateTable,
    exp.Command,
    exp.Attach,
    exp.Detach,
    exp.Install,
    exp.Pragma,
    exp.Set,
    exp.Use,
)
# Functions that open files or run SQL given as text (json_serialize_sql's plans run through
# json_execute_serialized_sql), including those of extensions that are not loaded.
_FILE_FUNCTION = re.compile(
    r"^(read_\w+|\w+_scan|glob|sniff_csv|parquet_\w+|query|query_table|iceberg_\w+|delta_\w+"
    r"|json_\w*(serializ|execut)\w*)$",
    re.I,
)
# DuckDB's own table functions that only compute or describe; every other one it ships
# (checkpoint, enable_logging, which_secret, ...) is refused, new versions' ones included.
_READ_ONLY_TABLE_FUNCTIONS = frozenset(
    """range generate_series unnest repeat repeat_row json_each json_tree version pragma_version pragma_platform
    pragma_table_info duckdb_columns duckdb_constraints duckdb_databases duckdb_dependencies duckdb_functions
    duckdb_indexes duckdb_keywords duckdb_schemas duckdb_sequences duckdb_tables duckdb_types duckdb_views""".split()
)
_FILE_NAME = re.compile(r"[/\\.:*]")  # `FROM 'x.csv'` reads a file; catalog names have none of these
# A value a name-resolving macro looks up as a table: a run id or table name, never a path
# nor a file DuckDB would read by its extension.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_DATA_FILE = re.compile(
    r"\.(csv|tsv|parquet|json|jsonl|ndjson|txt|text|arrow|ipc|feather|avro|xlsx|duckdb|db|sqlite|gz|zst)$", re.I
)
_CONSTANT = (exp.Literal, exp.RawString, exp.Null, exp.Boolean, exp.Neg, exp.Array, exp.Paren, exp.Cast, exp.DataType)
_SHOW_NAMED = re.compile(r"\s*((ALL\s+)?TABLES|DATABASES|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)\s*", re.I)
_KNOWN_STATEMENTS = tuple(
    """EXPORT IMPORT COPY ATTACH DETACH INSTALL LOAD PRAGMA SET RESET CALL CREATE DROP ALTER INSERT UPDATE DELETE MERGE
    TRUNCATE USE CHECKPOINT VACUUM BEGIN COMMIT ROLLBACK EXPLAIN COMMENT FORCE UNINSTALL ANALYZE""".split()
)
_HINT = "only SELECT/WITH/VALUES/DESCRIBE/SUMMARIZE/SHOW queries are allowed"
_INSTEAD = "query the warehouse's tables and macros instead"


def _refuse(kind: str) -> QueryError:
    return QueryError(f"read-only mode refuses {kind} statements: {_HINT}")


def _statement_kind(statement: exp.Expression) -> str:
    if isinstance(statement, exp.Command):
        return str(statement.this).upper()
    names = {"TruncateTable": "TRUNCATE", "Column": "CHECKPOINT/VACUUM-like"}
    return names.get(type(statement).__name__, statement.key.upper())


@functools.cache
def _duckdb_table_functions() -> frozenset[str]:
    with duckdb.connect(":memory:") as con:
        rows = con.execute(
            "SELECT DISTINCT lower(function_name) FROM duckdb_functions() "
            "WHERE function_type IN ('table', 'table_macro', 'pragma')"
        ).fetchall()
    return frozenset(name for (name,) in rows)


def _function_names(node: exp.Func) -> set[str]:
    """The names DuckDB would see for this call (sqlglot may model a known function as its own node)."""
    if isinstance(node, exp.Anonymous):
        return {node.name.lower()}
    printed = re.match(r"\s*([\w.]+)\s*\(", node.sql(dialect="duckdb"))
    return {node.sql_name().lower()} | ({printed[1].split(".")[-1].lower()} if printed else set())


def _check_function(node: exp.Func, name_macros: frozenset[str]) -> None:
    for name in _function_names(node):
        if _FILE_FUNCTION.match(name):
            raise QueryError(f"read-only mode refuses {name}(), which reads files or runs SQL text: {_INSTEAD}")
        in_from = isinstance(node.parent, (exp.Table, exp.Lateral))  # histogram() is also an aggregate
        if in_from and name in _duckdb_table_functions() and name not in _READ_ONLY_TABLE_FUNCTIONS:
            raise QueryError(
                f"read-only mode refuses {name}(), a DuckDB table function outside the read-only list: {_INSTEAD}"
            )
        if name in name_macros:
            _check_name_arguments(name, node)


def _check_name_arguments(macro: str, call: exp.Func) -> None:
    """A macro that looks a name up as a table (query_table) would read a file given as a path."""
    for argument in call.expressions:
        value = argument.expression if isinstance(argument, (exp.PropertyEQ, exp.Kwarg)) else argument
        for node in value.walk():
            if not isinstance(node, _CONSTANT):
                raise QueryError(
                    f"read-only mode needs constant arguments for {macro}(), which looks names up as tables: "
                    f"pass literal values"
                )
            if isinstance(node, (exp.Literal, exp.RawString)) and (node.is_string or isinstance(node, exp.RawString)):
                text = node.name
                if not _PLAIN_NAME.fullmatch(text) or _DATA_FILE.search(text):
                    raise QueryError(
                        f"read-only mode refuses {text!r} as an argument of {macro}(), which looks names up "
                        f"as tables: pass a run id or table name, not a path"
                    )


def _command_text(command: exp.Command) -> str:
    """What follows the keyword of a statement sqlglot left unparsed."""
    rest = command.expression
    return rest if isinstance(rest, str) else (rest.name if rest is not None else "")


def _check_named(kind: str, target: exp.Expression) -> None:
    """SUMMARIZE 'x.csv' and DESCRIBE 'x.csv' read the file the string names."""
    if isinstance(target, (exp.Literal, exp.RawString)) and _FILE_NAME.search(target.name):
        raise QueryError(f"read-only mode refuses {kind} of the file {target.name!r}: {_INSTEAD}")


def check_read_only(query: str, name_macros: frozenset[str] = frozenset()) -> None:
    """Raise QueryError unless every statement of `query` only reads the warehouse.

    `name_macros` are the catalog macros that look an argument up as a table (see
    name_resolving_macros); their arguments must be plain names.
    """
    parser_log = logging.getLogger("sqlglot")
    level = parser_log.level
    parser_log.setLevel(logging.ERROR)  # its "falling back to a Command" warning would be a second stderr line
    try:
        statements = [s for s in sqlglot.parse(query, read="duckdb") if s is not None]
    except sqlglot.errors.SqlglotError as err:
        first_word = (re.match(r"\s*([A-Za-z]+)", query) or [None, ""])[1].upper()
        if first_word in _KNOWN_STATEMENTS:
            raise _refuse(first_word) from None
        first = str(err).splitlines()[0]
        raise QueryError(f"read-only mode could not parse the SQL ({first}); send a single SELECT query") from None
    except (
        RecursionError
    ):  # sqlglot's parser recurses ~20 frames per nested call: 100 nested abs() exhaust Python's stack
        raise QueryError(
            "read-only mode could not parse the SQL: it is nested too deeply; flatten it (WITH ...)"
        ) from None
    finally:
        parser_log.setLevel(level)
    if not statements:
        raise QueryError("empty SQL: send a SELECT query")
    for statement in statements:
        kind = _statement_kind(statement)
        if isinstance(statement, exp.Command) and kind == "EXPLAIN":
            explained = _command_text(statement)
            check_read_only(re.sub(r"^\s*ANALY[SZ]E\b", "", explained, flags=re.I), name_macros)  # ANALYZE runs it
            continue
        if isinstance(statement, exp.Command) and kind == "SHOW":  # sqlglot leaves `SHOW x` unparsed
            shown = _command_text(statement)
            if re.match(r"\s*(SELECT|FROM|WITH|VALUES)\b", shown, re.I):
                check_read_only(shown, name_macros)
            elif not _SHOW_NAMED.fullmatch(shown):
                raise QueryError(
                    f"read-only mode refuses SHOW {shown.strip()}: show a table by name (SHOW tokens) or SHOW TABLES"
                )
            continue
        if not isinstance(statement, _ALLOWED) or isinstance(statement, exp.Command):
            raise _refuse(kind)
        if isinstance(statement, (exp.Summarize, exp.Describe)):
            _check_named(kind, statement.this)
        for node in statement.walk():
            if isinstance(node, _WRITES):
                raise QueryError(
                    f"read-only mode refuses {_statement_kind(node)} inside a query: only reads are allowed"
                )
            if isinstance(node, exp.Func):
                _check_function(node, name_macros)
            if isinstance(node, exp.Table) and _FILE_NAME.search(node.name or ""):
                raise QueryError(f"read-only mode refuses reading the file {node.name!r}: {_INSTEAD}")


def name_resolving_macros(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """The catalog's macros that pass an argument to query_table() or query(), directly or through another macro."""
    rows = con.execute(
        "SELECT lower(function_name), macro_definition FROM duckdb_functions() "
        "WHERE database_name = current_database() AND function_type IN ('macro', 'table_macro')"
    ).fetchall()
    found = {name for name, body in rows if re.search(r"\bquery(_table)?\s*\(", body or "", re.I)}
    while True:
        calling = {
            name for name, body in rows if any(re.search(rf"\b{m}\s*\(", body or "", re.I) for m in found)
        } - found
        if not calling:
            return frozenset(found)
        found |= calling


# -- bounds --------------------------------------------------------------------

_SIZE = re.compile(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", re.I)


def default_memory_limit() -> str:
    """A quarter of this machine's memory, in DuckDB's notation."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{total // 4 // 2**20}MiB"


MAX_TIMEOUT_S = 1_000_000_000  # below threading.TIMEOUT_MAX on every platform Python runs on


@dataclass(frozen=True)
class SqlLimits:
    """Bounds on untrusted SQL (`whq sql --read-only`, Warehouse.sql(read_only=True), run_read_only)."""

    timeout_s: float = 30.0
    """Seconds before DuckDB is interrupted (--timeout)."""
    memory_limit: str = field(default_factory=default_memory_limit)
    """DuckDB's memory_limit for the guarded instance, e.g. '2GB' (--memory-limit); spilling to disk is off."""
    max_rows: int = 10_000
    """Rows fetched at most; a result with more is cut and marked truncated (--max-rows)."""
    max_bytes: str = "256MB"
    """Bytes the fetched rows may hold, e.g. '1GB' (--max-bytes); a result with more is refused (result_bounds)."""

    def __post_init__(self):
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not math.isfinite(self.timeout_s)
            or self.timeout_s <= 0
        ):
            shown = f"{self.timeout_s:g}" if isinstance(self.timeout_s, float) else repr(self.timeout_s)
            raise QueryError(f"--timeout {shown} must be a positive number of seconds")
        if self.timeout_s > MAX_TIMEOUT_S:  # the timer thread's wait cannot be longer
            raise QueryError(
                f"--timeout {self.timeout_s:g} is longer than {MAX_TIMEOUT_S:,} seconds: give a shorter one"
            )
        if (
            not isinstance(self.memory_limit, str)
            or not _SIZE.fullmatch(self.memory_limit)
            or not re.search(r"[1-9]", self.memory_limit)
        ):
            raise QueryError(f"--memory-limit {self.memory_limit!r} must be a size such as 512MB or 4GB")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise QueryError(f"--max-rows {self.max_rows!r} must be a whole number of at least 1")
        from .result_bounds import size_bytes

        size_bytes(self.max_bytes)


@dataclass(frozen=True)
class BoundedResult:
    frame: polars.DataFrame
    """At most max_rows rows of the result (an empty frame for a query without columns)."""
    truncated: bool
    """True when the result had more rows than max_rows."""


@contextlib.contextmanager
def _interrupted_after(cursor: duckdb.DuckDBPyConnection, seconds: float):
    """Interrupt `cursor` once `seconds` have passed, and again every 50 ms until the block ends:
    an interrupt that arrives before DuckDB starts executing is lost (measured: a count over
    range(10^12) then ran its full 5 minutes)."""
    done = threading.Event()

    def watch():
        if not done.wait(seconds):
            cursor.interrupt()
            while not done.wait(0.05):
                cursor.interrupt()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def run_read_only(wh: GuardedCatalog, query: str, limits: SqlLimits | None = None, params=None) -> BoundedResult:
    """Run untrusted SQL through both walls and within `limits`; safe to call from several threads.

    Each call runs on its own cursor of the guarded connection, so the timeout interrupts
    this query only.
    """
    from .result_bounds import fetch_bounded, size_bytes

    limits = limits or SqlLimits()
    cursor = wh.guarded_connection(limits.memory_limit).cursor()
    try:
        cursor.execute("USE whq_catalog")
        check_read_only(query, wh.name_resolving_macros())
        with _interrupted_after(cursor, limits.timeout_s):
            rel = cursor.sql(query, params=params)
            frame = (
                fetch_bounded(displayable(rel), limits.max_rows, size_bytes(limits.max_bytes))
                if rel is not None
                else None
            )
    except duckdb.InterruptException:
        raise QueryError(
            f"the query ran past the {limits.timeout_s:g} s timeout and was stopped: "
            f"narrow it (WHERE, LIMIT), or raise --timeout"
        ) from None
    except duckdb.OutOfMemoryException:
        raise QueryError(
            f"the query needed more than the {limits.memory_limit} memory limit and was stopped: "
            f"narrow it (WHERE, LIMIT), or raise --memory-limit"
        ) from None
    except duckdb.Error as err:
        raise sql_error(err) from None
    finally:
        cursor.close()
    if frame is None:
        import polars

        return BoundedResult(polars.DataFrame(), False)
    return bounded(frame, limits.max_rows)


def bounded(frame, max_rows: int) -> BoundedResult:
    """The first `max_rows` rows of a frame read with LIMIT max_rows + 1, and whether more were cut."""
    return BoundedResult(frame.head(max_rows), frame.height > max_rows)


# -- trusted SQL: no writes into the warehouse -----------------------------------

_STRINGS = {TokenType.STRING, TokenType.RAW_STRING, TokenType.HEREDOC_STRING, TokenType.NATIONAL_STRING}
_PATH_SETTING = re.compile(r"directory|path|output|file", re.I)
_QUERY_WORDS = {"SELECT", "WITH", "FROM", "VALUES", "TABLE", "DESCRIBE", "SUMMARIZE", "SHOW", "PIVOT", "UNPIVOT", "("}
_ATTACH_TYPE = re.compile(r"^(duckdb|sqlite):", re.I)


def _written_paths(statement: list) -> list[str]:
    """The strings of one tokenized statement that name a file or folder it may write."""
    words = [t.text.upper() for t in statement if t.token_type not in _STRINGS]
    while words and words[0] in ("EXPLAIN", "ANALYZE", "ANALYSE"):
        words.pop(0)
    strings = [(i, t.text) for i, t in enumerate(statement) if t.token_type in _STRINGS]
    if not words or not strings:
        return []
    kind = words[0]
    if kind == "COPY":  # the target follows TO (COPY ... FROM reads; COPY FROM DATABASE writes an attached one)
        to = [i for i, t in enumerate(statement) if t.text.upper() == "TO"]
        return [text for i, text in strings if to and i > to[0]][:1]
    if kind == "EXPORT":
        return [strings[0][1]]
    if kind == "ATTACH":  # a READ_ONLY attach writes nothing
        read_only = any(w == "READ_ONLY" and (nxt not in ("FALSE", "0")) for w, nxt in zip(words, words[1:] + [""]))
        return [] if read_only else [_ATTACH_TYPE.sub("", strings[0][1])]
    if kind in ("SET", "RESET", "PRAGMA"):  # temp_directory, log_query_path, profiling_output, ...
        return [text for _, text in strings] if any(_PATH_SETTING.search(w) for w in words[1:4]) else []
    if kind in _QUERY_WORDS and "ENABLE_LOGGING" not in words:
        return []  # a query reads (its files may well be the warehouse's)
    # CALL enable_logging(...), CREATE SECRET, INSTALL ... FROM, and anything else: whatever looks like a path.
    return [text for _, text in strings if re.search(r"[/\\]", text) or text.startswith("~")]


def check_no_warehouse_writes(query: str, root: Path) -> None:
    """Raise QueryError if a statement of trusted `query` would write a file inside the warehouse `root`
    (or any other warehouse folder: the rule of every user-named output, warehouse/output.py).

    A guard against mistakes (COPY over a committed part, EXPORT or ATTACH into the folder,
    a temp or log directory pointed into it), not a sandbox: untrusted SQL goes to --read-only.
    Relative paths are resolved as DuckDB resolves them, from the working directory.
    """
    root = Path(root).resolve()
    try:
        statements = _tokenized_statements(query)
    except sqlglot.errors.SqlglotError:
        return  # DuckDB refuses what does not even tokenize, before writing anything
    for statement in statements:
        for text in _written_paths(statement):
            if (warehouse := enclosing_warehouse(text, (root,))) is not None:
                raise QueryError(refusal("whq sql", text, warehouse, "write elsewhere, or pass --allow-writes"))


def _tokenized_statements(query: str) -> list[list]:
    statements: list[list] = [[]]
    for token in sqlglot.tokenize(query, read="duckdb"):
        if token.token_type == TokenType.SEMICOLON:
            statements.append([])
        else:
            statements[-1].append(token)
    for i, statement in enumerate(statements):
        while (
            len(statement) == 2 and statement[0].token_type == TokenType.COMMAND
        ):  # EXPLAIN, CALL: the rest is one raw string
            statement = statements[i] = [statement[0], *sqlglot.tokenize(statement[1].text, read="duckdb")]
    return statements
