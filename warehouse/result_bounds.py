"""The byte bound on an untrusted query's result: fetched in chunks, measured, stopped once passed.

A row cap alone does not bound memory: one row may hold a 50 MB string, and six such rows
took the server to 3.8 GB (DuckDB's result, then Arrow's copy, Polars', the page's). The
result is read as Arrow record batches of at most BATCH_ROWS rows, each measured as it
arrives; once the total passes the bound, fetching stops and the query is refused in one
line naming the option that raises the bound. DuckDB still computes the chunk it is asked
for (its memory limit bounds that); what is bounded is everything whq builds from it.
"""

from __future__ import annotations

import contextlib
import re

import duckdb
import polars as pl
import pyarrow as pa

from .errors import QueryError

BATCH_ROWS = 256  # rows per measured batch: a smaller batch overshoots less, a larger one fetches faster

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", re.I)


def size_bytes(text: str, option: str = "--max-bytes") -> int:
    """'256MB' → 256,000,000 bytes (DuckDB's units: KB = 1000 bytes, KiB = 1024); QueryError naming `option`."""
    found = _SIZE.fullmatch(text) if isinstance(text, str) else None
    size = int(float(found[1]) * _UNITS[found[2].lower()]) if found else 0
    if size < 1:
        raise QueryError(f"{option} {text!r} must be a size such as 64MB or 1GB")
    return size


def fetch_bounded(rel: duckdb.DuckDBPyRelation, max_rows: int, max_bytes: int) -> pl.DataFrame:
    """At most `max_rows` + 1 rows of `rel` as a frame (the extra row tells the caller more were cut);
    QueryError once the rows fetched hold more than `max_bytes` bytes in Arrow's memory."""
    batches, held = [], 0
    reader = rel.limit(max_rows + 1).to_arrow_reader(BATCH_ROWS)
    for batch in reader:
        held += batch.nbytes
        if held > max_bytes:
            reader.close()
            raise QueryError(
                f"the result holds more than {max_bytes:,} bytes (stopped fetching): select fewer or shorter "
                f"values (LIMIT, left(text, 200)), or raise --max-bytes"
            )
        batches.append(batch)
    with unshowable_values():
        return pl.from_arrow(pa.Table.from_batches(batches, schema=reader.schema))


@contextlib.contextmanager
def unshowable_values():
    """A value Polars cannot convert (an INTERVAL, an infinite timestamp) as one QueryError line naming the fix."""
    try:
        yield
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as err:
        first = str(err).strip().splitlines()[0].split(". Hint")[0] if str(err).strip() else type(err).__name__
        raise QueryError(
            f"a value of the result cannot be shown ({first[:120]}): cast that column to VARCHAR in the query"
        ) from None
