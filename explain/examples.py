"""The examples a unit is explained and scored on, read from the warehouse.

Activating examples are the unit's stored examples (neuron_examples: kinds top, quantile, random)
with their windows as whq_examples builds them (50 tokens before to 20 after, each token's value:
the one captured with the example, else token_neurons'). `split` draws the explanation examples
and the test examples from them DISJOINT by construction: the test pool is the stored examples
minus every (doc, pos) shown to the explainer.

Non-activating examples come from `NON_ACTIVATING_SOURCES`, functions returning windows where the
unit does not fire:

  non-firing   the capture's uniform sample of 71-token windows where the unit never fires
               (neuron_examples kind nonfiring, kept with examples=N), with the unit's exact
               values. For runs without it: windows (50 tokens before to 20 after a token)
               holding no stored firing of the unit, drawn uniformly without replacement, one
               centre at most per 71-token block of a document. Exact where every firing is
               stored: a threshold capture (token_neurons holds every value above the
               threshold), or a top-k capture of a unit whose stored firings number its exact
               n_fired (neuron_stats). For other units of a top-k capture a firing may lie
               outside the top k: such windows are marked with a trailing ~ (source
               'non-firing~').
  neighbours   the top windows of the unit's most co-activating units (unit_coactivations,
               delphi's "neighbours" hard negatives) holding no stored firing of the unit, with
               the same exactness rule.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from warehouse.errors import BadInput, WarehouseError

from .hard_negatives import similar

BEFORE, AFTER = 50, 20


@dataclasses.dataclass
class Window:
    """One example: the unit's value at each shown token. `pos` is the example token (the
    activating one; for a non-activating window, the token the window is centred on)."""

    doc: int
    pos: int
    tokens: list[str]
    values: list[float]
    source: str  # top | quantile | random | non-firing[~] | neighbours[~]
    activating: bool
    quantile: int | None = None
    value: float = 0.0
    neuron: int | None = None  # a stored example's unit and rank within its kind (what read_windows reads)
    rank: int | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.doc, self.pos)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_activation(self) -> float:
        return max(self.values, default=0.0)


def select_units(wh, run: str, site: str, layers: list[int], where: str | None, limit: int | None) -> list[tuple]:
    """(layer, neuron) of the units passing `where` (an SQL condition over unit_stats' columns:
    rate, mean, std, min, max, skewness, kurtosis), most frequent first, at most `limit`."""
    units = []
    condition = f"({where})" if where else "true"
    for layer in layers:
        try:
            rows = wh.sql(
                f"SELECT neuron FROM unit_stats($run, $site, $layer) WHERE rate > 0 AND {condition} "
                f"ORDER BY rate DESC, neuron",
                {"run": run, "site": site, "layer": layer},
            ).fetchall()
        except WarehouseError as err:
            raise BadInput(f"--units {where!r} does not select units: {err}") from None
        units += [(layer, n) for (n,) in rows]
    return units[:limit] if limit else units


_SPECIALS: dict[tuple, dict[int, set[int]]] = {}


def _run_key(wh, run: str) -> tuple:
    """What names a committed run's facts in the memos below: its manifest's identity (a run deleted and
    captured again has a new manifest). A stat, not a read: planning asks at every unit."""
    try:
        stat = wh.layout.manifest(run).stat()
    except FileNotFoundError:
        wh.manifest(run)  # the one line naming the committed runs
        raise
    return (str(wh.root), run, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _specials(wh, run: str) -> dict[int, set[int]]:
    """Per document, the positions of special tokens ([CLS], BOS, ...), which windows leave out; read
    once per committed run (planning asks for them at every unit)."""
    key = _run_key(wh, run)
    if key not in _SPECIALS:
        rows = wh.sql(
            "SELECT doc, list(pos) FROM tokens WHERE run_id = $run AND special GROUP BY doc", {"run": run}
        ).fetchall()
        _SPECIALS[key] = {doc: set(positions) for doc, positions in rows}
    return _SPECIALS[key]


KINDS = ("top", "quantile", "random")  # the activating kinds, in the order a unit's examples are listed
_KIND_OF_SOURCE = {"non-firing": "nonfiring"}  # a Window's source, where it is not its neuron_examples kind


def stored_examples(wh, run: str, site: str, layer: int, neurons: list[int]) -> dict[int, list[Window]]:
    """The stored activating examples (kinds top, quantile, random) of `neurons` at one layer, in rank
    order, without their windows (tokens and values empty): a plan shows a few of the hundreds a unit
    keeps, and `read_windows` builds those alone."""
    params = {"run": run, "site": site, "layer": layer}
    kinds = [kind for kind in KINDS if kind in _kinds(wh, run, site, layer)]
    if not kinds:
        raise BadInput(
            f"site {site!r} of run {run!r} kept no examples at layer {layer}: re-ingest with --site {site}:examples=20"
        )
    rows = wh.sql(
        "SELECT list_position($kinds, kind) - 1, neuron, rank, doc, pos, value, quantile "
        "FROM whq_example_keys_by_kind($run, $site, $layer, NULL, MAP($kinds, $ks), 0, units := $neurons) "
        "ORDER BY neuron, 1, rank",
        params | {"kinds": kinds, "ks": [2147483647] * len(kinds), "neurons": sorted(set(neurons))},
    ).fetchall()
    found: dict[int, list[Window]] = {}
    for order, neuron, rank, doc, pos, value, quantile in rows:
        found.setdefault(neuron, []).append(
            Window(doc, pos, [], [], kinds[order], True, quantile, float(value), neuron=neuron, rank=rank)
        )
    return found


def read_windows(wh, run: str, site: str, layer: int, examples: list[Window]) -> None:
    """Fill in the windows of stored examples (from `stored_examples` or `draw_non_firing`, one layer)
    as whq_examples builds them, special tokens left out: one statement for all of them, every kind
    bound once."""
    kinds = sorted({_kind(w) for w in examples})
    if not kinds:
        return
    rows = wh.sql(
        "SELECT kind, neuron, rank, tokens FROM whq_examples_by_kind($run, $site, $layer, NULL, MAP($kinds, $ks), "
        "$before, $after, 0, units := $units, picks := $picks)",
        {
            "run": run,
            "site": site,
            "layer": layer,
            "kinds": kinds,
            "ks": [2147483647] * len(kinds),
            "before": BEFORE,
            "after": AFTER,
            "units": sorted({w.neuron for w in examples}),
            "picks": [{"kind": _kind(w), "neuron": w.neuron, "rank": w.rank} for w in examples],
        },
    ).fetchall()
    tokens = {(kind, neuron, rank): window for kind, neuron, rank, window in rows}
    specials = _specials(wh, run)
    for w in examples:
        w.tokens, w.values = _shown(w.doc, w.pos, tokens[(_kind(w), w.neuron, w.rank)], specials)


def _kind(example: Window) -> str:
    """A stored example's neuron_examples kind."""
    return _KIND_OF_SOURCE.get(example.source, example.source)


