"""`whq report`: one self-contained HTML file (and Activation Lab's CSVs) for a scenario run.

The data comes from the scenario macros; the charts (queries/scenario_charts.py) are
Vega-Lite specs embedded in the page together with the Vega, Vega-Lite and vega-embed
libraries (bundled by vl-convert), so the file opens offline: nothing is fetched.
A run with dictionary sites gets, per site, the same comparisons on its latents (each
state's last-token latents are stored like a source's vectors), its strongest latents at
the generation's final step with the tokens each promotes (the feature logit lens), and
the dictionaries' quality (dictionary_quality).
"""

from __future__ import annotations

import datetime as dt
import html
import json
from itertools import combinations
from pathlib import Path

import polars as pl

from warehouse.errors import BadInput
from warehouse.jsonio import script_json
from warehouse.names import check_name
from warehouse.output import check_output_file, check_output_folder, ensure_parent, output_folder
from warehouse.schema import SCENARIO_SOURCES

from . import scenario_charts as charts

# Activation Lab's names in its CSVs (its MLP output is `mlp_down_out`).
LAB_SOURCE = {"hidden_in": "hidden_in", "hidden_out": "hidden_out", "attn_out": "attn_out", "mlp_out": "mlp_down_out"}
SUMMARY_COLUMNS = (
    "mean_cosine",
    "std_cosine",
    "median_cosine",
    "min_cosine",
    "most_divergent_layer",
    "mean_MAE",
    "std_MAE",
    "median_MAE",
    "max_MAE_layer",
    "mean_overlap",
    "std_overlap",
    "median_overlap",
    "min_overlap",
    "min_overlap_layer",
)


# -- data -------------------------------------------------------------------------
def _sql(wh, query: str, *params) -> pl.DataFrame:
    return wh.pl(query, list(params) if params else None)


def _state_sites(wh, run: str) -> list[str]:
    """The sites with per-state (per pass) last-token vectors: the sources, and the dictionary sites' latents."""
    return _sql(
        wh,
        "SELECT DISTINCT site FROM vectors WHERE run_id = ? AND pool = 'last' AND step IS NOT NULL ORDER BY site",
        run,
    )["site"].to_list()


def run_sources(wh, run: str) -> list[str]:
    found = set(_state_sites(wh, run))
    return [s for s in SCENARIO_SOURCES if s in found]


def latent_sites(wh, run: str) -> list[str]:
    """The dictionary sites of a scenario run (their latents are states like the sources')."""
    return [s for s in _state_sites(wh, run) if s not in SCENARIO_SOURCES]


def _check_scenario_run(wh, run: str) -> None:
    wh.manifest(run)  # UnknownRun with the list of runs
    roles = set(_sql(wh, "SELECT DISTINCT role FROM documents WHERE run_id = ?", run)["role"].to_list())
    if "generated" not in roles or not run_sources(wh, run):
        raise BadInput(
            f"run {run!r} is not a scenario run (no generation states): capture one with `whq ingest ROOT --scenario scenario.yaml`"
        )


def similarity(wh, run: str, sources: list[str] | None = None) -> pl.DataFrame:
    """ref_similarity of each source (default: every captured source), with a source column."""
    frames = [
        _sql(wh, "SELECT ? AS source, * FROM ref_similarity(?, source := ?)", s, run, s)
        for s in (run_sources(wh, run) if sources is None else sources)
    ]
    return pl.concat(frames) if frames else pl.DataFrame()


def top_latents(wh, run: str, site: str, doc: int, k: int = 8) -> pl.DataFrame:
    """Per layer the k strongest active latents of one document's last state (its final step), with the
    tokens each latent's decoder direction promotes most (neuron_logits, empty without the feature logit lens)."""
    return _sql(
        wh,
        """
        WITH final AS (
            SELECT v.layer, unnest(v.vec) AS value, generate_subscripts(v.vec, 1) - 1 AS latent
            FROM whq_scenario_vectors(?) v
            WHERE v.source = ? AND v.doc = ? AND v.step = v.last_step
        ), ranked AS (
            SELECT f.*, row_number() OVER (PARTITION BY f.layer ORDER BY f.value DESC, f.latent) AS r
            FROM final f WHERE f.value > 0
        ), lens AS (
            SELECT nl.layer, nl.neuron, string_agg(nl.text, ' ' ORDER BY nl.rank) AS promotes
            FROM neuron_logits nl
            WHERE nl.run_id = ? AND nl.site = ? AND nl.direction = 'top' AND nl.rank < 3
            GROUP BY nl.layer, nl.neuron
        )
        SELECT r.layer, r.latent, r.value, coalesce(l.promotes, '') AS promotes
        FROM ranked r LEFT JOIN lens l ON l.layer = r.layer AND l.neuron = r.latent
        WHERE r.r <= ?
        ORDER BY r.layer, r.r
        """,
        run,
        site,
        doc,
        run,
        site,
        k,
    )


