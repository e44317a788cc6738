"""Read-only SQL: parse with sqlglot and accept queries only.

This is the first wall; the second is DuckDB's own configuration on the read-only
connection (Warehouse.sql(read_only=True)): only the committed parts may be opened,
nothing written, no extension installed or loaded, and the settings locked.
"""

from __future__ import annotations

import logging
import re

import sqlglot
from sqlglot import exp

from .errors import QueryError

_ALLOWED = (exp.Query, exp.Values, exp.Describe, exp.Summarize, exp.Show)
_ALLOWED_COMMANDS = {"SHOW"}  # sqlglot falls back to a Command for some SHOW forms
_WRITES = (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter, exp.Copy,
           exp.TruncateTable, exp.Command, exp.Attach, exp.Detach, exp.Install, exp.Pragma, exp.Set, exp.Use)
# Table functions that open files or run SQL given as a string: the views already read the parts.
_FILE_FUNCTION = re.compile(r"^(read_\w+|\w+_scan|glob|sniff_csv|parquet_\w+|query|query_table|iceberg_\w+|delta_\w+)$", re.I)
_FILE_NAME = re.compile(r"[/\\.:*]")  # `FROM 'x.csv'` reads a file; catalog names have none of these
_KNOWN_STATEMENTS = ("EXPORT", "IMPORT", "COPY", "ATTACH", "DETACH", "INSTALL", "LOAD", "PRAGMA", "SET", "RESET", "CALL",
                     "CREATE", "DROP", "ALTER", "INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "USE", "CHECKPOINT",
                     "VACUUM", "BEGIN", "COMMIT", "ROLLBACK", "EXPLAIN", "COMMENT", "FORCE", "UNINSTALL", "ANALYZE")
_HINT = "only SELECT/WITH/VALUES/DESCRIBE/SUMMARIZE/SHOW queries are allowed"


def _refuse(kind: str) -> QueryError:
    return QueryError(f"read-only mode refuses {kind} statements: {_HINT}")


def _statement_kind(statement: exp.Expression) -> str:
    if isinstance(statement, exp.Command):
        return str(statement.this).upper()
    names = {"TruncateTable": "TRUNCATE", "Column": "CHECKPOINT/VACUUM-like"}
    return names.get(type(statement).__name__, statement.key.upper())


def check_read_only(query: str) -> None:
    """Raise QueryError unless every statement of `query` only reads the warehouse."""
    parser_log = logging.getLogger("sqlglot")
    level = parser_log.level
    parser_log.setLevel(logging.ERROR)  # its "falling back to a Command" warning would be a second stderr line
    try:
        statements = [s for s in sqlglot.parse(query, read="duckdb") if s is not None]
    except sqlglot.errors.ParseError as err:
        first_word = (re.match(r"\s*([A-Za-z]+)", query) or [None, ""])[1].upper()
        if first_word in _KNOWN_STATEMENTS:
            raise _refuse(first_word) from None
        first = str(err).splitlines()[0]
        raise QueryError(f"read-only mode could not parse the SQL ({first}); send a single SELECT query") from None
    finally:
        parser_log.setLevel(level)
    if not statements:
        raise QueryError("empty SQL: send a SELECT query")
    for statement in statements:
        if isinstance(statement, exp.Command) and str(statement.this).upper() == "EXPLAIN":
            explained = statement.expression.name if statement.expression is not None else ""
            rest = re.sub(r"^\s*ANALY[SZ]E\b", "", explained, flags=re.I)
            check_read_only(rest)  # EXPLAIN ANALYZE runs the statement it explains
            continue
        if isinstance(statement, exp.Command) and str(statement.this).upper() in _ALLOWED_COMMANDS:
            continue
        if not isinstance(statement, _ALLOWED) or isinstance(statement, exp.Command):
            raise _refuse(_statement_kind(statement))
        for node in statement.walk():
            if isinstance(node, _WRITES):
                raise QueryError(f"read-only mode refuses {_statement_kind(node)} inside a query: only reads are allowed")
            if isinstance(node, exp.Func):
                name = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
                if _FILE_FUNCTION.match(name or ""):
                    raise QueryError(f"read-only mode refuses {name.lower()}(), which reads files or runs SQL text: query the warehouse's tables and macros instead")
            if isinstance(node, exp.Table) and _FILE_NAME.search(node.name or ""):
                raise QueryError(f"read-only mode refuses reading the file {node.name!r}: query the warehouse's tables and macros instead")