def _shown(doc, pos, tokens, specials) -> tuple[list[str], list[float]]:
    """The texts and values of a whq_examples row's window tokens, special tokens left out."""
    first = max(0, pos - BEFORE)  # a document's positions run 0, 1, ... without gaps
    skip = specials.get(doc, set())
    kept = [t for i, t in enumerate(tokens) if first + i not in skip]
    return [t["text"] or "" for t in kept], [max(float(t["value"] or 0.0), 0.0) for t in kept]


def split(windows: list[Window], n_explain: int, n_test: int, seed: int) -> tuple[list[Window], list[Window]]:
    """(explanation examples, test examples), disjoint by construction.

    The explanation examples are the strongest stored ones (kind top, rank order; delphi's default
    `train_type = top`); the test pool is every other stored example whose token was not shown,
    deduplicated by (doc, pos), of which n_test are drawn uniformly without replacement (seeded)."""
    tops = [w for w in windows if w.source == "top"]
    explain, seen = [], set()
    for w in tops:
        if len(explain) == n_explain:
            break
        if w.key not in seen:
            explain.append(w)
            seen.add(w.key)
    pool = []
    for w in windows:
        if w.key not in seen:
            pool.append(w)
            seen.add(w.key)
    rng = random.Random(seed)
    test = rng.sample(pool, min(n_test, len(pool)))
    return explain, test


