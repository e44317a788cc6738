"""`whq bench ...`: benchmarks on synthetic data in the warehouse format (figures, not tests)."""

from __future__ import annotations

from pathlib import Path

import typer

bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Benchmarks: build synthetic data, time the engines.")


@bench_app.command()
def nag(
    root: Path = typer.Argument(Path("whq-bench"), help="Warehouse folder for the synthetic pool (kept and reused)."),
    docs: list[int] = typer.Option([100_000], "--docs", help="Pool sizes (repeatable), e.g. --docs 100000 --docs 1000000."),
    fraction: float = typer.Option(0.2, "--fraction", help="Share of the pool's tokens to select."),
):
    """Time nag_distance + nag_select in SQL and Polars against NAG's numpy kernel on N docs x 28 layers x K=20.

    Example: whq bench nag whq-bench --docs 100000 --docs 1000000
    """
    from queries.nag_bench import run_bench

    for n in docs:
        run_bench(root, n, fraction, echo=typer.echo)
