"""The pages' reads: what `whq serve`, `whq export site` and `whq export neuronpedia` show, as rows.

Reads go through `Reader`: the trusted macros on a per-thread cursor of one read-only
connection (the server answers from a thread pool), and the SQL box's untrusted text
through `safesql.run_read_only`, what `whq sql --read-only` runs (both walls, timeout, memory
limit, row and byte caps). The functions here return rows and dicts; queries/pages.py renders them.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import duckdb
import polars as pl

from warehouse import catalog
from warehouse.errors import BadInput, NotFound, UnknownRun, sql_error

from .frames import kept_reductions

PAGE_SIZE = 100  # units per page of the run/site table (server; the export lists a layer on one page)
TOP_K, N_RANDOM = 20, 10
QUANTILE_ALL = 2147483647  # k of the quantile examples: every stored one
BEFORE, AFTER = 24, 8  # tokens of context shown before / after the firing token
SORTS = ("neuron", "rate", "mean", "min", "max", "skewness", "kurtosis", "selectivity")  # the units table's columns
SCORERS = ("detection", "fuzz", "simulation", "embedding", "intruder")  # explanation_scores' headline columns
EXPLANATION_SORTS = ("explanation", *SCORERS)  # the units table's further columns where the layer has explanations
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4  # tokens around an explanation's or a verdict's example
SEARCH_LIMIT = 100  # units an explanation search shows
SCOPES = 4  # the (run, site, layer) scopes a Reader keeps the views of (Reader.scope)


# -- reads -------------------------------------------------------------------------------------


class Reader:
    """The pages' reads: trusted macros on per-thread cursors, untrusted SQL on the guarded path."""

    def __init__(self, wh):
        self.wh = wh
        self._con = wh.connect()  # it keeps the parts' footers in memory (catalog.keep_footers)
        catalog.share(self._con)  # a run's tokens, copied once for its scopes' cursors
        self._sharing = threading.Lock()  # taken before _lock where both are
        self._cursors: dict[str, int] = {}  # the scopes' cursors of each run, idle or lent: its copy's readers
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sites: dict[str, list[dict]] | None = None
        self._explained: set[tuple[str, str]] | None = None
        self._scopes: OrderedDict[tuple, list[duckdb.DuckDBPyConnection]] = OrderedDict()  # idle, by scope

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        scoped = getattr(self._local, "scoped", None)
        if scoped is not None:
            return scoped
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            with self._lock:
                cursor = self._local.cursor = self._con.cursor()
        return cursor

    @contextlib.contextmanager
    def scope(self, run: str, site: str, layer: int):
        """Within the block, this thread's statements read views over the parts of `run`, `site` and
        `layer` alone, the smallest copied into memory (catalog.scope_views), so they must read only
        those: binding over a few parts instead of every one is most of what a unit page saves. The
        views live on cursors of their own, lent to one thread at a time and kept for the SCOPES scopes
        used last, whatever thread asks next (the server answers from a pool of threads): this Reader's
        catalog never changes (LiveReader opens another when the warehouse does). The scopes of one run
        share its tokens' copy, dropped with the last of its cursors. Where the warehouse changed since,
        the block reads the views of every part, as outside it."""
        key = (run, site, layer)
        with self._lock:
            idle = self._scopes.get(key)
            cursor = idle.pop() if idle else None
        if cursor is None:
            with self._lock:
                cursor = self._con.cursor()
                self._cursors[run] = self._cursors.get(run, 0) + 1
            try:
                scoped = catalog.scope_views(cursor, self.wh.layout, run, site, layer, self._sharing)
            except duckdb.Error as err:  # a part the catalog's views would fail on too
                self._release([(run, cursor)])
                raise sql_error(err) from None
            if not scoped:
                self._release([(run, cursor)])
                cursor = None
        outer, self._local.scoped = getattr(self._local, "scoped", None), cursor
        try:
            yield
        finally:
            self._local.scoped = outer
            if cursor is not None:
                evicted = []
                with self._lock:
                    self._scopes.setdefault(key, []).append(cursor)
                    self._scopes.move_to_end(key)
                    while len(self._scopes) > SCOPES:  # the idle cursors of the scope used longest ago
                        (old_run, *_), cursors = self._scopes.popitem(last=False)
                        evicted += [(old_run, old) for old in cursors]
                self._release(evicted)

    def _release(self, cursors: list[tuple[str, duckdb.DuckDBPyConnection]]) -> None:
        """Close scopes' cursors ((run, cursor)); drop a run's shared copy once no cursor of it is left."""
        for run, cursor in cursors:
            cursor.close()
            with self._sharing:
                with self._lock:
                    self._cursors[run] -= 1
                    last = not self._cursors[run]
                    if last:  # a scope of the run made meanwhile waits on _sharing, then copies it afresh
                        del self._cursors[run]
                        dropping = self._con.cursor()
                if last:
                    try:
                        catalog.drop_shared(dropping, run)
                    finally:
                        dropping.close()

    @contextlib.contextmanager
    def _whole(self):
        """Statements over every run (the lists read once) read the catalog's views, even in a scope."""
        outer, self._local.scoped = getattr(self._local, "scoped", None), None
        try:
            yield
        finally:
            self._local.scoped = outer

    def fetch(self, query: str, params: list | None = None) -> tuple[list[str], list[tuple]]:
        """(column names, rows) of a trusted statement; QueryError with DuckDB's first line."""
        # fetchall, not .pl() or Arrow: on the pages' small results those add ~14 ms a statement
        cursor = self._cursor()
        try:
            values = cursor.execute(query, params or []).fetchall()
        except duckdb.Error as err:  # macros check their arguments when the rows are fetched
            raise sql_error(err) from None
        return [d[0] for d in cursor.description], values

    def rows(self, query: str, params: list | None = None) -> list[dict]:
        names, values = self.fetch(query, params)
        return [dict(zip(names, row)) for row in values]

    def frame(self, query: str, params: list | None = None) -> pl.DataFrame:
        """The rows as a frame; with no rows (a run that held no token), an empty frame of the columns'
        types, so the charts draw an empty chart from it like any other."""
        names, values = self.fetch(query, params)
        if values:
            return pl.DataFrame(values, schema=names, orient="row", infer_schema_length=None)
        return self._cursor().sql(query, params=params or []).pl()  # no rows: cheap to read again, typed

    def sites(self) -> dict[str, list[dict]]:
        """{run: its rows of `sites`}, read once: the connection sees the catalog as it was when opened."""
        if self._sites is None:
            with self._whole():
                rows = self.rows(
                    "SELECT r.run_id, s.site, s.layers, s.width, s.reductions, s.threshold FROM runs r "
                    "LEFT JOIN sites s USING (run_id) ORDER BY r.run_id, s.site"
                )
            self._sites = {}
            for row in rows:  # a site of a run that held no token never learned its width: it has no units
                row["width"] = row["width"] or 0
                self._sites.setdefault(row.pop("run_id"), []).extend([row] if row["site"] is not None else [])
        return self._sites

    def explained(self, run: str, site: str) -> bool:
        """Whether `whq explain` committed explanations for the site; the set is read once, like sites."""
        if self._explained is None:
            with self._whole():
                rows = self.rows("SELECT DISTINCT run_id, site FROM explanations")
            self._explained = {(r["run_id"], r["site"]) for r in rows}
        return (run, site) in self._explained

    def untrusted(self, query: str, limits=None):
        """Untrusted SQL through safesql.run_read_only, what `whq sql --read-only` runs: both walls,
        its timeout, memory limit, row and byte caps (`limits`, a SqlLimits; its defaults when None);
        a BoundedResult (frame, truncated)."""
        from warehouse.safesql import run_read_only

        return run_read_only(self.wh, query, limits)

    def close(self) -> None:
        with self._lock:
            for cursors in self._scopes.values():
                for cursor in cursors:
                    cursor.close()
            self._scopes.clear()
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
        check_layer(info, run, site, layer)
    return {**info, "layers": sorted(layers)} if layers else info


