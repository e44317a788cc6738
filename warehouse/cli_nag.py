"""`whq nag ...`: NAG data selection from the command line (select, merge, keys)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_options import FrameEngine, FrameEngineOption, WarehouseArg
from .output import check_output_file

nag_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="NAG: rank and select pool documents by similarity to a target's neuron-activated graph.",
)

_LAYERS_HELP = "Layers to use: a range or list, e.g. 0-13 or 0,2,5 (default: all)."


@nag_app.command()
def select(
    root: WarehouseArg,
    target: str = typer.Option(..., "--target", help="Target documents: RUN or RUN:DATASET."),
    pool: str = typer.Option(..., "--pool", help="Pool documents: RUN or RUN:DATASET."),
    site: str = typer.Option("mlp.up", "--site", help="Site captured with nag=K."),
    fraction: float = typer.Option(0.2, "--fraction", help="Share of the pool's tokens to keep."),
    layers: str | None = typer.Option(None, "--layers", help=_LAYERS_HELP),
    power: float = typer.Option(1.0, "--power", help="Raise the target counts to this power before normalising."),
    quality_col: str | None = typer.Option(
        None, "--quality-col", help="Mix in this score from the documents' meta (lower is better)."
    ),
    invert: bool = typer.Option(False, "--invert", help="The quality score is higher-is-better: use 1 - its min-max."),
    target_role: str | None = typer.Option(None, "--target-role", help="Only target documents of this role."),
    pool_role: str | None = typer.Option(None, "--pool-role", help="Only pool documents of this role."),
    engine: FrameEngineOption = FrameEngine.sql,
    out: Path = typer.Option(
        ..., "--out", help="Parquet file of the selected pool documents (payload + nag_distance)."
    ),
):
    """Select the pool documents closest to the target under a token budget and write them with their payload.

    Example: whq nag select wh --target demo:MENENIUS --pool demo --site mlp.up --fraction 0.2 --out selected.parquet
    """
    import warehouse
    from queries import nag

    from .errors import BadInput

    if invert and quality_col is None:
        raise BadInput("--invert applies to --quality-col: add --quality-col NAME, or drop --invert")
    target_run, target_dataset = nag.parse_target(target)
    pool_run, pool_dataset = nag.parse_target(pool)
    check_output_file(out)  # before the selection runs; written by nag.write_selection
    wh = warehouse.open(root)
    picked = nag.select(
        wh,
        target_run,
        pool_run,
        site,
        fraction=fraction,
        target_dataset=target_dataset,
        pool_dataset=pool_dataset,
        layers=nag.parse_layers(layers),
        power=power,
        quality_column=quality_col,
        invert=invert,
        target_role=target_role,
        pool_role=pool_role,
        engine=engine.value,
    )
    rows = nag.with_payload(wh, pool_run, picked)
    nag.write_selection(rows, out)
    tokens = int(rows["n_tokens"].sum()) if rows.height else 0
    typer.echo(
        f"selected {rows.height:,} documents ({tokens:,} tokens, distance {rows['nag_distance'].min():.4f}-"
        f"{rows['nag_distance'].max():.4f}) -> {out}"
    )


@nag_app.command()
def merge(
    inputs: list[Path] = typer.Argument(..., help="Selections written by `whq nag select`, one per target."),
    out: Path = typer.Option(..., "--out", help="Parquet file of the merged selection (with a target column)."),
    dedup: bool = typer.Option(
        False, "--dedup", help="Keep each doc_id once, from the target where its distance is lowest."
    ),
):
    """Merge per-target selections into one multi-target mixture (run each select with fraction / N first).

    Example: whq nag merge arc.parquet hellaswag.parquet --dedup --out mixture.parquet
    """
    from queries import nag

    from .errors import BadInput

    check_output_file(out)
    names = [p.stem for p in inputs]
    if len(set(names)) != len(names):
        raise BadInput("two inputs share a file name; the name labels each target: rename one")
    merged, note = nag.merge({p.stem: nag.read_selection(p) for p in inputs}, dedup=dedup)
    nag.write_selection(merged, out)
    typer.echo(f"{note} -> {out}")


@nag_app.command()
def keys(
    root: WarehouseArg,
    target: str = typer.Option(..., "--target", help="Target documents: RUN or RUN:DATASET."),
    site: str = typer.Option("mlp.up", "--site", help="Site captured with nag=K."),
    top: int | None = typer.Option(None, "--top", help="Units per layer: the M most frequent in the target's top-Ks."),
    share: float | None = typer.Option(
        None, "--share", help="Or a share of all units, most frequent first (e.g. 0.0012)."
    ),
    layers: str | None = typer.Option(None, "--layers", help=_LAYERS_HELP),
    target_role: str | None = typer.Option(None, "--target-role", help="Only target documents of this role."),
    out: Path = typer.Option(..., "--out", help="JSON file of the keys (read by ingest.deactivate.load_keys)."),
):
    """Save deactivation keys: the units that appear most often in the target documents' top-K.

    Example: whq nag keys wh --target demo:MENENIUS --site mlp.up --top 20 --out keys.json
    """
    import warehouse
    from queries import nag

    target_run, target_dataset = nag.parse_target(target)
    check_output_file(out)  # before the keys are computed; written by nag.save_keys
    found = nag.deactivation_keys(
        warehouse.open(root),
        target_run,
        site,
        target_dataset=target_dataset,
        top=top,
        share=share,
        layers=nag.parse_layers(layers),
        target_role=target_role,
    )
    nag.save_keys(found, out)
    count = sum(len(v) for v in found["layers"].values())
    typer.echo(
        f"{count:,} units over {len(found['layers'])} layers ({found['rule']}, {found['n_targets']:,} target documents) -> {out}"
    )
