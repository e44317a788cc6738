"""NAG workflows over the macros: selection with payload, multi-target merge, deactivation keys, PCA view.

    from queries import nag
    picked = nag.select(wh, "t", "pool", "mlp.up", target_dataset="hellaswag", fraction=0.2)
    merged, note = nag.merge({"arc": a, "hellaswag": b}, dedup=True)
    keys = nag.deactivation_keys(wh, "t", "mlp.up", top=20)
    chart = nag.pca_chart(nag.vectors(wh, "pool", "mlp.up"))

Selections come from the SQL macros (engine="sql") or their Polars twins
(engine="polars"); both return the same rows.
"""

from __future__ import annotations

import math
import re
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

from warehouse import jsonio, ranges
from warehouse.catalog import quote
from warehouse.errors import BadInput
from warehouse.names import check_label, check_name
from warehouse.output import check_output_file, ensure_parent

from . import nag_frames
from .frames import scan

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_layers(text: str | None) -> list[int] | None:
    """'0-13', '0,2,5' or '0-3,8' -> a sorted list of layers (None: all)."""
    if text is None:
        return None
    if not text.strip():
        raise BadInput("--layers is empty: write a range or a list, e.g. --layers 0-13 or --layers 0,2,5")
    layers: set[int] = set()
    for piece in text.split(","):
        match = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", piece)
        if not match:
            raise BadInput(
                f"cannot read layers {text!r}: write a range or a list, e.g. --layers 0-13 or --layers 0,2,5"
            )
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise BadInput(f"layer range {piece.strip()!r} runs backwards: write it low-high, e.g. 0-13")
        if high >= ranges.LAYER_CEILING:
            raise BadInput(f"layer {high} in {piece.strip()!r} is beyond any model: give the site's own layers")
        layers.update(range(low, high + 1))
    return sorted(layers)


def parse_target(text: str) -> tuple[str, str | None]:
    """'RUN' or 'RUN:DATASET'."""
    run, _, dataset = text.partition(":")
    if not run:
        raise BadInput(f"cannot read {text!r}: write RUN or RUN:DATASET, e.g. --target bench:hellaswag")
    return check_name("run id", run), check_label("dataset", dataset) if dataset else None


def _check_names(
    target_run: str, pool_run: str, site: str, target_dataset: str | None, pool_dataset: str | None
) -> None:
    for run in (target_run, pool_run):
        check_name("run id", run)
    check_name("site", site)
    for dataset in (target_dataset, pool_dataset):
        if dataset is not None:
            check_label("dataset", dataset)


def _sql_literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_sql_literal(v) for v in value) + "]"
    return quote(str(value))


def select(
    wh,
    target_run: str,
    pool_run: str,
    site: str,
    *,
    fraction: float = 0.2,
    target_dataset: str | None = None,
    pool_dataset: str | None = None,
    layers=None,
    power: float = 1.0,
    quality_column: str | None = None,
    invert: bool = False,
    target_role: str | None = None,
    pool_role: str | None = None,
    engine: str = "sql",
) -> pl.DataFrame:
    """nag_select (or nag_quality when quality_column is given) as a DataFrame, in selection order."""
    _check_names(target_run, pool_run, site, target_dataset, pool_dataset)
    if quality_column is not None and not _IDENTIFIER.match(quality_column):
        raise BadInput(
            f"quality column {quality_column!r} is not a plain name: use the key of the score in the source's extra columns"
        )
    ranges.share("--fraction", fraction)
    ranges.positive("--power", power)
    named = {
        "target_dataset": target_dataset,
        "pool_dataset": pool_dataset,
        "layers": layers,
        "power": power,
        "fraction": fraction,
        "target_role": target_role,
        "pool_role": pool_role,
    }
    if quality_column is not None:
        named["invert"] = invert
    if engine == "polars":
        if quality_column is None:
            return nag_frames.nag_select(wh, target_run, pool_run, site, **named).collect(engine="streaming")
        return nag_frames.nag_quality(wh, target_run, pool_run, site, quality_column, **named).collect(
            engine="streaming"
        )
    if engine != "sql":
        raise BadInput(f"unknown engine {engine!r}: use sql or polars")
    positional = [target_run, pool_run, site] + ([quality_column] if quality_column is not None else [])
    macro = "nag_quality" if quality_column is not None else "nag_select"
    with (
        staged_weights(
            wh,
            target_run,
            pool_run,
            site,
            target_dataset=target_dataset,
            layers=layers,
            power=power,
            target_role=target_role,
        ) as weights,
        _documents_by_array(wh),
    ):
        return wh.pl(f"SELECT * FROM {_macro_call(macro, positional, {**named, 'weights': weights})}")


def _macro_call(macro: str, positional: list, named: dict) -> str:
    """`macro(a, b, name := value, ...)` with every argument as a SQL literal."""
    args = [_sql_literal(v) for v in positional] + [f"{k} := {_sql_literal(v)}" for k, v in named.items()]
    return f"{macro}({', '.join(args)})"


