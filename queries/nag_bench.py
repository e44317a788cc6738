"""NAG at pool scale: a synthetic pool in the warehouse format, timed in SQL, Polars and numpy.

The pool is written through the normal write path (warehouse.runwriter.write_run), one
layer at a time, so memory stays bounded. Its documents have K distinct units per layer
drawn from a skewed (Zipf-like) popularity, as real NAGs do. The baseline is a vectorised
numpy kernel written the way NAG's reference kernel is: the pool's features as a dense
[N, L, K] id array, and per layer a dense weight array indexed by those ids, summed,
divided by L. It reads the same Parquet parts, so every engine starts from the same files.
Each engine's scan alone (doc and neuron of every row, decoded) bounds what any plan that
reads every row can reach against the kernel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import warehouse
from warehouse import schema
from warehouse.runwriter import write_run

SITE = "mlp.up"
TARGET_DOCS = 1000


def run_id(n_docs: int) -> str:
    return f"nag-bench-{n_docs}"


def _popularity(rng: np.random.Generator, width: int) -> np.ndarray:
    weights = 1.0 / (np.arange(width) + 10.0)
    return (weights / weights.sum())[rng.permutation(width)]


def _layer_rows(rng, n_docs: int, width: int, k: int, popularity: np.ndarray) -> pa.Table:
    """K distinct units per document: a popular start unit, then steps coprime with the width."""
    start = rng.choice(width, size=n_docs, p=popularity)
    strides = np.array([s for s in (1, 5, 7, 11, 13, 17, 19, 23, 29, 31) if np.gcd(s, width) == 1])
    stride = strides[rng.integers(0, len(strides), n_docs)]
    ids = (start[:, None] + stride[:, None] * np.arange(k)[None, :]) % width
    impact = rng.random(n_docs, dtype=np.float32)[:, None] / (1.0 + np.arange(k, dtype=np.float32))[None, :]
    target = schema.table("doc_neurons").arrow_schema(width)
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(np.arange(n_docs, dtype=np.int32), k)),
            pa.array(np.tile(np.arange(k, dtype=np.int16), n_docs)),
            pa.array(ids.reshape(-1).astype(np.int16 if width <= 32767 else np.int32)),
            pa.array(impact.reshape(-1)),
        ],
        schema=target,
    )


def build(root: str | Path, n_docs: int, *, n_layers: int = 28, k: int = 20, width: int = 6144, seed: int = 0) -> str:
    """Write run nag-bench-<n_docs>: TARGET_DOCS target documents (role target) then n_docs pool documents."""
    root = Path(root)
    wh = warehouse.open_or_init(root)
    run = run_id(n_docs)
    if run in wh.run_ids():
        return run
    rng = np.random.default_rng(seed)
    total = TARGET_DOCS + n_docs
    popularity = _popularity(rng, width)
    n_tokens = rng.integers(16, 4096, total).astype(np.int32)
    roles = np.where(np.arange(total) < TARGET_DOCS, "target", "pool")
    datasets = np.where(roles == "target", "target", np.where(rng.random(total) < 0.5, "web-a", "web-b"))

    def parts():
        yield (
            "documents",
            None,
            None,
            pa.Table.from_pydict(
                {
                    "doc": np.arange(total, dtype=np.int32),
                    "doc_id": [f"d{i:09d}" for i in range(total)],
                    "dataset": datasets,
                    "role": roles,
                    "label": pa.nulls(total, pa.string()),
                    "message_index": pa.nulls(total, pa.int32()),
                    "message_role": pa.nulls(total, pa.string()),
                    "n_tokens": n_tokens,
                    "n_windows": (n_tokens + 511) // 512,
                    "text": pa.nulls(total, pa.string()),
                    "meta": pa.nulls(total, pa.string()),
                },
                schema=schema.table("documents").arrow_schema(),
            ),
        )
        yield (
            "sites",
            None,
            None,
            pa.Table.from_pydict(
                {
                    "site": [SITE],
                    "module_glob": ["model.layers.*.mlp.up_proj"],
                    "hook_point": ["out"],
                    "modules": [[f"model.layers.{i}.mlp.up_proj" for i in range(n_layers)]],
                    "layers": [list(range(n_layers))],
                    "width": [width],
                    "reductions": [f"nag={k}"],
                    "threshold": [0.0],
                },
                schema=schema.table("sites").arrow_schema(),
            ),
        )
        yield (
            "runs",
            None,
            None,
            pa.Table.from_pydict(
                {
                    "model_id": ["synthetic"],
                    "model_revision": [None],
                    "model_class": [None],
                    "dtype": [None],
                    "device": [None],
                    "n_layers": [n_layers],
                    "sites": [[f"{SITE}:nag={k}"]],
                    "n_documents": [total],
                    "n_tokens": [int(n_tokens.sum())],
                    "config": ['{"source": "queries.nag_bench"}'],
                    "created_at": [None],
                    "status": ["committed"],
                },
                schema=schema.table("runs").arrow_schema(),
            ),
        )
        for layer in range(n_layers):
            yield "doc_neurons", SITE, layer, _layer_rows(rng, total, width, k, popularity)

    write_run(wh.layout, run, parts(), {"source": "queries.nag_bench", "n_docs": n_docs, "seed": seed})
    return run


# -- the numpy baseline -------------------------------------------------------------
def numpy_select(wh, run: str, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(pool doc ordinals in selection order, their distances), the reference kernel's way."""
    docs = pq.read_table([str(f) for f in wh.files("documents", run)], columns=["doc", "doc_id", "role", "n_tokens"])
    role = docs.column("role").to_numpy(zero_copy_only=False)
    doc = docs.column("doc").to_numpy()
    pool, targets = doc[role == "pool"], doc[role == "target"]
    layers = sorted(
        {p["layer"] for p in wh.manifest(run)["parts"] if p["table"] == "doc_neurons" and p["site"] == SITE}
    )
    position = np.full(doc.max() + 1, -1, dtype=np.int64)
    position[pool] = np.arange(len(pool))
    is_target = np.zeros(doc.max() + 1, dtype=bool)
    is_target[targets] = True
    features = None
    weights = []
    doc_neuron_files = wh.files("doc_neurons", run)
    for i, layer in enumerate(layers):
        files = [str(p) for p in doc_neuron_files if f"/site={SITE}/layer={layer}/" in p.as_posix()]
        part = pq.read_table(files, columns=["doc", "rank", "neuron"])
        d, r, n = (part.column(c).to_numpy() for c in ("doc", "rank", "neuron"))
        if features is None:
            # -1 (the zero appended to each weight array) where a document has fewer than K rows
            features = np.full((len(pool), len(layers), int(r.max()) + 1), -1, dtype=np.int32)
        in_pool = position[d] >= 0
        features[position[d[in_pool]], i, r[in_pool]] = n[in_pool]
        counts = np.bincount(n[is_target[d]], minlength=int(n.max()) + 1).astype(np.float64)
        weights.append(np.append(counts, 0.0))  # n_docs; the normaliser n_targets * K is applied once, as the macros do
    similarity = np.zeros(len(pool))
    for i, weight in enumerate(weights):
        similarity += weight[features[:, i, :]].sum(axis=1)
    distance = 1.0 - similarity * (1.0 / (float(weights[0].sum()) * len(layers)))
    pool_rows = np.flatnonzero(role == "pool")
    doc_ids = docs.column("doc_id").to_numpy(zero_copy_only=False)[pool_rows]
    tokens = docs.column("n_tokens").to_numpy()[pool_rows]
    order = np.lexsort((doc_ids, distance))
    cumulative = np.cumsum(tokens[order])
    keep = max(1, int(np.searchsorted(cumulative, np.floor(fraction * tokens.sum()), side="right")))
    return pool[order[:keep]], distance[order[:keep]]


