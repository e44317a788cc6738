"""`whq bench query`: the main macros, timed warm on a synthetic warehouse of N token_neurons rows.

The warehouse is written through the normal write path (RunWriter shards of
`shard_tokens` tokens, parts in the row order the capture writes them) and reused
when a run of the same shape is already there. Each token keeps the top-k of
`width` units on every layer of one site `mlp.act`, which carries every table a capture of
`mlp.act:topk=K,nag=K,examples=20,hist,quantiles=10,similar=10 --logit-lens` writes:
neuron_stats, unit_histograms, neuron_examples of every kind with their window values,
unit_neighbors, neuron_logits, doc_neurons, documents and tokens, and the indexes of
warehouse/indexes.py as for every run; then a few explanations with their examples and scores per
layer, committed as `whq explain` / `whq score` commit theirs. The macros read what they would
read after a real ingest. The values are synthetic: a unit's value is its stored firing, one of
its N negative values (its bottom examples), or 0; window values show the example's own value
and 0 around it; similar units, logit lens, explanations and verdicts are random.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

import warehouse
from warehouse import jsonio, ranges, schema
from warehouse.errors import BadInput
from warehouse.indexes import index_parts

SITE = "mlp.act"
# token_neurons bytes a synthetic row takes on disk, rounded up (docs/bench-queries.md measures 3.2-3.4)
BYTES_PER_ROW = 4
TARGET_EVERY = 100  # every 100th document is in dataset 'target', the rest in 'pool' (for nag_distance)


@dataclass(frozen=True)
class Shape:
    rows: int
    layers: int = 12
    width: int = 3072
    k: int = 20
    doc_len: int = 256
    examples: int = 20
    quantiles: int = 10
    similar: int = 10
    shard_tokens: int = 65536

    def __post_init__(self) -> None:
        # `whq bench query` and `whq bench serve` both build this run: its options are checked here, once.
        ranges.at_least("--layers", self.layers, 1)
        ranges.at_least("--k", self.k, 1)
        if self.k > self.width:
            raise BadInput(
                f"--k {self.k} is more than --width {self.width}: top-k keeps k distinct units of each token; lower --k"
            )
        if self.width > 32767:
            raise BadInput("--width must be at most 32767 (token_neurons stores SMALLINT ids)")
        if self.rows < self.k * self.layers:
            raise BadInput(
                f"--rows {self.rows} is less than one token's rows ({self.k} x {self.layers} layers): raise it"
            )

    @property
    def tokens(self) -> int:
        return max(1, self.rows // (self.k * self.layers))

    @property
    def run_id(self) -> str:
        return f"bench-{self.rows}-l{self.layers}-w{self.width}-k{self.k}-full"

    @property
    def reductions(self) -> str:
        """What a capture with every section of the unit page keeps (the demo's mlp.act, and nag)."""
        return (
            f"topk={self.k},nag={self.k},examples={self.examples},hist,quantiles={self.quantiles},"
            f"similar={self.similar}"
        )


@dataclass
class QueryBench:
    root: str
    shape: Shape
    token_neuron_rows: int
    token_neuron_bytes: int
    build_s: float | None
    timings: dict = field(default_factory=dict)  # name -> [seconds, ...]
    result_rows: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # name -> why

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "run_id": self.shape.run_id,
            "token_neuron_rows": self.token_neuron_rows,
            "token_neuron_bytes": self.token_neuron_bytes,
            "build_s": self.build_s,
            "queries": {
                name: {
                    "median_s": statistics.median(ts),
                    "min_s": min(ts),
                    "result_rows": self.result_rows[name],
                    "rows_per_s": self.token_neuron_rows / statistics.median(ts),
                }
                for name, ts in self.timings.items()
            },
            "skipped": self.skipped,
        }

    def lines(self) -> list[str]:
        s = self.shape
        built = f"built in {self.build_s:,.1f} s" if self.build_s is not None else "reused"
        out = [
            f"warehouse {self.root}, run {s.run_id}: {self.token_neuron_rows:,} token_neurons rows "
            f"({s.layers} layers x {s.tokens:,} tokens x top-{s.k} of {s.width}), "
            f"{self.token_neuron_bytes / 2**20:,.1f} MiB ({self.token_neuron_bytes / max(self.token_neuron_rows, 1):.2f} bytes/row), {built}",
            f"{'query':<34} {'median s':>9} {'min s':>9} {'rows out':>9} {'token_neurons rows/s':>22}",
        ]
        for name, q in self.to_dict()["queries"].items():
            out.append(
                f"{name:<34} {q['median_s']:>9.4f} {q['min_s']:>9.4f} {q['result_rows']:>9,} {q['rows_per_s']:>22,.0f}"
            )
        out += [f"{name:<34} skipped: {why}" for name, why in self.skipped.items()]
        return out


