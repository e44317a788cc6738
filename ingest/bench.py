"""`whq bench ingest`: how much the capture slows the model down, and what it writes.

One process, one model, one batch. After a warm-up it alternates timed blocks of
(a) the plain forward pass and (b) the full capture path — hooks, device-side
reductions, host copies and the background writer committing a shard to a temporary
warehouse — each block being one shard's worth of batches, and the capture block
ending only when the writer has committed its shard. With `versus` SPECs a third
block, the capture of those sites instead, joins the alternation, so two site
configurations (e.g. a dictionary site with and without `encode_only`) are compared
under the same load. On CUDA the device is synchronised around every timed block.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from warehouse.errors import BadInput

from .capture import Capture, forward
from .options import DEFAULT_SITES, check_device, check_dtype
from .shard import Shard
from .tokenize import Window


@dataclass
class IngestBench:
    model: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    sites: list
    batches_per_block: int
    hooks: str = ""  # which hook implementation ran (fused C kernel or torch ops)
    plain_s: list = field(default_factory=list)  # seconds per timed plain block
    capture_s: list = field(default_factory=list)  # seconds per timed capture block
    versus_sites: list = field(default_factory=list)  # the other configuration's SPECs (none: no third block)
    versus_s: list = field(default_factory=list)  # seconds per timed block capturing those instead
    plain_peak: int = 0  # peak device bytes (CUDA) or peak RSS (CPU) during plain blocks
    capture_peak: int = 0
    memory_kind: str = "rss"
    tokens_captured: int = 0
    bytes_written: int = 0
    token_neuron_rows: int = 0
    token_neuron_bytes: int = 0
    dense_fp16_bytes_per_token: int = 0

    @property
    def tokens_per_block(self) -> int:
        return self.batch_size * self.seq_len * self.batches_per_block

    @property
    def plain_tokens_per_s(self) -> float:
        return self.tokens_per_block / statistics.median(self.plain_s)

    @property
    def capture_tokens_per_s(self) -> float:
        return self.tokens_per_block / statistics.median(self.capture_s)

    @property
    def ratio(self) -> float:
        return self.capture_tokens_per_s / self.plain_tokens_per_s

    @property
    def best_ratio(self) -> float:
        """Fastest capture block over fastest plain block: the least disturbed pair on a shared machine."""
        return min(self.plain_s) / min(self.capture_s)

    @property
    def versus_ratio(self) -> float | None:
        return statistics.median(self.plain_s) / statistics.median(self.versus_s) if self.versus_s else None

    @property
    def versus_best_ratio(self) -> float | None:
        return min(self.plain_s) / min(self.versus_s) if self.versus_s else None

    @property
    def versus_speedup(self) -> float | None:
        """Median over repeats of capture time / versus time, each pair timed back to back: the comparison least
        moved by a shared machine's load changing between repeats."""
        return statistics.median(c / v for c, v in zip(self.capture_s, self.versus_s)) if self.versus_s else None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "sites": self.sites,
            "batches_per_block": self.batches_per_block,
            "hooks": self.hooks,
            "plain_tokens_per_s": self.plain_tokens_per_s,
            "capture_tokens_per_s": self.capture_tokens_per_s,
            "ratio": self.ratio,
            "best_ratio": self.best_ratio,
            "plain_s": self.plain_s,
            "capture_s": self.capture_s,
            "versus_sites": self.versus_sites,
            "versus_ratio": self.versus_ratio,
            "versus_best_ratio": self.versus_best_ratio,
            "versus_speedup": self.versus_speedup,
            "versus_s": self.versus_s,
            "memory_kind": self.memory_kind,
            "plain_peak_bytes": self.plain_peak,
            "capture_peak_bytes": self.capture_peak,
            "extra_peak_bytes": self.capture_peak - self.plain_peak,
            "bytes_per_token": self.bytes_written / max(self.tokens_captured, 1),
            "token_neurons_bytes_per_entry": self.token_neuron_bytes / max(self.token_neuron_rows, 1),
            "dense_fp16_bytes_per_token": self.dense_fp16_bytes_per_token,
        }

    def lines(self) -> list[str]:
        d = self.to_dict()
        extra = d["extra_peak_bytes"]
        share = extra / self.plain_peak if self.plain_peak else float("nan")
        memory = "peak device memory" if self.memory_kind == "cuda" else "peak RSS"
        versus = (
            [
                f"versus sites: {' '.join(self.versus_sites)}",
                f"versus capture: {self.tokens_per_block / statistics.median(self.versus_s):>11,.0f} tokens/s",
                f"ratio versus / plain: {self.versus_ratio:.3f} (medians; fastest blocks: {self.versus_best_ratio:.3f})",
                f"versus speed-up over capture: {self.versus_speedup:.3f} (median of back-to-back pairs)",
            ]
            if self.versus_s
            else []
        )
        return [
            f"model {self.model} on {self.device} ({self.dtype}), batch {self.batch_size} x {self.seq_len} tokens, "
            f"{self.batches_per_block} batches per block, {len(self.plain_s)} timed blocks each",
            f"sites: {' '.join(self.sites)}; hooks: {self.hooks}",
            f"plain forward : {d['plain_tokens_per_s']:>12,.0f} tokens/s",
            f"capture+write : {d['capture_tokens_per_s']:>12,.0f} tokens/s",
            f"ratio capture / plain: {d['ratio']:.3f} (medians; fastest blocks: {d['best_ratio']:.3f})",
            *versus,
            f"{memory}: plain {self.plain_peak / 2**20:,.1f} MiB, capture {self.capture_peak / 2**20:,.1f} MiB, "
            f"extra {extra / 2**20:,.1f} MiB ({share:.1%} of plain)",
            f"written: {d['bytes_per_token']:,.1f} bytes/token (all tables); token_neurons "
            f"{d['token_neurons_bytes_per_entry']:.2f} bytes per (neuron, value) entry; "
            f"dense float16 of the same sites: {self.dense_fp16_bytes_per_token:,} bytes/token",
        ]


