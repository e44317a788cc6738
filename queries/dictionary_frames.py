"""Polars twin of queries/dictionaries.sql: same names, arguments, columns and row order."""

from __future__ import annotations

import polars as pl

from warehouse.errors import UnknownRun

from .frames import scan

__all__ = ["dictionary_quality"]


def dictionary_quality(wh, run: str) -> pl.LazyFrame:
    if scan(wh, "runs", run).select(pl.len()).collect().item() == 0:
        raise UnknownRun(f"no committed run {run!r} in this warehouse: list the runs with SELECT run_id FROM runs")
    q = scan(wh, "dictionaries", run).filter(pl.col("n_tokens") > 0)
    n = pl.col("n_tokens")
    return q.select(
        "site",
        "layer",
        "d_in",
        "d_sae",
        "n_tokens",
        (pl.col("l0_sum") / n).alias("mean_l0"),
        (pl.col("n_dead") / pl.col("d_sae")).alias("dead_share"),
        (pl.col("n_dense") / pl.col("d_sae")).alias("dense_share"),
        (pl.col("sq_error") / (n * pl.col("d_out"))).alias("mse"),
        pl.when(pl.col("total_variance") > 0).then(pl.col("sq_error") / pl.col("total_variance")).alias("fvu"),
        (pl.col("cosine_sum") / n).alias("mean_cosine"),
        (pl.col("ce_clean_sum") / pl.col("n_predicted")).alias("ce_clean"),
        (pl.col("ce_spliced_sum") / pl.col("n_predicted")).alias("ce_spliced"),
        ((pl.col("ce_spliced_sum") - pl.col("ce_clean_sum")) / pl.col("n_predicted")).alias("delta_loss"),
    ).sort("site", "layer")