def _token_columns(first_doc: int, n_docs: int, doc_len: int) -> tuple[np.ndarray, np.ndarray]:
    doc = np.repeat(np.arange(first_doc, first_doc + n_docs, dtype=np.int64), doc_len)
    pos = np.tile(np.arange(doc_len, dtype=np.int64), n_docs)
    return doc, pos


def _subset_pool(rng, width: int, k: int, size: int = 4096) -> np.ndarray:
    """`size` random sorted k-subsets of the units: each token's top-k ids are one of them."""
    return np.sort(np.argpartition(rng.random((size, width), dtype=np.float32), k, axis=1)[:, :k], axis=1).astype(
        np.int16
    )


def _documents(first_doc: int, n_docs: int, doc_len: int, token_ids: np.ndarray) -> tuple[pa.Table, pa.Table]:
    pieces = np.char.add("w", token_ids.astype(str))
    lengths = np.char.str_len(pieces) + 1
    starts = np.zeros_like(lengths)
    ends = np.zeros_like(lengths)
    texts = []
    for i in range(n_docs):
        span = slice(i * doc_len, (i + 1) * doc_len)
        offsets = np.cumsum(lengths[span]) - lengths[span]
        starts[span], ends[span] = offsets, offsets + lengths[span] - 1
        texts.append(" ".join(pieces[span].tolist()))
    docs = np.arange(first_doc, first_doc + n_docs)
    documents = pa.Table.from_pydict(
        {
            "doc": docs,
            "doc_id": [f"syn:{d}" for d in docs],
            "dataset": ["target" if d % TARGET_EVERY == 0 else "pool" for d in docs],
            "role": [None] * n_docs,
            "label": [None] * n_docs,
            "message_index": [None] * n_docs,
            "message_role": [None] * n_docs,
            "n_tokens": np.full(n_docs, doc_len),
            "n_windows": np.ones(n_docs, dtype=np.int64),
            "text": texts,
            "meta": [None] * n_docs,
        },
        schema=schema.table("documents").arrow_schema(),
    )
    doc, pos = _token_columns(first_doc, n_docs, doc_len)
    tokens = pa.Table.from_pydict(
        {
            "doc": doc,
            "pos": pos,
            "window": np.zeros(len(doc), dtype=np.int64),
            "token_id": token_ids,
            "piece": pieces,
            "char_start": starts,
            "char_end": ends,
            "special": np.zeros(len(doc), dtype=bool),
            "text": pieces,
            "context": pa.nulls(len(doc), pa.int32()),  # each document is its own model input
            "context_pos": pos,
        },
        schema=schema.table("tokens").arrow_schema(),
    )
    return documents, tokens


