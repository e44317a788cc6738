"""`whq bench ingest --data SOURCE`: does reading a dataset slow the capture down?

The same documents are captured twice per repeat, alternating: streamed from SOURCE (hf:NAME,
a save_to_disk folder, shards; read with `datasets`) and from a local JSONL file holding the
same documents (written first, untimed). Each timed block is the whole input path - reading,
--where, tokenizing, windowing or packing - plus the capture (hooks, reductions, the
background writer committing the shards to a temporary warehouse); it is divided by the plain
forward pass over the same model inputs, timed in the same block order. The figure of merit
is (capture ÷ plain from SOURCE) ÷ (capture ÷ plain from the JSONL): 1.00 means the dataset
input costs nothing over the local file.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .options import IngestOptions


@dataclass
class InputBench:
    source: str
    model: str
    documents: int = 0
    tokens: int = 0
    dataset_ratio: list = field(default_factory=list)  # capture ÷ plain per repeat, dataset source
    jsonl_ratio: list = field(default_factory=list)  # the same from the local JSONL

    @property
    def relative(self) -> float:
        return statistics.median(self.dataset_ratio) / statistics.median(self.jsonl_ratio)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "model": self.model,
            "documents": self.documents,
            "tokens": self.tokens,
            "dataset_capture_over_plain": self.dataset_ratio,
            "jsonl_capture_over_plain": self.jsonl_ratio,
            "dataset_over_jsonl": self.relative,
        }

    def lines(self) -> list[str]:
        return [
            f"{self.documents:,} documents, {self.tokens:,} tokens from {self.source} (model {self.model})",
            f"capture ÷ plain, dataset source: {statistics.median(self.dataset_ratio):.3f} "
            f"(runs {', '.join(f'{r:.3f}' for r in self.dataset_ratio)})",
            f"capture ÷ plain, local JSONL:    {statistics.median(self.jsonl_ratio):.3f} "
            f"(runs {', '.join(f'{r:.3f}' for r in self.jsonl_ratio)})",
            f"dataset ÷ JSONL: {self.relative:.3f} (goal: at most 1.02)",
        ]


def bench_input(options: IngestOptions, *, repeats: int = 1, echo=None) -> InputBench:
    """Time capture ÷ plain from `options.data` (one dataset source) against the same documents from a local
    JSONL, alternating (swapping which goes first), `repeats` times each."""
    import torch

    import warehouse
    from warehouse.runwriter import RunWriter

    from . import contexts, limits, models
    from .capture import forward
    from .hooks import hooks
    from .inputs import open_input
    from .prepare import read_sites, ready_capture
    from .sources import SkipCounter
    from .writer import ShardWriter

    say = echo or (lambda _: None)
    request = read_sites(options.sites, models.resolve_device(options.device))
    loaded = models.load(options.model, options.device, options.dtype)
    device = loaded.config["device"]
    max_length = limits.window_length(options.max_length, loaded, options.model)
    plan, options, _ = contexts.plan(
        options, loaded.tokenizer, request.dictionaries, max_length, limits.model_positions(loaded)
    )
    result = InputBench(options.data[0], loaded.model_id)

    def documents(opts: IngestOptions):
        return open_input(opts).documents(SkipCounter(), None, None)

    with tempfile.TemporaryDirectory(prefix="whq-bench-input-") as tmp:
        jsonl = Path(tmp) / "same.jsonl"
        with open(jsonl, "w") as fh:
            for doc in documents(options):
                fh.write(json.dumps({"doc_id": doc.doc_id, "text": doc.text}) + "\n")
        local = replace(options, data=(str(jsonl),), split=None, where=None, shuffle=None, text_column=None)
        local = replace(local, id_column=None)
        wh = warehouse.init(Path(tmp) / "wh")

        def shards(opts):
            return contexts.shards(
                [contexts.Segment(documents(opts))], loaded.tokenizer, plan, start=0, shard_tokens=opts.shard_tokens
            )

        def plain(opts) -> float:
            batches = [
                contexts.model_input(b, loaded.tokenizer.pad_id)[:2]
                for s in shards(opts)
                for b in s.batches(opts.batch_size)
            ]
            started = time.perf_counter()
            for ids, mask in batches:
                forward(loaded, torch.as_tensor(ids).to(device), torch.as_tensor(mask).to(device))
            return time.perf_counter() - started

        def captured(opts, run_id: str) -> tuple[float, int, int]:
            capture = ready_capture(request, loaded).capture
            run = RunWriter(wh.layout, run_id, {"bench": run_id})
            writer = ShardWriter(run)
            n_docs = n_tokens = 0
            try:
                with hooks(loaded.model, capture.taps):
                    started = time.perf_counter()
                    for shard in shards(opts):
                        capture.shard(shard, shard.batches(opts.batch_size), writer)
                        n_docs, n_tokens = n_docs + len(shard.docs), n_tokens + shard.n_tokens
                    writer.flush()
                    seconds = time.perf_counter() - started
                writer.close()
            finally:
                writer.stop()
                run.close()
            return seconds, n_docs, n_tokens

        with torch.inference_mode():
            plain(local)  # warm-up: the first forward passes are slower
            sides = [("dataset", options, result.dataset_ratio), ("jsonl", local, result.jsonl_ratio)]
            for rep in range(repeats):
                for name, opts, ratios in sides if rep % 2 == 0 else sides[::-1]:  # neither side always first
                    seconds, result.documents, result.tokens = captured(opts, f"{name}-{rep}")
                    ratios.append(seconds / plain(opts))
                    say(f"repeat {rep + 1}/{repeats} {name}: capture ÷ plain {ratios[-1]:.3f}")
    return result
