"""The capture: a model's site layers turn batches of windows into rows, a shard of documents at a time.

    capture = Capture(loaded, resolved_sites, device)
    with hooks(loaded.model, capture.taps), torch.inference_mode():
        capture.shard(shard, shard.batches(batch_size), shard_writer)

`ingest()` (ingest/pipeline.py), `whq bench ingest` (ingest/bench.py) and scenario runs
(ingest/chat.py) all capture through `Capture.shard`; they differ only in where the
documents come from and what else they commit. Torch is imported on first use, as
everywhere in ingest/.

Each module of the capture is named for the one thing a reader looks for in it:
capture.py (here) runs batches through the hooked model (`Capture`); hooks.py attaches
taps to modules (`hooks`, the one place forward hooks are registered); reductions.py is
what a site layer's tap computes on the device (`SiteLayer`, `collect`); shard.py is the
unit of documents committed together (`Shard`); encoder.py runs a dictionary inside a
tap, and dictionary_files.py reads dictionary files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa

from .shard import Shard
from .tokenize import Window


def forward(loaded, ids, mask):
    """The model's forward pass as the capture runs it."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if loaded.family == "decoder":
        kwargs["logits_to_keep"] = 1  # hidden states are what we capture; skip the full-vocab projection
    return loaded.model(**kwargs)


class Capture:
    """The site layers of one model on one device, and the steps that fill them.

    The hooks are attached by the caller (`with hooks(loaded.model, capture.taps)`),
    so one capture can run with and without them (the benchmark's plain passes).
    `bound` gives dictionary sites their encoder per (site, layer) (ingest.encoder.bind);
    `splice` adds --splice's loss passes after each batch.
    """

    def __init__(self, loaded, resolved: list, device: str, bound: dict | None = None, *, splice: bool = False):
        from .encoder import on_device
        from .reductions import SiteLayer

        self.loaded, self.device, self.splice = loaded, device, splice
        bound = bound or {}
        self.site_layers = [
            SiteLayer(r, layer, module, device, *on_device(bound.get((r.name, layer)), device, r.name, layer))
            for r in resolved
            for layer, module in r.modules
        ]

    @property
    def taps(self) -> list:
        """What the hooks attach: every site layer, and each transcoder's target (the MLP output)."""
        from .encoder import target_taps

        return self.site_layers + target_taps(self.site_layers)

    @property
    def widths(self) -> dict[tuple[str, int], int | None]:
        return {(sl.name, sl.layer): sl.width for sl in self.site_layers}

    def restore(self, saved_state: Callable[[str], pa.Table | None]) -> None:
        """Continue from the running statistics and examples a resumed run saved (`saved_state(name)`)."""
        for sl in self.site_layers:
            sl.restore({name: table for name in sl.state_names if (table := saved_state(name)) is not None})

    def batch(self, windows: list[Window]):
        """One hooked forward pass; returns the batch's HostBatch (outputs still in flight on CUDA)."""
        from .reductions import collect

        ids, mask, ctx, host = _batch_context(windows, self.loaded.tokenizer.pad_id, self.device)
        for sl in self.site_layers:
            sl.ctx = ctx
        forward(self.loaded, ids, mask)
        if self.splice:
            from .encoder import splice_losses

            splice_losses(self.loaded.model, self.site_layers, ids, mask)
        host.outputs, host.ready = collect(self.site_layers)
        return host

    def shard(
        self,
        shard: Shard,
        batches: Iterable[list[Window]],
        writer,
        *,
        extra_parts: list = (),
        on_batch: Callable | None = None,
    ) -> None:
        """Capture `batches` (the shard's windows) into `writer` (a ShardWriter), then end the shard:
        its documents, tokens, resume state and `extra_parts` are committed with the batches' rows."""
        from .writer import ShardEnd

        for batch in batches:
            host = self.batch(batch)
            writer.put(host)
            if on_batch is not None:
                on_batch(host)
        state = {name: table for sl in self.site_layers for name, table in sl.state_tables().items()}
        info = {"next_doc": shard.next_doc, "n_docs": len(shard.docs), "n_tokens": shard.n_tokens}
        writer.put(
            ShardEnd(
                shard.documents_table(),
                shard.tokens_table(self.loaded.tokenizer),
                state,
                info,
                self.widths,
                list(extra_parts),
            )
        )


def _batch_context(batch: list[Window], pad_id: int, device: str):
    """Host arrays and the device-side BatchContext for one batch of windows."""
    import torch

    from .contexts import model_input
    from .reductions import BatchContext
    from .writer import HostBatch

    # The model runs on model_ids; the hooks see each window's own positions (unpacked when windows are cut
    # from packed contexts or stripped of special tokens).
    model_ids, model_mask, mask, unpack = model_input(batch, pad_id)
    rows, seq = mask.shape
    docs = np.array([w.doc for w in batch], dtype=np.int64)
    starts = np.array([w.start_pos for w in batch], dtype=np.int64)
    lengths = mask.sum(axis=1)
    segment_of: dict[int, int] = {}
    segment = [segment_of.setdefault(int(d), len(segment_of)) for d in docs]
    finished_rows = [row for row, w in enumerate(batch) if w.last]
    finished_docs = docs[finished_rows]
    finished_tokens = np.array([batch[r].tokens_through for r in finished_rows], dtype=np.int64)
    finished_last = np.array([batch[r].start_pos + len(batch[r].ids) - 1 for r in finished_rows], dtype=np.int64)

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
        unpack=None if unpack is None else dev(unpack),
    )
    host = HostBatch(docs, starts, lengths, finished_docs, finished_last)
    return dev(model_ids), dev(model_mask), ctx, host
