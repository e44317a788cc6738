"""Polars twins of queries/neurons.sql: same names, arguments, columns and row order.

Each function takes an open Warehouse, then the macro's arguments, and returns a
polars.LazyFrame built by Polars over the committed Parquet (queries.frames.scan), never
through DuckDB, so the two engines check each other.
"""

from __future__ import annotations

import polars as pl

from warehouse.errors import BadInput

from .frames import kept_reductions, scan, site_row

__all__ = [
    "firing_rate",
    "layer_summary",
    "selectivity",
    "rate_histogram",
    "selectivity_histogram",
    "top_contexts",
    "bottom_contexts",
    "random_examples",
    "layer_examples",
    "activation_frequency",
    "activation_frequency_by_dataset",
    "neuron_contexts_bytes",
    "neuron_logit_lens",
    "sample_key",
]

_MASK = 2147483647
RARE_BELOW = 0.01
EXAMPLE_WINDOW = (50, 20)  # tokens before / after in random_examples, as in top_contexts' defaults
WINDOW_VALUES = (50, 20)  # tokens before / after held by neuron_examples.window_values (ingest/reductions.py CONTEXT_*)


def _stats(wh, run: str, site: str, layer: int | None = None) -> pl.LazyFrame:
    site_row(wh, run, site)
    frame = scan(wh, "neuron_stats", run).filter(pl.col("site") == site)
    return frame if layer is None else frame.filter(pl.col("layer") == layer)


def _rate() -> pl.Expr:
    return pl.col("n_fired") / pl.col("n_tokens")


def firing_rate(wh, run: str, site: str, layer: int) -> pl.LazyFrame:
    return _stats(wh, run, site, layer).select("neuron", "n_tokens", "n_fired", _rate().alias("rate")).sort("neuron")


def layer_summary(wh, run: str, site: str) -> pl.LazyFrame:
    rate = _rate()
    return (
        _stats(wh, run, site)
        .group_by("layer")
        .agg(
            pl.len().cast(pl.Int64).alias("n_neurons"),
            rate.mean().alias("mean_rate"),
            rate.median().alias("median_rate"),
            ((rate < RARE_BELOW).sum() / pl.len()).alias("rare_share"),
            ((pl.col("n_fired") == 0).sum() / pl.len()).alias("dead_share"),
        )
        .sort("layer")
    )


def _selectivity(frame: pl.LazyFrame) -> pl.LazyFrame:
    mean = pl.col("sum") / pl.col("n_tokens")
    positive = pl.coalesce("sum_pos", "sum")  # runs from before sum_pos: BDH's max / mean
    return frame.select(
        "neuron",
        _rate().alias("rate"),
        mean.alias("mean"),
        "max",
        pl.when(positive == 0)
        .then(None)
        .otherwise(pl.col("max").cast(pl.Float64) / (positive / pl.col("n_tokens")))
        .alias("selectivity"),
    )


def selectivity(wh, run: str, site: str, layer: int) -> pl.LazyFrame:
    return _selectivity(_stats(wh, run, site, layer)).sort(
        ["selectivity", "neuron"], descending=[True, False], nulls_last=True
    )


def _histogram(binned: pl.LazyFrame, bins: int, edges: pl.LazyFrame) -> pl.LazyFrame:
    """Every bin 0..bins with its edges and the number of units in it."""
    counts = binned.group_by("bin").agg(pl.len().cast(pl.Int64).alias("n_neurons"))
    return (
        edges.join(counts, on="bin", how="left")
        .with_columns(pl.col("n_neurons").fill_null(0))
        .select("bin", "lo", "hi", "n_neurons")
        .sort("bin")
    )


def _bins(bins: int) -> pl.LazyFrame:
    return pl.LazyFrame({"bin": pl.int_range(0, bins + 1, eager=True, dtype=pl.Int32)})


