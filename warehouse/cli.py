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

try:  # recent typer vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import ClickException

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
        import polars as pl

        nested = [c for c, t in df.schema.items() if t.is_nested()]
        flat = df.with_columns(pl.Series(c, [json.dumps(v, default=str) for v in df[c].to_list()], pl.String) for c in nested)
        typer.echo(flat.write_csv(), nl=False)
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


@app.command()
def ingest(
    root: Path = typer.Argument(..., help="Warehouse folder (created if missing)."),
    model: str = typer.Option("minilm", "--model", "-m", help="Local model folder, cached hub id, `minilm`, `config:qwen3-tiny`, or adapter.py[:checkpoint]."),
    data: list[Path] = typer.Option([], "--data", "-d", help="Documents: .jsonl, .parquet or .txt (repeatable)."),
    site: list[str] = typer.Option([], "--site", "-s", help="SPEC: <site>[@in|@out]:<reduction>[=arg],... e.g. mlp.act:topk=20 (repeatable)."),
    scenario: Optional[Path] = typer.Option(None, "--scenario", help="Chat scenario YAML (Activation Lab format) instead of --data."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (default: <model>-<UTC time>, printed)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset label for documents that have none (default: file stem)."),
    role: Optional[str] = typer.Option(None, "--role", help="Role label: pool, target, reference, ..."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Windows per forward pass."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per window (long documents are split, positions continue)."),
    truncate: bool = typer.Option(False, "--truncate", help="Keep only each document's first window."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run (same arguments and --run-id)."),
    shard_tokens: int = typer.Option(65536, "--shard-tokens", help="Tokens per committed shard (the unit of resume)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and count) bad records instead of stopping."),
    logit_lens: bool = typer.Option(False, "--logit-lens", help="Store each MLP unit's output direction through the unembedding."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Capture a model's activations over documents into a new run.

    Example: whq ingest wh --model minilm --data docs.jsonl --site mlp.act:topk=20 --site mlp.up:nag=20 --site resid.out:last
    """
    if scenario is not None:
        from ingest.chat import run_scenario

        summary = run_scenario(root, scenario, run_id=run_id, device=device, progress=not quiet)
    else:
        from ingest.pipeline import DEFAULT_SITES
        from ingest.pipeline import ingest as run_ingest

        summary = run_ingest(
            root, model, [str(d) for d in data], site or DEFAULT_SITES, run_id=run_id, dataset=dataset, role=role,
            batch_size=batch_size, max_length=max_length, truncate=truncate, device=device, dtype=dtype,
            resume=resume, shard_tokens=shard_tokens, skip_bad=skip_bad, logit_lens=logit_lens, progress=not quiet,
        )
    typer.echo(_summary_line(summary))


def _summary_line(summary: dict) -> str:
    rows = summary.get("rows", {})
    parts = [f"committed run {summary['run_id']}"]
    if "documents" in summary:
        parts.append(f"{summary['documents']:,} documents, {summary.get('tokens', 0):,} tokens")
    if rows:
        parts.append(", ".join(f"{table} {n:,}" for table, n in sorted(rows.items())) + " rows")
    if "bytes" in summary:
        parts.append(f"{summary['bytes'] / 1e6:,.2f} MB on disk")
    if summary.get("tokens_per_s"):
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    return "; ".join(parts)


@app.command()
def sites(
    model: str = typer.Option("minilm", "--model", "-m", help="Model as for `whq ingest --model`."),
    all_modules: bool = typer.Option(False, "--all", help="List every module, not only the first block's."),
):
    """Print a model's site aliases and module tree (to write --site SPECs).

    Example: whq sites --model minilm
    """
    from ingest.models import load

    loaded = load(model, "cpu", "float32")
    typer.echo(f"{loaded.model_id}: {loaded.family}, {loaded.n_layers} layers")
    typer.echo("aliases:")
    for alias, (glob, hook) in loaded.aliases.items():
        typer.echo(f"  {alias:<10} {glob}@{hook}")
    typer.echo("modules:")
    for name, module in loaded.model.named_modules():
        if name and (all_modules or not any(part.isdigit() and part != "0" for part in name.split("."))):
            typer.echo(f"  {name}  ({type(module).__name__})")


@app.command()
def demo(
    root: Path = typer.Argument(Path("whq-demo"), help="Folder for the demo warehouse."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Build a demo warehouse from real text through the real all-MiniLM-L6-v2, offline.

    Example: whq demo whq-demo
    """
    from ingest.demo import run_demo

    run_demo(root, progress=not quiet, echo=typer.echo)


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
    except ClickException as err:
        typer.echo(f"error: {err.format_message()} (see --help)", err=True)
        sys.exit(2)
    except FileNotFoundError as err:
        typer.echo(f"error: {err.filename or err}: no such file; check the path", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
