"""Polars twins of queries/explanations.sql: same names, same columns, built by Polars over the parts."""

from __future__ import annotations

import polars as pl

from .frames import scan, site_row

__all__ = ["explanation_scores", "scorer_summary", "search_explanations", "scorer_verdicts"]

_HEADLINE = [
    ("detection", "detection", "balanced_accuracy"),
    ("fuzz", "fuzz", "balanced_accuracy"),
    ("simulation", "simulation", "ev_correlation"),
    ("embedding", "embedding", "auc"),
    ("intruder", "intruder", "accuracy"),
]
HEADLINE = {scorer: metric for _, scorer, metric in _HEADLINE}  # each scorer's headline metric


def _rows(wh, table: str, run: str, site: str) -> pl.LazyFrame:
    site_row(wh, run, site)
    return scan(wh, table, run).filter(pl.col("site") == site)


def explanation_scores(wh, run: str, site: str, layer: int) -> pl.LazyFrame:
    keys = ["neuron", "explanation_id", "explainer", "model", "text"]
    explanations = _rows(wh, "explanations", run, site).filter(pl.col("layer") == layer).select(keys)
    scores = (
        _rows(wh, "scores", run, site)
        .filter(pl.col("layer") == layer)
        .select("explanation_id", "scorer", "metric", "value")
    )
    joined = explanations.join(scores, on="explanation_id", how="left")
    columns = [
        pl.col("value").filter((pl.col("scorer") == scorer) & (pl.col("metric") == metric)).max().alias(name)
        for name, scorer, metric in _HEADLINE
    ]
    return joined.group_by(keys).agg(columns).sort(["neuron", "explainer", "model", "explanation_id"])


