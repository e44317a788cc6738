"""Unit pages: the HTML views of `whq serve` and `whq export site`, built from the macros.

Each page is a pure function of the warehouse: a `*_page` function gathers the macros'
rows into a dict and renders one Jinja2 template of queries/templates/. Where a page's
links point is the only thing that differs between the server and the static export:
`Links` gives the server's routes, `Links(static_from=...)` the exported files relative
to the page being written. Charts are queries/charts.py's altair charts, drawn in the
browser by vega-embed from vl-convert's bundle, served once (/_whq/vega.js, or vega.js
beside the exported files) rather than inlined in every page: a site of 9,216 unit pages
would otherwise carry 0.9 MB of JavaScript in each.

Reads go through `Reader`: the trusted macros on a per-thread cursor of one read-only
connection (the server answers from a thread pool), and the SQL box's untrusted text
through `safesql.run_read_only`, what `whq sql --read-only` runs (both walls, timeout, memory
limit, row cap).
"""

from __future__ import annotations

import html
import json
import math
import posixpath
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlencode

import duckdb
import polars as pl

from warehouse.errors import BadInput, NotFound, QueryError, UnknownRun

from . import charts
from .frames import kept_reductions

TEMPLATES = Path(__file__).resolve().parent / "templates"
PAGE_SIZE = 100  # units per page of the run/site table (server; the export lists a layer on one page)
TOP_K, N_RANDOM = 20, 10
BEFORE, AFTER = 24, 8  # tokens of context shown before / after the firing token
SQL_ROWS = 1000  # rows of the SQL box's table (the CSV download has them all)
SORTS = ("neuron", "rate", "mean", "min", "max", "skewness", "kurtosis", "selectivity")  # the units table's columns


@lru_cache(maxsize=1)
def vega_bundle() -> str:
    """vega + vega-lite + vega-embed from vl-convert, for the Vega-Lite version altair writes."""
    import altair
    import vl_convert

    version = ".".join(altair.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return vl_convert.javascript_bundle(vl_version=version)


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
    """The URLs a page links to: server routes, or (static_from = the page's own path inside an
    export) relative paths to the exported files, None where the export has no such page."""

    def __init__(self, static_from: str | None = None):
        self.static_from = static_from

    @property
    def static(self) -> bool:
        return self.static_from is not None

    def _rel(self, path: str) -> str:
        return posixpath.relpath(path, posixpath.dirname(self.static_from) or ".")

    def vega(self) -> str:
        return self._rel("vega.js") if self.static else "/_whq/vega.js"

    def home(self) -> str | None:
        return None if self.static else "/"

    def site(self, run: str, site: str, layer: int | None = None, **params) -> str:
        if self.static:
            return self._rel(f"layer-{layer}.html" if layer is not None else "index.html")
        query = {k: v for k, v in {"layer": layer, **params}.items() if v is not None}
        return f"/{quote(run, safe='')}/{quote(site, safe='')}" + (f"?{urlencode(query)}" if query else "")

    def unit(self, run: str, site: str, layer: int, unit: int) -> str:
        if self.static:
            return self._rel(f"{layer}/{unit}.html")
        return f"/{quote(run, safe='')}/{quote(site, safe='')}/{layer}/{unit}"

    def tokens(self, run: str, site: str, text: str | None = None) -> str | None:
        if self.static:
            return None
        return f"/{quote(run, safe='')}/{quote(site, safe='')}/tokens" + (f"?{urlencode({'q': text})}" if text else "")

    def sql(self, query: str | None = None, csv: bool = False) -> str | None:
        if self.static:
            return None
        return ("/sql.csv" if csv else "/sql") + (f"?{urlencode({'q': query})}" if query else "")


# -- reads -------------------------------------------------------------------------------------


class Reader:
    """The pages' reads: trusted macros on per-thread cursors, untrusted SQL on the guarded path."""

    def __init__(self, wh):
        self.wh = wh
        self._con = wh.connect()
        # Each statement binds the views over every Parquet part of their tables: keeping the parts'
        # footers in memory halves the planning of the unit page's macros (they are most of its time).
        self._con.execute("SET GLOBAL parquet_metadata_cache = true")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sites: dict[str, list[dict]] | None = None

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            with self._lock:
                cursor = self._local.cursor = self._con.cursor()
        return cursor

    def rows(self, query: str, params: list | None = None) -> list[dict]:
        # fetchall, not .pl() or Arrow: on the pages' small results those add ~14 ms a statement
        cursor = self._cursor()
        try:
            values = cursor.execute(query, params or []).fetchall()
        except duckdb.Error as err:  # macros check their arguments when the rows are fetched
            raise QueryError(str(err).splitlines()[0].removeprefix("Invalid Input Error: ")) from None
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in values]

    def frame(self, query: str, params: list | None = None) -> pl.DataFrame:
        return pl.DataFrame(self.rows(query, params), infer_schema_length=None)

    def sites(self) -> dict[str, list[dict]]:
        """{run: its rows of `sites`}, read once: the connection sees the catalog as it was when opened."""
        if self._sites is None:
            rows = self.rows(
                "SELECT r.run_id, s.site, s.layers, s.width, s.reductions, s.threshold FROM runs r "
                "LEFT JOIN sites s USING (run_id) ORDER BY r.run_id, s.site"
            )
            self._sites = {}
            for row in rows:
                self._sites.setdefault(row.pop("run_id"), []).extend([row] if row["site"] is not None else [])
        return self._sites

    def untrusted(self, query: str):
        """Untrusted SQL through safesql.run_read_only, what `whq sql --read-only` runs: both walls,
        its timeout, memory limit and row cap (SqlLimits' defaults); a BoundedResult (frame, truncated)."""
        from warehouse.safesql import SqlLimits, run_read_only

        return run_read_only(self.wh, query, SqlLimits())

    def close(self) -> None:
        self._con.close()


