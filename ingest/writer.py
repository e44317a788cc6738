"""The background writer: host arrays -> Arrow rows -> Parquet parts, one shard at a time.

The model thread hands each batch's host copies over a bounded queue (so a slow disk
applies back-pressure instead of growing memory) and keeps computing; this thread
turns them into table rows, and at each shard boundary commits the shard's parts and
resume state through the RunWriter.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from warehouse.parts import part_order, side_by_side, to_arrow


@dataclass
class HostBatch:
    row_doc: np.ndarray  # [B] document of each row
    row_start: np.ndarray  # [B] position of each row's first token
    lengths: np.ndarray  # [B] valid tokens per row
    finished_docs: np.ndarray  # documents whose last window is in this batch, in order
    finished_last_pos: np.ndarray  # position of each finished document's last token
    outputs: dict = field(default_factory=dict)  # (site, layer) -> {name: array}
    ready: object = None  # CUDA event: outputs are valid once it completes (None: already valid)


@dataclass
class Flush:
    """Marker: set `done` once every item queued before it has been processed."""

    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class ShardEnd:
    documents: pa.Table
    tokens: pa.Table
    state: dict  # name -> pa.Table (resume state)
    info: dict
    widths: dict  # (site, layer) -> units, for the list columns of vectors
    extra_parts: list = field(default_factory=list)  # (table, site, layer, Arrow table) committed with the shard


def _token_rows(batch: HostBatch, ids: np.ndarray, values: np.ndarray) -> dict:
    """Per-token top-k arrays [B, T, k] -> rows, padding dropped (part_order sorts them)."""
    rows, seq, k = ids.shape
    valid = np.arange(seq)[None, :] < batch.lengths[:, None]
    ids, values = ids[valid], values[valid]
    b, t = np.nonzero(valid)
    # int32 as stored: half the bytes for part_order's gathers and no cast in to_arrow.
    return {
        "doc": np.repeat(batch.row_doc[b].astype(np.int32), k),
        "pos": np.repeat((batch.row_start[b] + t).astype(np.int32), k),
        "neuron": ids.reshape(-1),
        "value": values.reshape(-1),
    }


def _threshold_rows(batch: HostBatch, index: np.ndarray, values: np.ndarray) -> dict:
    b, t, unit = index[:, 0], index[:, 1], index[:, 2]
    return {"doc": batch.row_doc[b], "pos": batch.row_start[b] + t, "neuron": unit, "value": values}


def batch_parts(batch: HostBatch) -> list[tuple]:
    """(table, site, layer, column dict) pieces for one batch."""
    pieces = []
    for (site, layer), out in batch.outputs.items():
        if "topk_ids" in out:
            pieces.append(("token_neurons", site, layer, _token_rows(batch, out["topk_ids"], out["topk_values"])))
        if "threshold_index" in out:
            pieces.append(
                ("token_neurons", site, layer, _threshold_rows(batch, out["threshold_index"], out["threshold_values"]))
            )
        if "nag_ids" in out:
            docs, k = len(batch.finished_docs), out["nag_ids"].shape[1]
            pieces.append(
                (
                    "doc_neurons",
                    site,
                    layer,
                    {
                        "doc": np.repeat(batch.finished_docs, k),
                        "rank": np.tile(np.arange(k), docs),
                        "neuron": out["nag_ids"].reshape(-1),
                        "impact": out["nag_impacts"].reshape(-1),
                    },
                )
            )
        for pool, positions in (("last", batch.finished_last_pos), ("mean", None)):
            if pool in out:
                n = len(batch.finished_docs)
                pieces.append(
                    (
                        "vectors",
                        site,
                        layer,
                        {
                            "doc": batch.finished_docs,
                            "step": np.full(n, None),
                            "pos": positions if positions is not None else np.full(n, None),
                            "pool": np.full(n, pool),
                            "vec": out[pool],
                        },
                    )
                )
        if "dense" in out:
            b, t = np.nonzero(np.arange(int(batch.lengths.max(initial=0)))[None, :] < batch.lengths[:, None])
            n = len(b)
            pieces.append(
                (
                    "vectors",
                    site,
                    layer,
                    {
                        "doc": batch.row_doc[b],
                        "step": np.full(n, None),
                        "pos": batch.row_start[b] + t,
                        "pool": np.full(n, "token"),
                        "vec": out["dense"],
                    },
                )
            )
    return pieces


class ShardWriter:
    """Consumes HostBatch / ShardEnd items on a thread; commits each shard."""

    def __init__(self, run_writer, max_pending: int = 4):
        self.run_writer = run_writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.rows: dict[str, int] = defaultdict(int)
        self._pending: dict[tuple, list[dict]] = defaultdict(list)
        self._thread = threading.Thread(target=self._run, name="whq-writer", daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def flush(self) -> None:
        """Wait until everything queued so far is processed (shards committed)."""
        marker = Flush()
        self.put(marker)
        while not marker.done.wait(0.1):
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        self.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread if it still runs (after an error in the model thread)."""
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if isinstance(item, Flush):
                    item.done.set()
                elif isinstance(item, HostBatch):
                    if item.ready is not None:
                        item.ready.synchronize()
                    for table, site, layer, columns in batch_parts(item):
                        self._pending[(table, site, layer)].append(columns)
                else:
                    self._commit(item)
        except BaseException as err:  # surfaced to the model thread by put()/close()
            self.error = err
            while True:  # unblock the producer
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _commit(self, end: ShardEnd) -> None:
        parts = [("documents", None, None, end.documents), ("tokens", None, None, end.tokens)]
        parts += merged_parts(self._pending, end.widths) + end.extra_parts
        self._pending.clear()
        self.run_writer.commit_shard(parts, end.state, end.info)
        for table, _, _, data in parts:
            self.rows[table] += data.num_rows


def merged_parts(pending: dict, widths: dict) -> list[tuple]:
    """(table, site, layer, Arrow table) per key of `pending`: its batch pieces concatenated, in part order."""

    def merge(key):
        (table, site, layer), pieces = key, pending[key]
        merged = part_order(table, {k: _concat([p[k] for p in pieces]) for k in pieces[0]})
        return table, site, layer, to_arrow(table, merged, widths.get((site, layer)))

    return side_by_side(merge, list(pending))


def _concat(chunks: list):
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate([np.asarray(c) for c in chunks])
