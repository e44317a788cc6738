"""BDH interpretability report from a warehouse (after BDH's analyze.py), with the neuron macros.

    python examples/bdh/analyze.py WH --run-id bdh --site xy_sparse --out examples/bdh/out

Runs the named queries of analyze.sql (the same file the DuckDB shell runs): per layer
the mean firing rate (a > 0), the share of rare units (rate < 1%, dead ones included) and
of dead units; the most selective units (selectivity = max / mean activation over all
tokens) with the bytes around their strongest activation; and the firing-rate and
selectivity histograms as altair charts (HTML, and PNG where vl-convert is installed).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import polars as pl

import warehouse
from warehouse.errors import BadInput, WarehouseError

ANALYZE_SQL = Path(__file__).resolve().parent / "analyze.sql"


def named_queries(path: Path = ANALYZE_SQL) -> dict[str, str]:
    """{name: SQL} of the `-- name: X` sections of analyze.sql."""
    sections = re.split(r"^-- name: (\w+)\n", path.read_text(), flags=re.M)
    return {name: body.strip().rstrip(";") for name, body in zip(sections[1::2], sections[2::2])}


def run_query(wh, name: str, run_id: str, site: str, top: int = 10, min_fired: int = 5, bins: int = 40) -> pl.DataFrame:
    for variable, value in (("run", run_id), ("site", site), ("top", top), ("min_fired", min_fired), ("bins", bins)):
        wh.sql(f"SET VARIABLE {variable} = ?", [value])
    return wh.pl(named_queries()[name])


def layer_summary(wh, run_id: str, site: str) -> pl.DataFrame:
    return run_query(wh, "layer_summary", run_id, site)


def top_selective(wh, run_id: str, site: str, k: int = 10, min_fired: int = 5) -> pl.DataFrame:
    return run_query(wh, "top_selective", run_id, site, top=k, min_fired=min_fired)


def histograms(wh, run_id: str, site: str, out: Path, bins: int = 40) -> list[Path]:
    from queries.charts import rate_histogram_chart, selectivity_histogram_chart

    charts = {
        "firing_rate": rate_histogram_chart(
            run_query(wh, "rate_histogram", run_id, site, bins=bins), "firing rate (a > 0)"
        ),
        "selectivity": selectivity_histogram_chart(run_query(wh, "selectivity_histogram", run_id, site, bins=bins)),
    }
    written = []
    for name, chart in charts.items():
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
        raise BadInput(
            f"no neuron_stats for run {args.run_id!r}, site {args.site!r}: check `whq runs {args.warehouse}`"
        )
    overall = run_query(wh, "overall", args.run_id, args.site).row(0, named=True)
    with pl.Config(tbl_rows=-1, float_precision=4):
        print(summary)
    print(
        f"mean firing rate across layers {overall['mean_rate']:.2%}, "
        f"rare (<1% of tokens) {overall['rare_share']:.1%}, dead {overall['dead_share']:.1%}"
    )
    print(f"\ntop {args.top} selective units (selectivity = max / mean; fired on >= {args.min_fired} tokens):")
    for row in top_selective(wh, args.run_id, args.site, args.top, args.min_fired).iter_rows(named=True):
        print(
            f"  layer {row['layer']} unit {row['neuron']:>6}  sel {row['selectivity']:8.1f}  "
            f"fired {row['n_fired']:>5}  rate {row['rate']:.4f}  max {row['max']:.3f}  {row['context']!r}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in histograms(wh, args.run_id, args.site, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