# -- non-activating windows ---------------------------------------------------------------
# Facts of a committed run that explaining never changes, read once per _run_key and site layer.
_EXACTNESS: dict[tuple, dict[int, bool]] = {}
_KINDS: dict[tuple, set[str]] = {}
_NON_FIRING: dict[tuple, list[Window]] = {}  # drawn and read for a plan, each taken by its unit
_NEIGHBOURS: dict[tuple, list[Window]] = {}  # the same


def forget_runs() -> None:
    """Drop the memos of committed runs' facts, as a new process starts (the bench times each step as
    the command of its own that it is)."""
    for memo in (_SPECIALS, _EXACTNESS, _KINDS):
        memo.clear()


def _exactness(wh, run: str, site: str, layer: int) -> dict[int, bool]:
    """Per unit: is every firing stored in token_neurons (so a window without one is exactly non-firing)?
    Computed once per layer of a committed run (explaining never changes token_neurons or neuron_stats;
    a run deleted and captured again has another commit time)."""
    key = (*_run_key(wh, run), site, layer)
    if key not in _EXACTNESS:
        _EXACTNESS[key] = _stored_every_firing(wh, run, site, layer)
    return _EXACTNESS[key]


def _stored_every_firing(wh, run: str, site: str, layer: int) -> dict[int, bool]:
    rows = wh.sql(
        """
        WITH stored AS (
            SELECT t.neuron, count(*) AS n FROM token_neurons t, sites s
            WHERE t.run_id = $run AND t.site = $site AND t.layer = $layer AND s.run_id = $run AND s.site = $site
              AND t.value > coalesce(s.threshold, 0)
            GROUP BY t.neuron
        )
        SELECT ns.neuron, coalesce(st.n, 0) >= ns.n_fired FROM neuron_stats ns LEFT JOIN stored st USING (neuron)
        WHERE ns.run_id = $run AND ns.site = $site AND ns.layer = $layer
        """,
        {"run": run, "site": site, "layer": layer},
    ).fetchall()
    return dict(rows)


def _token_windows(wh, run: str, centres: list[tuple[int, int]]) -> list[list[str]]:
    """The non-special token texts of each centre's window (50 before to 20 after), in centre order
    (empty where the window holds special tokens alone)."""
    if not centres:
        return []
    rows = wh.sql(
        """
        WITH c AS (SELECT unnest($docs) AS doc, unnest($poss) AS pos, unnest($idx) AS i)
        SELECT c.i, list(coalesce(t.text, t.piece) ORDER BY t.pos)
        FROM c JOIN tokens t ON t.run_id = $run AND t.doc = c.doc
            AND t.pos BETWEEN c.pos - $before AND c.pos + $after AND NOT t.special
        GROUP BY c.i
        """,
        {
            "run": run,
            "docs": [d for d, _ in centres],
            "poss": [p for _, p in centres],
            "idx": list(range(len(centres))),
            "before": BEFORE,
            "after": AFTER,
        },
    ).fetchall()
    texts = dict(rows)
    return [[t or "" for t in texts.get(i, [])] for i in range(len(centres))]


def _blank_windows(centres: list[tuple[int, int]], texts: list[list[str]], source: str) -> list[Window]:
    """Non-activating windows of token texts, every value 0, leaving out those that show nothing."""
    return [Window(d, p, toks, [0.0] * len(toks), source, False) for (d, p), toks in zip(centres, texts) if toks]


# The unit's stored firings (doc, pos): the tokens no non-activating window may hold. Parameters $run,
# $site, $layer, $neuron.
FIRED = """fired AS (
            SELECT t.doc, t.pos FROM token_neurons t, sites s
            WHERE t.run_id = $run AND t.site = $site AND t.layer = $layer AND t.neuron = $neuron
              AND s.run_id = $run AND s.site = $site AND t.value > coalesce(s.threshold, 0)
        )"""


