"""The `whq` command line: a thin layer over the library and its one error boundary.

Every WarehouseError (and a few well-known user mistakes) becomes one line on stderr
naming the fix, with exit code 2. Heavy modules (torch, transformers) are imported
inside the commands that need them, so `whq sql` starts fast.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import duckdb
import typer

from .cli_options import (
    INGEST_OPTIONS,
    FormatOption,
    ModelOption,
    OutputFormat,
    SqlEngine,
    SqlEngineOption,
    WarehouseArg,
)
from .display import terminal_safe
from .errors import WarehouseError, sql_error

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


def _print_table(df, fmt: OutputFormat) -> None:
    from .display import formatted

    # color=True: click would otherwise drop what looks like a terminal escape from values printed to a pipe
    typer.echo(formatted(df, fmt, terminal=sys.stdout.isatty()), nl=fmt != "csv", color=True)


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
    root: WarehouseArg,
    delete: str | None = typer.Option(None, "--delete", help="Delete this run atomically."),
    fmt: FormatOption = OutputFormat.table,
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
    root: WarehouseArg,
    query: str = typer.Argument(..., help="SQL to run; the tables and macros of the catalog are in scope."),
    fmt: FormatOption = OutputFormat.table,
    read_only: bool = typer.Option(
        False,
        "--read-only",
        help="Refuse anything but queries, bounded by --timeout, --memory-limit and --max-bytes (for untrusted SQL).",
    ),
    engine: SqlEngineOption = SqlEngine.duckdb,
    timeout: float | None = typer.Option(
        None, "--timeout", help="With --read-only: stop the query after this many seconds (default 30)."
    ),
    memory_limit: str | None = typer.Option(
        None,
        "--memory-limit",
        help="With --read-only: DuckDB's memory limit, e.g. 2GB (default: a quarter of this machine's memory).",
    ),
    max_rows: int = typer.Option(
        10_000,
        "--max-rows",
        min=1,
        max=2**63 - 2,  # read with LIMIT max_rows + 1, a 64-bit count in DuckDB
        help="Print at most this many rows; a line on stderr says when more were cut.",
    ),
    max_bytes: str | None = typer.Option(
        None, "--max-bytes", help="With --read-only: refuse a result holding more than this, e.g. 1GB (default 256MB)."
    ),
    allow_writes: bool = typer.Option(
        False,
        "--allow-writes",
        help="Let trusted SQL write files inside the warehouse folder (COPY, EXPORT, ATTACH, ...).",
    ),
):
    """Run SQL against a warehouse.

    Example: whq sql wh "SELECT * FROM layer_summary('demo', 'mlp.act')"
    """
    import warehouse

    from .safesql import SqlLimits, bounded, check_no_warehouse_writes, run_read_only

    if not read_only and (timeout is not None or memory_limit is not None):
        _fail("--timeout and --memory-limit bound untrusted SQL: add --read-only")
    if not read_only and max_bytes is not None:
        _fail("--max-bytes bounds untrusted SQL: add --read-only")
    if read_only and allow_writes:
        _fail("--allow-writes contradicts --read-only: drop one of them")
    wh = warehouse.open(root)
    if engine == "spark":
        from queries.spark import spark_sql

        if read_only:  # Spark SQL can read any file (csv.`/path`) and call Java (reflect): no sandbox
            _fail("--read-only runs on the duckdb engine only: drop --engine spark for untrusted SQL")
        _print_table(spark_sql(wh, query), fmt)
        return
    if read_only:
        limits = SqlLimits(
            **{
                k: v
                for k, v in (("timeout_s", timeout), ("memory_limit", memory_limit), ("max_bytes", max_bytes))
                if v is not None
            },
            max_rows=max_rows,
        )
        result = run_read_only(wh, query, limits)
    else:
        if not allow_writes:
            check_no_warehouse_writes(query, wh.root)
        rel = wh.sql(query)
        if rel is None:
            typer.echo("ok")
            return
        result = bounded(_rel_to_polars(rel.limit(max_rows + 1)), max_rows)
    frame, truncated = result.frame, result.truncated
    _print_table(frame, fmt)
    if truncated:
        typer.echo(
            f"note: printed the first {max_rows:,} rows; more were cut: add a LIMIT, or raise --max-rows", err=True
        )


def ingest(ctx: typer.Context, root: Path, scenario: Path | None, ranks: int, **fields) -> None:
    """Capture a model's activations over documents into a new run.

    Example: whq ingest wh --model minilm --data docs.jsonl --site mlp.act:topk=20 --site mlp.up:nag=20 --site resid.out:last

    Dictionary sites encode a site with an SAE or transcoder on the device and store its latents as units:
    --site 'resid.out[3]+sae=saes:topk=32,examples=20' --site 'mlp.in[*]+transcoder=transcoders:threshold=0'
    ([3], [0,2], [0-3], [*] select layers; PATH is a SAELens, sparsify or Gemma Scope dictionary, a folder of them
    per layer, or dict.py[:checkpoint]; the site is named sae.resid.out / transcoder.mlp.in, and +sae.NAME=PATH
    names a second dictionary on one site sae.NAME.resid.out). Dictionary options among the reductions:
    encode_only (no decoder: no reconstruction quality, no --splice), encode_dtype=float32|bfloat16|float16.
    """
    if scenario is not None:
        from ingest.chat import run_scenario

        given_model = ctx.get_parameter_source("model").name != "DEFAULT"
        result = run_scenario(
            root,
            scenario,
            run_id=fields["run_id"],
            device=fields["device"],
            progress=fields["progress"],
            model=fields["model"] if given_model else None,
        )
    else:
        from dataclasses import replace

        from ingest.options import IngestOptions

        options = IngestOptions(**fields)
        if ranks != 1:
            from ingest.ranks import launch

            launch(ranks, list(options.data), _without_ranks(sys.argv[sys.argv.index("ingest") + 1 :]))
            return
        from ingest.pipeline import ingest as run_ingest
        from ingest.ranks import from_env

        rank, world_size, run_id, device = from_env(options.run_id, options.device, options.model)  # set by torchrun
        result = run_ingest(root, replace(options, run_id=run_id, device=device, rank=rank, world_size=world_size))
    for note in result.notes if fields["progress"] else []:
        typer.echo(note)
    if result.skipped:
        typer.echo(f"skipped {result.skipped} bad record(s); first: {result.first_skipped}")
    if result.rank == 0:  # rank 0 reports the committed run
        typer.echo(_summary_line(result))


# The flags are IngestOptions' fields (cli_options.dataclass_options), between the folder and the two
# options that are not ingest options: a scenario instead of documents, and the torchrun launch.
_INGEST_PARAMETERS = [
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    inspect.Parameter(
        "root",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[Path, typer.Argument(help="Warehouse folder (created if missing).")],
    ),
    *INGEST_OPTIONS.values(),
    inspect.Parameter(
        "scenario",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None,
            typer.Option(
                "--scenario",
                help="Chat scenario YAML (Activation Lab format) instead of --data; "
                "--model then replaces the scenario's model.id.",
            ),
        ],
    ),
    inspect.Parameter(
        "ranks",
        inspect.Parameter.KEYWORD_ONLY,
        default=1,
        annotation=Annotated[
            int,
            typer.Option(
                "--ranks",
                help="Shard the documents over N processes on this machine (torchrun; one GPU each with --device cuda).",
            ),
        ],
    ),
]
ingest.__signature__ = inspect.Signature(_INGEST_PARAMETERS)
ingest.__annotations__ = {p.name: p.annotation for p in _INGEST_PARAMETERS}
app.command()(ingest)


def _without_ranks(arguments: list[str]) -> list[str]:
    """The arguments less --ranks and its value: what each torchrun rank runs."""
    kept, skip = [], False
    for arg in arguments:
        if skip:
            skip = False
        elif arg == "--ranks":
            skip = True
        elif not arg.startswith("--ranks="):
            kept.append(arg)
    return kept


def _summary_line(result) -> str:
    parts = [f"committed run {result.run_id}"]
    if result.documents is not None:
        parts.append(f"{result.documents:,} documents, {result.tokens or 0:,} tokens")
    if result.rows:
        parts.append(", ".join(f"{table} {n:,}" for table, n in sorted(result.rows.items())) + " rows")
    parts.append(f"{result.bytes / 1e6:,.2f} MB on disk")
    if result.tokens_per_s:
        parts.append(f"{result.tokens_per_s:,.0f} tokens/s")
    return "; ".join(parts)


@app.command()
def sites(
    model: ModelOption = "minilm",
    all_modules: bool = typer.Option(False, "--all", help="List every module, not only the first block's."),
    dictionary: str | None = typer.Option(
        None, "--dictionary", help="A dictionary path (as after +sae=): print what it holds instead."
    ),
):
    """Print a model's site aliases and module tree (to write --site SPECs), or what a dictionary holds.

    Example: whq sites --model minilm; whq sites --model minilm --dictionary saes/
    """
    from ingest.models import load

    if dictionary is not None:
        from ingest.dictionary_files import load as load_dictionary

        info = load_dictionary(dictionary).describe()
        k = f" (k={info['k']})" if info["k"] else ""
        layers = ", ".join(map(str, info["layers"])) or "not recorded (select one: SITE[N]+sae=PATH)"
        typer.echo(
            f"{info['path']}: {info['format']} {'transcoder' if info['transcoder'] else 'SAE'}, architecture "
            f"{info['architecture']}{k}, d_in {info['d_in']}, d_sae {info['d_sae']}, hook {info['hook'] or 'not recorded'}, "
            f"layers {layers}"
        )
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


@app.command()
def check(
    root: WarehouseArg,
    quick: bool = typer.Option(False, "--quick", help="Skip the sha256 of each part (sizes, rows and schemas only)."),
):
    """Verify every committed part against its manifest (exists, bytes, rows, sha256, schema).

    Exit 0 when all verify, 1 with one line per missing or corrupt part (and its fix).
    Example: whq check wh
    """
    from .maintenance import check as check_parts
    from .maintenance import layout_of

    layout = layout_of(root)  # not opened: a damaged part may stop the catalog from building
    problems, counts = check_parts(layout, checksum=not quick)
    for problem in problems:
        typer.echo(problem.line(layout.root))
    quarantined = f"; quarantined: {', '.join(counts['quarantined'])}" if counts["quarantined"] else ""
    verdict = f"{len(problems)} bad part(s)" if problems else "all verify"
    typer.echo(f"checked {counts['parts']} parts of {len(counts['runs'])} runs: {verdict}{quarantined}")
    if problems:
        raise typer.Exit(1)


@app.command()
def repair(root: WarehouseArg):
    """Quarantine runs with missing or corrupt parts (others stay queryable) and rebuild the catalog.

    Example: whq repair wh
    """
    from .maintenance import repair as repair_warehouse

    for action in repair_warehouse(root):
        typer.echo(action)


@app.command()
def gc(
    root: WarehouseArg,
    interrupted: bool = typer.Option(False, "--interrupted", help="Also discard interrupted (resumable) runs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed, remove nothing."),
):
    """Remove orphan parts, stale temporary files and journals no run needs.

    Example: whq gc wh --dry-run
    """
    import warehouse

    from .maintenance import gc as collect

    removed = collect(warehouse.open(root), interrupted=interrupted, dry_run=dry_run)
    for path in removed:
        typer.echo(("would remove " if dry_run else "removed ") + path)
    typer.echo(f"{'would remove' if dry_run else 'removed'} {len(removed)} item(s)")


@app.command()
def report(
    root: WarehouseArg,
    run: str = typer.Option(..., "--run", "-r", help="Scenario run to report on."),
    out: Path = typer.Option(
        Path("report.html"), "--out", "-o", help="HTML file to write (self-contained, opens offline)."
    ),
    csv: Path | None = typer.Option(
        None, "--csv", help="Also write Activation Lab's four CSV summaries into this folder."
    ),
    compare: list[str] = typer.Option(
        [], "--compare", help="Other scenario runs for the inter-run comparison (repeatable)."
    ),
):
    """Write the comparison report of a scenario run: one offline HTML file (and CSVs).

    Example: whq report wh --run emo --out emo.html --csv results/
    """
    import warehouse
    from queries.report import write_report

    written = write_report(warehouse.open(root), run, out, csv_dir=csv, compare=compare)
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def serve(
    root: WarehouseArg,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to listen on (::1 for IPv6, 0.0.0.0: every interface)."
    ),
    port: int = typer.Option(8050, "--port", help="TCP port (0: any free port; the URL printed names it)."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="The SQL box: stop a query after this many seconds (default 30)."
    ),
    memory_limit: str | None = typer.Option(
        None,
        "--memory-limit",
        help="The SQL box: DuckDB's memory limit, e.g. 2GB (default: a quarter of this machine's memory).",
    ),
    max_bytes: str | None = typer.Option(
        None, "--max-bytes", help="The SQL box: refuse a result holding more than this, e.g. 1GB (default 256MB)."
    ),
):
    """Browse the warehouse's runs, sites and units in a web browser (Ctrl-C stops the server).

    The SQL box answers only with the token of the URL printed. Example: whq serve wh --port 8050
    """
    import uvicorn

    import warehouse
    from queries.server import allowed_hosts, create_app, listen, new_token, url_of

    from .safesql import SqlLimits

    options = (("timeout_s", timeout), ("memory_limit", memory_limit), ("max_bytes", max_bytes))
    limits = SqlLimits(**{k: v for k, v in options if v is not None})
    wh = warehouse.open(root)
    sock = listen(host, port)  # bound here, so a taken port is one line naming the fix, not uvicorn's log and exit
    token = new_token()
    app = create_app(wh, allowed_hosts=allowed_hosts(sock, host), token=token, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    typer.echo(f"serving {wh.root} at {url_of(sock, token)} (Ctrl-C stops)")
    server.run(sockets=[sock])


from .cli_export import export_app  # noqa: E402 - sub-apps are registered after the commands

app.add_typer(export_app, name="export")
from .cli_nag import nag_app  # noqa: E402

app.add_typer(nag_app, name="nag")
from .cli_bench import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")
from .cli_explain import explain_app  # noqa: E402 - whq explain, whq score (and whq bench explain)

app.add_typer(explain_app)
from .cli_import import import_app  # noqa: E402 - whq import explanations

app.add_typer(import_app, name="import")
from .cli_remote import pull, push  # noqa: E402

app.command()(push)
app.command()(pull)


def _rel_to_polars(rel):
    from .display import result_frame

    try:
        return result_frame(rel)
    except duckdb.Error as err:
        raise sql_error(err) from None


def _report(err: WarehouseError) -> NoReturn:
    # One line, even if a library's text had several, and no raw control character (a value in DuckDB's message).
    typer.echo(f"error: {terminal_safe(' '.join(str(err).split()))}", err=True)
    sys.exit(err.exit_code)


def main() -> None:
    """Console entry point: the one error boundary."""
    try:
        code = app(standalone_mode=False)  # click returns (not raises) a typer.Exit's code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except WarehouseError as err:
        _report(err)
    except duckdb.Error as err:
        # a statement of whq's own that failed where none was expected (a run deleted meanwhile)
        _report(sql_error(err))
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
