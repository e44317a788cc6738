"""The ingest pipeline: documents -> windows -> batches -> hooked forward -> shards -> commit.

    from ingest.pipeline import ingest
    ingest("wh", model="minilm", data=["docs.jsonl"], sites=["mlp.act:topk=20", "mlp.up:nag=20"])
    ingest("wh", IngestOptions("minilm", data=("docs.jsonl",), batch_size=32))   # the same, as one object

Documents are streamed and processed in shards of whole documents; each shard is
committed with the run's resume state, so an interrupted ingest continues with
`resume=True` from its last shard and ends with exactly the rows of an uninterrupted run.
`ingest()` is its steps in order, one small function each; the capture is set up by
ingest/prepare.py and runs as `shard.Capture`, both shared with `whq bench ingest` and
scenario runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import warehouse
from warehouse.errors import BadInput, WarehouseError
from warehouse.names import check_label, check_name
from warehouse.runwriter import RunWriter, committed_with_same_config

from . import contexts, inputs, limits, sources
from .capture import Capture
from .options import DEFAULT_SITES, IngestOptions, default_run_id
from .prepare import read_sites, ready_capture
from .ranks import merge_ranks, open_writer, refuse_repeated_ids, share
from .shard import Shard


@dataclass
class IngestResult:
    """What an ingest or a scenario run did (the CLI says it)."""

    run_id: str
    rows: dict[str, int] = field(default_factory=dict)  # committed rows per table
    bytes: int = 0  # committed bytes on disk
    documents: int | None = None  # None: not captured by this call
    tokens: int | None = None  # rank 0: the run's, over every rank (as documents); another rank: its own
    seconds: float | None = None
    captured: int | None = None  # tokens this call captured over every rank (tokens/s; 0: not known); None: tokens
    skipped: int = 0  # bad records skipped (--skip-bad)
    first_skipped: str | None = None  # why the first of them was bad
    already_committed: bool = False  # a --resume of a run that had committed: nothing done
    rank: int = 0  # not 0: this rank's part is written, rank 0 commits
    notes: list[str] = field(default_factory=list)  # where the run differs from what was asked

    @property
    def tokens_per_s(self) -> float:
        captured = self.tokens if self.captured is None else self.captured
        return captured / self.seconds if captured and self.seconds else 0.0


def _documents_identity(documents: list) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(json.dumps([doc.doc_id, doc.text, doc.dataset, doc.role, doc.label], default=str).encode())
    return digest.hexdigest()


def _start_doc(writer) -> int:
    """The ordinal to continue from: after the last journalled shard of this rank."""
    return writer.shard_info()[-1]["next_doc"] if writer.completed_shards else 0


def _capture_shards(
    options: IngestOptions, capture: Capture, writer, shards: Iterator[Shard], run_id: str
) -> tuple[int, int]:
    """Capture every shard into the run's journal; returns (documents, tokens) captured."""
    import torch

    from warehouse.collector import loaded_exempt

    from .hooks import hooks
    from .progress import IngestProgress
    from .writer import ShardWriter

    shard_writer = ShardWriter(writer)
    n_docs = n_tokens = 0

    def count(host) -> None:
        nonlocal n_tokens
        batch_tokens = int(host.lengths.sum())
        n_tokens += batch_tokens
        bar.advance(docs=len(host.finished_docs), tokens=batch_tokens)

    try:
        with (
            IngestProgress(enabled=options.progress, run_id=run_id) as bar,
            hooks(capture.loaded.model, capture.taps),
            torch.inference_mode(),
            loaded_exempt(),
        ):
            for shard in shards:
                capture.shard(shard, shard.batches(options.batch_size), shard_writer, on_batch=count)
                n_docs += len(shard.docs)
                # Documents without a token finish in no batch: count them here.
                bar.advance(docs=shard.doc_tokens.count(0), tokens=0)
            shard_writer.close()
    except BaseException as err:
        # A bad input before anything was journalled: leave no interrupted run behind to trip the next try.
        if isinstance(err, WarehouseError) and not writer.completed_shards:
            writer.discard()
        writer.close()  # release the run's lock: a --resume from this same process must be able to take it
        raise
    finally:
        shard_writer.stop()
    return n_docs, n_tokens


def _commit(options: IngestOptions, capture: Capture, resolved: list, writer) -> tuple[dict, int, int]:
    """Rank 0: fold in the other ranks, write the run-level tables, commit; returns (manifest, documents,
    tokens) of the run, over every rank."""
    from .finalize import final_parts

    if options.world_size > 1:
        merge_ranks(writer, capture.site_layers)
    infos = writer.run_shard_info()
    total_docs = sum(i["n_docs"] for i in infos)
    if total_docs == 0:
        writer.discard()
        raise BadInput("no documents to capture: the data files hold no readable documents")
    parts = final_parts(capture.loaded, resolved, capture.site_layers, writer, options.logit_lens)
    return writer.commit(parts, writer.started_at), total_docs, sum(i["n_tokens"] for i in infos)


