"""`whq bench serve`: the unit page's, token search's and run/site page's server time, warm.

On the synthetic warehouse of `whq bench query` (queries/bench.py builds or reuses it), which
holds every section a unit page shows: examples of every kind with their window values,
the histogram and quantile examples, similar units, the logit lens and explanations with
their examples, verdicts and scores.

Each page is rendered as the server renders it (pages.unit_page / pages.tokens_page, no
HTTP), after one warm-up; every SQL statement the page runs is timed on its own, labelled
by the page function that ran it and the table or macro it reads, so the report names the
query that dominates.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import warehouse
from warehouse.errors import BadInput

from . import bench, page_data, pages


class _TimedReader(page_data.Reader):
    """A Reader that adds each statement's time to `spent` under the statement's label (see _label)."""

    def __init__(self, wh):
        super().__init__(wh)
        self.spent: dict[str, float] = defaultdict(float)
        self._labels: dict[str, str] = {}  # statement text -> its label, one label per statement

    def fetch(self, query, params=None):
        start = time.perf_counter()
        try:
            return super().fetch(query, params)
        finally:
            self.spent[self._labelled(query)] += time.perf_counter() - start

    def _labelled(self, query: str) -> str:
        if query not in self._labels:
            label = candidate = _label(query, _caller())
            taken, n = set(self._labels.values()), 1
            while candidate in taken:  # another statement of the same function reads the same table
                n += 1
                candidate = f"{label} #{n}"
            self._labels[query] = candidate
        return self._labels[query]


def _caller() -> str:
    """The page function that ran the statement: the first frame outside the Reader's methods."""
    frame = sys._getframe(2)
    while frame.f_code.co_name in ("fetch", "rows", "frame", "_labelled"):
        frame = frame.f_back
    return frame.f_code.co_name


def _label(query: str, caller: str) -> str:
    """The page function, the first table or macro the statement reads and the example kinds it names."""
    found = re.search(r"\b(?:FROM|JOIN)\s+([A-Za-z_]\w*)", query)
    kinds = re.findall(r"'(top|bottom|random|quantile|nonfiring)'", query)
    name = found.group(1) if found else query.split()[0]
    return f"{caller}: {name}" + (f" ({'+'.join(dict.fromkeys(kinds))})" if kinds else "")


def _time(render, reader: _TimedReader, repeats: int) -> tuple[list[float], dict[str, float]]:
    render()  # warm-up: file metadata and the OS cache
    reader.spent.clear()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        render()
        times.append(time.perf_counter() - start)
    return times, {name: spent / repeats for name, spent in sorted(reader.spent.items(), key=lambda kv: -kv[1])}


def bench_serve(
    root: str | Path, rows: int, *, layers: int = 12, width: int = 3072, k: int = 20, repeats: int = 5, echo=None
) -> dict:
    if repeats < 1:
        raise BadInput("--repeats must be at least 1")
    shape = bench.Shape(rows=rows, layers=layers, width=width, k=k)
    bench.build(root, shape, echo=echo)
    wh = warehouse.open(root)
    reader = _TimedReader(wh)
    links = pages.Links()
    try:
        run, site = shape.run_id, bench.SITE
        unit = reader.rows(
            "SELECT neuron FROM neuron_stats WHERE run_id = ? AND site = ? AND layer = 0 ORDER BY n_fired DESC, neuron LIMIT 1",
            [run, site],
        )[0]["neuron"]
        word = reader.rows("SELECT piece FROM tokens WHERE run_id = ? LIMIT 1", [run])[0]["piece"]
        result = {
            "run_id": run,
            "token_neuron_rows": shape.layers * shape.tokens * shape.k,
            "unit": [0, unit],
            "token": word,
        }
        for name, render in (
            ("unit page", lambda: pages.unit_page(reader, links, run, site, 0, unit)),
            ("token search", lambda: pages.tokens_page(reader, links, run, site, word)),
            ("run/site page", lambda: pages.site_page(reader, links, run, site, 0)),
        ):
            times, spent = _time(render, reader, repeats)
            result[name] = {
                "median_ms": 1e3 * statistics.median(times),
                "min_ms": 1e3 * min(times),
                "queries_ms": {q: 1e3 * s for q, s in spent.items()},
            }
        return result
    finally:
        reader.close()
        wh.close()


def lines(result: dict) -> list[str]:
    out = [
        f"run {result['run_id']}: {result['token_neuron_rows']:,} token_neurons rows; unit page of layer 0 unit "
        f"{result['unit'][1]}, token search for {result['token']!r}"
    ]
    for name in ("unit page", "token search", "run/site page"):
        r = result[name]
        top = next(iter(r["queries_ms"].items()))
        out.append(
            f"{name:<14} median {r['median_ms']:8.1f} ms  min {r['min_ms']:8.1f} ms  dominated by {top[0]} ({top[1]:.1f} ms)"
        )
        out += [f"    {q:<28} {ms:8.1f} ms" for q, ms in r["queries_ms"].items()]
    return out
