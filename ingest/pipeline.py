"""The ingest pipeline: documents -> windows -> batches -> hooked forward -> shards -> commit.

    from ingest.pipeline import ingest
    ingest("wh", model="minilm", data=["docs.jsonl"], sites=["mlp.act:topk=20", "mlp.up:nag=20"])

Documents are streamed and processed in shards of whole documents; each shard is
committed with the run's resume state, so an interrupted ingest continues with
`resume=True` from its last shard and ends with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

import warehouse
from warehouse.errors import BadInput, BadSpec, WarehouseError
from warehouse.runwriter import RunWriter, committed_with_same_config

from . import sources
from .sites import ResolvedSite, parse_spec, resolve
from .tokenize import Window, pad_batch, windows

DEFAULT_SITES = ("mlp.act:topk=20", "mlp.up:nag=20", "resid.out:last")


@dataclass
class ShardDocs:
    docs: list            # (ordinal, Document, [Window])
    next_doc: int         # ordinal after the last document of the shard


def default_run_id(model: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", Path(model.split(":")[0]).name or model).strip("-.") or "run"
    return f"{stem[:40]}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"


def _data_identity(paths: list[Path]) -> list[dict]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths]


def _documents_identity(documents: list) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(json.dumps([doc.doc_id, doc.text, doc.dataset, doc.role, doc.label], default=str).encode())
    return digest.hexdigest()


def _shards(stream: Iterator, tokenizer, *, start: int, rank: int, world_size: int, max_length: int,
            truncate: bool, shard_tokens: int) -> Iterator[ShardDocs]:
    docs, tokens, ordinal = [], 0, -1
    for ordinal, doc in enumerate(stream):
        if ordinal < start or ordinal % world_size != rank:
            continue
        wins = windows(ordinal, doc.text, tokenizer, max_length, truncate)
        docs.append((ordinal, doc, wins))
        tokens += sum(len(w.ids) for w in wins)
        if tokens >= shard_tokens:
            yield ShardDocs(docs, ordinal + 1)
            docs, tokens = [], 0
    if docs:
        yield ShardDocs(docs, ordinal + 1)


def _batches(wins: list[Window], batch_size: int) -> Iterator[list[Window]]:
    live = [w for w in wins if w.ids]
    for i in range(0, len(live), batch_size):
        yield live[i:i + batch_size]


def _context(batch: list[Window], pad_id: int, device: str):
    """Host arrays and the device-side BatchContext for one batch of windows."""
    import torch

    from .capture import BatchContext
    from .writer import HostBatch

    ids, mask = pad_batch(batch, pad_id)
    rows, seq = ids.shape
    docs = np.array([w.doc for w in batch], dtype=np.int64)
    starts = np.array([w.start_pos for w in batch], dtype=np.int64)
    lengths = mask.sum(axis=1)
    segment_of: dict[int, int] = {}
    segment = [segment_of.setdefault(int(d), len(segment_of)) for d in docs]
    finished_rows = [row for row, w in enumerate(batch) if w.last]
    finished_docs = docs[finished_rows]
    finished_tokens = np.array([batch[r].start_pos + len(batch[r].ids) for r in finished_rows], dtype=np.int64)

    def dev(array, dtype=torch.int64):
        return torch.as_tensor(np.asarray(array), dtype=dtype).to(device, non_blocking=True)

    ctx = BatchContext(
        mask=dev(mask, torch.bool),
        lengths=dev(lengths),
        row_doc=dev(np.repeat(docs, seq)),
        row_pos=dev((starts[:, None] + np.arange(seq)[None, :]).reshape(-1)),
        segment=dev(segment),
        n_segments=len(segment_of),
        finished=dev([segment_of[int(d)] for d in finished_docs]),
        finished_tokens=dev(finished_tokens, torch.float32),
        last_rows=dev(finished_rows),
        carry_in=batch[0].index > 0,
        carry_out=not batch[-1].last,
        full=bool(mask.all()),
    )
    host = HostBatch(docs, starts, lengths, finished_docs, finished_tokens - 1)
    return dev(ids), dev(mask), ctx, host


def capture_batch(loaded, site_layers: list, batch: list[Window], device: str):
    """One hooked forward pass; returns the batch's HostBatch (outputs still in flight on CUDA)."""
    from .capture import collect

    ids, mask, ctx, host = _context(batch, loaded.tokenizer.pad_id, device)
    for sl in site_layers:
        sl.ctx = ctx
    _forward(loaded, ids, mask)
    host.outputs, host.ready = collect(site_layers)
    return host


