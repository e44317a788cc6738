"""Altair charts of a scenario run: each a pure function of a polars DataFrame.

The frames come from the scenario macros (queries/scenarios.sql); queries/report.py
gathers them and embeds the charts' Vega-Lite specs in one offline HTML file.
"""

from __future__ import annotations

import altair as alt
import polars as pl

METRICS = ("cosine", "mae", "jaccard")
ROLE_SHORT = {"system": "sys", "user": "usr", "assistant": "ast", "generated": "gen"}


def _data(df: pl.DataFrame) -> alt.Data:
    return alt.Data(values=df.to_dicts())


def turn_label(df: pl.DataFrame) -> pl.DataFrame:
    """Adds `turn`, e.g. '03·usr' (sorts in conversation order; the generation's final state is 'gen')."""
    short = pl.col("role").replace_strict(ROLE_SHORT, default=pl.col("role"))
    return df.with_columns(turn=pl.format("{}·{}", pl.col("message_index").cast(pl.String).str.zfill(2), short))


def reference_heatmap(similarity: pl.DataFrame) -> alt.Chart:
    """Message x reference: cosine averaged over layers and sources (similarity: ref_similarity rows + source)."""
    cells = turn_label(similarity).group_by("turn", "label").agg(pl.col("cosine").mean()).sort("turn", "label")
    labels = similarity["label"].unique(maintain_order=True).to_list()
    base = alt.Chart(_data(cells)).encode(
        x=alt.X("label:N", sort=labels, title="reference"), y=alt.Y("turn:N", sort="ascending", title="message")
    )
    rect = base.mark_rect().encode(
        color=alt.Color("cosine:Q", scale=alt.Scale(scheme="viridis"), title="mean cosine"),
        tooltip=["turn:N", "label:N", alt.Tooltip("cosine:Q", format=".4f")],
    )
    text = base.mark_text(fontSize=10).encode(text=alt.Text("cosine:Q", format=".3f"), color=alt.value("white"))
    return (rect + text).properties(
        title="Message × reference (cosine, mean over layers and sources)",
        width=60 * len(labels),
        height=22 * cells["turn"].n_unique(),
    )


def layer_lines(similarity: pl.DataFrame) -> alt.Chart:
    """Per layer: cosine, MAE and Jaccard of the messages vs each reference, one panel per metric x source."""
    means = similarity.group_by("source", "label", "layer").agg(pl.col(m).mean() for m in METRICS)
    long = means.unpivot(index=["source", "label", "layer"], on=list(METRICS), variable_name="metric").sort(
        "source", "label", "layer"
    )
    labels = similarity["label"].unique(maintain_order=True).to_list()
    return (
        alt.Chart(_data(long))
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O"),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            color=alt.Color("label:N", sort=labels, title="reference"),
            tooltip=["source:N", "label:N", "layer:O", "metric:N", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=180, height=120)
        .facet(
            row=alt.Row("metric:N", sort=list(METRICS)),
            column=alt.Column("source:N"),
        )
        .resolve_scale(y="independent")
        .properties(title="Per layer, mean over messages: cosine / MAE / Jaccard vs each reference")
    )


def role_averages(similarity: pl.DataFrame) -> alt.Chart:
    """User vs assistant snapshots: mean cosine per layer vs each reference, one panel per role x source."""
    rows = similarity.filter(pl.col("role").is_in(["user", "assistant"]))
    means = (
        rows.group_by("role", "source", "label", "layer")
        .agg(pl.col("cosine").mean())
        .sort("role", "source", "label", "layer")
    )
    labels = similarity["label"].unique(maintain_order=True).to_list()
    return (
        alt.Chart(_data(means))
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O"),
            y=alt.Y("cosine:Q", scale=alt.Scale(zero=False)),
            color=alt.Color("label:N", sort=labels, title="reference"),
            tooltip=["role:N", "source:N", "label:N", "layer:O", alt.Tooltip("cosine:Q", format=".4f")],
        )
        .properties(width=180, height=120)
        .facet(
            row=alt.Row("role:N", sort=["user", "assistant"]),
            column=alt.Column("source:N"),
        )
        .properties(title="User vs assistant averages: cosine per layer vs each reference")
    )


def drift_lines(drift: pl.DataFrame) -> alt.Chart:
    """Prefill vs final decode step per layer, one panel per metric, a line per source."""
    long = drift.unpivot(index=["doc_id", "source", "layer"], on=list(METRICS), variable_name="metric")
    return (
        alt.Chart(_data(long))
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O"),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            color=alt.Color("source:N"),
            strokeDash=alt.StrokeDash("doc_id:N", title="generation"),
            tooltip=["doc_id:N", "source:N", "layer:O", "metric:N", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=220, height=150)
        .facet(column=alt.Column("metric:N", sort=list(METRICS)))
        .resolve_scale(y="independent")
        .properties(title="Drift: prefill (step 0) vs final decode step")
    )