def dictionary_quality(wh, run: str) -> pl.DataFrame:
    """dictionary_quality rows without the columns that are empty for this run (the splice losses without --splice)."""
    quality = _sql(wh, "SELECT * FROM dictionary_quality(?)", run)
    return quality.select(c for c in quality.columns if quality[c].null_count() < quality.height)


def generations(wh, run: str) -> pl.DataFrame:
    """doc, doc_id, prompt and generated text of each generation of the run."""
    docs = _sql(
        wh, "SELECT doc, doc_id, text, meta FROM documents WHERE run_id = ? AND role = 'generated' ORDER BY doc", run
    )
    generated = [json.loads(m).get("generated_text", "") for m in docs["meta"]]
    prompts = [
        text[: len(text) - len(g)] if g and text.endswith(g) else text for text, g in zip(docs["text"], generated)
    ]
    return docs.select("doc", "doc_id").with_columns(
        prompt=pl.Series(prompts, dtype=pl.String), generated=pl.Series(generated, dtype=pl.String)
    )


def per_layer_summary(per_layer: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Activation Lab's summary columns from per-layer cosine / MAE / overlap rows, rounded to 4 places."""

    def arg(col: str, pick) -> pl.Expr:
        return pl.col("layer").sort_by([pl.col(col) if pick == "min" else -pl.col(col), pl.col("layer")]).first()

    return per_layer.group_by(keys, maintain_order=True).agg(
        pl.col("cosine").mean().round(4).alias("mean_cosine"),
        pl.col("cosine").std(ddof=0).round(4).alias("std_cosine"),
        pl.col("cosine").median().round(4).alias("median_cosine"),
        pl.col("cosine").min().round(4).alias("min_cosine"),
        arg("cosine", "min").alias("most_divergent_layer"),
        pl.col("MAE").mean().round(4).alias("mean_MAE"),
        pl.col("MAE").std(ddof=0).round(4).alias("std_MAE"),
        pl.col("MAE").median().round(4).alias("median_MAE"),
        arg("MAE", "max").alias("max_MAE_layer"),
        pl.col("overlap").mean().round(4).alias("mean_overlap"),
        pl.col("overlap").std(ddof=0).round(4).alias("std_overlap"),
        pl.col("overlap").median().round(4).alias("median_overlap"),
        pl.col("overlap").min().round(4).alias("min_overlap"),
        arg("overlap", "min").alias("min_overlap_layer"),
    )


def _lab_layers(df: pl.DataFrame) -> pl.DataFrame:
    """Macro rows -> Activation Lab's per-layer columns: its source names and order, MAE, overlap."""
    order = pl.col("source").replace_strict(
        {s: i for i, s in enumerate(SCENARIO_SOURCES)}, default=len(SCENARIO_SOURCES)
    )
    return (
        df.with_columns(source_order=order)
        .sort("source_order", maintain_order=True)
        .drop("source_order")
        .with_columns(pl.col("source").replace_strict(LAB_SOURCE, default=pl.col("source")))
        .rename({"mae": "MAE", "jaccard": "overlap"})
    )


def _rounded(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("cosine", "MAE", "overlap").round(4))


def intra_run_tables(wh, run: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """intra_run_report and intra_run_cosines rows (one 'run' per generation of the scenario run)."""
    gens = generations(wh, run)
    name = {d: run if gens.height == 1 else f"{run}/{d}" for d in gens["doc_id"]}
    rows = _lab_layers(_sql(wh, "SELECT * FROM drift(?)", run)).with_columns(run=pl.col("doc_id").replace_strict(name))
    summary = per_layer_summary(rows, ["run", "doc_id", "source"]).join(
        gens.select("doc_id", "generated", "prompt"), on="doc_id", how="left"
    )
    return (
        summary.select("run", "generated", "prompt", "source", *SUMMARY_COLUMNS),
        _rounded(rows).select("run", "source", "layer", "cosine", "MAE", "overlap"),
    )


def comparison_tables(wh, runs: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """comparison_report and comparison_cosines rows for every pair of runs (initial and final states)."""
    reports, cosines = [], []
    ids = ["pair", "run_a", "run_b", "generated_a", "generated_b"]
    report_columns = ["state", *ids, "prompt_a", "prompt_b", "source", *SUMMARY_COLUMNS]
    cosine_columns = ["state", *ids, "source", "layer", "cosine", "MAE", "overlap"]
    for run_a, run_b in combinations(runs, 2):
        gen_a, gen_b = generations(wh, run_a).row(-1, named=True), generations(wh, run_b).row(-1, named=True)
        values = {
            "pair": f"{run_a}  vs  {run_b}",
            "run_a": run_a,
            "run_b": run_b,
            "generated_a": gen_a["generated"].replace("\n", " ").strip()[:40] or run_a,
            "generated_b": gen_b["generated"].replace("\n", " ").strip()[:40] or run_b,
        }
        layers = _lab_layers(_sql(wh, "SELECT * FROM run_compare(?, ?)", run_a, run_b)).with_columns(
            **{k: pl.lit(v) for k, v in values.items()}
        )
        cosines.append(_rounded(layers).select(cosine_columns))
        summary = per_layer_summary(layers, ["state", "source"])
        reports.append(
            summary.with_columns(
                **{k: pl.lit(v) for k, v in values.items()},
                prompt_a=pl.lit(gen_a["prompt"].strip()),
                prompt_b=pl.lit(gen_b["prompt"].strip()),
            ).select(report_columns)
        )
    return (
        pl.concat(reports) if reports else pl.DataFrame(schema={c: pl.String for c in report_columns}),
        pl.concat(cosines) if cosines else pl.DataFrame(schema={c: pl.String for c in cosine_columns}),
    )


def write_csvs(wh, run: str, folder: Path, compare: list[str] = ()) -> list[Path]:
    """Activation Lab's four CSV summaries, same file names and columns."""
    check_output_folder(folder, "--csv")
    for other in compare:
        _check_scenario_run(wh, other)
    intra_report, intra_cosines = intra_run_tables(wh, run)
    report, cosines = comparison_tables(wh, [run, *compare])
    written = []
    with output_folder(folder, "report CSVs", "--csv"):
        for name, df in (
            ("comparison_report", report),
            ("comparison_cosines", cosines),
            ("intra_run_report", intra_report),
            ("intra_run_cosines", intra_cosines),
        ):
            path = Path(folder) / f"{name}.csv"
            df.write_csv(path)
            written.append(path)
    return written


# -- HTML -------------------------------------------------------------------------
def table_html(df: pl.DataFrame, digits: int = 4) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in df.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sections(wh, run: str) -> list[tuple[str, object]]:
    """(title, chart or HTML string) in page order."""
    out: list[tuple[str, object]] = []
    gens = generations(wh, run)
    main = gens.row(-1, named=True)
    shown = (
        main["generated"] if main["generated"].strip() else repr(main["generated"])
    )  # a random model's bytes stay visible
    out.append(("Generation", f"<p><b>{html.escape(main['doc_id'])}</b> generated:</p><pre>{html.escape(shown)}</pre>"))
    sim = similarity(wh, run)
    if sim.height:
        out.append(("Message × reference", charts.reference_heatmap(sim)))
        out.append(("Reference summary", table_html(_sql(wh, "SELECT * FROM ref_summary(?)", run))))
        out.append(("Per-layer metrics vs references", charts.layer_lines(sim)))
        out.append(("User vs assistant", charts.role_averages(sim)))
    all_drift = _sql(wh, "SELECT * FROM drift(?)", run)
    drift = all_drift.filter(pl.col("source").is_in(run_sources(wh, run)))
    if drift.height:
        out.append(("Drift", charts.drift_lines(drift)))
    lens = _sql(wh, "SELECT * FROM logit_lens WHERE run_id = ? AND doc = ? ORDER BY step, layer", run, main["doc"])
    if lens.height:
        out.append(("Logit lens", charts.logit_lens_table(lens)))
    steps = _sql(wh, "SELECT * FROM steps WHERE run_id = ? AND doc = ? ORDER BY step", run, main["doc"])
    if steps.height and steps["top_ids"].list.len().max():
        out.append(("Generation top-k explorer", charts.topk_explorer(steps)))
    if set(SCENARIO_SOURCES) <= set(run_sources(wh, run)):
        decomposition = _sql(
            wh, "SELECT * FROM residual_decomposition(?) WHERE role = 'generated' AND doc_id = ?", run, main["doc_id"]
        )
        out.append(("Residual decomposition", charts.residual_lines(decomposition)))
    for site in latent_sites(wh, run):
        out += _latent_sections(wh, run, site, main["doc"], all_drift.filter(pl.col("source") == site))
    quality = dictionary_quality(wh, run)
    if quality.height:
        out.append(("Dictionary quality", table_html(quality)))
    return out


def _latent_sections(wh, run: str, site: str, doc: int, drift: pl.DataFrame) -> list[tuple[str, object]]:
    """The comparisons of one dictionary site's latents, and its strongest latents at the final step."""
    out: list[tuple[str, object]] = []
    sim = similarity(wh, run, [site])
    if sim.height:
        out.append((f"Latents of {site}: message × reference", charts.reference_heatmap(sim)))
        out.append((f"Latents of {site}: per-layer metrics vs references", charts.layer_lines(sim)))
    if drift.height:
        out.append((f"Latents of {site}: drift", charts.drift_lines(drift)))
    top = top_latents(wh, run, site, doc)
    if top.height:
        out.append((f"Latents of {site}: strongest at the final step", charts.latent_bars(top)))
    return out


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1e293b; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #cbd5e1; }}
table {{ border-collapse: collapse; font-size: 0.8rem; }} th, td {{ border: 1px solid #e2e8f0; padding: 2px 6px; text-align: right; }}
pre {{ background: #f1f5f9; padding: 0.5rem; white-space: pre-wrap; }} .meta {{ color: #64748b; font-size: 0.85rem; }}
</style>
<script>{bundle}</script>
</head><body>
<h1>{title}</h1>
<p class="meta">{meta}</p>
{body}
<script>
window.whqErrors = []; window.whqRendered = 0;
const specs = {specs};
for (const [id, spec] of Object.entries(specs)) {{
  vegaEmbed('#' + id, spec, {{renderer: 'svg', actions: false}})
    .then(() => {{ window.whqRendered += 1; document.getElementById(id).dataset.rendered = 'yes'; }})
    .catch(err => {{ window.whqErrors.push(String(err)); document.getElementById(id).textContent = 'chart failed: ' + err; }});
}}
</script>
</body></html>
"""


def render_html(wh, run: str) -> str:
    import vl_convert

    manifest = wh.manifest(run)
    scenario = manifest["config"].get("scenario", {})
    blocks, specs = [], {}
    for index, (title, item) in enumerate(sections(wh, run)):
        if isinstance(item, str):
            blocks.append(f"<h2>{html.escape(title)}</h2>{item}")
        else:
            specs[f"chart{index}"] = item.to_dict()
            blocks.append(f'<h2>{html.escape(title)}</h2><div id="chart{index}" class="chart"></div>')
    meta = (
        f"run {html.escape(run)} · scenario {html.escape(str(scenario.get('name', '?')))} · model "
        f"{html.escape(str(manifest['config'].get('model_id', '?')))} · written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    )
    vl_version = ".".join(__import__("altair").SCHEMA_VERSION.lstrip("v").split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    return PAGE.format(
        title=f"whq scenario report: {html.escape(run)}",
        meta=meta,
        body="\n".join(blocks),
        bundle=bundle.replace("</script", "<\\/script"),
        specs=script_json(specs),
    )


def write_report(
    wh, run: str, out: str | Path, csv_dir: str | Path | None = None, compare: list[str] = ()
) -> list[Path]:
    """Write the HTML report (and the CSVs when csv_dir is given); returns the paths written."""
    for name in (run, *compare):
        check_name("run id", name)
    out = check_output_file(out)
    if csv_dir is not None:
        check_output_folder(csv_dir, "--csv")
    _check_scenario_run(wh, run)
    page = render_html(wh, run)
    ensure_parent(out).write_text(page, encoding="utf-8")
    written = [out]
    if csv_dir is not None:
        written += write_csvs(wh, run, Path(csv_dir), list(compare))
    return written