def ingest(
    root: str | Path,
    model: str | IngestOptions = "minilm",
    data: Iterable[str] = (),
    sites: Iterable[str] = DEFAULT_SITES,
    *,
    documents: list | None = None,
    loaded=None,
    **options,
) -> IngestResult:
    """Capture the sites of a model over the documents and commit them as one run.

    Takes an IngestOptions, or its fields (`model`, `data`, `sites` and the keywords);
    `documents` (Document objects) replace `data`, and `loaded` an already loaded model.
    """
    from . import models

    opts = model if isinstance(model, IngestOptions) else IngestOptions(model, tuple(data), tuple(sites), **options)
    if opts.run_id is not None:
        check_name("run id", opts.run_id)
    for kind, label in (("--dataset", opts.dataset), ("--role", opts.role)):
        if label is not None:
            check_label(kind, label)
    # Opened before the run exists: bad records of plain files, unknown columns and splits are refused now,
    # and the data's identity (file hashes, dataset fingerprints) ties --resume to the content.
    source = inputs.open_input(opts) if documents is None else None
    device = loaded.config["device"] if loaded else models.resolve_device(opts.device)
    request = read_sites(opts.sites, device, splice=opts.splice)
    loaded = loaded or models.load(opts.model, opts.device, opts.dtype)
    ready = ready_capture(request, loaded)
    max_length = limits.window_length(opts.max_length, loaded, opts.model)
    plan, opts, notes = contexts.plan(
        opts, loaded.tokenizer, request.dictionaries, max_length, limits.model_positions(loaded)
    )
    limits.check_logit_lens(opts.logit_lens, loaded)
    wh = warehouse.open_or_init(root)  # once every input is checked: a refused one creates no warehouse
    run_id = opts.run_id or default_run_id(opts.model)
    identity = (
        source.identity
        if documents is None
        else {"documents": len(documents), "sha256": _documents_identity(documents)}
    )
    config = opts.run_config(
        model_id=loaded.model_id, sites=[s.text for s in request.specs], data_identity=identity, max_length=max_length
    )
    if opts.resume and (done := committed_with_same_config(wh.layout, run_id, config)) is not None:
        # Killed after its commit: the run is complete, resuming it is a no-op.
        return IngestResult(run_id, done["rows"], sum(p["bytes"] for p in done["parts"]), already_committed=True)
    if opts.resume and source is not None and source.paths:
        from .resume import refuse_changed_data

        refuse_changed_data(wh.layout, run_id, source.paths, source.plain_identity)

    counter = sources.SkipCounter(opts.skip_bad)
    # Before the run exists: where each rank reads its own pieces, counting them refuses a bad row now.
    segments, own_pieces = (
        ([contexts.Segment(iter(documents))], False)
        if documents is not None
        else source.segments(
            counter,
            opts.dataset,
            opts.role,
            plan=plan,
            tokenizer=loaded.tokenizer,
            rank=opts.rank,
            world_size=opts.world_size,
            share=share,
        )
    )
    writer = open_writer(
        lambda: RunWriter(wh.layout, run_id, config, resume=opts.resume, rank=opts.rank, world_size=opts.world_size),
        opts.rank,
        opts.world_size,
    )
    capture = ready.capture
    capture.restore(writer.state)
    deal = dict(rank=0, world_size=1) if own_pieces else dict(rank=opts.rank, world_size=opts.world_size)
    shards = contexts.shards(
        segments, loaded.tokenizer, plan, start=_start_doc(writer), shard_tokens=opts.shard_tokens, **deal
    )
    started = time.perf_counter()
    n_docs, n_tokens = _capture_shards(opts, capture, writer, shards, run_id)
    skipped = dict(skipped=counter.skipped, first_skipped=counter.first_error)
    if opts.rank != 0:
        writer.finish_rank()
        return IngestResult(run_id, documents=n_docs, tokens=n_tokens, rank=opts.rank, notes=notes, **skipped)
    if own_pieces and source.datasets:
        writer.wait_for_ranks()
        refuse_repeated_ids(writer)
    manifest, total_docs, total_tokens = _commit(opts, capture, ready.resolved, writer)
    # The rate counts what this call captured: rank 0's alone knows it unless every rank started afresh.
    captured = n_tokens if opts.world_size == 1 else 0 if opts.resume else total_tokens
    return IngestResult(
        run_id,
        manifest["rows"],
        sum(p["bytes"] for p in manifest["parts"]),
        total_docs,
        total_tokens,
        time.perf_counter() - started,
        captured=captured,
        notes=notes,
        **skipped,
    )
