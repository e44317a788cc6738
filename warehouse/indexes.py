"""Indexes precomputed at commit from a run's stored top-k rows, so that a unit page and a token
search read a few rows instead of scanning `token_neurons`.

`index_parts(writer, thresholds)` reads the `tokens` and `token_neurons` parts every rank of the
run journalled and returns run-level parts for `RunWriter.commit`:

- `unit_coactivations` per (site, layer): each unit's top-K co-activating units of its layer by
  the Jaccard index of the sets of tokens where each is stored above the site threshold (what
  `similar_units` reports as kind coactivation);
- `token_units` per (site, layer): per token id and unit, the firings above the threshold and
  the sum of their values (what `units_for_token` adds up);
- `vocabulary`: per token id its piece, text and how many tokens of the run it is.

Every writer of runs with top-k rows calls it (ingest/finalize.py for captures and chat
scenarios, queries/bench.py for the synthetic run): it lives here, below both rooms. A token's
rows and its `tokens` row are in the same shard (a shard holds whole documents), so the work
goes one shard's parts at a time and memory is bounded by the indexes' size, not the run's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from .errors import WarehouseError

COACTIVATION_K = 32  # co-activating units kept per unit: similar_units(k := ...) up to this reads them
# Pairs cost sum over tokens of (units stored at the token)^2: a threshold capture of a dense site
# (hundreds of firing units a token) would make it quadratic, so such a layer keeps no
# co-activations and similar_units computes them from token_neurons instead.
MAX_MEAN_COFIRING = 64
_BLOCK_CELLS = 1 << 25  # pair counts held at once (int64): 256 MiB; wider layers go in blocks of units
_CHUNK_PAIRS = 1 << 23  # pairs expanded at once


def index_parts(writer, thresholds: dict[str, float], k: int = COACTIVATION_K) -> list[tuple]:
    """The run-level parts (table, site, layer, pyarrow.Table) of the indexes over the parts every
    rank of `writer` (a RunWriter) journalled so far; `thresholds`: {site: its firing threshold}
    for the sites to index (sites without token_neurons parts are skipped). Call it on rank 0
    once the ranks have finished, and pass the parts to `writer.commit` with the others."""
    shards = [s["parts"] for r in range(writer.world_size) for s in writer.rank_shards(r)]
    root = Path(writer.layout.root)
    layers: dict[tuple[str, int], list[tuple[Path, Path]]] = defaultdict(list)
    tokens_of_shard = []
    for parts in shards:
        tokens = [root / p["path"] for p in parts if p["table"] == "tokens"]
        tokens_of_shard.extend(tokens)
        for p in parts:
            if p["table"] == "token_neurons" and p["site"] in thresholds:
                if len(tokens) != 1:
                    raise WarehouseError(f"shard part {p['path']} has {len(tokens)} tokens parts beside it, not 1")
                layers[(p["site"], p["layer"])].append((tokens[0], root / p["path"]))
    out = [("vocabulary", None, None, _vocabulary(tokens_of_shard))] if tokens_of_shard else []
    for (site, layer), pairs in sorted(layers.items()):
        threshold = thresholds[site]
        out.append(("token_units", site, layer, _token_units(pairs, threshold)))
        coactivations = _coactivations([tn for _, tn in pairs], threshold, k)
        if coactivations is not None:
            out.append(("unit_coactivations", site, layer, coactivations))
    return out


def _table(name: str, columns: dict) -> pa.Table:
    target = schema.table(name).arrow_schema()
    return pa.Table.from_pydict({f.name: columns[f.name] for f in target}, schema=target)


def _fired(path: Path, threshold: float) -> dict[str, np.ndarray]:
    """One token_neurons part's rows above the threshold, in (doc, pos) order."""
    t = pq.read_table(path, columns=["doc", "pos", "neuron", "value"])
    cols = {c: t.column(c).to_numpy() for c in t.column_names}
    keep = cols["value"] > threshold
    cols = {c: v[keep] for c, v in cols.items()}
    order = np.lexsort((cols["pos"], cols["doc"]))
    return {c: v[order] for c, v in cols.items()}


