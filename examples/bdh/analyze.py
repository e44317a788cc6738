"""BDH interpretability report from a warehouse (after BDH's analyze.py), in SQL.

    python examples/bdh/analyze.py WH --run-id bdh --site xy_sparse --out examples/bdh/out

Per layer: mean firing rate (a > 0), the share of rare units (rate < 1%, dead ones
included) and of dead units; the most selective units (selectivity = max / mean
activation over all tokens, among units that fired) with the byte context of their
strongest activation; histograms of firing rate and selectivity (altair HTML, PNG).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

import warehouse
from warehouse.errors import BadInput, WarehouseError

LAYER_SUMMARY = """
SELECT layer, count(*) AS n_neurons,
       avg(n_fired / n_tokens) AS mean_rate,
       avg(CASE WHEN n_fired / n_tokens < ? THEN 1.0 ELSE 0.0 END) AS rare_share,
       avg(CASE WHEN n_fired = 0 THEN 1.0 ELSE 0.0 END) AS dead_share
FROM neuron_stats WHERE run_id = ? AND site = ?
GROUP BY layer ORDER BY layer
"""

RATES = """
SELECT layer, neuron, n_fired / n_tokens AS rate
FROM neuron_stats WHERE run_id = ? AND site = ?
"""

SELECTIVITY = """
SELECT layer, neuron, n_fired, n_fired / n_tokens AS rate, max / (sum / n_tokens) AS selectivity,
       max, max_doc, max_pos
FROM neuron_stats WHERE run_id = ? AND site = ? AND n_fired > 0
"""

# The bytes around one (doc, pos): `before` tokens, the token itself in [brackets], `after` tokens.
CONTEXT = """
SELECT string_agg(CASE WHEN pos = ? THEN '[' || piece || ']' ELSE piece END, '' ORDER BY pos) AS context
FROM tokens WHERE run_id = ? AND doc = ? AND pos BETWEEN ? AND ?
"""


def layer_summary(wh, run_id: str, site: str, rare_below: float = 0.01) -> pl.DataFrame:
    return wh.sql(LAYER_SUMMARY, [rare_below, run_id, site]).pl()


def firing_rates(wh, run_id: str, site: str) -> pl.DataFrame:
    return wh.sql(RATES, [run_id, site]).pl()


def selectivity(wh, run_id: str, site: str) -> pl.DataFrame:
    return wh.sql(SELECTIVITY, [run_id, site]).pl()


def top_selective(wh, run_id: str, site: str, k: int = 10, min_fired: int = 1) -> pl.DataFrame:
    """The k most selective units among those that fired on at least min_fired tokens (a unit
    firing once has selectivity = n_tokens, so min_fired > 1 surfaces recurring detectors)."""
    ranked = selectivity(wh, run_id, site).filter(pl.col("n_fired") >= min_fired)
    return ranked.sort(["selectivity", "max", "layer", "neuron"], descending=[True, True, False, False]).head(k)


def byte_context(wh, run_id: str, doc: int, pos: int, before: int = 24, after: int = 4) -> str:
    return wh.sql(CONTEXT, [pos, run_id, doc, pos - before, pos + after]).fetchall()[0][0]


def histograms(rates: pl.DataFrame, sel: pl.DataFrame, out: Path) -> list[Path]:
    import altair as alt

    charts = {
        "firing_rate": alt.Chart(rates.select("layer", "rate")).mark_bar().encode(
            alt.X("rate:Q", bin=alt.Bin(maxbins=50), title="firing rate (share of tokens with a > 0)"),
            alt.Y("count()", title="units"),
            alt.Color("layer:N")),
        "selectivity": alt.Chart(sel.select("layer", pl.col("selectivity").log10().alias("log10_selectivity"))).mark_bar().encode(
            alt.X("log10_selectivity:Q", bin=alt.Bin(maxbins=50), title="log10(max / mean), units that fired"),
            alt.Y("count()", title="units"),
            alt.Color("layer:N")),
    }
    written = []
    for name, chart in charts.items():
        chart = chart.properties(width=420, height=240, title=name.replace("_", " "))
        chart.save(out / f"{name}.html")
        written.append(out / f"{name}.html")
        try:
            chart.save(out / f"{name}.png")
            written.append(out / f"{name}.png")
        except Exception as err:  # PNG needs vl-convert; the HTML is the chart of record
            print(f"(no PNG for {name}: {err})")
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("warehouse")
    p.add_argument("--run-id", default="bdh")
    p.add_argument("--site", default="xy_sparse")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--min-fired", type=int, default=5, help="rank only units that fired on at least this many tokens")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    try:
        report(p.parse_args(argv))
    except WarehouseError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def report(args) -> None:
    wh = warehouse.open(args.warehouse)
    summary = layer_summary(wh, args.run_id, args.site)
    if summary.is_empty():
        raise BadInput(f"no neuron_stats for run {args.run_id!r}, site {args.site!r}: check `whq runs {args.warehouse}`")
    with pl.Config(tbl_rows=-1, float_precision=4):
        print(summary)
        print(f"mean firing rate across layers {summary['mean_rate'].mean():.2%}, "
              f"rare (<1% of tokens) {summary['rare_share'].mean():.1%}, dead {summary['dead_share'].mean():.1%}")
    print(f"\ntop {args.top} selective units (selectivity = max / mean; fired on >= {args.min_fired} tokens):")
    for row in top_selective(wh, args.run_id, args.site, args.top, args.min_fired).iter_rows(named=True):
        context = byte_context(wh, args.run_id, row["max_doc"], row["max_pos"])
        print(f"  layer {row['layer']} unit {row['neuron']:>6}  sel {row['selectivity']:8.1f}  "
              f"fired {row['n_fired']:>5}  rate {row['rate']:.4f}  max {row['max']:.3f}  {context!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in histograms(firing_rates(wh, args.run_id, args.site), selectivity(wh, args.run_id, args.site), out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