class _PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or the process's peak RSS (Linux VmHWM)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @property
    def kind(self) -> str:
        return "cuda" if self.cuda else "rss"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _template(loaded, batch_size: int, seq_len: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """Fixed random token ids (no special tokens) for each row, and their decoded texts."""
    tok = loaded.tokenizer
    vocab = getattr(loaded.model.config, "vocab_size", None) or 256
    specials = set(getattr(getattr(tok, "tok", None), "all_special_ids", []) or [])
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(specials, dtype=np.int64, count=len(specials)))
    rows = [rng.choice(allowed, seq_len).tolist() for _ in range(batch_size)]
    return rows, [tok.decode(r) for r in rows]


def _block_windows(rows: list[list[int]], first_doc: int) -> list[Window]:
    seq = len(rows[0])
    return [Window(first_doc + i, 0, 0, ids, [False] * seq, [-1] * seq, [-1] * seq, True) for i, ids in enumerate(rows)]


def bench_ingest(
    model: str = "minilm",
    *,
    model_config: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
    seq_len: int = 128,
    sites: list[str] | tuple = DEFAULT_SITES,
    versus: list[str] | tuple = (),
    repeats: int = 3,
    shard_tokens: int = 65536,
    root: str | Path | None = None,
    seed: int = 0,
    echo=None,
) -> IngestBench:
    """Time plain forward vs capture+write on the same batch (and vs capturing the `versus` SPECs instead);
    see the module docstring."""
    import torch

    import warehouse
    from warehouse.collector import loaded_exempt
    from warehouse.runwriter import RunWriter

    from . import fused, models
    from .hooks import hooks
    from .limits import model_positions
    from .prepare import read_sites, ready_capture
    from .sources import Document
    from .writer import ShardWriter

    if batch_size < 1 or seq_len < 1 or repeats < 1:
        raise BadInput("--batch-size, --seq-len and --repeats must be at least 1")
    check_device(device)
    check_dtype(dtype)
    spec_texts = list(sites) or list(DEFAULT_SITES)
    requested_device = models.resolve_device(device)
    requests = [read_sites(texts, requested_device) for texts in (spec_texts, list(versus)) if texts]
    loaded = models.load(f"config:{model_config}" if model_config else model, device, dtype)
    device = loaded.config["device"]
    positions = model_positions(loaded)
    if positions and seq_len > positions:
        raise BadInput(f"--seq-len {seq_len} is longer than the model's {positions} positions: lower it")
    capture, *other = [ready_capture(request, loaded).capture for request in requests]
    batches_per_block = max(1, shard_tokens // (batch_size * seq_len))
    # Distinct rows for each batch of a block (the same batches every block): repeated rows
    # inside one shard would compress unrealistically well.
    rows, texts = _template(loaded, batch_size * batches_per_block, seq_len, seed)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    result = IngestBench(
        model=loaded.model_id,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        sites=spec_texts,
        versus_sites=list(versus),
        batches_per_block=batches_per_block,
        hooks=fused.describe() if device == "cpu" else f"torch ops on {device}",
    )
    memory = _PeakMemory(device)
    result.memory_kind = memory.kind
    say = echo or (lambda _: None)

    with tempfile.TemporaryDirectory(prefix="whq-bench-", dir=root) as tmp:
        wh = warehouse.init(Path(tmp) / "wh")
        run = RunWriter(wh.layout, "bench", {"bench": spec_texts})
        writer = ShardWriter(run)
        # The versus capture journals into a run of its own: the written figures are the main capture's.
        versus_run = RunWriter(wh.layout, "bench-versus", {"bench": list(versus)}) if other else None
        versus_writer = ShardWriter(versus_run) if other else None
        next_doc = 0

        def plain_block() -> float:
            inputs = [torch.as_tensor(b, dtype=torch.int64).to(device) for b in batches]
            _synchronize(device)
            start = time.perf_counter()
            for ids in inputs:
                forward(loaded, ids, torch.ones_like(ids))
            _synchronize(device)
            return time.perf_counter() - start

        def capture_block(capture: Capture, writer: ShardWriter) -> float:
            nonlocal next_doc
            with hooks(loaded.model, capture.taps):
                _synchronize(device)
                start = time.perf_counter()
                # Each row is a document of one full window; each batch of rows one forward pass.
                windows = [_block_windows(batch, next_doc + index * batch_size) for index, batch in enumerate(batches)]
                shard = Shard(
                    [(w.doc, Document(f"bench:{w.doc}", texts[w.doc - next_doc]), [w]) for ws in windows for w in ws],
                    next_doc + len(rows),
                )
                next_doc = shard.next_doc
                capture.shard(shard, windows, writer)
                writer.flush()
                _synchronize(device)
                return time.perf_counter() - start

        try:
            with torch.inference_mode(), loaded_exempt():  # as `whq ingest` captures, with the model loaded
                say("warm-up")
                plain_block()
                capture_block(capture, writer)
                if other:
                    capture_block(other[0], versus_writer)
                warm_shards = run.completed_shards
                for rep in range(repeats):
                    memory.reset()
                    result.plain_s.append(plain_block())
                    result.plain_peak = max(result.plain_peak, memory.peak())
                    memory.reset()
                    result.capture_s.append(capture_block(capture, writer))
                    result.capture_peak = max(result.capture_peak, memory.peak())
                    if other:
                        result.versus_s.append(capture_block(other[0], versus_writer))
                    versus_time = f", versus {result.versus_s[-1]:.3f} s" if other else ""
                    say(
                        f"block {rep + 1}/{repeats}: plain {result.plain_s[-1]:.3f} s, "
                        f"capture {result.capture_s[-1]:.3f} s{versus_time}"
                    )
            writer.close()
            if other:
                versus_writer.close()
        finally:
            for w, r in ((writer, run), (versus_writer, versus_run)):
                if w is not None:
                    w.stop()
                    r.close()
        timed = run.shards[warm_shards:]
        parts = [p for shard in timed for p in shard["parts"]]
        result.tokens_captured = sum(s["info"]["n_tokens"] for s in timed)
        result.bytes_written = sum(p["bytes"] for p in parts)
        result.token_neuron_rows = sum(p["rows"] for p in parts if p["table"] == "token_neurons")
        result.token_neuron_bytes = sum(p["bytes"] for p in parts if p["table"] == "token_neurons")
        result.dense_fp16_bytes_per_token = 2 * sum(width or 0 for width in capture.widths.values())
    return result