# -- what exists -------------------------------------------------------------------------------


def runs(reader: Reader) -> list[dict]:
    """Committed runs with their model, sites, documents, tokens and bytes on disk."""
    rows = reader.rows(
        "SELECT run_id, model_id, n_layers, n_documents, n_tokens, strftime(created_at, '%Y-%m-%d %H:%M') AS created "
        "FROM runs ORDER BY created_at, run_id"
    )
    sites = reader.sites()
    for row in rows:
        row["sites"] = [{**s, "n_layers": len(s["layers"])} for s in sites[row["run_id"]]]
        row["bytes"] = sum(p["bytes"] for p in reader.wh.manifest(row["run_id"])["parts"])
    return rows


def site_info(reader: Reader, run: str, site: str, layers: list[int] | None = None) -> dict:
    """The site's row of `sites` (its layers narrowed to `layers` when given: an export of some
    layers links to those only); UnknownRun or NotFound naming the runs or sites that exist."""
    sites = reader.sites()
    if run not in sites:
        raise UnknownRun(f"no run {run!r} in this warehouse; its runs: {', '.join(sites) or 'none yet'}")
    rows = sites[run]
    found = [r for r in rows if r["site"] == site]
    if not found:
        raise NotFound(f"run {run!r} has no site {site!r}; its sites: {', '.join(r['site'] for r in rows)}")
    info = found[0]
    for layer in layers or ():
        check_unit(info, run, site, layer, 0)
    return {**info, "layers": sorted(layers)} if layers else info


def check_unit(info: dict, run: str, site: str, layer: int, unit: int) -> None:
    if layer not in info["layers"]:
        raise NotFound(
            f"site {site!r} of run {run!r} has no layer {layer}; its layers: {', '.join(map(str, info['layers']))}"
        )
    if not 0 <= unit < info["width"]:
        raise NotFound(f"site {site!r} of run {run!r} has units 0..{info['width'] - 1}; there is no unit {unit}")


