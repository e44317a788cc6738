"""Writing one Parquet part atomically: encode in memory, write under tmp/, fsync, rename.

A part never appears at its final path half-written, and its size, row count and
sha256 go to the journal and then the manifest, so `whq check` can verify it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from .errors import WarehouseError
from .faults import fault

# token_neurons (measured on MiniLM top-20 parts, docs/bench-ingest.md, "Storage"): in neuron-major parts
# the doc/pos columns delta-encode to a fraction of a byte a row, and neuron ids (long runs) and
# FLOAT16 values compress best as PLAIN under zstd. Level 3 rather than 6: 2.51 vs 2.49 bytes
# per entry, but encoding is 30% faster, and it runs beside the model on the same cores.
# (BYTE_STREAM_SPLIT would give less, but DuckDB reads it only for FLOAT/DOUBLE.)
_ENCODINGS = {
    "token_neurons": {"doc": "DELTA_BINARY_PACKED", "pos": "DELTA_BINARY_PACKED", "neuron": "PLAIN", "value": "PLAIN"},
}
# token_neurons parts are sorted by neuron (part_order below): small row groups make
# their neuron min/max statistics selective, so a one-unit scan skips most of them. The
# indexes (warehouse/indexes.py) are sorted by their lookup key for the same reason, and
# tokens (in document order) so that an example's window reads its document's row groups only, and
# neuron_examples (unit-major, ingest/finalize.py) so that a unit page reads its unit's windows only.
_ROW_GROUP_ROWS = {
    "token_neurons": 1 << 16,
    "token_units": 1 << 14,
    "unit_coactivations": 1 << 12,
    "tokens": 1 << 12,
    "neuron_examples": 1 << 12,
}
# Min/max statistics where they prune: neuron (one-unit scans) and doc (a shard's documents).
# In neuron-major row groups pos and value span nearly their whole range, so theirs would
# prune nothing and cost 12% of the encode.
_STATISTICS = {"token_neurons": ["neuron", "doc"]}
# zstd's level 3 elsewhere; the model calls' JSON (mostly log-probabilities' digits) came out no
# smaller at level 3 and took twice as long to encode as at level 1.
_ZSTD_LEVEL = {"model_calls": 1}


_POOL: ThreadPoolExecutor | None = None


def side_by_side(function, items) -> list:
    """[function(item) for item in items], on a thread pool (for work that releases the GIL:
    numpy sorts, Parquet encoding, hashing, fsync). One pool for the process: reusing its
    threads keeps malloc from opening a new arena per shard."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="whq-parts")
    return list(_POOL.map(function, items))