def non_firing(wh, run: str, site: str, layer: int, neuron: int, n: int, seed: int) -> list[Window]:
    """n windows (without replacement, seeded) where the unit does not fire: drawn from the capture's
    own uniform sample (neuron_examples kind nonfiring, with the unit's exact values) where the site
    kept one; else centred on non-special tokens whose whole window (50 before to 20 after) holds no
    stored firing of the unit, at most one centre per 71-token block of a document, so two windows
    are never near copies."""
    if _kept_non_firing(wh, run, site, layer):
        return _captured_non_firing(wh, run, site, layer, neuron, n, seed)
    exact = _exactness(wh, run, site, layer).get(neuron, False)
    centres = wh.sql(
        f"""
        WITH {FIRED}
        SELECT t.doc, t.pos FROM tokens t
        WHERE t.run_id = $run AND NOT t.special AND NOT EXISTS (
            SELECT 1 FROM fired f WHERE f.doc = t.doc AND f.pos BETWEEN t.pos - $before AND t.pos + $after)
        QUALIFY row_number() OVER (PARTITION BY t.doc, t.pos // ($before + $after + 1)
                                   ORDER BY hash($seed, t.doc, t.pos), t.pos) = 1
        ORDER BY hash($seed, t.doc, t.pos), t.doc, t.pos LIMIT $n
        """,
        {
            "run": run,
            "site": site,
            "layer": layer,
            "neuron": neuron,
            "seed": seed,
            "n": n,
            "before": BEFORE,
            "after": AFTER,
        },
    ).fetchall()
    return _blank_windows(centres, _token_windows(wh, run, centres), "non-firing" if exact else "non-firing~")


def _kept_non_firing(wh, run: str, site: str, layer: int) -> bool:
    """Did the capture keep its sample of non-firing windows at this layer (kind nonfiring)?"""
    return "nonfiring" in _kinds(wh, run, site, layer)


def _kinds(wh, run: str, site: str, layer: int) -> set[str]:
    """The kinds of examples the capture kept at this layer, read once per layer of a committed run."""
    key = (*_run_key(wh, run), site, layer)
    if key not in _KINDS:
        _KINDS[key] = {
            kind
            for (kind,) in wh.sql(
                "SELECT DISTINCT kind FROM neuron_examples WHERE run_id = $run AND site = $site AND layer = $layer",
                {"run": run, "site": site, "layer": layer},
            ).fetchall()
        }
    return _KINDS[key]


def draw_non_firing(wh, run: str, site: str, layer: int, neurons: list[int], n: int, seed: int) -> list[Window]:
    """Draw n of the kept non-firing windows of every unit in `neurons` at one layer (without
    replacement, seeded, among those that show a token), in one statement for all units (planning asks
    unit by unit: a statement each cost ~60 ms). Returns the drawn windows, which the caller reads
    (`read_windows`) with the other examples of its plan before a unit takes its own."""
    if not neurons or not _kept_non_firing(wh, run, site, layer):
        return []
    rows = wh.sql(
        """
        SELECT k.neuron, k.rank, k.doc, k.pos, k.value FROM whq_example_keys_by_kind(
            $run, $site, $layer, NULL, MAP(['nonfiring'], [2147483647]), 0, units := $neurons) k
        -- a document of special tokens alone shows nothing
        WHERE EXISTS (SELECT 1 FROM tokens t WHERE t.run_id = $run AND t.doc = k.doc
                      AND t.pos BETWEEN k.pos - $before AND k.pos + $after AND NOT t.special)
        ORDER BY k.neuron, k.rank
        """,
        {"run": run, "site": site, "layer": layer, "before": BEFORE, "after": AFTER, "neurons": sorted(set(neurons))},
    ).fetchall()
    kept: dict[int, list[Window]] = {neuron: [] for neuron in neurons}
    for neuron, rank, doc, pos, value in rows:
        kept[neuron].append(Window(doc, pos, [], [], "non-firing", False, value=float(value), neuron=neuron, rank=rank))
    drawn = {neuron: random.Random(seed).sample(windows, min(n, len(windows))) for neuron, windows in kept.items()}
    key = (*_run_key(wh, run), site, layer)
    _NON_FIRING.update({(*key, neuron, n, seed): windows for neuron, windows in drawn.items()})
    return [w for windows in drawn.values() for w in windows]


def _take(memo: dict, prefetch, wh, run: str, site: str, layer: int, neuron: int, n: int, seed: int):
    """The unit's entry of a plan's prefetched `memo`, removed (a plan asks for it once, so nothing is
    kept after); read alone, through `prefetch`, when the plan did not prefetch it."""
    key = (*_run_key(wh, run), site, layer, neuron, n, seed)
    if key not in memo:
        prefetch(wh, run, site, layer, [neuron], n, seed)
    return memo.pop(key)


