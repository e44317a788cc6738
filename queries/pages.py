"""Unit pages: the HTML views of `whq serve` and `whq export site`, rendered from page_data's reads.

Each page is a pure function of the warehouse: a `*_page` function takes page_data's rows
and renders one Jinja2 template of queries/templates/. Where a page's links point is the
only thing that differs between the server and the static export: `Links` gives the
server's routes, `Links(static_from=...)` the exported files relative to the page being
written. Charts are queries/charts.py's altair charts, drawn in the browser by vega-embed
from vl-convert's bundle, served once (/_whq/vega.js, or vega.js beside the exported files)
rather than inlined in every page: a site of 9,216 unit pages would otherwise carry 0.9 MB
of JavaScript in each.
"""

from __future__ import annotations

import html
import math
import posixpath
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlencode

import polars as pl

from warehouse import jsonio
from warehouse.errors import NotFound, QueryError
from warehouse.result_bounds import unshowable_values
from warehouse.user_cache import cached_text

from . import charts
from .page_data import (
    BEFORE,
    PAGE_SIZE,
    SORTS,
    Reader,
    check_layer,
    check_sort,
    check_unit,
    explanation_hits,
    keeps_examples,
    layer_histograms,
    layer_summary,
    neighbours,
    runs,
    scored_columns,
    site_info,
    site_units,
    token_hits,
    token_text,
    unit_data,
    unit_explanations,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
SQL_ROWS = 1000  # rows of the SQL box's table (the CSV download has them all)
SQL_CELL_CHARS = 1000  # characters of one value in the SQL box's table (the CSV download has them all)


@lru_cache(maxsize=1)
def vega_bundle() -> str:
    """vega + vega-lite + vega-embed from vl-convert, for the Vega-Lite version altair writes; bundling
    takes seconds, so it is kept in whq's cache folder per vl-convert and Vega-Lite version."""
    import altair
    import vl_convert

    version = ".".join(altair.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return cached_text(
        f"vega-bundle-{vl_convert.__version__}-vl{version}.js",
        lambda: vl_convert.javascript_bundle(vl_version=version),
    )


@lru_cache(maxsize=1)
def environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _number
    env.filters["lens_token"] = lens_token
    return env


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:,.{digits}g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


_BLANKS = str.maketrans({" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"})


def lens_token(row: dict) -> str:
    """A logit-lens token made visible: whitespace as ␣ ⏎ ⇥, control characters escaped, a token
    with no text as its id."""
    text = row["token"]
    if not text:
        return f"id {row['token_id']}"
    text = text.translate(_BLANKS)
    return text if text.isprintable() else repr(text)[1:-1]


# -- links -------------------------------------------------------------------------------------


class Links:
    """The URLs a page links to: server routes (carrying `token`, the server's per-launch token, when
    the page was opened with it, so the SQL box stays one click away), or (static_from = the page's
    own path inside an export) relative paths to the exported files, None where the export has no
    such page."""

    def __init__(self, static_from: str | None = None, token: str | None = None):
        self.static_from = static_from
        self.token = token

    @property
    def static(self) -> bool:
        return self.static_from is not None

    def _rel(self, path: str) -> str:
        return posixpath.relpath(path, posixpath.dirname(self.static_from) or ".")

    def _route(self, path: str, query: dict | None = None) -> str:
        query = {k: v for k, v in {**(query or {}), "token": self.token}.items() if v is not None}
        return path + (f"?{urlencode(query)}" if query else "")

    def vega(self) -> str:
        return self._rel("vega.js") if self.static else "/_whq/vega.js"

    def home(self) -> str | None:
        return None if self.static else self._route("/")

    def site(self, run: str, site: str, layer: int | None = None, **params) -> str:
        if self.static:
            return self._rel(f"layer-{layer}.html" if layer is not None else "index.html")
        return self._route(f"/{quote(run, safe='')}/{quote(site, safe='')}", {"layer": layer, **params})

    def unit(self, run: str, site: str, layer: int, unit: int) -> str:
        if self.static:
            return self._rel(f"{layer}/{unit}.html")
        return self._route(f"/{quote(run, safe='')}/{quote(site, safe='')}/{layer}/{unit}")

    def tokens(self, run: str, site: str, text: str | None = None) -> str | None:
        if self.static:
            return None
        return self._route(f"/{quote(run, safe='')}/{quote(site, safe='')}/tokens", {"q": text or None})

    def explanations(self, run: str, site: str, text: str | None = None) -> str | None:
        if self.static:
            return None
        return self._route(f"/{quote(run, safe='')}/{quote(site, safe='')}/explanations", {"q": text or None})

    def sql(self, query: str | None = None, csv: bool = False) -> str | None:
        if self.static:
            return None
        return self._route("/sql.csv" if csv else "/sql", {"q": query or None})


# -- rendering helpers -------------------------------------------------------------------------


def _render(template: str, links: Links, title: str, specs: dict | None = None, **context) -> str:
    return (
        environment()
        .get_template(template)
        .render(links=links, title=title, specs=jsonio.script_json(specs or {}), **context)
    )


def _spec(chart) -> dict:
    # Not validated against Vega-Lite's JSON schema here: that was most of a page's chart time, and the
    # chart functions' specs are validated in tests/test_neuron_macros.py (test_charts_draw_the_macros_rows).
    return chart.to_dict(validate=False)


def shaded(tokens: list[dict], fire: int, scale: float, negative_scale: float | None = None):
    """A context window as HTML: one span per token, its background orange for a positive value and
    blue for a negative one, opacity |value| / scale (/ `negative_scale` for negative values where
    given), the value as its title; `fire` (the example's
    own token) outlined; a line break shows as ⏎, so each window stays one line. Built here rather
    than in the template: Jinja's per-token escaping and attribute lookups made most of
    `whq export site`'s time (259 golden pages: 12.3 s, now 2.9 s)."""
    from markupsafe import Markup

    spans = []
    for i, token in enumerate(tokens):
        value = token.get("value")
        by = negative_scale if negative_scale and (value or 0) < 0 else scale
        alpha = 0.0 if value is None or not by else min(1.0, abs(value) / by)
        kind = " neg" if (value or 0) < 0 else ""
        # the colour is CSS's (.tok, .tok.neg); the span carries only its opacity: a demo unit page
        # holds ~4,300 spans, and a full rgba() style in each made it 0.5 MB
        spans.append(
            f'<span class="tok{kind}{" fire" if i == fire else ""}" style="--a:{alpha:.2f}" '
            f'title="{_number(value)}">{html.escape(token_text(token).replace(chr(10), "⏎"), quote=False)}</span>'
        )
    return Markup("".join(spans))


def _examples(rows: list[dict], before: int, scale: float, negative_scale: float | None = None) -> list[dict]:
    return [{**row, "shaded": shaded(row["tokens"], min(row["pos"], before), scale, negative_scale)} for row in rows]


# -- pages -------------------------------------------------------------------------------------


def home_page(reader: Reader, links: Links) -> str:
    return _render("home.html", links, "whq: runs", runs=runs(reader))


def site_page(
    reader: Reader,
    links: Links,
    run: str,
    site: str,
    layer: int | None = None,
    sort: str = "neuron",
    order: str = "asc",
    page: int = 1,
    page_size: int | None = PAGE_SIZE,
    layers: list[int] | None = None,
    summary: pl.DataFrame | None = None,
) -> str:
    """`summary`: the site's layer_summary rows when the caller already has them (the export, once for all layers)."""
    info = site_info(reader, run, site, layers)
    layer = info["layers"][0] if layer is None else layer
    check_layer(info, run, site, layer)
    explained = reader.explained(run, site)
    check_sort(sort, order, explained)
    if summary is None:
        summary = layer_summary(reader, run, site)
    rate_hist, sel_hist = layer_histograms(reader, run, site, layer)
    n_pages = 1 if page_size is None else max(1, -(-info["width"] // page_size))
    if not 1 <= page <= n_pages:
        raise NotFound(f"layer {layer} of site {site!r} has pages 1..{n_pages}; there is no page {page}")
    limit = info["width"] if page_size is None else page_size
    units = site_units(reader, run, site, layer, sort, order, limit, (page - 1) * limit, explained)
    scorers = scored_columns(reader, run, site) if explained else []
    specs = {
        "chart-layers": _spec(charts.layer_summary_chart(summary)),
        "chart-rate": _spec(charts.rate_histogram_chart(rate_hist, title=f"firing rate, layer {layer}")),
        "chart-selectivity": _spec(
            charts.selectivity_histogram_chart(sel_hist, title=f"selectivity, layer {layer}", log=True)
        ),
    }
    return _render(
        "site.html",
        links,
        f"{run} / {site}",
        specs,
        run=run,
        site=site,
        info=info,
        layer=layer,
        summary=summary.to_dicts(),
        units=units,
        sort=sort,
        order=order,
        page=page,
        n_pages=n_pages,
        columns=SORTS,
        explained=explained,
        scorers=scorers,
        headers=[*SORTS, "explanation", *scorers] if explained else list(SORTS),
    )


def unit_page(
    reader: Reader,
    links: Links,
    run: str,
    site: str,
    layer: int,
    unit: int,
    layers: list[int] | None = None,
    data: dict | None = None,
) -> str:
    """The unit page; `data` is unit_data's entry for the unit when the caller read it already."""
    info = site_info(reader, run, site, layers)
    check_unit(info, run, site, layer, unit)
    with reader.scope(run, site, layer):  # every statement below reads this run, site and layer alone
        data = data or unit_data(reader, info, run, site, layer, unit)[unit]
        explanations = unit_explanations(reader, run, site, layer, unit)
    stats = data["stats"]
    scale = max(abs(stats["max"] or 0.0), abs(stats["min"] or 0.0), 1e-12)
    specs = {}
    # The most negative values of a signed unit (stored where the capture kept examples=N); a unit
    # that never fired can still have them.
    bottom = [("Most negative activations", "bottom", data["examples"]["bottom"])] if data["examples"]["bottom"] else []
    # A GELU/SiLU unit's negative part is small next to its maximum (demo: -0.17 vs 1.99): shaded on the
    # common scale its most negative examples were near-white, so that section shades negatives by |min|.
    negative_scale = {"bottom": abs(stats["min"] or 0.0) or None}
    sections = [(name, kind, _examples(rows, BEFORE, scale, negative_scale[kind])) for name, kind, rows in bottom]
    if not keeps_examples(info):
        no_examples = f"This site kept no examples: re-ingest with --site {site}:{info['reductions']},examples=20."
    elif not stats["n_fired"]:
        no_examples = "This unit never fired: no firing examples."
    else:
        no_examples = None
        quantiles = [{**row, "rank": f"q{row['quantile']}.{row['rank']}"} for row in data["examples"]["quantile"]]
        sections = [
            (name, kind, _examples(rows, BEFORE, scale, negative_scale.get(kind)))
            for name, kind, rows in (
                ("Top activations", "top", data["examples"]["top"]),
                *bottom,
                ("Examples across the activation range (quantile bins, lowest first)", "quantile", quantiles),
                ("Random firing examples", "random", data["examples"]["random"]),
            )
            if rows or kind != "quantile"
        ]
    if data["histogram"]:
        specs["chart-hist"] = _spec(
            charts.unit_histogram_chart(pl.DataFrame(data["histogram"]), title=f"unit {unit}: activation histogram")
        )
    before, after = neighbours(info, layer, unit)
    return _render(
        "unit.html",
        links,
        f"{run} / {site} / layer {layer} / unit {unit}",
        specs,
        run=run,
        site=site,
        layer=layer,
        unit=unit,
        info=info,
        stats=stats,
        sections=sections,
        no_examples=no_examples,
        quantile_bins=_bins(data["examples"]["quantile"]),
        has_histogram=bool(specs),
        lens_top=data["lens"]["top"],
        lens_bottom=data["lens"]["bottom"],
        similar=data["similar"],
        prev=before,
        next=after,
        explanations=explanations,
    )


def _bins(rows: list[dict]) -> list[dict]:
    """The quantile bins the examples came from: value range and exact shares of the firing tokens."""
    seen = {}
    for row in rows:
        seen.setdefault(row["quantile"], {k: row[k] for k in ("quantile", "lo", "hi", "share_lo", "share_hi")})
    return list(seen.values())


def tokens_page(reader: Reader, links: Links, run: str, site: str, text: str = "", limit: int = 50) -> str:
    info = site_info(reader, run, site)
    hits = token_hits(reader, run, site, text, limit)
    return _render(
        "tokens.html", links, f"{run} / {site}: token search", run=run, site=site, info=info, text=text, hits=hits
    )


def explanations_page(reader: Reader, links: Links, run: str, site: str, text: str = "") -> str:
    info = site_info(reader, run, site)
    hits = explanation_hits(reader, run, site, text)
    return _render(
        "explanations.html",
        links,
        f"{run} / {site}: explanation search",
        run=run,
        site=site,
        info=info,
        text=text,
        hits=hits,
        explained=reader.explained(run, site),
    )


def sql_result(reader: Reader, query: str, limits=None) -> pl.DataFrame:
    return reader.untrusted(query, limits).frame


def sql_cell(value) -> str:
    """One value of the SQL box's table as text: numbers as everywhere on the pages, a long value cut
    to SQL_CELL_CHARS characters (the CSV download has it whole). The one place the SQL box formats values."""
    text = _number(value) if value is None or isinstance(value, (int, float)) else str(value)
    if len(text) > SQL_CELL_CHARS:
        return f"{text[:SQL_CELL_CHARS]}… ({len(text):,} characters; the CSV download has them all)"
    return text


def sql_rows(frame: pl.DataFrame) -> list[list[str]]:
    """The first SQL_ROWS rows of a result as sql_cell texts; QueryError for a value Polars cannot convert."""
    with unshowable_values():
        return [[sql_cell(v) for v in row] for row in frame.head(SQL_ROWS).rows()]


def sql_page(reader: Reader, links: Links, query: str = "", limits=None) -> tuple[str, int]:
    """(page, status): 400 with the one-line refusal when the SQL is refused or fails; `limits`
    (safesql.SqlLimits, its defaults when None) bound the query."""
    frame, error, truncated, rows = None, None, False, []
    if query.strip():
        try:
            result = reader.untrusted(query, limits)
            frame, truncated = result.frame, result.truncated
            rows = sql_rows(frame)
        except QueryError as err:
            frame, error = None, " ".join(str(err).split())
    page = _render(
        "sql.html",
        links,
        "whq: SQL",
        query=query,
        error=error,
        columns=frame.columns if frame is not None else [],
        rows=rows,
        n_rows=frame.height if frame is not None else 0,
        shown=len(rows),
        truncated=truncated,
    )
    return page, 400 if error else 200


def missing_page(links: Links, message: str) -> str:
    return _render("missing.html", links, "not found", message=message)