def neighbours(info: dict, layer: int, unit: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(layer, unit) before and after this one, running on into the neighbouring layers."""
    layers = sorted(info["layers"])
    at = layers.index(layer)
    before = (layer, unit - 1) if unit > 0 else ((layers[at - 1], info["width"] - 1) if at > 0 else None)
    after = (layer, unit + 1) if unit + 1 < info["width"] else ((layers[at + 1], 0) if at + 1 < len(layers) else None)
    return before, after


# -- rendering helpers -------------------------------------------------------------------------


def _render(template: str, links: Links, title: str, specs: dict | None = None, **context) -> str:
    return (
        environment()
        .get_template(template)
        .render(links=links, title=title, specs=json.dumps(specs or {}).replace("</", "<\\/"), **context)
    )


def _spec(chart) -> dict:
    return chart.to_dict()


def token_text(token: dict) -> str:
    """A window token as pages and exports show it: as its document spells it (see _spell), else as
    the tokenizer decodes it (the piece in older runs)."""
    return token.get("spelled", token["text"]) or ""


def _spell(reader: Reader, run: str, rows: list[dict]) -> None:
    """Give each window token of `rows` (whq_examples / quantile_examples rows) its text as the
    document spells it: the characters from the end of the token before it to its own end, so the
    window reads as the document does whatever the tokenizer (WordPiece decoded alone loses the
    spaces between words, 'all' 'resolved'; byte-level BPE decodes each byte of 'é' alone to '�').
    Special tokens, which have no characters, keep their decoded text."""
    if not rows:
        return
    starts = [
        row["pos"] - min(row["pos"], BEFORE) for row in rows
    ]  # every position is stored: windows start at max(0, pos - before)
    spans = reader.rows(
        "SELECT DISTINCT d.doc_id, t.pos, t.char_start, t.char_end FROM (SELECT unnest(?::VARCHAR[]) AS doc_id, "
        "unnest(?::INTEGER[]) AS lo, unnest(?::INTEGER[]) AS hi) w JOIN documents d ON d.run_id = ? AND d.doc_id = w.doc_id "
        "JOIN tokens t ON t.run_id = d.run_id AND t.doc = d.doc AND t.pos BETWEEN w.lo AND w.hi "
        "WHERE NOT t.special AND t.char_start IS NOT NULL",
        [[r["doc_id"] for r in rows], starts, [lo + len(r["tokens"]) - 1 for r, lo in zip(rows, starts)], run],
    )
    at = {(s["doc_id"], s["pos"]): (s["char_start"], s["char_end"]) for s in spans}
    texts = {
        r["doc_id"]: r["text"]
        for r in reader.rows(
            "SELECT doc_id, text FROM documents WHERE run_id = ? AND doc_id IN (SELECT unnest(?::VARCHAR[]))",
            [run, sorted({r["doc_id"] for r in rows})],
        )
    }
    for row, lo in zip(rows, starts):
        text, end = texts[row["doc_id"]], None
        for i, token in enumerate(row["tokens"]):
            span = at.get((row["doc_id"], lo + i))
            if span is not None:
                start = span[0] if end is None else end  # a character several tokens share shows on the first
                token["spelled"] = text[start : span[1]]
                end = span[1] if end is None else max(end, span[1])


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
    check_unit(info, run, site, layer, 0)
    if sort not in SORTS or order not in ("asc", "desc"):
        raise BadInput(f"sort by one of {', '.join(SORTS)}, order asc or desc")
    if summary is None:
        summary = reader.frame("SELECT * FROM layer_summary(?, ?)", [run, site])
    rate_hist = reader.frame("SELECT * FROM rate_histogram(?, ?, ?)", [run, site, layer])
    sel_hist = reader.frame("SELECT * FROM selectivity_histogram(?, ?, ?, log := true)", [run, site, layer])
    n_pages = 1 if page_size is None else max(1, -(-info["width"] // page_size))
    if not 1 <= page <= n_pages:
        raise NotFound(f"layer {layer} of site {site!r} has pages 1..{n_pages}; there is no page {page}")
    limit = info["width"] if page_size is None else page_size
    units = reader.rows(  # `sort` is one of SORTS, checked above
        f"SELECT u.neuron, u.rate, u.mean, u.min, u.max, u.skewness, u.kurtosis, x.selectivity "
        f"FROM unit_stats(?, ?, ?) u JOIN selectivity(?, ?, ?) x ON x.neuron = u.neuron "
        f"ORDER BY {sort} {order.upper()} NULLS LAST, u.neuron LIMIT ? OFFSET ?",
        [run, site, layer, run, site, layer, limit, (page - 1) * limit],
    )
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
    )


def _keeps_examples(info: dict) -> bool:
    """Whether whq_examples has a source: examples=N, or a threshold capture's every firing."""
    kept = kept_reductions(info)
    return "examples" in kept or "threshold" in kept


def unit_data(reader: Reader, info: dict, run: str, site: str, layer: int, unit: int | None = None) -> dict[int, dict]:
    """{unit: what its page shows} for one unit, or (unit None) every unit of the layer, as the
    static export reads them: a few statements per layer, plus one per fired unit for the
    quantile examples and similar units (their macros take one unit)."""
    params = [run, site, layer, unit, unit]
    kept = kept_reductions(info)
    stats = reader.rows(
        "SELECT u.*, s.n_tokens, s.n_fired, s.max_doc, s.max_pos, x.selectivity "
        "FROM unit_stats(?, ?, ?) u JOIN selectivity(?, ?, ?) x ON x.neuron = u.neuron "
        "JOIN neuron_stats s ON s.run_id = ? AND s.site = ? AND s.layer = ? AND s.neuron = u.neuron "
        "WHERE (? IS NULL OR u.neuron = ?) ORDER BY u.neuron",
        [run, site, layer, run, site, layer, *params],
    )
    data = {
        row["neuron"]: {
            "stats": row,
            "examples": {"top": [], "bottom": [], "random": [], "quantile": []},
            "lens": {"top": [], "bottom": []},
            "histogram": [],
            "similar": {"decoder": [], "coactivation": []},
        }
        for row in stats
    }
    fired = [row["neuron"] for row in stats if row["n_fired"]]
    if fired and _keeps_examples(info):
        macro_args = [run, site, layer, unit]
        for row in reader.rows(  # one statement: half the time of two on the golden warehouse
            "SELECT 'top' AS kind, * FROM whq_examples(?, ?, ?, ?, 'top', ?, ?, ?, 0) UNION ALL "
            "SELECT 'random', * FROM whq_examples(?, ?, ?, ?, 'random', ?, ?, ?, 0) ORDER BY neuron, kind DESC, rank",
            [*macro_args, TOP_K, BEFORE, AFTER, *macro_args, N_RANDOM, BEFORE, AFTER],
        ):
            data[row["neuron"]]["examples"][row["kind"]].append(row)
    if "examples" in kept and any((row["min"] or 0) < 0 for row in stats):  # signed units, fired or not
        for row in reader.rows(
            "SELECT * FROM whq_examples(?, ?, ?, ?, 'bottom', ?, ?, ?, 0) ORDER BY neuron, rank",
            [run, site, layer, unit, TOP_K, BEFORE, AFTER],
        ):
            data[row["neuron"]]["examples"]["bottom"].append(row)
    for row in reader.rows(
        "SELECT g.neuron, g.direction, g.rank, g.token_id, coalesce(g.text, g.token) AS token, g.logit "
        "FROM neuron_logits g WHERE g.run_id = ? AND g.site = ? AND g.layer = ? "
        "AND (? IS NULL OR g.neuron = ?) ORDER BY g.neuron, g.direction DESC, g.rank",
        params,
    ):
        data[row["neuron"]]["lens"][row["direction"]].append(row)
    if "hist" in kept:  # the table unit_histogram reads, for every unit at once; empty bins are not stored
        for row in reader.rows(
            "SELECT u.neuron, CAST(u.bin AS INTEGER) AS bin, whq_hist_lo(u.bin) AS lo, "
            "whq_hist_hi(u.bin) AS hi, u.count FROM unit_histograms u WHERE u.run_id = ? AND u.site = ? "
            "AND u.layer = ? AND (? IS NULL OR u.neuron = ?) ORDER BY u.neuron, u.bin",
            params,
        ):
            data[row["neuron"]]["histogram"].append(row)
    for neuron in fired:
        if "quantiles" in kept and "hist" in kept:
            data[neuron]["examples"]["quantile"] = reader.rows(
                "SELECT * FROM quantile_examples(?, ?, ?, ?, before := ?, after := ?)",
                [run, site, layer, neuron, BEFORE, AFTER],
            )
        for row in reader.rows("SELECT * FROM similar_units(?, ?, ?, ?)", [run, site, layer, neuron]):
            data[neuron]["similar"][row["kind"]].append(row)
    _spell(reader, run, [row for d in data.values() for rows in d["examples"].values() for row in rows])
    return data


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
    data = data or unit_data(reader, info, run, site, layer, unit)[unit]
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
    if not _keeps_examples(info):
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
    )