def check_layer(info: dict, run: str, site: str, layer: int) -> None:
    if layer not in info["layers"]:
        raise NotFound(
            f"site {site!r} of run {run!r} has no layer {layer}; its layers: {', '.join(map(str, info['layers']))}"
        )


def check_unit(info: dict, run: str, site: str, layer: int, unit: int) -> None:
    check_layer(info, run, site, layer)
    if not info["width"]:
        raise NotFound(f"site {site!r} of run {run!r} has no units: the run's documents held no token")
    if not 0 <= unit < info["width"]:
        raise NotFound(f"site {site!r} of run {run!r} has units 0..{info['width'] - 1}; there is no unit {unit}")


def neighbours(info: dict, layer: int, unit: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(layer, unit) before and after this one, running on into the neighbouring layers."""
    layers = sorted(info["layers"])
    at = layers.index(layer)
    before = (layer, unit - 1) if unit > 0 else ((layers[at - 1], info["width"] - 1) if at > 0 else None)
    after = (layer, unit + 1) if unit + 1 < info["width"] else ((layers[at + 1], 0) if at + 1 < len(layers) else None)
    return before, after


def check_sort(sort: str, order: str, explained: bool = False) -> None:
    columns = (*SORTS, *EXPLANATION_SORTS) if explained else SORTS
    if sort not in columns or order not in ("asc", "desc"):
        raise BadInput(f"sort by one of {', '.join(columns)}, order asc or desc")


def site_units(
    reader: Reader,
    run: str,
    site: str,
    layer: int,
    sort: str,
    order: str,
    limit: int,
    offset: int,
    explained: bool = False,
) -> list[dict]:
    """One page of the layer's units table, sorted by `sort` (one of SORTS, or with `explained` also
    EXPLANATION_SORTS) in `order` (asc or desc). With `explained`, each unit's explanations (joined
    by ' | ' where several explainers or models wrote one) and each scorer's best headline figure
    from explanation_scores; NULL where the unit has none."""
    check_sort(sort, order, explained)
    columns = "u.neuron, u.rate, u.mean, u.min, u.max, u.skewness, u.kurtosis, x.selectivity"
    joins, params = "", [run, site, layer, run, site, layer]
    if explained:
        scorers = ", ".join(f"max(e.{s}) AS {s}" for s in SCORERS)
        columns += ", " + ", ".join(f"e.{c}" for c in EXPLANATION_SORTS)
        joins = (
            "LEFT JOIN (SELECT e.neuron, string_agg(e.text, ' | ' ORDER BY e.explainer, e.model, e.explanation_id) "
            f"AS explanation, {scorers} FROM explanation_scores(?, ?, ?) e GROUP BY e.neuron) e ON e.neuron = u.neuron "
        )
        params += [run, site, layer]
    return reader.rows(  # `sort` is one of the columns, checked above
        f"SELECT {columns} FROM unit_stats(?, ?, ?) u JOIN selectivity(?, ?, ?) x ON x.neuron = u.neuron {joins}"
        f"ORDER BY {sort} {order.upper()} NULLS LAST, u.neuron LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )


def scored_columns(reader: Reader, run: str, site: str) -> list[str]:
    """The SCORERS whose headline figure the site has (the units table shows those columns only)."""
    found = {
        r["scorer"]
        for r in reader.rows("SELECT DISTINCT scorer FROM scores WHERE run_id = ? AND site = ?", [run, site])
    }
    return [s for s in SCORERS if s in found]


def explanation_hits(reader: Reader, run: str, site: str, text: str, limit: int = SEARCH_LIMIT) -> list[dict]:
    """The explanations of the site that contain `text` (case ignored; search_explanations without a
    query embedding: the pages never load MiniLM), none for no text."""
    if not text:
        return []
    return reader.rows(
        "SELECT layer, neuron, explainer, model, text FROM search_explanations(?, ?, ?) LIMIT ?",
        [run, site, text, limit],
    )


def contexts(reader: Reader, run: str, rows: list[dict]) -> None:
    """Give each row with a (doc, pos) its text around that token as the document spells it:
    `before` (CONTEXT_BEFORE tokens), `token` and `after` (CONTEXT_AFTER tokens); empty strings where
    the token has no characters (a special token)."""
    placed = [r for r in rows if r.get("doc") is not None and r.get("pos") is not None]
    if not placed:
        return
    spans = reader.rows(
        "SELECT w.i, t.pos, t.char_start, t.char_end FROM (SELECT unnest(?::INTEGER[]) AS doc, "
        "unnest(?::INTEGER[]) AS pos, unnest(?::INTEGER[]) AS i) w JOIN tokens t ON t.run_id = ? AND t.doc = w.doc "
        "AND t.pos BETWEEN w.pos - ? AND w.pos + ? WHERE NOT t.special AND t.char_start IS NOT NULL",
        [
            [r["doc"] for r in placed],
            [r["pos"] for r in placed],
            list(range(len(placed))),
            run,
            CONTEXT_BEFORE,
            CONTEXT_AFTER,
        ],
    )
    texts = dict(
        reader.fetch(
            "SELECT doc, text FROM documents WHERE run_id = ? AND doc IN (SELECT unnest(?::INTEGER[]))",
            [run, sorted({r["doc"] for r in placed})],
        )[1]
    )
    around: dict[int, list[dict]] = {}
    for span in spans:
        around.setdefault(span["i"], []).append(span)
    for i, row in enumerate(placed):
        text, window = texts.get(row["doc"]) or "", around.get(i, [])
        fire = next((s for s in window if s["pos"] == row["pos"]), None)
        if not window or fire is None:
            row.update(before="", token="", after="")
            continue
        lo, hi = min(s["char_start"] for s in window), max(s["char_end"] for s in window)
        row.update(
            before=text[lo : fire["char_start"]],
            token=text[fire["char_start"] : fire["char_end"]],
            after=text[fire["char_end"] : hi],
        )


def unit_explanations(reader: Reader, run: str, site: str, layer: int, unit: int) -> list[dict]:
    """The unit's explanations (explanations), each with its scores (scores: every scorer, model and
    metric), the examples its explainer was shown (explanation_examples without a scorer) and the
    scorers' verdicts on the test and non-activating examples (scorer_verdicts); none where the unit
    was not explained."""
    if not reader.explained(run, site):
        return []
    found = reader.rows(
        "SELECT explanation_id, explainer, model, text, parsed FROM explanations "
        "WHERE run_id = ? AND site = ? AND layer = ? AND neuron = ? ORDER BY explainer, model, explanation_id",
        [run, site, layer, unit],
    )
    if not found:
        return []
    where = [run, site, layer, unit]
    scores = reader.rows(
        "SELECT explanation_id, scorer, model, metric, value, n_examples, n_unparsable FROM scores "
        "WHERE run_id = ? AND site = ? AND layer = ? AND neuron = ? ORDER BY scorer, model, metric",
        where,
    )
    shown = reader.rows(
        "SELECT x.explanation_id, x.role, x.source, x.quantile, x.doc, d.doc_id, x.pos, x.value "
        "FROM explanation_examples x JOIN documents d ON d.run_id = x.run_id AND d.doc = x.doc "
        "WHERE x.run_id = ? AND x.site = ? AND x.layer = ? AND x.neuron = ? AND x.scorer IS NULL "
        "ORDER BY x.explanation_id, x.value DESC NULLS LAST, x.doc, x.pos",
        where,
    )
    verdicts = reader.rows("SELECT * FROM scorer_verdicts(?, ?, ?, ?)", where)
    contexts(reader, run, shown + verdicts)
    for explanation in found:
        key = explanation["explanation_id"]
        explanation["scores"] = [r for r in scores if r["explanation_id"] == key]
        explanation["shown"] = [r for r in shown if r["explanation_id"] == key]
        explanation["verdicts"] = [r for r in verdicts if r["explanation_id"] == key]
    return found


def layer_summary(reader: Reader, run: str, site: str) -> pl.DataFrame:
    return reader.frame("SELECT * FROM layer_summary(?, ?)", [run, site])


def layer_histograms(reader: Reader, run: str, site: str, layer: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The layer's firing-rate histogram and its (log) selectivity histogram."""
    return (
        reader.frame("SELECT * FROM rate_histogram(?, ?, ?)", [run, site, layer]),
        reader.frame("SELECT * FROM selectivity_histogram(?, ?, ?, log := true)", [run, site, layer]),
    )


