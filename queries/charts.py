"""Charts of the neuron macros: pure functions from a macro's DataFrame to an altair.Chart.

Each takes the rows a macro returns (Polars or pandas), optionally with a `layer` column
added by the caller to overlay several layers (translucent, one colour each), and returns
a chart to `.save()` as HTML or PNG (PNG needs vl-convert-python).
"""

from __future__ import annotations

import altair as alt
import polars as pl

WIDTH, HEIGHT = 420, 240


def _frame(df) -> pl.DataFrame:
    return df if isinstance(df, pl.DataFrame) else pl.from_pandas(df)


def _tooltip(df: pl.DataFrame, *fields: str) -> list:
    """Typed tooltip channels: a list of bare column names makes altair infer each channel against
    its schema, ~40 ms a chart (measured), as much as the rest of the chart."""
    return [alt.Tooltip(f"{name}:{'N' if name == 'layer' else 'Q'}") for name in fields if name in df.columns]


def _by_layer(df: pl.DataFrame) -> dict:
    return {"color": alt.Color("layer:N", title="layer")} if "layer" in df.columns else {}


# log and symlog axes bunch their ticks ("0.0010.002"): drop the labels that would overprint
_SPARSE_LABELS = alt.Axis(labelOverlap="greedy", labelSeparation=6)


def _bins_chart(df, title: str, x_title: str, scale: str, skipped: str) -> alt.Chart:
    """Histogram rows (bin, lo, hi, n_neurons[, layer]): bars for bins 1..n; bin 0's count in the subtitle after `skipped`."""
    df = _frame(df)
    n_skipped = int(df.filter(pl.col("bin") == 0)["n_neurons"].sum())
    bars = df.filter(pl.col("bin") > 0)
    return (
        alt.Chart(bars)
        .mark_rect(opacity=0.55, stroke="white", strokeWidth=0.5)
        .encode(
            alt.X("lo:Q", scale=alt.Scale(type=scale), axis=_SPARSE_LABELS, title=x_title),
            alt.X2("hi:Q"),
            alt.Y("n_neurons:Q", title="units"),
            alt.Y2(datum=0),
            tooltip=_tooltip(df, "bin", "lo", "hi", "n_neurons", "layer"),
            **_by_layer(bars),
        )
        .properties(
            width=WIDTH,
            height=HEIGHT,
            title=alt.TitleParams(title, subtitle=f"{skipped}: {n_skipped:,}"),
        )
    )


def rate_histogram_chart(df, title: str = "firing rate") -> alt.Chart:
    """rate_histogram rows: log-spaced bars for bins 1..n; the dead units (bin 0) in the subtitle."""
    return _bins_chart(
        df, title, "firing rate (share of tokens where the unit fires)", "log", "dead units (rate 0, not drawn)"
    )


def selectivity_histogram_chart(
    df, title: str = "selectivity (max / mean positive part)", log: bool = False
) -> alt.Chart:
    """selectivity_histogram rows: bars for bins 1..n, on a log axis for its log := true bins; units without
    a selectivity (bin 0) in the subtitle."""
    return _bins_chart(
        df,
        title,
        "selectivity = max / mean of max(value, 0)",
        "log" if log else "linear",
        "units with mean 0 (no selectivity, not drawn)",
    )


def layer_summary_chart(df, title: str = "firing per layer") -> alt.Chart:
    """layer_summary rows: mean and median rate, rare and dead share, side by side per layer."""
    measures = ["mean_rate", "median_rate", "rare_share", "dead_share"]
    long = _frame(df).unpivot(index="layer", on=measures, variable_name="measure", value_name="value")
    return (
        alt.Chart(long)
        .mark_bar()
        .encode(
            alt.X("layer:O"),
            alt.Y("value:Q", title="share"),
            alt.Color("measure:N", sort=measures),
            alt.XOffset("measure:N", sort=measures),
            tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("measure:N"), alt.Tooltip("value:Q")],
        )
        .properties(width=WIDTH, height=HEIGHT, title=title)
    )


def context_chart(df, title: str = "activation across the window") -> alt.Chart:
    """One top_contexts / random_examples row's `tokens`: the unit's value at each token of the window
    (tokens whose value was not stored show as gaps)."""
    row = _frame(df).row(0, named=True)
    tokens = pl.DataFrame(
        {
            "label": [f"{i}:{t['piece']}" for i, t in enumerate(row["tokens"])],
            "value": [t["value"] for t in row["tokens"]],
        }
    )
    return (
        alt.Chart(tokens)
        .mark_bar()
        .encode(
            alt.X("label:N", sort=None, title=None), alt.Y("value:Q", title="activation"), tooltip=["label", "value"]
        )
        .properties(width=WIDTH, height=HEIGHT, title=alt.TitleParams(title, subtitle=row["context"][:120]))
    )


def unit_histogram_chart(df, title: str = "activation histogram") -> alt.Chart:
    """unit_histogram rows (bin, lo, hi, count) of one unit: one bar per bin of the fixed grid, on a
    symmetric-log value axis (the grid is quarter octaves of |value|) and a symmetric-log count axis
    (the bin around 0 often holds most tokens); the open end bins are drawn one grid step wide."""
    df = _frame(df).filter(pl.col("count") > 0)
    finite = df.with_columns(
        lo=pl.when(pl.col("lo").is_infinite()).then(pl.col("hi") * 1.25).otherwise(pl.col("lo")),
        hi=pl.when(pl.col("hi").is_infinite()).then(pl.col("lo") * 1.25).otherwise(pl.col("hi")),
    )
    return (
        alt.Chart(finite)
        .mark_rect(color="#f97316", stroke="white", strokeWidth=0.3)
        .encode(
            alt.X(
                "lo:Q",
                scale=alt.Scale(type="symlog", constant=2**-12),
                axis=_SPARSE_LABELS,
                title="activation value",
            ),
            alt.X2("hi:Q"),
            alt.Y(
                "count:Q",
                scale=alt.Scale(type="symlog"),
                axis=_SPARSE_LABELS,
                title="tokens",
            ),
            alt.Y2(datum=0),
            tooltip=_tooltip(df, "bin", "lo", "hi", "count"),
        )
        .properties(
            width=WIDTH,
            height=HEIGHT,
            title=alt.TitleParams(title, subtitle=f"{int(df['count'].sum()):,} tokens, exact"),
        )
    )