def build(root: str | Path, shape: Shape, seed: int = 0, echo=None) -> float | None:
    """Write the synthetic run unless it is already committed; returns seconds spent (None: reused)."""
    from warehouse.parts import part_order, to_arrow
    from warehouse.runwriter import RunWriter

    root = Path(root)
    if not (root / "runs" / f"{shape.run_id}.json").exists():  # checked before anything is created
        disk = next(p for p in (root, *root.absolute().parents) if p.exists())
        needed, free = shape.rows * BYTES_PER_ROW, shutil.disk_usage(disk).free
        if needed > free:
            raise BadInput(
                f"--rows {shape.rows:,} would write about {needed / 2**30:,.1f} GiB of token_neurons, and {disk} has "
                f"{free / 2**30:,.1f} GiB free: lower --rows"
            )
    if echo:  # after the disk check, so a refusal is the command's only line
        echo(f"building {shape.run_id} in {root} (reused if present)")
    wh = warehouse.open_or_init(root)
    if shape.run_id in wh.run_ids():
        return None
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    pool = _subset_pool(rng, shape.width, shape.k)
    writer = RunWriter(wh.layout, shape.run_id, {"bench": "synthetic", **shape.__dict__})
    if writer.completed_shards:
        raise BadInput(
            f"run {shape.run_id} in {root} was interrupted while being built: `whq gc {root} --interrupted`, then rerun"
        )
    docs_per_shard = max(1, shape.shard_tokens // shape.doc_len)
    n_docs = -(-shape.tokens // shape.doc_len)
    n_shards = -(-n_docs // docs_per_shard)
    width, k = shape.width, shape.k
    # Each shard gives every layer an equal share of the example candidates: about 2QN per unit, the
    # size of a capture's quantile pool, from which the top, random and quantile examples are taken.
    picks_per_shard = -(-2 * shape.quantiles * shape.examples * width // n_shards)
    stats = [_Sums(width) for _ in range(shape.layers)]
    candidates: list[list[dict]] = [[] for _ in range(shape.layers)]
    for first in range(0, n_docs, docs_per_shard):
        count = min(docs_per_shard, n_docs - first)
        doc, pos = _token_columns(first, count, shape.doc_len)
        token_ids = rng.integers(100, 30000, len(doc))
        documents, tokens = _documents(first, count, shape.doc_len, token_ids)
        parts = [("documents", None, None, documents), ("tokens", None, None, tokens)]
        for layer in range(shape.layers):
            ids = pool[rng.integers(0, len(pool), len(doc))]
            # firings: every stored value is above the site's threshold 0
            values = (rng.gamma(2.0, 0.5, ids.shape) + 2.0**-10).astype(np.float16)
            cols = {
                "doc": np.repeat(doc, k),
                "pos": np.repeat(pos, k),
                "neuron": ids.reshape(-1),
                "value": values.reshape(-1),
            }
            parts.append(
                ("token_neurons", SITE, layer, to_arrow("token_neurons", part_order("token_neurons", cols), width))
            )
            stats[layer].add(cols["neuron"], cols["value"])
            pick = rng.choice(len(cols["neuron"]), min(picks_per_shard, len(cols["neuron"])), replace=False)
            candidates[layer].append({c: cols[c][pick] for c in cols})
            impacts = np.sort(rng.gamma(2.0, 0.5, (count, k)).astype(np.float32), axis=1)[:, ::-1]
            parts.append(
                (
                    "doc_neurons",
                    SITE,
                    layer,
                    to_arrow(
                        "doc_neurons",
                        {
                            "doc": np.repeat(np.arange(first, first + count), k),
                            "rank": np.tile(np.arange(k), count),
                            "neuron": pool[rng.integers(0, len(pool), count)].reshape(-1),
                            "impact": impacts.reshape(-1),
                        },
                        width,
                    ),
                )
            )
        writer.commit_shard(parts, info={"next_doc": first + count, "n_docs": count, "n_tokens": len(doc)})
        if echo:
            echo(f"  shard {writer.completed_shards}: documents {first + count:,}/{n_docs:,}")
    final = [("runs", None, None, _runs_row(shape, n_docs)), ("sites", None, None, _sites_row(shape))]
    explained = []
    for layer in range(shape.layers):
        merged = {c: np.concatenate([p[c] for p in candidates[layer]]) for c in candidates[layer][0]}
        candidates[layer] = []
        bottom = _bottom(shape, n_docs, rng)
        stats[layer].add(bottom["neuron"], bottom["value"])
        hist = stats[layer].histogram(n_docs * shape.doc_len)
        examples = _examples(merged, bottom, _quantile_bins(hist, shape.quantiles), shape, n_docs, rng)
        final += [
            ("neuron_examples", SITE, layer, to_arrow("neuron_examples", examples, width)),
            ("neuron_stats", SITE, layer, stats[layer].table(examples, n_docs * shape.doc_len)),
            ("unit_histograms", SITE, layer, _histogram_rows(hist)),
            ("unit_neighbors", SITE, layer, _neighbours(width, shape.similar, rng)),
            ("neuron_logits", SITE, layer, _logit_lens(width, rng)),
        ]
        explained.append((layer, examples, stats[layer].most_fired(EXPLAINED_UNITS)))
    final += index_parts(writer, {SITE: 0.0})  # as every run writer: the indexes the pages read
    writer.commit(final, writer.started_at)
    _explain(wh, shape, explained, rng)
    return time.perf_counter() - started


EXPLAINED_UNITS = 4  # per layer, the units that fired most (the unit `whq bench serve` shows among them)
HIST_BINS = 196  # the fixed grid of unit_histograms (ingest/reductions.py)
WINDOW_BEFORE, WINDOW_AFTER = 50, 20  # neuron_examples.window_values: 50 tokens before to 20 after


def _hist_bins(values: np.ndarray) -> np.ndarray:
    """ingest/reductions.py hist_bins in numpy (torch stays out of queries/): each value's bin 0..195."""
    bits = values.astype(np.float32).view(np.int32)
    k = ((bits & 0x7FFFFFFF) >> 21).astype(np.int64) - 460
    inside = (k >= 0) & (k < 96)
    below = np.where(inside, 96 - k, np.where(k < 0, 97, 0))
    above = np.where(inside, 99 + k, np.where(k < 0, 98, 195))
    return np.where(bits <= 0, below, above)


class _Sums:
    """One layer's exact aggregates of the unit values the run holds: the stored firings, the
    negative values its bottom examples show, and 0 at every other token."""

    def __init__(self, width: int):
        self.width = width
        self.n_fired = np.zeros(width, dtype=np.int64)
        self.moments = np.zeros((5, width))  # sum of value^0..4 over the non-zero values
        self.sum_pos = np.zeros(width)
        self.counts = np.zeros(width * HIST_BINS, dtype=np.int64)

    def add(self, neuron: np.ndarray, value: np.ndarray) -> None:
        units, v = neuron.astype(np.int64), value.astype(np.float64)
        self.n_fired += np.bincount(units[v > 0], minlength=self.width)
        for power in range(5):
            self.moments[power] += np.bincount(units, v**power, minlength=self.width)
        self.sum_pos += np.bincount(units, np.maximum(v, 0), minlength=self.width)
        self.counts += np.bincount(units * HIST_BINS + _hist_bins(value), minlength=self.width * HIST_BINS)

    def histogram(self, n_tokens: int) -> np.ndarray:
        """[units, bins]: the tokens without a value of the unit hold 0, bin 97."""
        hist = self.counts.reshape(self.width, HIST_BINS).copy()
        hist[:, 97] += n_tokens - self.moments[0].astype(np.int64)
        return hist

    def most_fired(self, n: int) -> np.ndarray:
        return np.lexsort((np.arange(self.width), -self.n_fired))[:n]  # ties to the lower unit, as the bench's ORDER BY

    def table(self, examples: dict, n_tokens: int) -> pa.Table:
        first = {}
        for kind in ("top", "bottom"):
            at = (examples["kind"] == kind) & (examples["rank"] == 0)
            first[kind] = {c: examples[c][at] for c in ("neuron", "value", "doc", "pos")}
        top = first["top"]
        max_value, max_doc, max_pos = np.full(self.width, np.nan), np.full(self.width, -1), np.full(self.width, -1)
        max_value[top["neuron"]], max_doc[top["neuron"]], max_pos[top["neuron"]] = top["value"], top["doc"], top["pos"]
        min_value = np.zeros(self.width)
        min_value[first["bottom"]["neuron"]] = first["bottom"]["value"]
        seen = max_doc >= 0
        return pa.Table.from_pydict(
            {
                "neuron": np.arange(self.width),
                "n_tokens": np.full(self.width, n_tokens),
                "n_fired": self.n_fired,
                "sum": self.moments[1],
                "sum_sq": self.moments[2],
                "max": pa.array(max_value.astype(np.float32), mask=~seen),
                "max_doc": pa.array(max_doc, pa.int32(), mask=~seen),
                "max_pos": pa.array(max_pos, pa.int32(), mask=~seen),
                "min": min_value.astype(np.float32),
                "sum_cube": self.moments[3],
                "sum_quad": self.moments[4],
                "sum_pos": self.sum_pos,
            },
            schema=schema.table("neuron_stats").arrow_schema(self.width),
        )


def _quantile_bins(hist: np.ndarray, q: int) -> np.ndarray:
    """ingest/finalize.py quantile_bins for the site's threshold 0 (the bins above 97 hold the firings):
    [units, bins] quantile bin of each histogram bin holding firings, else -1."""
    firing = np.where(np.arange(HIST_BINS) > 97, hist, 0).astype(np.float64)
    total = firing.sum(axis=1, keepdims=True)
    before = np.cumsum(firing, axis=1) - firing
    with np.errstate(invalid="ignore", divide="ignore"):
        bins = np.minimum(q - 1, np.floor(q * (before + firing / 2) / total))
    return np.where(firing > 0, bins, -1).astype(np.int64)


def _first(group: np.ndarray, key: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each group's n smallest keys, grouped in order, and their rank within the group."""
    order = np.lexsort((key, group))
    sorted_group = group[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_group, sorted_group)
    return order[rank < n], rank[rank < n]


def _bottom(shape: Shape, n_docs: int, rng) -> dict:
    """Per unit its N negative values (a GELU's small negative part) at random tokens, most negative first."""
    n, width = shape.examples, shape.width
    return {
        "neuron": np.repeat(np.arange(width), n),
        "doc": rng.integers(0, n_docs, width * n),
        "pos": rng.integers(0, shape.doc_len, width * n),
        "value": -np.sort(rng.gamma(2.0, 0.05, (width, n)) + 2.0**-10, axis=1)[:, ::-1].reshape(-1).astype(np.float16),
    }


def _examples(rows: dict, bottom: dict, quantile_of_bin: np.ndarray, shape: Shape, n_docs: int, rng) -> dict:
    """Per unit the kinds of neuron_examples a capture of examples=N,quantiles=Q keeps: top (the
    largest candidates), bottom, random (N candidates), nonfiring (N windows without a firing) and
    quantile (up to N candidates of each quantile bin), unit-major as ingest writes them."""
    n, width = shape.examples, shape.width
    neuron = rows["neuron"].astype(np.int64)
    out = {c: [] for c in ("neuron", "kind", "rank", "doc", "pos", "value", "quantile")}

    def add(kind, picked, rank, source, quantile=None):
        out["neuron"].append(source["neuron"][picked].astype(np.int64))
        out["kind"].append(np.full(len(picked), kind))
        out["rank"].append(rank)
        for c in ("doc", "pos", "value"):
            out[c].append(source[c][picked])
        out["quantile"].append(np.full(len(picked), -1) if quantile is None else quantile)

    add("top", *_first(neuron, -rows["value"].astype(np.float64), n), rows)
    add("bottom", np.arange(len(bottom["neuron"])), np.tile(np.arange(n), width), bottom)
    add("random", *_first(neuron, rng.random(len(neuron)), n), rows)
    blocks = max(1, shape.doc_len - WINDOW_BEFORE - WINDOW_AFTER)  # a 71-token block inside the document
    quiet = {
        "neuron": np.repeat(np.arange(width), n),
        "doc": rng.integers(0, n_docs, width * n),
        "pos": np.minimum(rng.integers(0, blocks, width * n) + WINDOW_BEFORE, shape.doc_len - 1),
        "value": np.zeros(width * n, dtype=np.float16),
    }
    add("nonfiring", np.arange(width * n), np.tile(np.arange(n), width), quiet)
    bin_of = quantile_of_bin[neuron, _hist_bins(rows["value"])]
    picked, _ = _first(neuron * shape.quantiles + bin_of, rng.random(len(neuron)), n)
    units = neuron[picked]  # grouped by (unit, bin): rank runs through a unit's bins in order
    add("quantile", picked, np.arange(len(picked)) - np.searchsorted(units, units), rows, bin_of[picked])
    merged = {c: np.concatenate(v) for c, v in out.items()}
    order = np.argsort(merged["neuron"], kind="stable")
    merged = {c: v[order] for c, v in merged.items()}
    merged["quantile"] = pa.array(merged["quantile"], pa.int32(), mask=merged["quantile"] < 0)
    merged["window_values"] = _windows(merged["pos"], merged["value"], shape.doc_len)
    return merged


def _windows(pos: np.ndarray, value: np.ndarray, doc_len: int) -> pa.Array:
    """Each example's window values: its own value at its token, 0 at the others of its document
    (the synthetic unit's value where it holds none), NULL outside the document."""
    at = pos[:, None] + np.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1)
    windows = np.where((at >= 0) & (at < doc_len), 0.0, np.nan).astype(np.float16)
    windows[:, WINDOW_BEFORE] = value
    flat = windows.reshape(-1)
    offsets = pa.array(np.arange(len(pos) + 1, dtype=np.int32) * windows.shape[1])
    return pa.ListArray.from_arrays(offsets, pa.array(flat, pa.float16(), mask=np.isnan(flat)))


def _histogram_rows(hist: np.ndarray) -> pa.Table:
    units, bins = np.nonzero(hist)  # empty bins are not stored
    return pa.Table.from_pydict(
        {"neuron": units, "bin": bins.astype(np.int16), "count": hist[units, bins]},
        schema=schema.table("unit_histograms").arrow_schema(),
    )


def _neighbours(width: int, k: int, rng) -> pa.Table:
    """Per unit k other units of its layer (reduction similar=K), most similar output direction first."""
    k = min(k, width - 1)
    others = np.argpartition(rng.random((width, width - 1), dtype=np.float32), k - 1, axis=1)[:, :k]
    others += others >= np.arange(width)[:, None]  # skip the unit itself
    cosine = -np.sort(-rng.uniform(0.1, 0.6, (width, k)), axis=1)
    return pa.Table.from_pydict(
        {
            "neuron": np.repeat(np.arange(width), k),
            "rank": np.tile(np.arange(k), width),
            "other": others.reshape(-1),
            "cosine": cosine.reshape(-1).astype(np.float32),
        },
        schema=schema.table("unit_neighbors").arrow_schema(width),
    )


def _logit_lens(width: int, rng, k: int = 10) -> pa.Table:
    """Per unit its k most promoted and k most suppressed tokens (whq ingest --logit-lens)."""
    ids = rng.integers(100, 30000, (2, width, k))
    logits = np.sort(rng.gamma(2.0, 0.5, (2, width, k)), axis=2)[:, :, ::-1] * np.array([1, -1])[:, None, None]
    pieces = np.char.add("w", ids.reshape(-1).astype(str))
    return pa.Table.from_pydict(
        {
            "neuron": np.tile(np.repeat(np.arange(width), k), 2),
            "direction": np.repeat(["top", "bottom"], width * k),
            "rank": np.tile(np.arange(k), 2 * width),
            "token_id": ids.reshape(-1),
            "token": pieces,
            "logit": logits.reshape(-1).astype(np.float32),
            "text": pieces,
        },
        schema=schema.table("neuron_logits").arrow_schema(width),
    )


def _explain(wh, shape: Shape, explained: list[tuple], rng) -> None:
    """Commit an explanation of each layer's most firing units, as `whq explain` and `whq score` do
    (explain/store.py): the examples shown to the explainer (the unit's top examples), the verdicts of
    the detection, fuzz and embedding scorers on its random examples and non-firing windows, and the
    scores those verdicts give."""
    import datetime as dt

    from explain import metrics, store

    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    settings = jsonio.dumps({"n_explain": shape.examples, "n_test": shape.examples, "synthetic": True})
    parts = []
    for layer, examples, units in explained:
        rows = {"explanations": [], "explanation_examples": [], "scores": []}
        for unit in units:
            exp_id = _hash(shape.run_id, SITE, layer, unit, "synthetic")[:16]
            embedding = rng.standard_normal(384)
            rows["explanations"].append(
                dict(
                    neuron=unit,
                    explanation_id=exp_id,
                    explainer="delphi",
                    model="synthetic",
                    text=f"synthetic explanation of unit {unit}",
                    parsed=True,
                    settings=settings,
                    prompt_hash=_hash(exp_id),
                    embedding=(embedding / np.linalg.norm(embedding)).tolist(),
                    created_at=now,
                )
            )
            rows["explanation_examples"] += _example_rows(examples, unit, exp_id, "top")
            tested = _example_rows(examples, unit, exp_id, "random") + _example_rows(
                examples, unit, exp_id, "nonfiring"
            )
            for scorer, judge in (("detection", "synthetic"), ("fuzz", "synthetic"), ("embedding", "minilm")):
                verdicts = []
                for row in tested:
                    probability = float(rng.beta(4, 2) if row["truth"] else rng.beta(2, 4))
                    prediction = probability if scorer == "embedding" else float(probability >= 0.5)
                    verdicts.append(
                        row
                        | dict(
                            scorer=scorer,
                            model=judge,
                            role="test" if row["truth"] else "non-activating",
                            prediction=prediction,
                            probability=None if scorer == "embedding" else probability,
                            correct=None if scorer == "embedding" else (prediction == 1.0) == row["truth"],
                            parsed=True,
                            request_hash=None
                            if scorer == "embedding"
                            else _hash(exp_id, scorer, row["doc"], row["pos"]),
                        )
                    )
                truth = [r["truth"] for r in verdicts]
                if scorer == "embedding":
                    values = {"auc": metrics.roc_auc(truth, [r["prediction"] for r in verdicts])}
                else:
                    values = metrics.classification(metrics.confusion(truth, [r["prediction"] for r in verdicts]))
                    values["auc"] = metrics.roc_auc(truth, [r["probability"] for r in verdicts])
                rows["explanation_examples"] += verdicts
                rows["scores"] += [
                    dict(
                        neuron=unit,
                        explanation_id=exp_id,
                        scorer=scorer,
                        model=judge,
                        metric=metric,
                        value=value,
                        n_examples=len(verdicts),
                        n_unparsable=0,
                        settings=settings,
                        created_at=now,
                    )
                    for metric, value in values.items()
                ]
        parts += [
            (table, SITE, layer, pa.Table.from_pylist(found, schema=schema.table(table).arrow_schema()))
            for table, found in rows.items()
        ]
    store.commit(wh, shape.run_id, "bench", parts, set())


def _hash(*parts) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _example_rows(examples: dict, unit: int, exp_id: str, kind: str) -> list[dict]:
    """The unit's neuron_examples of `kind` as the explainer's examples (explanation_examples, scorer NULL)."""
    from explain.examples import Window
    from explain.scorers import example_row

    source = {"top": "top", "random": "random", "nonfiring": "non-firing"}[kind]
    return [
        example_row(
            exp_id,
            unit,
            None,
            "explain",
            Window(
                int(examples["doc"][i]),
                int(examples["pos"][i]),
                [],
                [],
                source,
                kind != "nonfiring",
                value=float(examples["value"][i]),
            ),  # fmt: skip
        )
        for i in np.flatnonzero((examples["neuron"] == unit) & (examples["kind"] == kind))
    ]


def _runs_row(shape: Shape, n_docs: int) -> pa.Table:
    import datetime as dt

    return pa.Table.from_pydict(
        {
            "model_id": ["synthetic"],
            "model_revision": [None],
            "model_class": ["synthetic"],
            "dtype": ["float16"],
            "device": ["none"],
            "n_layers": [shape.layers],
            "sites": [[f"{SITE}:{shape.reductions}"]],
            "n_documents": [n_docs],
            "n_tokens": [n_docs * shape.doc_len],
            "config": [jsonio.dumps(shape.__dict__)],
            "created_at": [dt.datetime.now(dt.UTC).replace(tzinfo=None)],
            "status": ["committed"],
        },
        schema=schema.table("runs").arrow_schema(),
    )


def _sites_row(shape: Shape) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "site": [SITE],
            "module_glob": ["synthetic"],
            "hook_point": ["in"],
            "modules": [[f"layers.{i}" for i in range(shape.layers)]],
            "layers": [list(range(shape.layers))],
            "width": [shape.width],
            "reductions": [shape.reductions],
            "threshold": [0.0],
        },
        schema=schema.table("sites").arrow_schema(),
    )


def _queries(run: str, layer: int, neuron: int) -> dict[str, tuple[str, str]]:
    """name -> (macro it needs, SQL)."""
    q = f"'{run}'"
    return {
        "layer_summary": ("layer_summary", f"SELECT * FROM layer_summary({q}, '{SITE}')"),
        "firing_rate": ("firing_rate", f"SELECT * FROM firing_rate({q}, '{SITE}', {layer})"),
        "selectivity": ("selectivity", f"SELECT * FROM selectivity({q}, '{SITE}', {layer})"),
        "top_contexts": ("top_contexts", f"SELECT * FROM top_contexts({q}, '{SITE}', {layer}, {neuron}, k := 20)"),
        "nag_distance": (
            "nag_distance",
            f"SELECT * FROM nag_distance({q}, {q}, '{SITE}', target_dataset := 'target', pool_dataset := 'pool')",
        ),
        "ref_similarity": ("ref_similarity", None),
        "scan one neuron (baseline)": (
            "",
            f"SELECT count(*), max(t.value) FROM token_neurons t WHERE t.run_id = {q} "
            f"AND t.site = '{SITE}' AND t.layer = {layer} AND t.neuron = {neuron}",
        ),
    }


def bench_query(
    root: str | Path,
    rows: int = 10_000_000,
    *,
    layers: int = 12,
    width: int = 3072,
    k: int = 20,
    repeats: int = 5,
    shard_tokens: int = 65536,
    seed: int = 0,
    echo=None,
) -> QueryBench:
    """Build (or reuse) the synthetic run of `rows` token_neurons rows, then time each macro warm."""
    if repeats < 1:
        raise BadInput("--repeats must be at least 1")
    shape = Shape(rows=rows, layers=layers, width=width, k=k, shard_tokens=shard_tokens)
    say = echo or (lambda _: None)
    build_s = build(root, shape, seed, echo=say)
    wh = warehouse.open(root)
    parts = [p for p in wh.manifest(shape.run_id)["parts"] if p["table"] == "token_neurons"]
    result = QueryBench(str(Path(root)), shape, sum(p["rows"] for p in parts), sum(p["bytes"] for p in parts), build_s)
    con = wh.connect()
    try:
        known = {r[0] for r in con.execute("SELECT DISTINCT function_name FROM duckdb_functions()").fetchall()}
        neuron = int(
            con.execute(
                "SELECT neuron FROM neuron_stats WHERE run_id = ? AND layer = 0 ORDER BY n_fired DESC LIMIT 1",
                [shape.run_id],
            ).fetchone()[0]
        )
        for name, (macro, sql) in _queries(shape.run_id, 0, neuron).items():
            if macro and macro not in known:
                result.skipped[name] = f"macro {macro} is not in this catalog"
                continue
            if sql is None:
                result.skipped[name] = (
                    "needs a scenario run (vectors of reference states); the synthetic warehouse has none"
                )
                continue
            out = con.execute(sql).fetchall()  # warm-up: file metadata and OS cache
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                con.execute(sql).fetchall()
                times.append(time.perf_counter() - start)
            result.timings[name], result.result_rows[name] = times, len(out)
            say(f"  {name}: {statistics.median(times):.4f} s")
    finally:
        con.close()
        wh.close()
    return result
