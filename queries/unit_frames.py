"""Polars twins of queries/units.sql: same names, arguments, columns and row order.

Like queries/neuron_frames.py, each takes an open Warehouse, then the macro's arguments,
and returns a polars.LazyFrame read from the committed Parquet, never through DuckDB.
"""

from __future__ import annotations

import polars as pl

from warehouse.errors import BadInput

from . import neuron_frames as nf  # a module reference: frames may import this module while loading that one
from .frames import kept_reductions, scan, site_row

__all__ = [
    "unit_stats",
    "unit_histogram",
    "units_for_token",
    "similar_units",
    "quantile_bins",
    "quantile_examples",
    "hist_lo",
    "hist_hi",
]


def _edge(i: pl.Expr) -> pl.Expr:
    """whq_hist_edge: 2^(-12 + i // 4) * (1 + (i % 4) / 4)."""
    return pl.lit(2.0).pow((i // 4 - 12).cast(pl.Float64)) * (1 + (i % 4) / 4)


def hist_lo(b: pl.Expr) -> pl.Expr:
    """whq_hist_lo: the lower edge of histogram bin b."""
    return (
        pl.when(b == 0)
        .then(float("-inf"))
        .when(b <= 96)
        .then(-_edge(97 - b))
        .when(b == 97)
        .then(-_edge(pl.lit(0)))
        .when(b == 98)
        .then(0.0)
        .when(b <= 194)
        .then(_edge(b - 99))
        .otherwise(4096.0)
    )


def hist_hi(b: pl.Expr) -> pl.Expr:
    """whq_hist_hi: the upper edge of histogram bin b."""
    return (
        pl.when(b == 0)
        .then(-4096.0)
        .when(b <= 96)
        .then(-_edge(96 - b))
        .when(b == 97)
        .then(0.0)
        .when(b == 98)
        .then(_edge(pl.lit(0)))
        .when(b <= 194)
        .then(_edge(b - 98))
        .otherwise(float("inf"))
    )


def unit_stats(wh, run: str, site: str, layer: int) -> pl.LazyFrame:
    n = pl.col("n_tokens")
    mean, m2, m3, m4 = pl.col("sum") / n, pl.col("sum_sq") / n, pl.col("sum_cube") / n, pl.col("sum_quad") / n
    var = m2 - mean * mean
    c3 = m3 - 3 * mean * m2 + 2 * mean * mean * mean
    c4 = m4 - 4 * mean * m3 + 6 * mean * mean * m2 - 3 * mean * mean * mean * mean
    return (
        nf._stats(wh, run, site, layer)
        .select(
            "neuron",
            nf._rate().alias("rate"),
            mean.alias("mean"),
            pl.max_horizontal(var, pl.lit(0.0)).sqrt().alias("std"),
            "min",
            "max",
            pl.when(var > 0).then(c3 / var.pow(1.5)).alias("skewness"),
            pl.when(var > 0).then(c4 / (var * var) - 3).alias("kurtosis"),
        )
        .sort("neuron")
    )


def _has_hist(wh, run: str, site: str) -> None:
    info = site_row(wh, run, site)
    reductions = info["reductions"] or ""
    if "hist" not in kept_reductions(info):
        raise BadInput(
            f"site '{site}' of run '{run}' kept no histograms: re-ingest with --site "
            f"{site}:{reductions + ',' if reductions else ''}hist"
        )


def unit_histogram(wh, run: str, site: str, layer: int, unit: int) -> pl.LazyFrame:
    _has_hist(wh, run, site)
    counts = (
        scan(wh, "unit_histograms", run)
        .filter(pl.col("site") == site, pl.col("layer") == layer, pl.col("neuron") == unit)
        .select(pl.col("bin").cast(pl.Int32), "count")
    )
    bins = counts.select(
        pl.int_ranges(pl.col("bin").min(), pl.col("bin").max() + 1, dtype=pl.Int32).alias("bin")
    ).explode("bin")
    b = pl.col("bin")
    return (
        bins.drop_nulls()
        .join(counts, on="bin", how="left")
        .select("bin", hist_lo(b).alias("lo"), hist_hi(b).alias("hi"), pl.col("count").fill_null(0))
        .sort("bin")
    )


def token_key(text: pl.Expr) -> pl.Expr:
    """whq_token_key: lower-cased, without surrounding spaces and without WordPiece's leading ##."""
    key = text.str.strip_chars(" ").str.to_lowercase()
    return pl.when(key.str.starts_with("##") & (key.str.len_chars() > 2)).then(key.str.slice(2)).otherwise(key)


def units_for_token(wh, run: str, site: str, text: str) -> pl.LazyFrame:
    info = site_row(wh, run, site)
    wanted = token_key(pl.lit(text))
    index = scan(wh, "token_units", run).filter(pl.col("site") == site)
    if index.select(pl.len()).collect().item():  # the token index written at commit
        ids = (
            scan(wh, "vocabulary", run)
            .filter(token_key(pl.coalesce("text", "piece")) == wanted)
            .select("token_id", "n_tokens")
        )
        occurrences = ids.select(pl.col("n_tokens").sum().cast(pl.Int64).alias("n_occurrences"))
        firings = index.join(ids, on="token_id", how="inner").select("layer", "neuron", "n_fired", "value_sum")
    else:
        matched = scan(wh, "tokens", run).filter(token_key(pl.coalesce("text", "piece")) == wanted).select("doc", "pos")
        occurrences = matched.select(pl.len().cast(pl.Int64).alias("n_occurrences"))
        firings = (
            scan(wh, "token_neurons", run)
            .filter(pl.col("site") == site, pl.col("value") > info["threshold"])
            .join(matched, on=["doc", "pos"], how="inner")
            .select(
                "layer",
                "neuron",
                pl.lit(1, pl.Int64).alias("n_fired"),
                pl.col("value").cast(pl.Float64).alias("value_sum"),
            )
        )
    return (
        firings.group_by("layer", "neuron")
        .agg(
            pl.col("n_fired").sum().cast(pl.Int64),
            (pl.col("value_sum").sum() / pl.col("n_fired").sum()).alias("mean_value"),
        )
        .join(occurrences, how="cross")
        .select(
            "layer",
            "neuron",
            "n_fired",
            "n_occurrences",
            (pl.col("n_fired") / pl.col("n_occurrences")).alias("share"),
            "mean_value",
        )
        .sort(["n_fired", "mean_value", "layer", "neuron"], descending=[True, True, False, False])
    )


def similar_units(wh, run: str, site: str, layer: int, unit: int, k: int = 10) -> pl.LazyFrame:
    info = site_row(wh, run, site)
    stored = scan(wh, "unit_coactivations", run).filter(pl.col("site") == site, pl.col("layer") == layer)
    kept = stored.select(pl.col("kept").max()).collect().item() or 0
    if k <= kept:  # precomputed at commit (warehouse/indexes.py)
        coactivation = stored.filter(pl.col("neuron") == unit).select(
            pl.lit("coactivation").alias("kind"),
            pl.col("other").alias("neuron"),
            pl.col("jaccard").alias("similarity"),
            "n_shared",
        )
    else:
        coactivation = _coactivation(wh, run, site, layer, unit, info["threshold"])
    decoder = (
        scan(wh, "unit_neighbors", run)
        .filter(pl.col("site") == site, pl.col("layer") == layer, pl.col("neuron") == unit)
        .select(
            pl.lit("decoder").alias("kind"),
            pl.col("other").alias("neuron"),
            pl.col("cosine").cast(pl.Float64).alias("similarity"),
            pl.lit(None, pl.Int64).alias("n_shared"),
        )
    )
    return (
        pl.concat([decoder, coactivation])
        .sort(["kind", "similarity", "neuron"], descending=[True, True, False])
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("kind").alias("rank"))
        .filter(pl.col("rank") < k)
        .select("kind", "rank", "neuron", "similarity", "n_shared")
    )


def _coactivation(wh, run: str, site: str, layer: int, unit: int, threshold: float) -> pl.LazyFrame:
    """similar_units' co-activations computed from token_neurons (runs or layers without unit_coactivations)."""
    fired = (
        scan(wh, "token_neurons", run)
        .filter(pl.col("site") == site, pl.col("layer") == layer, pl.col("value") > threshold)
        .select("neuron", "doc", "pos")
    )
    mine = fired.filter(pl.col("neuron") == unit).select("doc", "pos")
    n_mine = mine.select(pl.len().cast(pl.Int64).alias("n_mine"))
    shared = (
        fired.filter(pl.col("neuron") != unit)
        .join(mine, on=["doc", "pos"], how="inner")
        .group_by("neuron")
        .agg(pl.len().cast(pl.Int64).alias("n_shared"))
    )
    sizes = fired.group_by("neuron").agg(pl.len().cast(pl.Int64).alias("n"))
    return (
        shared.join(sizes, on="neuron", how="inner")
        .join(n_mine, how="cross")
        .select(
            pl.lit("coactivation").alias("kind"),
            "neuron",
            (pl.col("n_shared") / (pl.col("n_mine") + pl.col("n") - pl.col("n_shared"))).alias("similarity"),
            "n_shared",
        )
    )


def quantile_bins(wh, run: str, site: str, layer: int, unit: int | None) -> pl.LazyFrame:
    """Twin of whq_quantile_bins (unit None: every unit of the layer)."""
    info = site_row(wh, run, site)
    found = kept_reductions(info).get("quantiles")
    if found is None:
        raise BadInput(
            f"site '{site}' of run '{run}' kept no quantile examples: "
            f"re-ingest with --site {site}:examples=20,hist,quantiles=10"
        )
    q = int(found)
    b = pl.col("bin")
    firing = (
        scan(wh, "unit_histograms", run)
        .filter(pl.col("site") == site, pl.col("layer") == layer, pl.lit(unit is None) | (pl.col("neuron") == unit))
        .select("neuron", b.cast(pl.Int32), "count")
        .filter(hist_hi(b) > info["threshold"])
        .sort("neuron", "bin")
        .with_columns(
            (pl.col("count").cum_sum() - pl.col("count")).over("neuron").alias("before"),
            pl.col("count").sum().over("neuron").alias("total"),
        )
    )
    quantile = pl.min_horizontal(
        pl.lit(q - 1, pl.Float64), (q * (pl.col("before") + pl.col("count") / 2) / pl.col("total")).floor()
    ).cast(pl.Int32)
    return (
        firing.with_columns(quantile.alias("quantile"))
        .group_by("neuron", "quantile")
        .agg(
            hist_lo(b).min().alias("lo"),
            hist_hi(b).max().alias("hi"),
            (pl.col("before").min() / pl.col("total").max()).alias("share_lo"),
            ((pl.col("before") + pl.col("count")).max() / pl.col("total").max()).alias("share_hi"),
            pl.col("count").sum().cast(pl.Int64).alias("n_tokens"),
        )
        .sort("neuron", "quantile")
    )


def quantile_examples(
    wh, run: str, site: str, layer: int, unit: int, before: int = 50, after: int = 20
) -> pl.LazyFrame:
    bins = quantile_bins(wh, run, site, layer, unit)
    stored = (
        scan(wh, "neuron_examples", run)
        .filter(
            pl.col("site") == site, pl.col("layer") == layer, pl.col("neuron") == unit, pl.col("kind") == "quantile"
        )
        .select("rank", "quantile")
    )
    examples = nf.layer_examples(wh, run, site, layer, unit, "quantile", 2147483647, before, after)
    return (
        examples.join(stored, on="rank", how="inner")
        .join(bins.drop("neuron"), on="quantile", how="inner")
        .with_columns((pl.col("rank") - pl.col("rank").min().over("quantile")).cast(pl.Int32).alias("rank"))
        .select("quantile", "lo", "hi", "share_lo", "share_hi", "rank", "doc_id", "pos", "value", "context", "tokens")
        .sort("quantile", "rank")
    )
