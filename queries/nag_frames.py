"""Polars twins of queries/nag.sql: same names, arguments, columns and row order.

Each function takes an open Warehouse, then the macro's arguments, and returns a
polars.LazyFrame built by Polars over the committed Parquet (queries.frames.scan), never
through DuckDB. The small lookups (the sites row, the target profile) are collected
eagerly; the pool is read when the frame is collected, a layer at a time per thread
(a 1M-document pool peaks near 0.75 GB).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

from warehouse.errors import BadInput

from .frames import kept_reductions, scan, site_row

__all__ = ["nag_profile", "nag_unit_weights", "nag_distance", "nag_select", "nag_quality"]

WEIGHT_UNITS = float(1 << 40)  # a weight is floor(weight * 2^40) units when power != 1 (see queries/nag.sql)


def nag_site(wh, run: str, site: str) -> dict:
    """The sites row of a NAG site; an error naming the fix when the run did not capture NAG there."""
    return site_row(
        wh,
        run,
        site,
        reduction="nag",
        fix=f"run '{run}' has no NAG site '{site}': capture one with --site {site}:nag=20, or list the sites "
        f"with SELECT site, reductions FROM sites WHERE run_id = '{run}'",
    )


def _check_documents(wh, run: str, dataset: str | None, role: str | None) -> None:
    for column, value in (("dataset", dataset), ("role", role)):
        if (
            value is not None
            and scan(wh, "documents", run).filter(pl.col(column) == value).select(pl.len()).collect().item() == 0
        ):
            raise BadInput(
                f"run '{run}' has no documents of {column} '{value}': list them with "
                f"SELECT {column}, count(*) FROM documents WHERE run_id = '{run}' GROUP BY ALL"
            )


def check_layers(run: str, site_info: dict, layers) -> list[int]:
    """The layers used: all of the site's (layers None) or the wanted ones, which must be the site's."""
    have = list(site_info["layers"])
    if layers is None:
        return have
    wanted = sorted({int(x) for x in layers})
    if not wanted:
        raise BadInput("layers := [] selects no layer: give at least one, or NULL for all")
    missing = [x for x in wanted if x not in have]
    if missing:
        raise BadInput(
            f"layers {missing} are not layers of site '{site_info['site']}' in run '{run}' "
            f"(it has {min(have)}-{max(have)}): pick layers from that range"
        )
    return wanted


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise BadInput(
            f"fraction must be in (0, 1], got {fraction}: e.g. fraction := 0.2 keeps a fifth of the pool's tokens"
        )


def _documents(wh, run: str, dataset: str | None, role: str | None) -> pl.LazyFrame:
    frame = scan(wh, "documents", run)
    if dataset is not None:
        frame = frame.filter(pl.col("dataset") == dataset)
    if role is not None:
        frame = frame.filter(pl.col("role") == role)
    return frame


def nag_profile(
    wh,
    target_run: str,
    site: str,
    target_dataset: str | None = None,
    layers=None,
    power: float = 1.0,
    target_role: str | None = None,
) -> pl.LazyFrame:
    site_info = nag_site(wh, target_run, site)
    _check_documents(wh, target_run, target_dataset, target_role)
    used = check_layers(target_run, site_info, layers)
    targets = _documents(wh, target_run, target_dataset, target_role).select("doc").collect()
    # doc_neurons parts are in document order (warehouse/parts.py), so the targets' doc
    # range lets the scan skip the row groups of other documents: when the targets are a
    # small slice of a big run, the profile reads that slice instead of the whole run.
    first, last = targets["doc"].min(), targets["doc"].max()
    in_range = pl.col("doc").is_between(first, last) if first is not None else pl.lit(False)
    counts = (
        scan(wh, "doc_neurons", target_run)
        .filter(pl.col("site") == site, pl.col("layer").is_in(used), in_range)
        .join(targets.lazy(), on="doc", how="semi")
        .group_by("layer", "neuron")
        .agg(pl.len().cast(pl.Int64).alias("n_docs"))
    )
    powered = pl.col("n_docs").cast(pl.Float64).pow(power)
    return counts.with_columns((powered / powered.sum().over("layer")).alias("weight")).sort("layer", "neuron")


def nag_unit_weights(
    wh,
    target_run: str,
    pool_run: str,
    site: str,
    target_dataset: str | None = None,
    layers=None,
    power: float = 1.0,
    target_role: str | None = None,
) -> pl.LazyFrame:
    """unit_key = layer * stride + unit, weight_units and per_unit, as queries/nag.sql computes them.

    With power 1 and equal layer totals a unit is one target document (exact sums);
    otherwise a weight is floor(weight * 2^40) units.
    """
    used = check_layers(pool_run, nag_site(wh, pool_run, site), layers)
    profile = nag_profile(wh, target_run, site, target_dataset, layers, power, target_role).collect()
    totals = profile.group_by("layer").agg(pl.col("n_docs").cast(pl.Float64).pow(power).sum())["n_docs"].to_list()
    exact = power == 1 and len(set(totals)) == 1
    units = pl.col("n_docs").cast(pl.Float64) if exact else (pl.col("weight") * WEIGHT_UNITS).floor()
    per_unit = 1.0 / ((totals[0] if exact else WEIGHT_UNITS) * len(used))
    stride = _stride(wh, target_run, pool_run, site)
    return (
        profile.lazy()
        .select(
            (pl.col("layer") * stride + pl.col("neuron").cast(pl.Int32)).cast(pl.Int32).alias("unit_key"),
            units.alias("weight_units"),
            pl.lit(per_unit, dtype=pl.Float64).alias("per_unit"),
        )
        .sort("unit_key")
    )


def _stride(wh, target_run: str, pool_run: str, site: str) -> int:
    return max(nag_site(wh, run, site)["width"] for run in {target_run, pool_run})


def nag_distance(
    wh,
    target_run: str,
    pool_run: str,
    site: str,
    target_dataset: str | None = None,
    pool_dataset: str | None = None,
    layers=None,
    power: float = 1.0,
    target_role: str | None = None,
    pool_role: str | None = None,
    weights: pl.DataFrame | None = None,
) -> pl.LazyFrame:
    """Each pool row's units are gathered from a dense array indexed by unit, the way
    NAG's kernel indexes its weights, and summed per document (_unit_sums) when the
    frame is collected."""
    pool_site = nag_site(wh, pool_run, site)
    _check_documents(wh, pool_run, pool_dataset, pool_role)
    used = check_layers(pool_run, pool_site, layers)
    if weights is None:
        weights = nag_unit_weights(wh, target_run, pool_run, site, target_dataset, layers, power, target_role).collect()
    stride = _stride(wh, target_run, pool_run, site)
    dense = np.zeros((max(used) + 1) * stride)
    dense[weights["unit_key"].to_numpy()] = weights["weight_units"].to_numpy()
    per_unit = weights["per_unit"].max() or 0.0  # without a profile row every sum is 0
    block = kept_reductions(pool_site).get("nag")
    hits = pl.defer(
        lambda: _unit_sums(wh, pool_run, site, used, stride, dense, int(block) if block and block.isdigit() else None),
        schema={"doc": pl.Int32, "units": pl.Float64},
    )
    similarity = pl.col("units").fill_null(0.0) * per_unit
    return (
        _documents(wh, pool_run, pool_dataset, pool_role)
        .select("doc", "doc_id", "dataset", "n_tokens")
        .join(hits, on="doc", how="left")
        .select(
            "doc", "doc_id", "dataset", "n_tokens", similarity.alias("similarity"), (1 - similarity).alias("distance")
        )
    )


# Rows summed per slice of a layer: K times 2^14 rows (2.6 MB of units) stay in cache,
# where gathering and summing a whole 20M-row layer at once took twice the CPU.
_SLICE_BLOCKS = 1 << 14
# Layers read and summed at once: each holds its part (6 bytes a row) while it is summed.
_LAYER_THREADS = 4


def _unit_sums(wh, run: str, site: str, layers: list[int], stride: int, dense: np.ndarray, k: int | None):
    """Per document, the sum of its rows' weight units over the layers: (doc, units).

    A capture writes each layer's rows in document order, a document's K rows side by
    side (warehouse/parts.py), so a layer is summed K rows at a time into one value per
    document (_block_sums checks that layout), and the layers whose documents line up
    are added as columns: no hash table over every row, which took most of the CPU at
    1M documents (560M rows: 10 s, against 5 s this way). A layer laid out otherwise (a
    document with fewer than K rows) is summed by a group_by on doc, and so are the
    per-document sums of layers that do not line up with the first.
    The sums are whole numbers below 2^53 (see queries/nag.sql), so every order of
    adding them gives the same bits.
    """
    pool = scan(wh, "doc_neurons", run).filter(pl.col("site") == site)

    def by_doc(frames: list[pl.DataFrame]) -> pl.DataFrame:
        return pl.concat(frames).group_by("doc").agg(pl.col("units").sum())

    def layer_sums(layer: int) -> tuple[bool, pl.Series | None, pl.Series | pl.DataFrame]:
        part = pool.filter(pl.col("layer") == layer).select("doc", "neuron").collect()
        units = pl.Series("units", dense[layer * stride : (layer + 1) * stride])
        blocks = _block_sums(part["doc"], part["neuron"], units, k) if k else None
        if blocks:
            return True, *blocks
        return False, None, by_doc([pl.DataFrame({"doc": part["doc"], "units": units.gather(part["neuron"])})])

    # Per-document sums of the layers that line up, and of the others (one row per document each).
    aligned_docs, aligned, rest = None, None, pl.DataFrame(schema={"doc": pl.Int32, "units": pl.Float64})
    with ThreadPoolExecutor(min(_LAYER_THREADS, pl.thread_pool_size(), len(layers))) as threads:
        for blocks, docs, sums in threads.map(layer_sums, layers):
            if blocks and aligned_docs is None:
                aligned_docs, aligned = docs, sums
            elif blocks and docs.equals(aligned_docs):
                aligned = aligned + sums
            else:
                rest = by_doc([rest, sums if docs is None else pl.DataFrame({"doc": docs, "units": sums})])
    if aligned_docs is None:
        return rest
    return by_doc([pl.DataFrame({"doc": aligned_docs, "units": aligned}), rest])


def _block_sums(doc: pl.Series, neuron: pl.Series, units: pl.Series, k: int) -> tuple[pl.Series, pl.Series] | None:
    """(doc, units summed) per block of K rows, when every block of K rows is one document
    (checked: by each block's first and last doc where doc is sorted, else by its min and
    max, which takes twice as long); None otherwise."""
    if doc.len() % k:
        return None
    # Expressions on a frame: on a part's doc (one chunk per row group) they took half the time of the Series methods.
    column = pl.col(doc.name)
    if doc.is_sorted():
        ends = doc.to_frame().select(first=column.gather_every(k), last=column.gather_every(k, k - 1))
    else:  # e.g. a layer's parts listed out of document order, each in order
        ends = doc.to_frame().select(first=column.reshape((-1, k)).arr.min(), last=column.reshape((-1, k)).arr.max())
    first, last = ends["first"], ends["last"]
    if not first.equals(last):
        return None
    step = k * _SLICE_BLOCKS
    sums = [units.gather(neuron.slice(start, step)).reshape((-1, k)).arr.sum() for start in range(0, doc.len(), step)]
    return first.rename("doc"), pl.concat(sums) if sums else pl.Series("units", [], pl.Float64)


def budget_select(frame: pl.LazyFrame, key: str, fraction: float) -> pl.LazyFrame:
    """Sort by (key, doc_id, doc) and keep rows while cumulative n_tokens <= floor(fraction * total); at least one."""
    _check_fraction(fraction)
    ordered = frame.sort(key, "doc_id", "doc")
    tokens = pl.col("n_tokens").cast(pl.Int64)
    return (
        ordered.with_columns(
            pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"),
            tokens.cum_sum().alias("cum_tokens"),
            tokens.sum().alias("pool_tokens"),
        )
        .filter((pl.col("cum_tokens") <= (fraction * pl.col("pool_tokens")).floor()) | (pl.col("rank") == 1))
        .drop("pool_tokens")
    )


def nag_select(
    wh,
    target_run: str,
    pool_run: str,
    site: str,
    target_dataset: str | None = None,
    pool_dataset: str | None = None,
    layers=None,
    power: float = 1.0,
    fraction: float = 0.2,
    target_role: str | None = None,
    pool_role: str | None = None,
    weights: pl.DataFrame | None = None,
) -> pl.LazyFrame:
    distances = nag_distance(
        wh, target_run, pool_run, site, target_dataset, pool_dataset, layers, power, target_role, pool_role, weights
    )
    return budget_select(distances, "distance", fraction)


def _minmax(column: str) -> pl.Expr:
    low, high = pl.col(column).min(), pl.col(column).max()
    return pl.when(high > low).then((pl.col(column) - low) * (1.0 / (high - low))).otherwise(0.0)


def nag_quality(
    wh,
    target_run: str,
    pool_run: str,
    site: str,
    quality_column: str,
    target_dataset: str | None = None,
    pool_dataset: str | None = None,
    layers=None,
    power: float = 1.0,
    fraction: float = 0.2,
    invert: bool = False,
    target_role: str | None = None,
    pool_role: str | None = None,
    weights: pl.DataFrame | None = None,
) -> pl.LazyFrame:
    _check_fraction(fraction)
    distances = nag_distance(
        wh, target_run, pool_run, site, target_dataset, pool_dataset, layers, power, target_role, pool_role, weights
    )
    quality = _documents(wh, pool_run, pool_dataset, pool_role).select(
        "doc", pl.col("meta").str.json_path_match(f"$.{quality_column}").cast(pl.Float64, strict=False).alias("quality")
    )
    scored = distances.join(quality, on="doc", how="left")
    if quality.select(pl.col("quality").is_not_null().any()).collect().item() is not True:
        raise BadInput(
            f"no pool document has a number under '{quality_column}' in its meta: quality columns are the "
            f"source's extra columns (SELECT meta FROM documents WHERE run_id = '{pool_run}' LIMIT 1)"
        )
    normalised = 1 - _minmax("quality") if invert else _minmax("quality")
    mixed = scored.with_columns(
        (_minmax("distance") + pl.when(pl.col("quality").is_null()).then(1.0).otherwise(normalised)).alias("score")
    )
    return budget_select(mixed, "score", fraction).select(
        "doc", "doc_id", "dataset", "n_tokens", "similarity", "distance", "quality", "score", "rank", "cum_tokens"
    )
