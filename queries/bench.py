"""`whq bench query`: the main macros, timed warm on a synthetic warehouse of N token_neurons rows.

The warehouse is written through the normal write path (RunWriter shards of
`shard_tokens` tokens, parts in the row order the capture writes them) and reused
when a run of the same shape is already there. Each token keeps the top-k of
`width` units on every layer of one site `mlp.act`; neuron_stats, neuron_examples,
doc_neurons, documents and tokens match those rows, and the indexes come from
warehouse/indexes.py as for every run, so the macros read what they would read after a real
ingest.
"""

from __future__ import annotations

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
        return f"bench-{self.rows}-l{self.layers}-w{self.width}-k{self.k}"


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
    width, k, n_ex = shape.width, shape.k, shape.examples
    n_fired = np.zeros((shape.layers, width), dtype=np.int64)
    sums = np.zeros((shape.layers, width))
    sum_sq = np.zeros((shape.layers, width))
    candidates: list[list[dict]] = [[] for _ in range(shape.layers)]
    for first in range(0, n_docs, docs_per_shard):
        count = min(docs_per_shard, n_docs - first)
        doc, pos = _token_columns(first, count, shape.doc_len)
        token_ids = rng.integers(100, 30000, len(doc))
        documents, tokens = _documents(first, count, shape.doc_len, token_ids)
        parts = [("documents", None, None, documents), ("tokens", None, None, tokens)]
        for layer in range(shape.layers):
            ids = pool[rng.integers(0, len(pool), len(doc))]
            values = rng.gamma(2.0, 0.5, ids.shape).astype(np.float16)
            cols = {
                "doc": np.repeat(doc, k),
                "pos": np.repeat(pos, k),
                "neuron": ids.reshape(-1),
                "value": values.reshape(-1),
            }
            parts.append(
                ("token_neurons", SITE, layer, to_arrow("token_neurons", part_order("token_neurons", cols), width))
            )
            flat_ids, flat_values = cols["neuron"].astype(np.int64), cols["value"].astype(np.float64)
            n_fired[layer] += np.bincount(flat_ids, minlength=width)
            sums[layer] += np.bincount(flat_ids, flat_values, minlength=width)
            sum_sq[layer] += np.bincount(flat_ids, flat_values**2, minlength=width)
            pick = rng.integers(0, len(flat_ids), 4 * width)
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
    for layer in range(shape.layers):
        merged = {c: np.concatenate([p[c] for p in candidates[layer]]) for c in candidates[layer][0]}
        examples = _examples(merged, width, n_ex, rng)
        final.append(("neuron_examples", SITE, layer, to_arrow("neuron_examples", examples, width)))
        top = examples["kind"] == "top"
        first_rank = top & (examples["rank"] == 0)
        max_value = np.full(width, np.nan)
        max_doc = np.full(width, -1)
        max_pos = np.full(width, -1)
        units = examples["neuron"][first_rank]
        max_value[units], max_doc[units], max_pos[units] = (
            examples["value"][first_rank],
            examples["doc"][first_rank],
            examples["pos"][first_rank],
        )
        seen = max_doc >= 0
        final.append(
            (
                "neuron_stats",
                SITE,
                layer,
                pa.Table.from_pydict(
                    {
                        "neuron": np.arange(width),
                        "n_tokens": np.full(width, n_docs * shape.doc_len),
                        "n_fired": n_fired[layer],
                        "sum": sums[layer],
                        "sum_sq": sum_sq[layer],
                        "max": pa.array(max_value.astype(np.float32), mask=~seen),
                        "max_doc": pa.array(max_doc, pa.int32(), mask=~seen),
                        "max_pos": pa.array(max_pos, pa.int32(), mask=~seen),
                        # The synthetic rows carry no dense values: no min, higher moments or positive part.
                        "min": pa.nulls(width, pa.float32()),
                        **{c: pa.nulls(width, pa.float64()) for c in ("sum_cube", "sum_quad", "sum_pos")},
                    },
                    schema=schema.table("neuron_stats").arrow_schema(width),
                ),
            )
        )
    final += index_parts(writer, {SITE: 0.0})  # as every run writer: the indexes the pages read
    writer.commit(final, writer.started_at)
    return time.perf_counter() - started


def _examples(rows: dict, width: int, n: int, rng) -> dict:
    """Per unit the n largest sampled values (top) and n sampled firings (random)."""
    out = {c: [] for c in ("neuron", "kind", "rank", "doc", "pos", "value")}
    neuron = rows["neuron"].astype(np.int64)
    for kind, key in (("top", -rows["value"].astype(np.float64)), ("random", rng.random(len(neuron)))):
        order = np.lexsort((key, neuron))
        sorted_units = neuron[order]
        starts = np.searchsorted(sorted_units, sorted_units, side="left")
        rank = np.arange(len(order)) - starts
        keep = order[rank < n]
        out["neuron"].append(neuron[keep])
        out["kind"].append(np.full(len(keep), kind))
        out["rank"].append(rank[rank < n])
        for c in ("doc", "pos"):
            out[c].append(rows[c][keep])
        out["value"].append(rows["value"][keep].astype(np.float32))
    merged = {c: np.concatenate(v) for c, v in out.items()}
    return {
        **merged,
        "quantile": np.full(len(merged["neuron"]), None),
        "window_values": pa.nulls(len(merged["neuron"]), pa.list_(pa.float16())),
    }


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
            "sites": [[f"{SITE}:topk={shape.k},nag={shape.k},examples={shape.examples}"]],
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
            "reductions": [f"topk={shape.k},nag={shape.k},examples={shape.examples}"],
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