def _bins(rows: list[dict]) -> list[dict]:
    """The quantile bins the examples came from: value range and exact shares of the firing tokens."""
    seen = {}
    for row in rows:
        seen.setdefault(row["quantile"], {k: row[k] for k in ("quantile", "lo", "hi", "share_lo", "share_hi")})
    return list(seen.values())


def tokens_page(reader: Reader, links: Links, run: str, site: str, text: str = "", limit: int = 50) -> str:
    info = site_info(reader, run, site)
    hits = reader.rows("SELECT * FROM units_for_token(?, ?, ?) LIMIT ?", [run, site, text, limit]) if text else []
    return _render(
        "tokens.html", links, f"{run} / {site}: token search", run=run, site=site, info=info, text=text, hits=hits
    )


def sql_result(reader: Reader, query: str) -> pl.DataFrame:
    return reader.untrusted(query).frame


def sql_page(reader: Reader, links: Links, query: str = "") -> tuple[str, int]:
    """(page, status): 400 with the one-line refusal when the SQL is refused or fails."""
    frame, error, truncated = None, None, False
    if query.strip():
        try:
            result = reader.untrusted(query)
            frame, truncated = result.frame, result.truncated
        except QueryError as err:
            error = " ".join(str(err).split())
    rows = frame.head(SQL_ROWS).rows() if frame is not None else []
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


