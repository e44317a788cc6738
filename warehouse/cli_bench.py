"""`whq bench ...`: benchmarks on synthetic data in the warehouse format (figures, not tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ingest.options import DEFAULT_SITES

from . import jsonio
from .cli_options import (
    BatchSizeOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    MaxDocsOption,
    ModelOption,
    SitesOption,
)

bench_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Benchmarks: build synthetic data, time the engines."
)

# The shape of the synthetic run `whq bench query` builds and `whq bench serve` reuses, and the repeats.
RowsOption = Annotated[int, typer.Option("--rows", help="token_neurons rows of the synthetic run.")]
LayersOption = Annotated[int, typer.Option("--layers", help="Layers of the synthetic site.")]
WidthOption = Annotated[int, typer.Option("--width", help="Units per layer.")]
KOption = Annotated[int, typer.Option("--k", help="Units kept per token (top-k).")]
RepeatsOption = Annotated[int, typer.Option("--repeats", help="Timed repeats of each measurement, after one warm-up.")]


@bench_app.command()
def nag(
    root: Path = typer.Argument(Path("whq-bench"), help="Warehouse folder for the synthetic pool (kept and reused)."),
    docs: list[int] = typer.Option(
        [100_000], "--docs", help="Pool sizes (repeatable), e.g. --docs 100000 --docs 1000000."
    ),
    fraction: float = typer.Option(0.2, "--fraction", help="Share of the pool's tokens to select."),
):
    """Time nag_distance + nag_select in SQL and Polars against NAG's numpy kernel on N docs x 28 layers x K=20.

    Example: whq bench nag whq-bench --docs 100000 --docs 1000000
    """
    from queries.nag_bench import run_bench

    from . import ranges

    for n in docs:
        ranges.at_least("--docs", n, 1)
    ranges.share("--fraction", fraction)
    for n in docs:
        run_bench(root, n, fraction, echo=typer.echo)


@bench_app.command("ingest")
def ingest_(
    model: ModelOption = "minilm",
    model_config: str = typer.Option(
        None, "--model-config", help="Random-initialised model of a known shape instead, e.g. qwen3-0.6b."
    ),
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    batch_size: BatchSizeOption = 32,
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per window."),
    sites: SitesOption = DEFAULT_SITES,
    versus: list[str] = typer.Option(
        [],
        "--versus",
        help="SPEC of another site configuration (repeatable), timed in the same alternation: e.g. the same dictionary site with encode_only.",
    ),
    repeats: RepeatsOption = 3,
    shard_tokens: int = typer.Option(65536, "--shard-tokens", help="Tokens per block = per committed shard."),
    as_json: JsonOption = False,
    data: str | None = typer.Option(
        None,
        "--data",
        help="A dataset source (hf:NAME, a save_to_disk folder, shards): time capture ÷ plain from it against the same "
        "documents from a local JSONL (docs/datasets.md).",
    ),
    max_docs: MaxDocsOption = None,
):
    """Time the plain forward pass against the full capture path (hooks, reductions, writer) on one batch.

    On the CPU the hooks run a fused C kernel built on first use with the system compiler;
    WHQ_FUSED=0 times the torch-op hooks instead. The output names the one that ran.

    Example: whq bench ingest --model minilm --batch-size 32 --seq-len 128
    """

    from ingest.bench import bench_ingest

    from . import ranges

    ranges.at_least("--shard-tokens", shard_tokens, 1)
    if data is not None:
        from ingest.bench_input import bench_input
        from ingest.options import IngestOptions

        options = IngestOptions(
            model,
            (data,),
            tuple(sites),
            batch_size=batch_size,
            max_length=seq_len,
            device=device,
            dtype=dtype,
            shard_tokens=shard_tokens,
            max_docs=max_docs,
            progress=False,
        )
        found = bench_input(options, repeats=repeats, echo=None if as_json else typer.echo)
        typer.echo(jsonio.dumps(found.to_dict(), indent=1) if as_json else "\n".join(found.lines()))
        return
    result = bench_ingest(
        model,
        model_config=model_config,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        sites=sites,
        versus=versus,
        repeats=repeats,
        shard_tokens=shard_tokens,
        echo=None if as_json else typer.echo,
    )
    typer.echo(jsonio.dumps(result.to_dict(), indent=1) if as_json else "\n".join(result.lines()))


@bench_app.command("query")
def query(
    root: Path = typer.Argument(..., help="Warehouse folder for the synthetic run (built once, then reused)."),
    rows: RowsOption = 10_000_000,
    layers: LayersOption = 12,
    width: WidthOption = 3072,
    k: KOption = 20,
    repeats: RepeatsOption = 5,
    as_json: JsonOption = False,
):
    """Time the main macros warm on a synthetic warehouse of N token_neurons rows (written through the normal write path).

    Example: whq bench query /tmp/whq-qbench --rows 100000000
    """

    from queries.bench import bench_query

    result = bench_query(
        root, rows, layers=layers, width=width, k=k, repeats=repeats, echo=None if as_json else typer.echo
    )
    typer.echo(jsonio.dumps(result.to_dict(), indent=1) if as_json else "\n".join(result.lines()))


@bench_app.command("serve")
def serve_(
    root: Path = typer.Argument(
        ..., help="Warehouse folder for the synthetic run (the one `whq bench query` builds; reused)."
    ),
    rows: RowsOption = 10_000_000,
    layers: LayersOption = 12,
    width: WidthOption = 3072,
    k: KOption = 20,
    repeats: RepeatsOption = 5,
    as_json: JsonOption = False,
):
    """Time the unit page, the token search and the run/site page warm, as `whq serve` renders them, per query.

    Example: whq bench serve /tmp/whq-qbench --rows 100000000
    """

    from queries.pages_bench import bench_serve, lines

    result = bench_serve(
        root, rows, layers=layers, width=width, k=k, repeats=repeats, echo=None if as_json else typer.echo
    )
    typer.echo(jsonio.dumps(result, indent=1) if as_json else "\n".join(lines(result)))


@bench_app.command("storage")
def storage(
    root: Path = typer.Argument(..., help="Warehouse whose committed runs are pushed and pulled (built when --rows)."),
    rows: int | None = typer.Option(
        None, "--rows", help="First write the synthetic run of `whq bench query` with this many token_neurons rows."
    ),
    repeats: int = typer.Option(1, "--repeats", help="Timed copies of each kind, alternating; the best counts."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
):
    """Push and pull throughput to a local S3 server (SeaweedFS) against a plain s3fs copy of the same files.

    Example: whq bench storage sbench-wh --rows 20000000
    """
    import warehouse

    from . import ranges
    from .transfer_bench import bench_storage

    ranges.at_least("--repeats", repeats, 1)
    if rows is not None:
        from queries.bench import Shape, build

        build(root, Shape(rows=rows), echo=None if as_json else typer.echo)
    result = bench_storage(warehouse.open(root), repeats, echo=None if as_json else typer.echo)
    typer.echo(jsonio.dumps(result.to_dict(), indent=1) if as_json else "\n".join(result.lines()))