@dataclass
class PartInfo:
    table: str
    path: str  # relative to the warehouse root
    rows: int
    bytes: int
    sha256: str
    site: str | None = None
    layer: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def encode(table_name: str, data: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    encodings = {k: v for k, v in _ENCODINGS.get(table_name, {}).items() if k in data.column_names}
    pq.write_table(
        data,
        sink,
        compression="zstd",
        compression_level=_ZSTD_LEVEL.get(table_name, 3),
        use_dictionary=[c for c in data.column_names if c not in encodings],
        column_encoding=encodings or None,
        row_group_size=_ROW_GROUP_ROWS.get(table_name, 1 << 20),
        write_statistics=_STATISTICS.get(table_name, True),
    )
    return sink.getvalue().to_pybytes()


def _cannot_write(final: Path, err: OSError, retry: str) -> WarehouseError:
    return WarehouseError(
        f"cannot write {final}: {err.strerror or err}; free disk space or fix permissions, then {retry}"
    )


def make_durable(paths: list[Path]) -> None:
    """Put the data and entries of `paths` (files, and folders for their entries) on disk, an fsync each
    (not one syncfs of the filesystem, which would also wait for every other program's unwritten data
    there). Raises OSError."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(
    payload: bytes,
    final: Path,
    tmp_dir: Path,
    what: str = "file",
    retry: str = "rerun with --resume",
    *,
    sync_folder: bool = True,
) -> None:
    """Write under tmp_dir, fsync, then rename onto `final` (same filesystem), and fsync its folder.

    `what` names the fault points (warehouse.faults) on the way: <what>.partial/.synced/.renamed.
    `retry` is the advice after a failure (maintenance commands are rerun, not resumed).
    sync_folder=False leaves the folder's fsync to a caller that writes many files into few
    folders and syncs each folder once before it commits.
    """
    install_atomic(write_tmp(payload, final, tmp_dir, what, retry), final, what, retry, sync_folder=sync_folder)


def write_tmp(payload: bytes, final: Path, tmp_dir: Path, what: str, retry: str) -> Path:
    """The first half of write_bytes_atomic: `payload` in a new file under tmp_dir, not yet synced."""
    tmp = tmp_dir / f"{uuid.uuid4().hex}.tmp"
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            view, half = memoryview(payload), len(payload) // 2  # halves without copying the payload
            fh.write(view[:half])
            fault(f"{what}.partial")
            fh.write(view[half:])
            fh.flush()
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(final, err, retry) from None
    return tmp


def install_atomic(
    tmp: Path, final: Path, what: str, retry: str, *, sync_file: bool = True, sync_folder: bool = True
) -> None:
    """The second half of write_bytes_atomic: fsync `tmp` (unless sync_file=False: the caller made it
    durable), rename it onto `final`, fsync the folder (unless sync_folder=False); fault points
    <what>.synced/.renamed."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if sync_file:
            make_durable([tmp])
        fault(f"{what}.synced")
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(final, err, retry) from None
    try:
        fault(f"{what}.renamed")
        if sync_folder:
            make_durable([final.parent])
    except OSError as err:  # the file is in place; its folder's entry may not be on disk yet
        raise _cannot_write(final, err, retry) from None


def write_part(
    root: Path,
    tmp_dir: Path,
    final: Path,
    table_name: str,
    data: pa.Table,
    site: str | None = None,
    layer: int | None = None,
    what: str = "part",
) -> PartInfo:
    payload = encode(table_name, data)
    write_bytes_atomic(payload, final, tmp_dir, what)
    return PartInfo(
        table=table_name,
        path=final.relative_to(root).as_posix(),
        rows=data.num_rows,
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        site=site,
        layer=layer,
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- rows of a part: the order they are stored in, and their Arrow form ------------------
def to_arrow(table: str, columns: dict, width: int | None) -> pa.Table:
    """Column arrays -> an Arrow table with the table's physical schema."""
    target = schema.table(table).arrow_schema(width)
    arrays = []
    for fld in target:
        data = columns[fld.name]
        if isinstance(data, pa.Array):
            arrays.append(data.cast(fld.type))
        elif pa.types.is_list(fld.type):
            matrix = np.asarray(data)
            rows, width_k = matrix.shape
            flat = pa.array(matrix.reshape(-1).astype(fld.type.value_type.to_pandas_dtype()), fld.type.value_type)
            offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width_k)
            arrays.append(pa.ListArray.from_arrays(offsets, flat, type=fld.type))
        elif fld.type == pa.float16():
            arrays.append(pa.array(np.asarray(data, dtype=np.float16), pa.float16()))
        else:
            arrays.append(pa.array(data, type=fld.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=target)


def part_order(table: str, columns: dict) -> dict:
    """The row order of a part: token_neurons by (neuron, doc, pos), every other table in document order.

    Neuron-major token_neurons parts, written in small row groups (_ROW_GROUP_ROWS), let a
    scan for one unit skip every row group whose neuron min/max excludes it: at 100M rows
    a one-neuron scan reads ~1/20 of the rows (docs/bench-ingest.md, "Storage"); they also compress
    better (runs of equal ids).
    """
    order = (
        _neuron_major_order(columns) if table == "token_neurons" and "neuron" in columns else _document_order(columns)
    )
    return {k: np.asarray(v)[order] for k, v in columns.items()}


def _neuron_major_order(columns: dict) -> np.ndarray:
    """The permutation to (neuron, doc, pos) order, stable like np.lexsort.

    A token's rows arrive adjacent, so the (doc, pos) sort runs over tokens (runs of rows
    with one key), 20x fewer than rows at top-20; the rows then get a stable sort by
    neuron, a radix sort for int16 ids.
    """
    doc, pos = np.asarray(columns["doc"]), np.asarray(columns["pos"])
    rows = len(doc)
    if rows == 0:
        return np.arange(0)
    new_token = np.ones(rows, dtype=bool)
    new_token[1:] = (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1])
    starts = np.flatnonzero(new_token)
    lengths = np.diff(np.append(starts, rows))
    token_order = _lexsort([pos[starts].astype(np.int64), doc[starts].astype(np.int64)])
    ordered_lengths = lengths[token_order]
    # Each token's run of rows, the tokens one after another in document order.
    shift = starts[token_order] - (np.cumsum(ordered_lengths) - ordered_lengths)
    in_document_order = np.arange(rows) + np.repeat(shift, ordered_lengths)
    neuron = np.asarray(columns["neuron"])[in_document_order]
    if 0 <= neuron.min() and neuron.max() < 1 << 15:
        neuron = neuron.astype(np.int16)
    return in_document_order[np.argsort(neuron, kind="stable")]


def _document_order(columns: dict) -> np.ndarray:
    """The permutation to (doc, pos, neuron) order: batches run in length order, files are read in document order."""
    keys = [
        np.asarray(columns[k], dtype=np.int64)
        for k in ("neuron", "pos", "doc")
        if k in columns and np.asarray(columns[k]).dtype != object
    ]
    return _lexsort(keys)


def _lexsort(keys: list[np.ndarray]) -> np.ndarray:
    """np.lexsort(keys) (last key primary), 20x faster when the keys pack into one int64.

    Packed, a stable argsort runs timsort, which is near-linear here: each batch's rows
    arrive as long runs already in order.
    """
    if not keys or not len(keys[0]):
        return np.lexsort(keys) if keys else np.arange(0)
    bounds = [(int(key.min()), int(key.max())) for key in keys]
    if any(low < 0 for low, _ in bounds) or np.prod([float(high) + 1 for _, high in bounds]) >= 2.0**62:
        return np.lexsort(keys)
    packed = np.zeros(len(keys[0]), dtype=np.int64)
    scale = 1
    for key, (_, high) in zip(keys, bounds):
        packed += key * scale
        scale *= high + 1
    return np.argsort(packed, kind="stable")