def csv_text(frame: pl.DataFrame) -> str:
    nested = [c for c, t in frame.schema.items() if t.is_nested()]
    flat = frame.with_columns(
        pl.Series(c, [json.dumps(v, default=str) for v in frame[c].to_list()], pl.String) for c in nested
    )
    return flat.write_csv()


def missing_page(links: Links, message: str) -> str:
    return _render("missing.html", links, "not found", message=message)


# -- static export -----------------------------------------------------------------------------


def write_site(wh, run: str, site: str, out: str | Path, layers: list[int] | None = None) -> dict:
    """The run/site and unit pages as static files under `out` (open index.html from file://)."""
    out = Path(out)
    reader = Reader(wh)
    try:
        info = site_info(reader, run, site, layers)
        layers = info["layers"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "vega.js").write_text(vega_bundle(), encoding="utf-8")
        written = {"pages": 0}
        summary = reader.frame("SELECT * FROM layer_summary(?, ?)", [run, site])
        for index, layer in enumerate(layers):
            # Both names lie in the export's root folder, so their relative links are the same: render once.
            page = site_page(
                reader,
                Links(static_from=f"layer-{layer}.html"),
                run,
                site,
                layer,
                page_size=None,
                layers=layers,
                summary=summary,
            )
            for name in [f"layer-{layer}.html"] + (["index.html"] if index == 0 else []):
                (out / name).write_text(page, encoding="utf-8")
                written["pages"] += 1
            (out / str(layer)).mkdir(exist_ok=True)
            data = unit_data(reader, info, run, site, layer)
            for unit in range(info["width"]):
                path = f"{layer}/{unit}.html"
                page = unit_page(
                    reader, Links(static_from=path), run, site, layer, unit, layers=layers, data=data[unit]
                )
                (out / path).write_text(page, encoding="utf-8")
                written["pages"] += 1
        written["layers"] = layers
        return written
    finally:
        reader.close()