def _captured_non_firing(wh, run: str, site: str, layer: int, neuron: int, n: int, seed: int) -> list[Window]:
    def alone(wh, run, site, layer, neurons, n, seed):
        read_windows(wh, run, site, layer, draw_non_firing(wh, run, site, layer, neurons, n, seed))

    return _take(_NON_FIRING, alone, wh, run, site, layer, neuron, n, seed)


def prefetch_neighbours(wh, run: str, site: str, layer: int, neurons: list[int], n: int, seed: int) -> None:
    """Draw n of the neighbours' windows (below) of every unit in `neurons` at one layer and read them:
    two statements for all units."""
    if not neurons:
        return
    rows = wh.sql(
        """
        WITH fired AS (
            SELECT t.neuron, t.doc, t.pos FROM token_neurons t, sites s
            WHERE t.run_id = $run AND t.site = $site AND t.layer = $layer AND list_contains($neurons, t.neuron)
              AND s.run_id = $run AND s.site = $site AND t.value > coalesce(s.threshold, 0)
        )
        SELECT DISTINCT c.neuron, e.doc, e.pos
        FROM unit_coactivations c
        JOIN neuron_examples e ON e.run_id = $run AND e.site = $site AND e.layer = $layer
            AND e.neuron = c.other AND e.kind = 'top'
        WHERE c.run_id = $run AND c.site = $site AND c.layer = $layer AND list_contains($neurons, c.neuron)
          AND NOT EXISTS (SELECT 1 FROM fired f WHERE f.neuron = c.neuron AND f.doc = e.doc
                          AND f.pos BETWEEN e.pos - $before AND e.pos + $after)
        ORDER BY c.neuron, e.doc, e.pos
        """,
        {"run": run, "site": site, "layer": layer, "neurons": sorted(set(neurons)), "before": BEFORE, "after": AFTER},
    ).fetchall()
    found: dict[int, list[tuple[int, int]]] = {neuron: [] for neuron in neurons}
    for neuron, doc, pos in rows:
        found[neuron].append((doc, pos))
    drawn = {neuron: random.Random(seed).sample(centres, min(n, len(centres))) for neuron, centres in found.items()}
    centres = [c for neuron in neurons for c in drawn[neuron]]
    texts = iter(_token_windows(wh, run, centres))
    exact = _exactness(wh, run, site, layer)
    key = (*_run_key(wh, run), site, layer)
    for neuron in neurons:
        source = "neighbours" if exact.get(neuron, False) else "neighbours~"
        windows = _blank_windows(drawn[neuron], [next(texts) for _ in drawn[neuron]], source)
        _NEIGHBOURS[(*key, neuron, n, seed)] = windows


def neighbours(wh, run: str, site: str, layer: int, neuron: int, n: int, seed: int) -> list[Window]:
    """Up to n top windows of the unit's most co-activating units whose whole window holds no stored firing of it."""
    return _take(_NEIGHBOURS, prefetch_neighbours, wh, run, site, layer, neuron, n, seed)


NonActivatingSource = Callable[..., list[Window]]
NON_ACTIVATING_SOURCES: dict[str, NonActivatingSource] = {
    "non-firing": non_firing,
    "neighbours": neighbours,
    "similar": similar,  # explain/hard_negatives.py: MiniLM-nearest non-firing windows (delphi's FAISS source)
}


def source_share(n: int, sources) -> int:
    """How many windows `non_activating` asks each source for."""
    return -(-n // max(1, len(sources)))


def non_activating(wh, run, site, layer, neuron, n: int, seed: int, sources: list[str]) -> list[Window]:
    """n non-activating windows, split as evenly as the sources allow, in source order, no (doc, pos) twice."""
    unknown = [s for s in sources if s not in NON_ACTIVATING_SOURCES]
    if unknown:
        raise BadInput(f"unknown non-activating source {unknown[0]!r}: use {', '.join(NON_ACTIVATING_SOURCES)}")
    out, seen = [], set()
    share = source_share(n, sources)
    for name in sources:
        for w in NON_ACTIVATING_SOURCES[name](wh, run, site, layer, neuron, share, seed):
            if w.key not in seen and len(out) < n:
                out.append(w)
                seen.add(w.key)
    return out