# -- timing -----------------------------------------------------------------------------
@dataclass
class Timing:
    engine: str
    step: str
    wall_s: float
    cpu_s: float
    rows: int


def _timed(engine: str, step: str, fn) -> tuple[Timing, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if isinstance(result, int):  # a scan returns how many rows it read
        rows = result
    else:
        rows = result[0].shape[0] if isinstance(result, tuple) else len(result)
    return Timing(engine, step, time.perf_counter() - wall, time.process_time() - cpu, rows), result


def run_bench(root: str | Path, n_docs: int, fraction: float = 0.2, echo=print) -> list[Timing]:
    """Build (or reuse) the pool, then time the scan bound, distance and selection in SQL, Polars and numpy."""
    from queries import nag, nag_frames
    from queries.frames import scan

    started = time.perf_counter()
    run = build(root, n_docs)
    echo(
        f"pool {run}: {n_docs:,} documents x 28 layers x K=20 in {root} ({time.perf_counter() - started:.1f} s to build or open)"
    )
    wh = warehouse.open(root)
    wh.sql("SET enable_progress_bar = false")
    args = f"'{run}', '{run}', '{SITE}', target_role := 'target', pool_role := 'pool'"
    kwargs = dict(target_role="target", pool_role="pool")
    # "scan" reads the two columns every plan must read, doc and neuron of every row at the
    # site (nag_distance reads them all), and sums them so that they are decoded: no plan that
    # reads every row can beat its time.
    pool_rows = f"FROM doc_neurons n WHERE n.run_id = '{run}' AND n.site = '{SITE}'"
    timings, selections = [], {}
    for engine, step, fn in [
        ("sql", "scan", lambda: wh.sql(f"SELECT count(*), sum(n.doc), sum(n.neuron) {pool_rows}").fetchall()[0][0]),
        (
            "polars",
            "scan",
            lambda: (
                scan(wh, "doc_neurons", run)
                .filter(pl.col("site") == SITE)
                .select(pl.len(), pl.col("doc").sum(), pl.col("neuron").sum())
                .collect(engine="streaming")
                .item(0, 0)
            ),
        ),
        ("sql", "distance", lambda: wh.sql(f"SELECT * FROM nag_distance({args})").to_arrow_table()),
        (
            "sql",
            "select",
            lambda: wh.sql(f"SELECT * FROM nag_select({args}, fraction := {fraction})").to_arrow_table(),
        ),
        # what `whq nag select` runs: the profile staged in a temporary table, then nag_select
        ("sql-staged", "select", lambda: nag.select(wh, run, run, SITE, fraction=fraction, **kwargs)),
        (
            "polars",
            "distance",
            lambda: nag_frames.nag_distance(wh, run, run, SITE, **kwargs).collect(engine="streaming"),
        ),
        (
            "polars",
            "select",
            lambda: nag_frames.nag_select(wh, run, run, SITE, fraction=fraction, **kwargs).collect(engine="streaming"),
        ),
        ("numpy", "select", lambda: numpy_select(wh, run, fraction)),
    ]:
        timing, result = _timed(engine, step, fn)
        timings.append(timing)
        echo(f"  {engine:<11}{step:<9}{timing.wall_s:8.2f} s wall {timing.cpu_s:8.2f} s cpu  {timing.rows:>10,} rows")
        if step == "select":
            selections[engine] = [int(d) for d in (result[0] if engine == "numpy" else result["doc"].to_numpy())]
    same = all(picked == selections["numpy"] for picked in selections.values())
    base = next(t for t in timings if t.engine == "numpy")
    for t in timings:
        if t.step in ("select", "scan") and t.engine != "numpy":
            echo(f"numpy / {t.engine} ({t.step}): {base.wall_s / t.wall_s:.1f}x wall, {base.cpu_s / t.cpu_s:.1f}x cpu")
    echo(f"selections identical across engines: {same} ({len(selections['sql']):,} documents)")
    wh.close()
    return timings
