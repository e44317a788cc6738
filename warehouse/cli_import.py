"""`whq import ...`: what other tools published, onto a warehouse's units (docs/explain.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_options import WarehouseArg

import_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Read other tools' results onto a run's units."
)


@import_app.command()
def explanations(
    root: WarehouseArg,
    file: Path = typer.Argument(
        ..., help="Neuronpedia's explanation export: a .jsonl(.gz) file or its explanations/ folder."
    ),
    run: str = typer.Option(..., "--run", help="Run id whose units the explanations are of."),
    site: str = typer.Option(..., "--site", help="Site of the run (e.g. mlp.act, or a dictionary's site)."),
    source: str | None = typer.Option(
        None, "--source", help="Import only records of this Neuronpedia source id (their layer field, e.g. 6-res-jb)."
    ),
    layer: int | None = typer.Option(
        None, "--layer", help="Put every record on this layer (default: the number a source id starts with)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Import Neuronpedia's bulk explanation export onto the units of a run's site, committed in one step.

    Each record (modelId, layer, index, description, typeName, explanationModelName, and scores where
    present) becomes an explanation of unit `index` with explainer neuronpedia:<typeName>; browse them
    on the pages and score them with `whq score --explainer neuronpedia:<typeName>`.

    Example: whq import explanations wh gpt2-small/6-res-jb/explanations --run demo --site sae6 --source 6-res-jb
    """
    import warehouse
    from explain.neuronpedia import import_explanations

    from . import ranges

    if layer is not None:
        ranges.at_least("--layer", layer, 0)
    wh = warehouse.open(root)
    if quiet:
        done = import_explanations(wh, file, run, site, layer=layer, source=source)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("embedding explanations"), BarColumn(), MofNCompleteColumn(), transient=True) as bar:
            task = bar.add_task("", total=None)
            done = import_explanations(
                wh,
                file,
                run,
                site,
                layer=layer,
                source=source,
                on_embedded=lambda n, total: bar.update(task, completed=n, total=total),
            )
    skipped = [f"{done.other_sources:,} of other sources skipped"] if done.other_sources else []
    skipped += [f"{done.duplicates:,} repeated records kept once"] if done.duplicates else []
    typer.echo(
        f"imported {done.explanations:,} explanations and {done.scores:,} scores onto run {run}, site {site}, "
        f"layers {', '.join(map(str, done.layers))}" + (f" ({'; '.join(skipped)})" if skipped else "")
    )