@contextmanager
def staged_weights(wh, target_run: str, pool_run: str, site: str, **named):
    """The name of a temporary table holding nag_unit_weights: a table has statistics, so
    DuckDB joins the pool to it by array lookup (1.5x faster on a 1M-document pool)."""
    name = f"whq_nag_weights_{uuid.uuid4().hex}"
    wh.sql(
        f"CREATE TEMP TABLE {name} AS SELECT * FROM {_macro_call('nag_unit_weights', [target_run, pool_run, site], named)}"
    )
    try:
        yield name
    finally:
        wh.sql(f"DROP TABLE IF EXISTS {name}")


# A doc ordinal range of up to 2^22 (4M documents) is summed by DuckDB's perfect hash
# aggregate, a plain array indexed by doc (the range comes from the Parquet statistics),
# instead of its default hash table (2^12): the GROUP BY doc over every row of the pool
# is most of nag_distance's time, and this took a third less CPU on a 100k-document pool.
# A thread's array then holds at most 4M sums (about 100 MB).
_DOC_ARRAY_BITS = 22


@contextmanager
def _documents_by_array(wh):
    """Let DuckDB sum per document into an array indexed by doc, then restore the setting."""
    (previous,) = wh.sql("SELECT current_setting('perfect_ht_threshold')").fetchall()[0]
    wh.sql(f"SET perfect_ht_threshold = {max(int(previous), _DOC_ARRAY_BITS)}")
    try:
        yield
    finally:
        wh.sql(f"SET perfect_ht_threshold = {int(previous)}")


def with_payload(wh, pool_run: str, selected: pl.DataFrame) -> pl.DataFrame:
    """The selected pool documents with their payload (documents' columns) and a nag_distance column, in selection order."""
    documents = scan(wh, "documents", pool_run).drop("run_id")
    extra = [c for c in ("quality", "score") if c in selected.columns]
    picked = selected.select(
        "doc", pl.col("distance").alias("nag_distance"), *[pl.col(c).alias(f"nag_{c}") for c in extra], "rank"
    )
    return documents.join(picked.lazy(), on="doc", how="inner").sort("rank").drop("rank").collect()


def merge(selections: dict[str, pl.DataFrame], dedup: bool = False) -> tuple[pl.DataFrame, str]:
    """Concatenate per-target selections (each with doc_id and nag_distance) under a `target` column.

    dedup keeps each doc_id once, from the selection where its distance is lowest (ties:
    the first target given). Returns the frame and a line saying what was done.
    """
    if not selections:
        raise BadInput("nothing to merge: give at least one selection")
    frames = []
    for name, frame in selections.items():
        for column in ("doc_id", "nag_distance"):
            if column not in frame.columns:
                raise BadInput(f"selection {name!r} has no {column} column: merge the files `whq nag select` writes")
        frames.append(frame.with_columns(pl.lit(name).alias("target")))
    merged = pl.concat(frames, how="diagonal_relaxed").with_row_index("order")
    repeated = merged.height - merged["doc_id"].n_unique()
    if dedup:
        merged = merged.sort("nag_distance", "order").unique("doc_id", keep="first", maintain_order=True).sort("order")
        note = f"merged {len(selections)} selections: {merged.height:,} documents; de-duplicated {repeated:,} repeated doc ids (kept the lowest distance)"
    else:
        note = f"merged {len(selections)} selections: {merged.height:,} rows; not de-duplicated ({repeated:,} doc ids appear more than once)"
    return merged.drop("order"), note


def select_targets(
    wh,
    targets: list[tuple[str, str | None]],
    pool_run: str,
    site: str,
    *,
    fraction: float = 0.2,
    dedup: bool = False,
    **options,
) -> tuple[pl.DataFrame, str]:
    """NAG's multi-target mixture: each target selects fraction / N of the pool's tokens, then merge."""
    if not targets:
        raise BadInput("no target given: pass at least one (run, dataset)")
    share = fraction / len(targets)
    selections = {}
    for run, dataset in targets:
        picked = select(wh, run, pool_run, site, fraction=share, target_dataset=dataset, **options)
        selections[f"{run}:{dataset}" if dataset else run] = with_payload(wh, pool_run, picked)
    return merge(selections, dedup)