def token_hits(reader: Reader, run: str, site: str, text: str, limit: int) -> list[dict]:
    """The units that fire on the token `text` most often (units_for_token), none for no text."""
    return reader.rows("SELECT * FROM units_for_token(?, ?, ?) LIMIT ?", [run, site, text, limit]) if text else []


# -- units ----------------------------------------------------------------------------------


def token_text(token: dict) -> str:
    """A window token as pages and exports show it: as its document spells it (see spell), else as
    the tokenizer decodes it (the piece in older runs)."""
    return token.get("spelled", token["text"]) or ""


def spell(example: dict) -> None:
    """Give each window token of a whq_examples_by_kind row its text as the document spells it: the
    characters from the end of the token before it to its own end, so the window reads as the document
    does whatever the tokenizer (WordPiece decoded alone loses the spaces between words, 'all'
    'resolved'; byte-level BPE decodes each byte of 'é' alone to '�'). Special tokens, which have no
    characters, keep their decoded text."""
    text, offset, end = example["window_text"], example["window_start"], None
    for token, span in zip(example["tokens"], example["spans"]):
        if span["char_start"] is not None:
            start = span["char_start"] if end is None else end  # a character several tokens share shows on the first
            token["spelled"] = text[start - offset : span["char_end"] - offset]
            end = span["char_end"] if end is None else max(end, span["char_end"])


