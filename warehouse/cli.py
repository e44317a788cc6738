"""The `whq` command line: a thin layer over the library and its one error boundary.

Every WarehouseError (and a few well-known user mistakes) becomes one line on stderr
naming the fix, with exit code 2. Heavy modules (torch, transformers) are imported
inside the commands that need them, so `whq sql` starts fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import WarehouseError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="whq: capture transformer activations once, query them with SQL (DuckDB) and Polars.",
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _print_table(df, fmt: str) -> None:
    if fmt == "csv":
        typer.echo(df.write_csv(), nl=False)
    elif fmt == "json":
        typer.echo(json.dumps(df.to_dicts(), default=str, indent=1))
    else:
        import polars as pl

        with pl.Config(tbl_rows=50, tbl_cols=20, fmt_str_lengths=60, tbl_width_chars=160):
            typer.echo(df)


@app.command()
def init(root: Path = typer.Argument(..., help="Folder of the new warehouse.")):
    """Create an empty warehouse.

    Example: whq init wh
    """
    import warehouse

    wh = warehouse.init(root)
    typer.echo(f"initialised warehouse {wh.root}")


@app.command()
def runs(
    root: Path = typer.Argument(..., help="Warehouse folder."),
    delete: Optional[str] = typer.Option(None, "--delete", help="Delete this run atomically."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
):
    """List committed runs (or delete one).

    Example: whq runs wh
    """
    import warehouse

    wh = warehouse.open(root)
    if delete:
        from .maintenance import delete_run

        delete_run(wh, delete)
        typer.echo(f"deleted run {delete}")
        return
    df = wh.pl(
        "SELECT run_id, model_id, dtype, n_layers, n_documents, n_tokens, sites, created_at FROM runs ORDER BY created_at"
    )
    _print_table(df, fmt)


@app.command()
def sql(
    root: Path = typer.Argument(..., help="Warehouse folder."),
    query: str = typer.Argument(..., help="SQL to run; the tables and macros of the catalog are in scope."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
    read_only: bool = typer.Option(False, "--read-only", help="Refuse anything but queries (for untrusted SQL)."),
    engine: str = typer.Option("duckdb", "--engine", help="duckdb, or spark to run the same SQL on Spark."),
):
    """Run SQL against a warehouse.

    Example: whq sql wh "SELECT * FROM layer_summary('demo', 'mlp.act')"
    """
    import warehouse

    wh = warehouse.open(root)
    if engine == "spark":
        from queries.spark import spark_sql

        _print_table(spark_sql(wh, query), fmt)
        return
    if engine != "duckdb":
        _fail(f"unknown engine {engine!r}: use duckdb or spark")
    rel = wh.sql(query, read_only=read_only)
    if rel is None:
        typer.echo("ok")
        return
    _print_table(_rel_to_polars(rel), fmt)


def _rel_to_polars(rel):
    import duckdb

    from .errors import QueryError

    try:
        return rel.pl()
    except duckdb.Error as err:
        raise QueryError(f"SQL error: {str(err).splitlines()[0]}") from None


def main() -> None:
    """Console entry point: the one error boundary."""
    try:
        app(standalone_mode=False)
    except WarehouseError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except __import__("click").ClickException as err:
        typer.echo(f"error: {err.format_message()} (see --help)", err=True)
        sys.exit(2)
    except FileNotFoundError as err:
        typer.echo(f"error: {err.filename or err}: no such file; check the path", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