def deactivation_keys(
    wh,
    target_run: str,
    site: str,
    *,
    target_dataset: str | None = None,
    top: int | None = None,
    share: float | None = None,
    layers=None,
    target_role: str | None = None,
) -> dict:
    """The units most often in the target documents' top-K: top-M per layer, or a global share of all units.

    Ties go to the lower layer, then the lower unit. The dict is what `whq nag keys` saves
    and `ingest.deactivate.deactivate` reads.
    """
    _check_names(target_run, target_run, site, target_dataset, None)
    if (top is None) == (share is None):
        raise BadInput("give exactly one of top (units per layer, e.g. 20) or share (of all units, e.g. 0.0012)")
    if top is not None and top < 1:
        raise BadInput(f"top must be at least 1, got {top}")
    if share is not None and not 0 < share <= 1:
        raise BadInput(f"share must be in (0, 1], got {share}: e.g. 0.0012 for 0.12% of all units")
    site_row = nag_frames.nag_site(wh, target_run, site)
    used = nag_frames.check_layers(target_run, site_row, layers)
    profile = nag_frames.nag_profile(wh, target_run, site, target_dataset, used, 1.0, target_role).collect()
    ordered = profile.sort(["n_docs", "layer", "neuron"], descending=[True, False, False])
    if top is not None:
        # no layer has more than width units (and Polars takes no count beyond 64 bits)
        chosen = ordered.group_by("layer", maintain_order=True).head(min(top, int(site_row["width"])))
        rule = f"top {top} per layer"
    else:
        count = math.ceil(share * len(used) * int(site_row["width"]))
        chosen = ordered.head(count)
        rule = f"share {share} of {len(used) * int(site_row['width']):,} units"
    by_layer = {str(layer): sorted(group["neuron"].to_list()) for (layer,), group in chosen.group_by("layer")}
    return {
        "run": target_run,
        "site": site,
        "dataset": target_dataset,
        "role": target_role,
        "rule": rule,
        "n_targets": _count_targets(wh, target_run, target_dataset, target_role),
        "layers": {k: by_layer[k] for k in sorted(by_layer, key=int)},
    }


def _count_targets(wh, run: str, dataset: str | None, role: str | None) -> int:
    frame = scan(wh, "documents", run)
    if dataset is not None:
        frame = frame.filter(pl.col("dataset") == dataset)
    if role is not None:
        frame = frame.filter(pl.col("role") == role)
    return frame.select(pl.len()).collect().item()


def save_keys(keys: dict, path: str | Path) -> Path:
    return jsonio.write(ensure_parent(check_output_file(path)), keys, indent=1)


def read_selection(path: str | Path) -> pl.DataFrame:
    """A selection written by `whq nag select`; a missing, odd or damaged file is one BadInput."""
    path = Path(path)
    if not path.is_file():
        state = "does not exist" if not path.exists() else "is not a regular file"
        raise BadInput(f"selection {path} {state}: give the Parquet files `whq nag select` writes")
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise BadInput(
            f"selection {path} is not a readable Parquet file ({first}): give the files `whq nag select` writes"
        ) from None


def write_selection(rows: pl.DataFrame, path: str | Path) -> Path:
    """A selection (or merged selections) as a Parquet file at `path` (checked as an output file)."""
    path = ensure_parent(check_output_file(path))
    rows.write_parquet(path)
    return path


def vectors(wh, run: str, site: str, *, dataset: str | None = None, layers=None) -> pl.DataFrame:
    """Documents' NAGs as long rows (doc, doc_id, dataset, layer, neuron): the input of pca_chart."""
    _check_names(run, run, site, dataset, None)
    site_row = nag_frames.nag_site(wh, run, site)
    used = nag_frames.check_layers(run, site_row, layers)
    documents = scan(wh, "documents", run).select("doc", "doc_id", "dataset")
    if dataset is not None:
        documents = documents.filter(pl.col("dataset") == dataset)
    return (
        scan(wh, "doc_neurons", run)
        .filter(pl.col("site") == site, pl.col("layer").is_in(used))
        .join(documents, on="doc", how="inner")
        .select("doc", "doc_id", "dataset", "layer", "neuron")
        .sort("doc", "layer", "neuron")
        .collect()
    )


def pca(frame: pl.DataFrame) -> pl.DataFrame:
    """Two principal components of the documents' NAG indicator vectors (one column per (layer, unit) seen)."""
    docs = frame.select("doc", "doc_id", "dataset").unique("doc", maintain_order=True).sort("doc")
    if docs.height < 2:
        raise BadInput("PCA needs at least two documents with a NAG")
    row = {doc: i for i, doc in enumerate(docs["doc"].to_list())}
    unit = frame.select((pl.col("layer").cast(pl.Int64) * (1 << 32) + pl.col("neuron")).alias("key"))["key"]
    columns, index = np.unique(unit.to_numpy(), return_inverse=True)
    matrix = np.zeros((docs.height, len(columns)))
    matrix[[row[d] for d in frame["doc"].to_list()], index] = 1.0
    centred = matrix - matrix.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    components = u[:, :2] * s[:2]
    if components.shape[1] < 2:
        components = np.pad(components, ((0, 0), (0, 2 - components.shape[1])))
    return docs.with_columns(pl.Series("pc1", components[:, 0]), pl.Series("pc2", components[:, 1]))


def pca_chart(frame: pl.DataFrame, title: str = "Documents by their NAG (PCA)"):
    """An altair scatter of pca(frame), coloured by dataset (frame: vectors()' long rows)."""
    import altair as alt

    points = pca(frame)
    return (
        alt.Chart(points.drop("doc"), title=title)
        .mark_circle(size=40, opacity=0.7)
        .encode(
            x=alt.X("pc1:Q", title="PC 1"),
            y=alt.Y("pc2:Q", title="PC 2"),
            color=alt.Color("dataset:N", title="dataset"),
            tooltip=["doc_id:N", "dataset:N"],
        )
    )
