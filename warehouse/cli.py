"""The `whq` command line: a thin layer over the library and its one error boundary.

Every WarehouseError (and a few well-known user mistakes) becomes one line on stderr
naming the fix, with exit code 2. Heavy modules (torch, transformers) are imported
inside the commands that need them, so `whq sql` starts fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .cli_options import DeviceOption, DtypeOption, FormatOption, OutputFormat, SqlEngine, SqlEngineOption, WarehouseArg
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


def _print_table(df, fmt: OutputFormat) -> None:
    if fmt == "csv":
        import polars as pl

        nested = [c for c, t in df.schema.items() if t.is_nested()]
        flat = df.with_columns(
            pl.Series(c, [json.dumps(v, default=str) for v in df[c].to_list()], pl.String) for c in nested
        )
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
        help="Refuse anything but queries, bounded by --timeout and --memory-limit (for untrusted SQL).",
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
        10_000, "--max-rows", min=1, help="Print at most this many rows; a line on stderr says when more were cut."
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
            **{k: v for k, v in (("timeout_s", timeout), ("memory_limit", memory_limit)) if v is not None},
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


@app.command()
def ingest(
    root: Path = typer.Argument(..., help="Warehouse folder (created if missing)."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Local model folder, cached hub id, `minilm` (the default), `config:qwen3-tiny`, or adapter.py[:checkpoint]; with --scenario it replaces the scenario's model.id.",
    ),
    data: list[Path] = typer.Option([], "--data", "-d", help="Documents: .jsonl, .parquet or .txt (repeatable)."),
    site: list[str] = typer.Option(
        [],
        "--site",
        "-s",
        help="SPEC: <site>[@in|@out][[layers]][+sae[.NAME]=PATH|+transcoder[.NAME]=PATH]:<reduction>[=arg],... e.g. "
        "mlp.act:topk=20, resid.out[6]+sae=saes/layers.6:topk=32,examples=20 (repeatable; dictionary sites and their "
        "options encode_only, encode_dtype=bfloat16: ingest/README.md).",
    ),
    scenario: Path | None = typer.Option(
        None, "--scenario", help="Chat scenario YAML (Activation Lab format) instead of --data."
    ),
    run_id: str | None = typer.Option(None, "--run-id", help="Run id (default: <model>-<UTC time>, printed)."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Dataset label for documents that have none (default: file stem)."
    ),
    role: str | None = typer.Option(None, "--role", help="Role label: pool, target, reference, ..."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Windows per forward pass."),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Tokens per window (long documents are split, positions continue)."
    ),
    truncate: bool = typer.Option(False, "--truncate", help="Keep only each document's first window."),
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run (same arguments and --run-id)."),
    shard_tokens: int = typer.Option(65536, "--shard-tokens", help="Tokens per committed shard (the unit of resume)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and count) bad records instead of stopping."),
    logit_lens: bool = typer.Option(
        False, "--logit-lens", help="Store each MLP unit's output direction through the unembedding."
    ),
    splice: bool = typer.Option(
        False,
        "--splice",
        help="Dictionary sites of a causal LM: also measure next-token loss with each reconstruction spliced in (one extra forward per dictionary layer, plus one; not with encode_only).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ranks: int = typer.Option(
        1,
        "--ranks",
        help="Shard the documents over N processes on this machine (torchrun; one GPU each with --device cuda).",
    ),
    # dataset input options (docs/datasets.md; the fields and their help: ingest/options.py)
    split: str | None = typer.Option(None, "--split", help="Dataset split (default: train, or the only one)."),
    text_column: str | None = typer.Option(
        None, "--text-column", help="Column with the text (default: text, else input_ids/tokens used as is)."
    ),
    id_column: str | None = typer.Option(None, "--id-column", help="Column with each document's id."),
    where: str | None = typer.Option(
        None, "--where", help="Keep rows where this SQL boolean expression holds, e.g. \"lang = 'en'\"."
    ),
    shuffle: int | None = typer.Option(None, "--shuffle", help="Shuffle the rows with this seed (buffer shuffle)."),
    shuffle_buffer: int = typer.Option(10_000, "--shuffle-buffer", help="Rows in the --shuffle buffer."),
    streaming: bool = typer.Option(True, "--streaming/--no-streaming", help="Stream hf: datasets."),
    max_docs: int | None = typer.Option(None, "--max-docs", help="Stop after this many documents."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Stop after exactly this many document tokens (the last document is cut)."
    ),
    context_size: int | None = typer.Option(None, "--context-size", help="Tokens per packed context (--pack)."),
    pack: bool = typer.Option(False, "--pack", help="Pack documents into fixed contexts as SAELens does."),
    prepend_bos: bool | None = typer.Option(
        None, "--prepend-bos/--no-prepend-bos", help="BOS at each packed context's start (default: the SAE's cfg)."
    ),
    separator: str = typer.Option(
        "bos", "--separator", help="Token between packed documents: bos, eos, sep, none, ID."
    ),
    keep_partial: bool = typer.Option(False, "--keep-partial", help="Keep the last, partial packed context."),
    exclude_special: bool = typer.Option(
        False, "--exclude-special", help="Leave BOS/EOS/pad tokens out of statistics, examples and tables."
    ),
):
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

        result = run_scenario(root, scenario, run_id=run_id, device=device, progress=not quiet, model=model)
    else:
        from dataclasses import replace

        from ingest.inputs import INPUT_OPTIONS  # dataset input options
        from ingest.options import DEFAULT_SITES, IngestOptions

        options = IngestOptions(
            model or "minilm",
            tuple(str(d) for d in data),
            tuple(site) or DEFAULT_SITES,
            run_id=run_id,
            dataset=dataset,
            role=role,
            batch_size=batch_size,
            max_length=max_length,
            truncate=truncate,
            device=device,
            dtype=dtype,
            resume=resume,
            shard_tokens=shard_tokens,
            skip_bad=skip_bad,
            logit_lens=logit_lens,
            splice=splice,
            progress=not quiet,
            **{name: value for name, value in locals().items() if name in INPUT_OPTIONS},  # dataset input options
        )
        if ranks != 1:
            from ingest.ranks import launch

            launch(ranks, list(options.data), _without_ranks(sys.argv[sys.argv.index("ingest") + 1 :]))
            return
        from ingest.pipeline import ingest as run_ingest
        from ingest.ranks import from_env

        rank, world_size, run_id, device = from_env(run_id, device, options.model)  # set by torchrun
        result = run_ingest(root, replace(options, run_id=run_id, device=device, rank=rank, world_size=world_size))
    for note in result.notes if not quiet else []:
        typer.echo(note)
    if result.skipped:
        typer.echo(f"skipped {result.skipped} bad record(s); first: {result.first_skipped}")
    if result.rank == 0:  # rank 0 reports the committed run
        typer.echo(_summary_line(result))


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
    model: str = typer.Option("minilm", "--model", "-m", help="Model as for `whq ingest --model`."),
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
        from ingest.dictionary import load as load_dictionary

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
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8050, "--port", help="TCP port."),
):
    """Browse the warehouse's runs, sites and units in a web browser (Ctrl-C stops the server).

    Example: whq serve wh --port 8050
    """
    import os
    import socket

    import uvicorn

    import warehouse
    from queries.server import create_app

    wh = warehouse.open(root)
    try:  # bound here, so a taken port is one line naming the fix, not uvicorn's log and exit
        sock = socket.create_server((host, port))
    except OSError as err:
        _fail(
            f"cannot listen on {host}:{port}: {os.strerror(err.errno) if err.errno else err}; pick another port with --port"
        )
    hosts = ["*"] if host in ("0.0.0.0", "::") else ["127.0.0.1", "localhost", "::1", host]
    server = uvicorn.Server(uvicorn.Config(create_app(wh, allowed_hosts=hosts), log_level="warning"))
    typer.echo(f"serving {wh.root} at http://{host}:{port}/ (Ctrl-C stops)")
    server.run(sockets=[sock])


from .cli_export import export_app  # noqa: E402 - sub-apps are registered after the commands

app.add_typer(export_app, name="export")
from .cli_nag import nag_app  # noqa: E402

app.add_typer(nag_app, name="nag")
from .cli_bench import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


def _rel_to_polars(rel):
    import duckdb

    from .errors import sql_error

    try:
        return rel.pl()
    except duckdb.Error as err:
        raise sql_error(err) from None


def main() -> None:
    """Console entry point: the one error boundary."""
    try:
        code = app(standalone_mode=False)  # click returns (not raises) a typer.Exit's code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except WarehouseError as err:
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)  # one line, even if a library's text had several
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