def _auc(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Pooled ROC AUC per (scorer, model) from columns truth and score: the rank statistic, ties averaged."""
    ranked = frame.with_columns(pl.col("score").rank("average").over("scorer", "model").alias("r"))
    pos = pl.col("truth").cast(pl.Int64).sum()
    neg = (~pl.col("truth")).cast(pl.Int64).sum()
    value = (pl.col("r").filter(pl.col("truth")).sum() - pos * (pos + 1) / 2) / (pos * neg)
    return (
        ranked.group_by("scorer", "model")
        .agg(pl.when((pos > 0) & (neg > 0)).then(value).otherwise(None).cast(pl.Float64).alias("value"))
        .with_columns(pl.lit("auc").alias("metric"))
    )


def scorer_summary(wh, run: str, site: str) -> pl.LazyFrame:
    x = _rows(wh, "explanation_examples", run, site).filter(pl.col("scorer").is_not_null())
    cls = x.filter(pl.col("scorer").is_in(["detection", "fuzz"]) & pl.col("parsed"))
    yes = pl.col("prediction") >= 0.5
    conf = cls.group_by("scorer", "model").agg(
        (pl.col("truth") & yes).sum().alias("tp"),
        (~pl.col("truth") & ~yes).sum().alias("tn"),
        (~pl.col("truth") & yes).sum().alias("fp"),
        pl.col("truth").sum().alias("pos"),
        (~pl.col("truth")).sum().alias("neg"),
    )
    tp, tn, fp, pos, neg = (pl.col(c).cast(pl.Float64) for c in ("tp", "tn", "fp", "pos", "neg"))

    def ratio(a, b):
        return pl.when(b > 0).then(a / b).otherwise(0.0)

    metrics = {
        "balanced_accuracy": (ratio(tp, pos) + ratio(tn, neg)) / 2,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, pos),
        "f1": pl.when(tp > 0).then(2 * tp / (2 * tp + fp + (pos - tp))).otherwise(0.0),
    }
    classification = pl.concat(
        [
            conf.select("scorer", "model", pl.lit(name).alias("metric"), expr.alias("value"))
            for name, expr in metrics.items()
        ]
    )
    score = pl.when(pl.col("scorer") == "embedding").then(pl.col("prediction")).otherwise(pl.col("probability"))
    auc = _auc(
        x.filter(pl.col("scorer").is_in(["detection", "fuzz", "embedding"]))
        .with_columns(score.alias("score"))
        .filter(pl.col("score").is_not_null())
    ).select("scorer", "model", "metric", "value")
    intruder = (
        x.filter((pl.col("scorer") == "intruder") & (pl.col("role") == "non-activating"))
        .group_by("scorer", "model")
        .agg(pl.col("correct").fill_null(False).cast(pl.Float64).mean().alias("value"))
        .select("scorer", "model", pl.lit("accuracy").alias("metric"), "value")
    )
    simulation = (
        x.filter((pl.col("scorer") == "simulation") & pl.col("parsed"))
        .select("scorer", "model", "true_values", "predicted_values")
        .explode("true_values", "predicted_values")
        .group_by("scorer", "model")
        .agg(
            pl.corr(pl.col("true_values").cast(pl.Float64), pl.col("predicted_values").cast(pl.Float64)).alias("value")
        )
        .select("scorer", "model", pl.lit("ev_correlation").alias("metric"), "value")
    )
    pooled = pl.concat([classification, auc, intruder, simulation], how="vertical_relaxed")
    per_unit = (
        _rows(wh, "scores", run, site)
        .group_by("scorer", "model", "metric")
        .agg(
            pl.col("value").mean().alias("per_unit_mean"),
            pl.col("value").count().cast(pl.Int64).alias("n_units"),
            pl.col("n_examples").cast(pl.Int64).sum().alias("n_examples"),
            pl.col("n_unparsable").cast(pl.Int64).sum().alias("n_unparsable"),
        )
    )
    return (
        per_unit.join(pooled.rename({"value": "pooled"}), on=["scorer", "model", "metric"], how="left")
        .select("scorer", "model", "metric", "pooled", "per_unit_mean", "n_units", "n_examples", "n_unparsable")
        .sort("scorer", "model", "metric")
    )


def search_explanations(wh, run: str, site: str, query: str, query_embedding=None) -> pl.LazyFrame:
    frame = _rows(wh, "explanations", run, site).filter(pl.col("parsed"))
    if query_embedding is not None:
        query_vector = [float(v) for v in query_embedding]
        similarity = (
            pl.col("embedding")
            .cast(pl.List(pl.Float64))
            .map_elements(lambda e: _cosine(e, query_vector), return_dtype=pl.Float64)
            .alias("similarity")
        )
    else:
        similarity = pl.lit(None, pl.Float64).alias("similarity")
    matched = frame.select(
        "layer",
        "neuron",
        "explanation_id",
        "explainer",
        "model",
        "text",
        similarity,
        pl.col("text").str.to_lowercase().str.contains(query.lower(), literal=True).alias("text_match"),
    )
    return (
        matched.filter(pl.col("text_match") | pl.col("similarity").is_not_null())
        .with_columns((pl.col("similarity").fill_null(0.0) + pl.col("text_match").cast(pl.Float64)).alias("score"))
        .sort(["score", "layer", "neuron", "explanation_id"], descending=[True, False, False, False])
    )


def _cosine(a, b) -> float | None:
    if a is None:
        return None
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / (na * nb) if na and nb else None


def scorer_verdicts(wh, run: str, site: str, layer: int, unit: int) -> pl.LazyFrame:
    x = _rows(wh, "explanation_examples", run, site).filter(
        (pl.col("layer") == layer) & (pl.col("neuron") == unit) & pl.col("scorer").is_not_null()
    )
    docs = scan(wh, "documents", run).select("doc", "doc_id")
    verdict = (
        pl.when(~pl.col("parsed"))
        .then(pl.lit("unparsable"))
        .when(pl.col("correct"))
        .then(pl.lit("right"))
        .when(~pl.col("correct"))
        .then(pl.lit("wrong"))
        .otherwise(pl.lit(None, pl.String))
        .alias("verdict")
    )
    return (
        x.join(docs, on="doc", how="inner")
        .select(
            "explanation_id",
            "scorer",
            "model",
            "role",
            "source",
            "doc_id",
            "doc",
            "pos",
            "quantile",
            "truth",
            "value",
            "prediction",
            "probability",
            "correct",
            "parsed",
            verdict,
        )
        .sort(["explanation_id", "scorer", "model", "role", "doc", "pos"])
    )
