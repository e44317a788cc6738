"""`whq export ...`: files for viewers, written from a warehouse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_options import RunOption, WarehouseArg
from .output import output_folder

export_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Write a run's analyses as files for viewers."
)

LayersOption = Annotated[
    list[str] | None,
    typer.Option("--layers", help="Layers to export: a range or list, e.g. 3, 0-5 or 0,2 (repeatable; default all)."),
]


def _layers(values: list[str] | None) -> list[int] | None:
    """Every --layers given, each a range or list as `whq nag --layers` reads it."""
    from queries.nag import parse_layers

    if not values:
        return None
    return sorted({layer for value in values for layer in parse_layers(value) or []})


@export_app.command()
def features(
    root: WarehouseArg,
    run: RunOption,
    site: str = typer.Option(..., "--site", help="Site captured with examples=N or threshold=T (e.g. mlp.act)."),
    out: Path = typer.Option(..., "--out", help="Output folder (features/, feature_metadata.json, packed/)."),
    layers: LayersOption = None,
    top: int = typer.Option(20, "--top", help="Top examples per unit."),
    random: int = typer.Option(10, "--random", help="Random examples per unit."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random examples."),
):
    """Per-unit JSON in transcoder-adapters' shape (keyed by cantor id), its feature metadata, and circuit-tracer's packed layout.

    Example: whq export features wh --run demo --site mlp.act --out features-demo --layers 3
    """
    import warehouse
    from queries.export import write_features

    from . import ranges

    ranges.at_least("--top", top, 0)
    ranges.at_least("--random", random, 0)
    wh = warehouse.open(root)
    written = write_features(wh, run, site, out, _layers(layers), k=top, n_random=random, seed=seed)
    total = sum(written.values())
    typer.echo(f"wrote {total:,} units ({', '.join(f'layer {lyr}: {n:,}' for lyr, n in written.items())}) to {out}")


@export_app.command()
def site(
    root: WarehouseArg,
    run: RunOption,
    site_name: str = typer.Option(..., "--site", help="Site (e.g. mlp.act)."),
    out: Path = typer.Option(..., "--out", help="Output folder (index.html, layer-L.html, L/U.html, vega.js)."),
    layers: LayersOption = None,
):
    """The run/site and unit pages of `whq serve` as static HTML that opens from file:// with no network.

    Example: whq export site wh --run demo --site mlp.act --out site-demo --layers 3
    """
    import warehouse
    from queries.site_export import write_site

    with output_folder(out, "whq export site"):
        written = write_site(warehouse.open(root), run, site_name, out, _layers(layers))
    typer.echo(
        f"wrote {written['pages']:,} pages (layers {', '.join(map(str, written['layers']))}) to {out}; open {out / 'index.html'}"
    )


@export_app.command()
def neuronpedia(
    root: WarehouseArg,
    run: RunOption,
    site_name: str = typer.Option(..., "--site", help="Site (e.g. mlp.act)."),
    out: Path = typer.Option(..., "--out", help="Output folder: OUT/<model>/<layer>-<set>/ per layer."),
    layers: LayersOption = None,
    model_name: str | None = typer.Option(
        None, "--model-name", help="Neuronpedia model id (default: the model folder's name)."
    ),
    set_name: str | None = typer.Option(None, "--set-name", help="Neuronpedia source set (default: whq-<site>)."),
):
    """Features and activations in the layout Neuronpedia's importer reads (jsonl + jsonl.gz per layer).

    Example: whq export neuronpedia wh --run demo --site mlp.act --out np-demo --model-name all-minilm-l6-v2
    """
    import warehouse
    from queries.neuronpedia import write_neuronpedia

    written = write_neuronpedia(
        warehouse.open(root), run, site_name, out, _layers(layers), model_name=model_name, set_name=set_name
    )
    for folder, n in written.items():
        typer.echo(f"wrote {n:,} features to {folder}")
