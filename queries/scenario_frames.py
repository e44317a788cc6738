"""Polars twins of queries/scenarios.sql: same names, columns and row order, computed by Polars.

from queries import scenario_frames as sf
sf.ref_similarity(wh, "emo", source="hidden_out").collect()
"""

from __future__ import annotations

import polars as pl

from .frames import scan, site_row

__all__ = [
    "ref_similarity",
    "ref_summary",
    "ref_by_role",
    "drift",
    "run_compare",
    "cross_layer_cosine",
    "neuron_trajectory",
    "residual_decomposition",
]

STATE_ROLES = ("message", "generated", "reference")


def _cosine(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    norms = (a * a).list.sum().sqrt() * (b * b).list.sum().sqrt()
    return (a * b).list.sum() / pl.max_horizontal(norms, pl.lit(1e-8))


def _mae(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return (a - b).list.eval(pl.element().abs()).list.mean()


def _jaccard(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    inter = a.list.set_intersection(b).list.len().cast(pl.Int64)
    return inter / (a.list.len().cast(pl.Int64) + b.list.len().cast(pl.Int64) - inter)


def _top(vec: pl.Expr) -> pl.Expr:
    """0-based indices of the k = max(1, H // 100) largest |values| (ties: lower index), ascending."""
    k = pl.max_horizontal(pl.lit(1), vec.list.len() // 100)
    order = vec.list.eval(
        pl.int_range(pl.len(), dtype=pl.Int64).sort_by(pl.element().abs(), descending=True, maintain_order=True)
    )
    return order.list.head(k).list.sort()


def scenario_vectors(wh, run: str) -> pl.LazyFrame:
    """Twin of whq_scenario_vectors: last-token states with document ids, last step, DOUBLE vec and norm."""
    docs = (
        scan(wh, "documents", run)
        .filter(pl.col("role").is_in(STATE_ROLES))
        .select("doc", "doc_id", "role", "message_index", "message_role", "label")
    )
    vectors = scan(wh, "vectors", run).filter((pl.col("pool") == "last") & pl.col("step").is_not_null())
    return (
        vectors.join(docs, on="doc", how="inner")
        .with_columns(vec=pl.col("vec").cast(pl.List(pl.Float64)))
        .select(
            pl.col("site").alias("source"),
            "layer",
            "doc",
            "step",
            "pos",
            "doc_id",
            "role",
            "message_index",
            "message_role",
            "label",
            pl.col("step").max().over("doc").alias("last_step"),
            "vec",
            (pl.col("vec") * pl.col("vec")).list.sum().sqrt().alias("norm"),
        )
    )


def scenario_states(wh, run: str) -> pl.LazyFrame:
    """Twin of whq_scenario_states: scenario_vectors plus the top-1% |value| index set."""
    return scenario_vectors(wh, run).with_columns(top=_top(pl.col("vec")))


def _ref_pairs(wh, run: str) -> pl.LazyFrame:
    states = scenario_states(wh, run)
    turns = states.filter(
        (pl.col("role") == "message") | ((pl.col("role") == "generated") & (pl.col("step") == pl.col("last_step")))
    )
    refs = states.filter(pl.col("role") == "reference").select(
        "source",
        "layer",
        pl.col("doc").alias("ref_doc"),
        "label",
        pl.col("vec").alias("ref_vec"),
        pl.col("top").alias("ref_top"),
    )
    return (
        turns.drop("label")
        .join(refs, on=["source", "layer"], how="inner")
        .select(
            "source",
            "doc",
            "ref_doc",
            "doc_id",
            pl.when(pl.col("role") == "message").then(pl.col("message_role")).otherwise(pl.col("role")).alias("role"),
            (pl.col("role") == "message").alias("is_message"),
            "message_index",
            "label",
            "layer",
            _cosine(pl.col("vec"), pl.col("ref_vec")).alias("cosine"),
            _mae(pl.col("vec"), pl.col("ref_vec")).alias("mae"),
            _jaccard(pl.col("top"), pl.col("ref_top")).alias("jaccard"),
        )
    )


def ref_similarity(wh, run: str, source: str = "hidden_out") -> pl.LazyFrame:
    site_row(wh, run, source)
    return (
        _ref_pairs(wh, run)
        .filter(pl.col("source") == source)
        .sort("doc", "ref_doc", "layer")
        .select("doc_id", "role", "message_index", "label", "layer", "cosine", "mae", "jaccard")
    )


def _stats(name: str) -> list[pl.Expr]:
    return [
        pl.col(name).mean().alias(f"mean_{name}"),
        pl.col(name).std(ddof=0).alias(f"std_{name}"),
        pl.col(name).median().alias(f"median_{name}"),
    ]


def ref_summary(wh, run: str) -> pl.LazyFrame:
    return (
        _ref_pairs(wh, run)
        .filter(pl.col("is_message"))
        .group_by("ref_doc", "label", "source")
        .agg(*_stats("cosine"), *_stats("mae"), *_stats("jaccard"))
        .sort("ref_doc", "source")
        .drop("ref_doc")
    )


def ref_by_role(wh, run: str) -> pl.LazyFrame:
    return (
        _ref_pairs(wh, run)
        .group_by("role", "ref_doc", "label", "source")
        .agg(
            pl.col("doc").n_unique().cast(pl.Int64).alias("n_messages"),
            pl.col("cosine").mean().alias("mean_cosine"),
            pl.col("mae").mean().alias("mean_mae"),
            pl.col("jaccard").mean().alias("mean_jaccard"),
        )
        .sort("role", "ref_doc", "source")
        .drop("ref_doc")
    )


def drift(wh, run: str) -> pl.LazyFrame:
    states = scenario_states(wh, run).filter(pl.col("role") == "generated")
    first = states.filter(pl.col("step") == 0)
    last = states.filter(pl.col("step") == pl.col("last_step")).select(
        "doc", "source", "layer", pl.col("vec").alias("vec_b"), pl.col("top").alias("top_b")
    )
    pairs = first.join(last, on=["doc", "source", "layer"], how="inner").with_columns(
        cosine=_cosine(pl.col("vec"), pl.col("vec_b")),
        mae=_mae(pl.col("vec"), pl.col("vec_b")),
        jaccard=_jaccard(pl.col("top"), pl.col("top_b")),
    )
    divergent = pl.col("layer").sort_by(["cosine", "layer"]).first().over("doc", "source")
    return pairs.sort("doc", "source", "layer").select(
        "doc_id", "source", "layer", "cosine", "mae", "jaccard", divergent.alias("most_divergent_layer")
    )


def _main_generation(wh, run: str) -> pl.LazyFrame:
    states = scenario_states(wh, run).filter(pl.col("role") == "generated")
    return states.filter(pl.col("doc") == pl.col("doc").max())


def run_compare(wh, run_a: str, run_b: str) -> pl.LazyFrame:
    a, b = _main_generation(wh, run_a), _main_generation(wh, run_b)
    frames = []
    for order, state, step_a, step_b in (
        (0, "initial", pl.lit(0), pl.lit(0)),
        (1, "final", pl.col("last_step"), pl.col("last_step")),
    ):
        left = a.filter(pl.col("step") == step_a).select("source", "layer", "vec", "top")
        right = b.filter(pl.col("step") == step_b).select(
            "source", "layer", pl.col("vec").alias("vec_b"), pl.col("top").alias("top_b")
        )
        frames.append(
            left.join(right, on=["source", "layer"], how="inner").with_columns(
                state=pl.lit(state), state_order=pl.lit(order)
            )
        )
    return (
        pl.concat(frames)
        .sort("state_order", "source", "layer")
        .select(
            "state",
            "source",
            "layer",
            _cosine(pl.col("vec"), pl.col("vec_b")).alias("cosine"),
            _mae(pl.col("vec"), pl.col("vec_b")).alias("mae"),
            _jaccard(pl.col("top"), pl.col("top_b")).alias("jaccard"),
        )
    )


def cross_layer_cosine(wh, run: str, doc_id: str, source: str = "hidden_out", step: int | None = None) -> pl.LazyFrame:
    site_row(wh, run, source)
    chosen = pl.col("last_step") if step is None else pl.lit(step)
    states = (
        scenario_vectors(wh, run)
        .filter((pl.col("doc_id") == doc_id) & (pl.col("source") == source) & (pl.col("step") == chosen))
        .select("layer", "vec")
    )
    pairs = states.rename({"layer": "layer_a"}).join(states.rename({"layer": "layer_b", "vec": "vec_b"}), how="cross")
    return pairs.sort("layer_a", "layer_b").select(
        "layer_a", "layer_b", _cosine(pl.col("vec"), pl.col("vec_b")).alias("cosine")
    )


def neuron_trajectory(wh, run: str, site: str, layer: int, neuron: int) -> pl.LazyFrame:
    site_row(wh, run, site)
    fed = (
        scan(wh, "steps", run)
        .sort("doc", "step")
        .select(
            "doc",
            "step",
            pl.col("input_tokens").list.last().alias("input_token"),
            "generated_token",
            (pl.col("input_token_ids").list.len().cum_sum().over("doc", order_by="step") - 1)
            .cast(pl.Int32)
            .alias("pos"),
        )
    )
    docs = scan(wh, "documents", run).select("doc", "doc_id")
    vectors = (
        scan(wh, "vectors", run)
        .filter((pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("pool") == "last"))
        .select("doc", "step", pl.col("vec").list.get(neuron, null_on_oob=True).alias("vec_value"))
    )
    sparse = (
        scan(wh, "token_neurons", run)
        .filter((pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("neuron") == neuron))
        .select("doc", "pos", pl.col("value").alias("sparse_value"))
    )
    return (
        fed.join(docs, on="doc", how="inner")
        .join(vectors, on=["doc", "step"], how="left")
        .join(sparse, on=["doc", "pos"], how="left")
        .sort("doc", "step")
        .select(
            "doc_id",
            "step",
            "pos",
            "input_token",
            "generated_token",
            pl.coalesce("vec_value", "sparse_value").alias("value"),
        )
    )


def residual_decomposition(wh, run: str) -> pl.LazyFrame:
    vectors = scenario_vectors(wh, run)
    keys = ["doc", "step", "layer"]

    def part(source: str, prefix: str) -> pl.LazyFrame:
        return vectors.filter(pl.col("source") == source).select(
            *keys, pl.col("vec").alias(f"{prefix}_vec"), pl.col("norm").alias(f"{prefix}_norm")
        )

    base = vectors.filter(pl.col("source") == "hidden_in").select(
        *keys, "doc_id", "role", pl.col("vec").alias("in_vec"), pl.col("norm").alias("in_norm")
    )
    joined = (
        base.join(part("attn_out", "attn"), on=keys)
        .join(part("mlp_out", "mlp"), on=keys)
        .join(part("hidden_out", "out"), on=keys)
    )
    update = pl.col("out_vec") - pl.col("in_vec")
    return joined.sort(keys).select(
        "doc_id",
        "role",
        "step",
        "layer",
        pl.col("in_norm").alias("hidden_in_norm"),
        pl.col("attn_norm").alias("attn_out_norm"),
        pl.col("mlp_norm").alias("mlp_out_norm"),
        pl.col("out_norm").alias("hidden_out_norm"),
        _cosine(pl.col("attn_vec"), update).alias("attn_cosine"),
        _cosine(pl.col("mlp_vec"), update).alias("mlp_cosine"),
    )