def rate_histogram(wh, run: str, site: str, layer: int, bins: int = 50) -> pl.LazyFrame:
    stats = _stats(wh, run, site, layer).select("n_fired", "n_tokens")
    binned = stats.select(
        pl.when(pl.col("n_fired") == 0)
        .then(0)
        .when(pl.col("n_tokens") <= 1)
        .then(bins)
        .otherwise(
            pl.min_horizontal(
                pl.lit(bins), 1 + (bins * pl.col("n_fired").log() / pl.col("n_tokens").log()).floor().cast(pl.Int32)
            )
        )
        .cast(pl.Int32)
        .alias("bin")
    )
    n_tokens = stats.select(pl.col("n_tokens").max().cast(pl.Float64).alias("n"))
    b = pl.col("bin")
    edges = (
        _bins(bins)
        .join(n_tokens, how="cross")
        .filter(pl.col("n").is_not_null())
        .with_columns(
            pl.when(b == 0).then(0.0).otherwise(pl.col("n").pow((b - 1) / bins - 1)).alias("lo"),
            pl.when(b == 0).then(0.0).otherwise(pl.col("n").pow(b / bins - 1)).alias("hi"),
        )
    )
    return _histogram(binned, bins, edges)


def selectivity_histogram(wh, run: str, site: str, layer: int, bins: int = 50, log: bool = False) -> pl.LazyFrame:
    sel = _selectivity(_stats(wh, run, site, layer)).select(
        pl.when(pl.col("selectivity") > 0).then(pl.col("selectivity").log()) if log else pl.col("selectivity")
    )
    span = sel.select(
        pl.col("selectivity").min().alias("s_lo"), pl.col("selectivity").max().alias("s_hi"), pl.len().alias("units")
    )
    s, lo, hi = pl.col("selectivity"), pl.col("s_lo"), pl.col("s_hi")
    binned = sel.join(span, how="cross").select(
        pl.when(s.is_null())
        .then(0)
        .when(hi == lo)
        .then(1)
        .otherwise(pl.min_horizontal(pl.lit(bins), 1 + ((s - lo) / (hi - lo) * bins).floor().cast(pl.Int32)))
        .cast(pl.Int32)
        .alias("bin")
    )
    b = pl.col("bin")
    edges = (
        _bins(bins)
        .join(span, how="cross")
        .filter(pl.col("units") > 0)
        .with_columns(
            pl.when(b > 0).then(lo + (hi - lo) * (b - 1) / bins).alias("lo"),
            pl.when(b > 0).then(lo + (hi - lo) * b / bins).alias("hi"),
        )
    )
    if log:
        edges = edges.with_columns(pl.col("lo").exp(), pl.col("hi").exp())
    return _histogram(binned, bins, edges)