def keeps_examples(info: dict) -> bool:
    """Whether whq_examples has a source: examples=N, or a threshold capture's every firing."""
    kept = kept_reductions(info)
    return "examples" in kept or "threshold" in kept


def unit_data(reader: Reader, info: dict, run: str, site: str, layer: int, unit: int | None = None) -> dict[int, dict]:
    """{unit: what its page shows} for one unit, or (unit None) every unit of the layer, as the
    static export reads them: a few statements per layer."""
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
    kinds = {}  # every kind of example the page shows, in one statement: binding it is most of its time
    if fired and keeps_examples(info):
        kinds.update(top=TOP_K, random=N_RANDOM)
    if "examples" in kept and any((row["min"] or 0) < 0 for row in stats):  # signed units, fired or not
        kinds["bottom"] = TOP_K
    binned = fired and "quantiles" in kept and "hist" in kept
    if binned:
        kinds["quantile"] = QUANTILE_ALL
    if kinds:  # the quantile examples as whq_quantile_examples gives them: each with its bin, ranked within it
        columns = (
            "b.lo, b.hi, b.share_lo, b.share_hi"
            if binned
            else "NULL AS lo, NULL AS hi, NULL AS share_lo, NULL AS share_hi"
        )
        bins = (
            "LEFT JOIN whq_quantile_bins(?, ?, ?, ?) b ON x.kind = 'quantile' AND b.neuron = x.neuron "
            "AND b.quantile = x.quantile WHERE x.kind <> 'quantile' OR b.quantile IS NOT NULL"
            if binned
            else ""
        )
        macro_args = [run, site, layer, unit]
        for row in reader.rows(
            "SELECT x.kind, x.neuron, x.rank, x.doc_id, x.pos, x.value, x.context, x.tokens, x.spans, x.window_start, "
            f"x.window_text, x.quantile, {columns}, "
            "CAST(x.rank - min(x.rank) OVER (PARTITION BY x.kind, x.neuron, x.quantile) AS INTEGER) AS bin_rank "
            f"FROM whq_examples_by_kind(?, ?, ?, ?, MAP(?::VARCHAR[], ?::INTEGER[]), ?, ?, 0) x {bins} "
            "ORDER BY x.neuron, x.kind, x.quantile, x.rank",
            [*macro_args, list(kinds), list(kinds.values()), BEFORE, AFTER, *(macro_args if binned else [])],
        ):
            spell(row)
            example = {name: row[name] for name in ("rank", "doc_id", "pos", "value", "context", "tokens")}
            if row["kind"] == "quantile":  # the columns of whq_quantile_examples
                bin_of = {name: row[name] for name in ("quantile", "lo", "hi", "share_lo", "share_hi")}
                example = {**bin_of, **example, "rank": row["bin_rank"]}
            else:  # the columns of whq_examples; top and random with their kind
                kind = {} if row["kind"] == "bottom" else {"kind": row["kind"]}
                example = {**kind, "neuron": row["neuron"], **example}
            data[row["neuron"]]["examples"][row["kind"]].append(example)
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
    if fired:
        shown = set(fired)  # a unit that never fired shows no similar units
        for row in reader.rows("SELECT * FROM whq_similar_units(?, ?, ?, ?, 10)", [run, site, layer, unit]):
            if row["of_unit"] in shown:
                data[row.pop("of_unit")]["similar"][row["kind"]].append(row)
    return data
