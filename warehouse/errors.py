"""The one exception family: every user-facing failure is a WarehouseError.

The CLI prints ``str(error)`` as a single line and exits 2, so each message names
what went wrong *and* the fix.
"""


class WarehouseError(Exception):
    """Root of every error whq raises for bad input or a bad warehouse."""

    exit_code = 2


class NotAWarehouse(WarehouseError):
    """The path is not a whq warehouse (or is of an unknown format version)."""


class UnknownRun(WarehouseError):
    """A run id that is not committed in this warehouse."""


class RunExists(WarehouseError):
    """A run id that is already committed or in progress."""


class NotFound(WarehouseError):
    """A site, layer, unit or page that the warehouse does not hold (the message lists what it holds)."""


class BadSpec(WarehouseError):
    """A --site SPEC that does not parse or names an unknown site/reduction."""


class BadInput(WarehouseError):
    """A data file, scenario or argument that cannot be used."""


class QueryError(WarehouseError):
    """A SQL statement that failed or was refused."""


class UnknownSite(BadInput, QueryError):
    """A site the run did not capture: a bad argument to a Polars twin, as its SQL macro's error is a QueryError."""


def sql_error(err: Exception) -> QueryError:
    """A DuckDB error as a QueryError: its first line, which names the problem without DuckDB's hints.
    A macro's own error() (an Invalid Input Error) already says what is wrong and the fix: it stands alone."""
    first = str(err).splitlines()[0]
    own = first.removeprefix("Invalid Input Error: ")
    return QueryError(own if own != first else f"SQL error: {first}")


class CorruptPart(WarehouseError):
    """A committed part is missing or does not match its manifest."""


class DamagedMetadata(WarehouseError):
    """A metadata file (manifest, marker, quarantine list, journal) that cannot be read or has the wrong shape."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail  # what is wrong with the file, without the fix