def logit_lens_table(lens: pl.DataFrame) -> alt.Chart:
    """Layer x step: each layer's top token, coloured by KL(final || layer) (lens: logit_lens rows of one document)."""
    cells = lens.select(
        "step",
        "layer",
        pl.col("top_tokens").list.first().alias("token"),
        pl.col("argmax_logprob").exp().alias("p"),
        "kl_from_final",
    )
    base = alt.Chart(_data(cells)).encode(x=alt.X("step:O"), y=alt.Y("layer:O", sort="descending"))
    rect = base.mark_rect().encode(
        color=alt.Color("kl_from_final:Q", scale=alt.Scale(scheme="orangered"), title="KL(final‖layer)"),
        tooltip=[
            "step:O",
            "layer:O",
            "token:N",
            alt.Tooltip("p:Q", format=".3f"),
            alt.Tooltip("kl_from_final:Q", format=".4f"),
        ],
    )
    text = base.mark_text(fontSize=9).encode(text="token:N")
    return (rect + text).properties(
        title="Logit lens: top token per layer and generation step",
        width=max(200, 40 * cells["step"].n_unique()),
        height=24 * cells["layer"].n_unique(),
    )


def latent_bars(top: pl.DataFrame) -> alt.Chart:
    """Per layer the strongest latents, labelled with the tokens they promote (top: layer, latent, value, promotes)."""
    bars = top.with_columns(label=pl.format("#{} {}", pl.col("latent"), pl.col("promotes")).str.strip_chars())
    return (
        alt.Chart(_data(bars))
        .mark_bar()
        .encode(
            x=alt.X("value:Q", title="latent value"),
            y=alt.Y("label:N", sort="-x", title=None),
            tooltip=["layer:O", "latent:N", alt.Tooltip("value:Q", format=".4f"), "promotes:N"],
        )
        .properties(width=360, height=alt.Step(16))
        .facet(row=alt.Row("layer:O"))
        .resolve_scale(y="independent")
        .properties(title="Strongest latents at the final step (label: the tokens each promotes)")
    )


def topk_explorer(steps: pl.DataFrame) -> alt.Chart:
    """A slider over generation steps showing the top-k candidates' probabilities, and the rank x step table."""
    long = (
        steps.select("step", "generated_token", "top_tokens", "top_logprobs")
        .explode("top_tokens", "top_logprobs")
        .with_columns(rank=pl.int_range(pl.len()).over("step"), prob=pl.col("top_logprobs").exp())
        .rename({"top_tokens": "token"})
    )
    long = long.with_columns(
        label=pl.format("{}. {}", pl.col("rank"), pl.col("token").str.replace_all("\n", "\\n", literal=True))
    )
    last = int(steps["step"].max())
    chosen = alt.param(
        name="step", value=0, bind=alt.binding_range(min=0, max=max(last, 1), step=1, name="generation step ")
    )
    bars = (
        alt.Chart(_data(long))
        .mark_bar()
        .encode(
            x=alt.X("prob:Q", title="probability"),
            y=alt.Y("label:N", sort=alt.EncodingSortField("rank"), title=None),
            tooltip=["step:O", "rank:O", "token:N", alt.Tooltip("prob:Q", format=".4f")],
        )
        .add_params(chosen)
        .transform_filter(alt.datum.step == chosen)
        .properties(title="Top-k candidates at the chosen step", width=300, height=200)
    )
    base = alt.Chart(_data(long)).encode(x=alt.X("step:O"), y=alt.Y("rank:O"))
    table = (
        base.mark_rect().encode(
            color=alt.Color("prob:Q", scale=alt.Scale(scheme="blues")),
            tooltip=["step:O", "rank:O", "token:N", alt.Tooltip("prob:Q", format=".4f")],
        )
        + base.mark_text(fontSize=9).encode(text="token:N")
    ).properties(title="Rank × step", width=max(200, 40 * (last + 1)), height=16 * int(long["rank"].max() + 1))
    return alt.hconcat(bars, table)


def residual_lines(decomposition: pl.DataFrame) -> alt.Chart:
    """Per layer, mean over the generation's steps: the four norms, and the update cosines of attn_out and mlp_out."""
    means = decomposition.group_by("layer").agg(pl.exclude("doc_id", "role", "step", "layer").mean()).sort("layer")
    norms = means.unpivot(
        index="layer",
        on=["hidden_in_norm", "attn_out_norm", "mlp_out_norm", "hidden_out_norm"],
        variable_name="quantity",
    )
    cosines = means.unpivot(index="layer", on=["attn_cosine", "mlp_cosine"], variable_name="quantity")

    def panel(df: pl.DataFrame, title: str) -> alt.Chart:
        return (
            alt.Chart(_data(df))
            .mark_line(point=True)
            .encode(
                x=alt.X("layer:O"),
                y=alt.Y("value:Q", title=None),
                color="quantity:N",
                tooltip=["layer:O", "quantity:N", alt.Tooltip("value:Q", format=".4f")],
            )
            .properties(title=title, width=300, height=180)
        )

    return (
        alt.hconcat(panel(norms, "Residual norms"), panel(cosines, "Cosine with hidden_out − hidden_in"))
        .resolve_scale(color="independent")
        .properties(title="Residual decomposition (generation, mean over steps)")
    )