def _document_rows(shard: ShardDocs) -> pa.Table:
    cols = {k: [] for k in ("doc", "doc_id", "dataset", "role", "label", "message_index", "message_role",
                            "n_tokens", "n_windows", "text", "meta")}
    for ordinal, doc, wins in shard.docs:
        cols["doc"].append(ordinal)
        cols["doc_id"].append(doc.doc_id)
        cols["dataset"].append(doc.dataset)
        cols["role"].append(doc.role)
        cols["label"].append(doc.label)
        cols["message_index"].append(doc.meta.get("message_index"))
        cols["message_role"].append(doc.meta.get("message_role"))
        cols["n_tokens"].append(sum(len(w.ids) for w in wins))
        cols["n_windows"].append(len(wins))
        cols["text"].append(doc.text)
        cols["meta"].append(json.dumps(doc.meta, default=str) if doc.meta else None)
    return pa.Table.from_pydict(cols, schema=warehouse.schema.table("documents").arrow_schema())


def _token_rows(shard: ShardDocs, tokenizer) -> pa.Table:
    ids, pieces, texts, docs, pos, win, starts, ends, special = [], [], [], [], [], [], [], [], []
    for ordinal, _, wins in shard.docs:
        for w in wins:
            n = len(w.ids)
            ids.extend(w.ids)
            pieces.extend(tokenizer.pieces(w.ids))
            texts.extend(tokenizer.texts(w.ids))
            docs.extend([ordinal] * n)
            pos.extend(range(w.start_pos, w.start_pos + n))
            win.extend([w.index] * n)
            starts.extend(None if s < 0 else s for s in w.char_start)
            ends.extend(None if e < 0 else e for e in w.char_end)
            special.extend(w.special)
    cols = {"doc": docs, "pos": pos, "window": win, "token_id": ids, "piece": pieces,
            "char_start": starts, "char_end": ends, "special": special, "text": texts}
    return pa.Table.from_pydict(cols, schema=warehouse.schema.table("tokens").arrow_schema())


def _forward(loaded, ids, mask):
    model = loaded.model
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if loaded.family == "decoder":
        kwargs["logits_to_keep"] = 1  # hidden states are what we capture; skip the full-vocab projection
    return model(**kwargs)


