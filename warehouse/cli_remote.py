"""`whq push` and `whq pull`: committed runs to and from object storage (warehouse/transfer.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from .cli_options import WarehouseArg

EndpointOption = typer.Option(
    None, "--endpoint-url", help="S3 endpoint of a non-AWS server (default: AWS_ENDPOINT_URL, else AWS)."
)


@contextlib.contextmanager
def _bar(what: str, enabled: bool):
    """A rich progress bar of bytes; yields the callback that advances it (its total is set on the first call)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True) as progress:
        task = progress.add_task(what, total=None)
        yield lambda n: progress.advance(task, n)


def push(
    root: WarehouseArg,
    url: str = typer.Argument(..., help="Destination: s3://bucket/prefix (or another fsspec URL)."),
    endpoint_url: str | None = EndpointOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Copy the committed runs of a local warehouse to object storage (parts first, each manifest last).

    Rerunning copies only what is missing. Credentials come from the AWS environment variables or profile.

    Example: whq push wh s3://my-bucket/warehouses/wh
    """
    import warehouse

    from .transfer import push as push_runs

    wh = warehouse.open(root)
    with _bar("push", not quiet) as progress:
        done = push_runs(wh, url, endpoint_url=endpoint_url, progress=progress)
    typer.echo(done.line("pushed", f"to {url.rstrip('/')}"))


def pull(
    url: str = typer.Argument(..., help="Source: s3://bucket/prefix (or another fsspec URL)."),
    root: Path = typer.Argument(..., help="Local warehouse folder (created when absent)."),
    endpoint_url: str | None = EndpointOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Copy the runs committed on object storage into a local warehouse (committed as a local ingest commits).

    Example: whq pull s3://my-bucket/warehouses/wh wh-copy
    """
    from .transfer import pull as pull_runs

    with _bar("pull", not quiet) as progress:
        done = pull_runs(url, root, endpoint_url=endpoint_url, progress=progress)
    typer.echo(done.line("pulled", f"into {root}"))