def _token_key(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return (doc.astype(np.int64) << 32) | pos.astype(np.int64)


def _vocabulary(paths: list[Path]) -> pa.Table:
    ids, pieces, texts = [], [], []
    for path in paths:
        t = pq.read_table(path, columns=["token_id", "piece", "text"])
        ids.append(t.column("token_id").to_numpy())
        pieces.append(t.column("piece").to_numpy(zero_copy_only=False))
        texts.append(t.column("text").to_numpy(zero_copy_only=False))
    ids = np.concatenate(ids)
    unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
    return _table(
        "vocabulary",
        {
            "token_id": unique.astype(np.int32),
            "piece": np.concatenate(pieces)[first],
            "text": np.concatenate(texts)[first],
            "n_tokens": counts.astype(np.int64),
        },
    )


def _token_units(pairs: list[tuple[Path, Path]], threshold: float) -> pa.Table:
    """Per (token id, unit): firings above the threshold and their value sum, in (token_id, neuron) order."""
    codes, counts, sums = [], [], []
    for tokens_path, rows_path in pairs:
        tokens = pq.read_table(tokens_path, columns=["doc", "pos", "token_id"])
        keys = _token_key(tokens.column("doc").to_numpy(), tokens.column("pos").to_numpy())
        order = np.argsort(keys, kind="stable")
        keys, token_ids = keys[order], tokens.column("token_id").to_numpy()[order]
        fired = _fired(rows_path, threshold)
        wanted = _token_key(fired["doc"], fired["pos"])
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        if len(wanted) and not np.array_equal(keys[at], wanted):
            raise WarehouseError(f"{rows_path} holds rows of tokens that its shard's tokens part {tokens_path} lacks")
        code = (token_ids[at].astype(np.int64) << 32) | fired["neuron"].astype(np.int64)
        unique, inverse = np.unique(code, return_inverse=True)
        codes.append(unique)
        counts.append(np.bincount(inverse, minlength=len(unique)))
        sums.append(np.bincount(inverse, fired["value"].astype(np.float64), minlength=len(unique)))
    code, inverse = np.unique(np.concatenate(codes), return_inverse=True)
    return _table(
        "token_units",
        {
            "token_id": (code >> 32).astype(np.int32),
            "neuron": (code & 0xFFFFFFFF).astype(np.int32),
            "n_fired": np.bincount(inverse, np.concatenate(counts), minlength=len(code)).astype(np.int64),
            # float16 values add up exactly in float64 (in any order), as units_for_token's avg over the rows
            "value_sum": np.bincount(inverse, np.concatenate(sums), minlength=len(code)),
        },
    )


def _coactivations(paths: list[Path], threshold: float, k: int) -> pa.Table | None:
    """Per unit its top-k others by Jaccard index of firing-token sets (ties: lower unit id first);
    None where the pairs would cost too much (MAX_MEAN_COFIRING)."""
    n_fired = np.zeros(0, dtype=np.int64)
    pairs = 0
    for path in paths:
        fired = _fired(path, threshold)
        counts = np.bincount(fired["neuron"].astype(np.int64))
        n_fired = np.pad(n_fired, (0, max(0, len(counts) - len(n_fired))))
        n_fired[: len(counts)] += counts
        pairs += int((_run_lengths(fired) ** 2).sum())
    rows = int(n_fired.sum())
    if rows == 0 or pairs > MAX_MEAN_COFIRING * rows:
        return None
    width = len(n_fired)
    block = max(1, _BLOCK_CELLS // width)
    cols = {c: [] for c in ("neuron", "rank", "other", "n_shared", "jaccard")}
    for first in range(0, width, block):
        last = min(width, first + block)
        shared = np.zeros((last - first) * width, dtype=np.int64)
        for path in paths:
            _count_pairs(_fired(path, threshold), first, last, width, shared)
        shared = shared.reshape(last - first, width)
        units = np.arange(first, last)
        shared[units - first, units] = 0  # not itself
        with np.errstate(invalid="ignore", divide="ignore"):
            jaccard = shared / (n_fired[units, None] + n_fired[None, :] - shared)
        jaccard[shared == 0] = -1.0
        top = np.argsort(-jaccard, axis=1, kind="stable")[:, :k]  # stable: ties keep the lower unit first
        picked = np.take_along_axis(jaccard, top, axis=1)
        keep = picked >= 0
        ranks = np.broadcast_to(np.arange(top.shape[1]), top.shape)
        cols["neuron"].append(np.broadcast_to(units[:, None], top.shape)[keep])
        cols["rank"].append(ranks[keep])
        cols["other"].append(top[keep])
        cols["n_shared"].append(np.take_along_axis(shared, top, axis=1)[keep])
        cols["jaccard"].append(picked[keep])
    columns = {c: np.concatenate(v) for c, v in cols.items()}
    columns["kept"] = np.full(len(columns["neuron"]), k, dtype=np.int32)
    return _table("unit_coactivations", columns)


def _run_lengths(fired: dict) -> np.ndarray:
    """Rows of each token, the rows being in (doc, pos) order."""
    doc, pos = fired["doc"], fired["pos"]
    if len(doc) == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(len(doc), dtype=bool)
    new[1:] = (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1])
    return np.diff(np.append(np.flatnonzero(new), len(doc)))


def _count_pairs(fired: dict, first: int, last: int, width: int, shared: np.ndarray) -> None:
    """Add to `shared` ([(last - first) * width]) the tokens each unit of first..last-1 shares with every unit."""
    lengths = _run_lengths(fired)
    if len(lengths) == 0:
        return
    units = fired["neuron"].astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    row_token = np.repeat(np.arange(len(lengths)), lengths)
    mine = np.flatnonzero((units >= first) & (units < last))  # rows whose unit is in the block
    per_row = lengths[row_token[mine]]  # pairs of each such row: one per row of its token
    ends = np.cumsum(per_row)
    begin = 0
    while begin < len(mine):
        # rows mine[begin:stop] expand to at most _CHUNK_PAIRS pairs (one row alone may exceed it)
        stop = max(begin + 1, int(np.searchsorted(ends, (ends[begin - 1] if begin else 0) + _CHUNK_PAIRS, "right")))
        rows, counts = mine[begin:stop], per_row[begin:stop]
        offset = np.repeat(np.cumsum(counts) - counts, counts)
        partner = np.repeat(starts[row_token[rows]], counts) + np.arange(int(counts.sum())) - offset
        code = np.repeat((units[rows] - first) * width, counts) + units[partner]
        shared += np.bincount(code, minlength=len(shared))
        begin = stop
