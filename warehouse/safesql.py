"""Read-only SQL: parse with sqlglot and accept queries only.

This is the first wall; the second is DuckDB's own configuration on the read-only
connection (no external access outside the warehouse, no extension loading).
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp

from .errors import QueryError

_ALLOWED = (exp.Query, exp.Describe)


def check_read_only(query: str) -> None:
    try:
        statements = [s for s in sqlglot.parse(query, read="duckdb") if s is not None]
    except sqlglot.errors.ParseError as err:
        first = str(err).splitlines()[0]
        raise QueryError(f"read-only mode could not parse the SQL ({first}); send a single SELECT query") from None
    if not statements:
        raise QueryError("empty SQL: send a SELECT query")
    for statement in statements:
        if not isinstance(statement, _ALLOWED) or isinstance(statement, exp.Command):
            kind = statement.key.upper() if not isinstance(statement, exp.Command) else str(statement.this).upper()
            raise QueryError(f"read-only mode refuses {kind} statements: only SELECT/WITH/DESCRIBE queries are allowed")
        for node in statement.walk():
            if isinstance(node, (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Copy, exp.Command)):
                raise QueryError(f"read-only mode refuses {node.key.upper()} inside a query: only reads are allowed")