def ingest(
    root: str | Path,
    model: str = "minilm",
    data: Iterable[str] = (),
    sites: Iterable[str] = DEFAULT_SITES,
    *,
    documents: list | None = None,
    run_id: str | None = None,
    dataset: str | None = None,
    role: str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    truncate: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    resume: bool = False,
    shard_tokens: int = 65536,
    skip_bad: bool = False,
    logit_lens: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    loaded=None,
) -> dict:
    """Capture `sites` of `model` over the documents and commit them as one run.

    Returns a summary dict (run_id, rows per table, bytes, tokens, seconds, tokens_per_s).
    """
    from . import models
    from .capture import SiteLayer, attach
    from .writer import ShardEnd, ShardWriter

    specs = [parse_spec(s) for s in sites]
    if not specs:
        raise BadSpec("no --site given: add e.g. --site mlp.act:topk=20")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BadSpec(f"site given twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): merge the reductions into one SPEC, e.g. mlp.act:topk=20,examples=20")
    if batch_size < 1:
        raise BadInput("--batch-size must be at least 1")
    if shard_tokens < 1:
        raise BadInput("--shard-tokens must be at least 1")
    paths = [] if documents is not None else sources.check_paths(list(data))
    root = Path(root)
    wh = warehouse.open(root) if (root / "whq.json").exists() else warehouse.init(root)
    loaded = loaded or models.load(model, device, dtype)
    resolved: list[ResolvedSite] = [resolve(spec, loaded.module_names, loaded.aliases) for spec in specs]
    max_length = int(max_length or loaded.max_length)
    positions = (loaded.config.get("model_config") or {}).get("max_position_embeddings")
    if positions and max_length > positions:
        raise BadInput(f"--max-length {max_length} is longer than the {positions} positions model {model!r} has: "
                       f"use at most {positions} (longer documents are split into windows)")
    if max_length <= loaded.tokenizer.n_special:
        raise BadInput(f"--max-length {max_length} leaves no room for text after {loaded.tokenizer.n_special} special tokens: raise it")
    if logit_lens and (loaded.family != "decoder" or loaded.model.get_output_embeddings() is None):
        raise BadInput("--logit-lens needs a causal LM with an unembedding (lm_head); this model has none: drop --logit-lens")
    from .finalize import check_similar

    check_similar(loaded, resolved)
    run_id = run_id or default_run_id(model)
    config = {
        "model": model, "model_id": loaded.model_id, "sites": [s.text for s in specs],
        "data": _data_identity(paths) if documents is None else {"documents": len(documents), "sha256": _documents_identity(documents)},
        "dataset": dataset, "role": role, "batch_size": batch_size, "max_length": max_length, "truncate": truncate,
        "dtype": dtype, "shard_tokens": shard_tokens, "skip_bad": skip_bad, "logit_lens": logit_lens,
        "world_size": world_size, "resume": resume,
    }
    if resume and (done := committed_with_same_config(wh.layout, run_id, config)) is not None:
        # Killed after its commit: the run is complete, resuming it is a no-op.
        return {"run_id": run_id, "rows": done["rows"], "bytes": sum(p["bytes"] for p in done["parts"]), "already_committed": True}
    from .ranks import open_writer

    writer = open_writer(lambda: RunWriter(wh.layout, run_id, config, resume=resume, rank=rank, world_size=world_size),
                         rank, world_size)
    device = loaded.config["device"]
    site_layers = [SiteLayer(r, layer, module, device) for r in resolved for layer, module in r.modules]
    saved = {}
    for sl in site_layers:
        for prefix in ("stats", "examples"):
            table = writer.state(f"{prefix}.{sl.name}.{sl.layer}")
            if table is not None:
                saved[f"{prefix}.{sl.name}.{sl.layer}"] = table
    for sl in site_layers:
        sl.restore(saved)
    start_doc = writer.shard_info()[-1]["next_doc"] if writer.completed_shards else 0

    counter = sources.SkipCounter(skip_bad)
    stream = iter(documents) if documents is not None else sources.read(paths, counter, dataset, role)
    handles = attach(loaded.model, site_layers)
    shard_writer = ShardWriter(writer, {})
    started = time.perf_counter()
    n_tokens = n_docs = 0
    import torch

    from .progress import IngestProgress

    try:
        with IngestProgress(enabled=progress, run_id=run_id) as bar, torch.inference_mode():
            for shard in _shards(stream, loaded.tokenizer, start=start_doc, rank=rank, world_size=world_size,
                                 max_length=max_length, truncate=truncate, shard_tokens=shard_tokens):
                # Shortest documents first: batches of similar length waste little on padding.
                # A document's windows stay consecutive and in order (the capture relies on it).
                by_length = sorted(shard.docs, key=lambda d: sum(len(w.ids) for w in d[2]))
                wins = [w for _, _, ws in by_length for w in ws]
                for batch in _batches(wins, batch_size):
                    host = capture_batch(loaded, site_layers, batch, device)
                    shard_writer.put(host)
                    batch_tokens = int(host.lengths.sum())
                    n_tokens += batch_tokens
                    bar.advance(docs=len(host.finished_docs), tokens=batch_tokens)
                for sl in site_layers:
                    shard_writer.widths[(sl.name, sl.layer)] = sl.width
                state = {name: table for sl in site_layers for name, table in sl.state_tables().items()}
                n_docs += len(shard.docs)
                bar.advance(docs=sum(1 for _, _, ws in shard.docs if not any(w.ids for w in ws)), tokens=0)
                shard_writer.put(ShardEnd(_document_rows(shard), _token_rows(shard, loaded.tokenizer), state,
                                          {"next_doc": shard.next_doc, "n_docs": len(shard.docs),
                                           "n_tokens": sum(len(w.ids) for w in wins)}))
            shard_writer.close()
    except WarehouseError:
        # A bad input before anything was journalled: leave no interrupted run behind to trip the next try.
        if not writer.completed_shards:
            writer.discard()
        raise
    finally:
        for handle in handles:
            handle.remove()
        shard_writer.stop()
    if counter.skipped:
        print(f"skipped {counter.skipped} bad record(s); first: {counter.first_error}")
    if rank != 0:
        writer.finish_rank()
        return {"run_id": run_id, "rank": rank, "documents": n_docs, "tokens": n_tokens}
    if world_size > 1:
        from .ranks import merge_ranks

        merge_ranks(writer, site_layers)
    total_docs = sum(i["n_docs"] for i in writer.run_shard_info())
    if total_docs == 0:
        writer.discard()
        raise BadInput("no documents to capture: the data files hold no readable documents")
    from .finalize import final_parts

    manifest = writer.commit(final_parts(loaded, resolved, site_layers, writer, logit_lens), writer.started_at)
    seconds = time.perf_counter() - started
    written = sum(p["bytes"] for p in manifest["parts"])
    return {
        "run_id": run_id, "rows": manifest["rows"], "bytes": written, "documents": total_docs,
        "tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / seconds if seconds else 0.0,
        "skipped": counter.skipped,
    }