def sample_key(seed: int, neuron: pl.Expr, doc: pl.Expr, pos: pl.Expr) -> pl.Expr:
    """whq_sample_key: a reproducible pseudo-random key in [0, 2^31) of (seed, neuron, doc, pos)."""

    def mix(h, v):
        return (h.xor(v.cast(pl.Int64)) * 2654435761) & _MASK

    def avalanche(h, m):
        return (h.xor(h // 32768) * m) & _MASK

    h = mix(mix(mix(mix(pl.lit(0, pl.Int64), pl.lit(seed & _MASK, pl.Int64)), neuron), doc), pos)
    h = avalanche(avalanche(h, 739982445), 695872825)
    return h.xor(h // 8192)


def _source(info: dict, run: str, site: str, k: int, kind: str) -> str:
    """Where examples come from (see whq_examples in neurons.sql)."""
    kept = kept_reductions(info)
    has_threshold = kept.get("threshold") is not None
    stored = kept.get("examples")
    if stored and (k <= int(stored) or not has_threshold or kind in ("quantile", "bottom")):
        return "examples"
    if kind == "bottom":
        raise BadInput(
            f"site '{site}' of run '{run}' kept no examples=N, which the most negative examples come from: "
            f"re-ingest with --site {site}:examples=20"
        )
    if has_threshold:
        return "firings"
    raise BadInput(
        f"site '{site}' of run '{run}' kept neither examples=N nor a threshold capture: "
        f"re-ingest with --site {site}:examples=20 (or :threshold=0)"
    )


def layer_examples(
    wh, run: str, site: str, layer: int, neuron: int | None, kind: str, k: int, before: int, after: int, seed: int = 0
) -> pl.LazyFrame:
    """Twin of whq_examples: top (kind 'top'), most negative (kind 'bottom') or sampled (kind 'random') examples of one unit,
    or of every unit with neuron None, with their context and per-token values."""
    info = site_row(wh, run, site)
    one = (lambda frame: frame) if neuron is None else (lambda frame: frame.filter(pl.col("neuron") == neuron))
    if _source(info, run, site, k, kind) == "examples":
        candidates = one(
            scan(wh, "neuron_examples", run).filter(
                pl.col("site") == site, pl.col("layer") == layer, pl.col("kind") == kind
            )
        ).select(
            "neuron",
            "doc",
            "pos",
            "value",
            pl.col("rank").alias("stored_rank"),
            pl.col("window_values").alias("windows"),
        )
    else:
        candidates = one(
            scan(wh, "token_neurons", run).filter(pl.col("site") == site, pl.col("layer") == layer)
        ).select(
            "neuron",
            "doc",
            "pos",
            "value",
            pl.lit(None, pl.Int32).alias("stored_rank"),
            pl.lit(None, pl.List(pl.Float32)).alias("windows"),
        )
    order = [sample_key(seed, pl.col("neuron"), pl.col("doc"), pl.col("pos"))] if kind == "random" else []
    picked = (
        candidates.sort(
            [*order, pl.col("stored_rank"), pl.col("value"), pl.col("doc"), pl.col("pos")],
            descending=[False] * len(order) + [False, True, False, False],
            nulls_last=True,
        )
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("neuron").alias("rank"))
        .filter(pl.col("rank") < k)
        .select("neuron", "rank", "doc", pl.col("pos").alias("at_pos"), pl.col("value").alias("at_value"), "windows")
    )
    tokens = scan(wh, "tokens", run).select(
        "doc", "pos", "piece", pl.coalesce("text", "piece").alias("text"), "char_start", "char_end", "special"
    )
    stored_values = one(scan(wh, "token_neurons", run).filter(pl.col("site") == site, pl.col("layer") == layer)).select(
        "doc", "pos", "neuron", pl.col("value").alias("stored_value")
    )
    at = pl.col("wpos") == pl.col("at_pos")
    offset = pl.col("wpos") - pl.col("at_pos")
    # the window values captured with the example (50 before, 20 after), else token_neurons' value
    captured = pl.when(offset.is_between(-WINDOW_VALUES[0], WINDOW_VALUES[1])).then(
        pl.col("windows").list.get(offset + WINDOW_VALUES[0], null_on_oob=True)
    )
    window = (
        picked.with_columns(
            pl.int_ranges(pl.col("at_pos") - before, pl.col("at_pos") + after + 1, dtype=pl.Int32).alias("wpos")
        )
        .explode("wpos")
        .join(tokens, left_on=["doc", "wpos"], right_on=["doc", "pos"], how="inner")
        .join(stored_values, left_on=["doc", "wpos", "neuron"], right_on=["doc", "pos", "neuron"], how="left")
        .with_columns(
            pl.when(at).then(pl.col("at_value")).otherwise(pl.coalesce(captured, "stored_value")).alias("value")
        )
        .sort("neuron", "rank", "wpos")
    )
    spans = window.group_by("neuron", "rank", "doc", "at_pos", "at_value", maintain_order=True).agg(
        pl.col("char_start").min().alias("first_start"),
        pl.col("char_end").max().alias("last_end"),
        pl.col("char_end").filter(pl.col("wpos") < pl.col("at_pos")).max().alias("end_before"),
        (at & pl.col("special")).any().alias("at_special"),
        pl.col("piece").filter(at).first().alias("at_piece"),
        pl.col("char_start").filter(at).first().alias("at_start"),
        pl.col("char_end").filter(at).first().alias("at_end"),
        pl.struct("piece", "text", "value").alias("tokens"),
    )
    anchor = pl.coalesce("end_before", "first_start", pl.lit(0, pl.Int32))
    special = pl.col("at_special")
    spans = spans.with_columns(
        pl.when(special).then(anchor).otherwise(pl.col("at_start")).alias("mark_start"),
        pl.when(special).then(anchor).otherwise(pl.col("at_end")).alias("mark_end"),
    )
    start = pl.coalesce("first_start", "mark_start")
    end = pl.coalesce("last_end", "mark_end")
    text = pl.col("text")
    documents = scan(wh, "documents", run).select("doc", "doc_id", "text")
    return (
        spans.join(documents, on="doc", how="inner")
        .select(
            "neuron",
            "rank",
            "doc_id",
            pl.col("at_pos").alias("pos"),
            pl.col("at_value").alias("value"),
            pl.concat_str(
                [
                    text.str.slice(start, pl.col("mark_start") - start),
                    pl.lit("«"),
                    pl.when(special)
                    .then(pl.col("at_piece"))
                    .otherwise(text.str.slice(pl.col("mark_start"), pl.col("mark_end") - pl.col("mark_start"))),
                    pl.lit("»"),
                    text.str.slice(pl.col("mark_end"), end - pl.col("mark_end")),
                ]
            ).alias("context"),
            "tokens",
        )
        .sort("neuron", "rank")
    )


def top_contexts(
    wh, run: str, site: str, layer: int, neuron: int, k: int = 20, before: int = 50, after: int = 20
) -> pl.LazyFrame:
    return layer_examples(wh, run, site, layer, neuron, "top", k, before, after).drop("neuron")


def bottom_contexts(
    wh, run: str, site: str, layer: int, neuron: int, k: int = 20, before: int = 50, after: int = 20
) -> pl.LazyFrame:
    return layer_examples(wh, run, site, layer, neuron, "bottom", k, before, after).drop("neuron")


def random_examples(wh, run: str, site: str, layer: int, neuron: int, n: int = 10, seed: int = 0) -> pl.LazyFrame:
    return layer_examples(wh, run, site, layer, neuron, "random", n, *EXAMPLE_WINDOW, seed=seed).drop("neuron")


def activation_frequency(wh, run: str, site: str) -> pl.LazyFrame:
    return _stats(wh, run, site).select("layer", "neuron", _rate().alias("frequency")).sort("layer", "neuron")


def activation_frequency_by_dataset(wh, run: str, site: str) -> pl.LazyFrame:
    info = site_row(wh, run, site)
    has_threshold = kept_reductions(info).get("threshold") is not None
    documents = scan(wh, "documents", run).select("doc", "dataset", "n_tokens")
    dataset_tokens = documents.group_by("dataset").agg(pl.col("n_tokens").sum().cast(pl.Int64))
    firings = scan(wh, "token_neurons", run).filter(pl.col("site") == site)
    if not has_threshold:
        firings = firings.filter(pl.col("value") > info["threshold"])
    fired = (
        firings.join(documents.select("doc", "dataset"), on="doc", how="inner")
        .group_by("layer", "neuron", "dataset")
        .agg(pl.len().cast(pl.Int64).alias("n_fired"))
    )
    return (
        fired.join(dataset_tokens, on="dataset", how="inner", nulls_equal=True)
        .select(
            "layer",
            "neuron",
            "dataset",
            "n_tokens",
            "n_fired",
            (pl.col("n_fired") / pl.col("n_tokens")).alias("density"),
            (pl.col("n_fired") / pl.col("n_fired").sum().over("layer", "neuron")).alias("fraction"),
        )
        .sort("layer", "neuron", "dataset", nulls_last=True)
    )


def neuron_contexts_bytes(
    wh, run: str, site: str, layer: int, neuron: int, before: int = 24, after: int = 4
) -> pl.LazyFrame:
    strongest = (
        _stats(wh, run, site, layer)
        .filter(pl.col("neuron") == neuron, pl.col("max_doc").is_not_null())
        .select(pl.col("max_doc").alias("doc"), pl.col("max_pos").alias("at_pos"), pl.col("max").alias("value"))
    )
    tokens = scan(wh, "tokens", run).select("doc", "pos", "piece")
    documents = scan(wh, "documents", run).select("doc", "doc_id")
    marked = (
        pl.when(pl.col("pos") == pl.col("at_pos"))
        .then(pl.concat_str([pl.lit("["), "piece", pl.lit("]")]))
        .otherwise("piece")
    )
    return (
        strongest.join(tokens, on="doc", how="inner")
        .filter(pl.col("pos").is_between(pl.col("at_pos") - before, pl.col("at_pos") + after))
        .sort("pos")
        .group_by("doc", "at_pos", "value", maintain_order=True)
        .agg(marked.str.join("").alias("context"))
        .join(documents, on="doc", how="inner")
        .select("doc_id", pl.col("at_pos").alias("pos"), "value", "context")
    )


def neuron_logit_lens(wh, run: str, site: str, layer: int, neuron: int) -> pl.LazyFrame:
    site_row(wh, run, site)
    return (
        scan(wh, "neuron_logits", run)
        .filter(pl.col("site") == site, pl.col("layer") == layer, pl.col("neuron") == neuron)
        .select("direction", "rank", "token_id", "token", "logit")
        .sort(["direction", "rank"], descending=[True, False])
    )
