"""Hooks and on-device reductions.

Each (site, layer) gets a `SiteLayer` whose hook reduces the activation where it is
computed: per-token top-k / threshold entries, document sums for NAG and mean
vectors, last-token vectors, exact neuron statistics, and per-unit running top-N and
uniform samples. Nothing inside a hook waits for the device except `threshold`
(whose output size is data-dependent); results stay on the device until the batch
ends and `collect()` copies them to the host in one go.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from . import fused
from .sites import ResolvedSite

# Reservoir sampling as a bottom-N sketch: every (doc, pos, unit) gets a fixed
# pseudo-random key and each unit keeps the N smallest keys among its firing tokens.
# That is a uniform sample, mergeable across batches, shards and ranks, and the same
# on resume.
_NO_KEY = (1 << 62)
# token_neurons values are stored as float16: convert on the device, so host copies are half the size.
VALUE_DTYPE = torch.float16


def sample_keys(doc: torch.Tensor, pos: torch.Tensor, width: int) -> torch.Tensor:
    """A [rows, width] int64 hash of (doc, pos, unit), uniform on [0, 2^31)."""
    unit = torch.arange(width, device=doc.device, dtype=torch.int64)
    x = (doc.to(torch.int64)[:, None] * 0x9E3779B1 + pos.to(torch.int64)[:, None] * 0x85EBCA77 + unit[None, :] * 0xC2B2AE3D) & 0x7FFFFFFF
    for mult in (0x2C1B3C6D, 0x297A2D39):
        x = ((x ^ (x >> 15)) * mult) & 0x7FFFFFFF
    return x ^ (x >> 13)


@dataclass
class BatchContext:
    """What the hooks need to know about the batch being run (all on the device)."""

    mask: torch.Tensor          # [B, T] bool, False on padding
    lengths: torch.Tensor       # [B] valid tokens per row
    row_doc: torch.Tensor       # [B*T] doc of each flattened position
    row_pos: torch.Tensor       # [B*T] position in its document
    segment: torch.Tensor       # [B] index of the row's document within the batch
    n_segments: int
    finished: torch.Tensor      # [n_finished] segments whose last window is in this batch
    finished_tokens: torch.Tensor  # [n_finished] their total token counts (all windows)
    last_rows: torch.Tensor     # [n_finished] row holding each finished document's last window
    carry_in: bool              # segment 0 continues a document from the previous batch
    carry_out: bool             # the last segment continues into the next batch
    full: bool = False          # no padding in this batch (every mask entry True)

    # Shared by every site layer of the batch, so computed once.
    @cached_property
    def n_valid(self) -> torch.Tensor:
        return self.mask.sum()

    @cached_property
    def first_doc(self) -> torch.Tensor:
        """[B] document of each row."""
        return self.row_doc.view(self.mask.shape[0], -1)[:, 0].contiguous()

    @cached_property
    def first_pos(self) -> torch.Tensor:
        """[B] position of each row's first token in its document."""
        return self.row_pos.view(self.mask.shape[0], -1)[:, 0].contiguous()

    @cached_property
    def row_order(self) -> torch.Tensor:
        """[B] the rows in document order (by document, then window start)."""
        return torch.argsort(self.first_doc * (1 << 32) + self.first_pos)

    @cached_property
    def row_rank(self) -> torch.Tensor:
        """[B] each row's place in document order."""
        rank = torch.empty_like(self.row_order)
        rank[self.row_order] = torch.arange(len(rank), device=rank.device)
        return rank


class SiteLayer:
    def __init__(self, site: ResolvedSite, layer: int, module_name: str, device: str):
        self.site, self.layer, self.module_name, self.device = site, layer, module_name, device
        self.spec = site.spec
        self.red = site.spec.reductions
        self.threshold = site.spec.threshold
        self.width: int | None = None
        self.ctx: BatchContext | None = None
        self.out: dict[str, torch.Tensor] = {}
        self.carry: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.examples: dict[str, torch.Tensor] = {}

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def hook_point(self) -> str:
        return self.site.hook

    # -- state ----------------------------------------------------------------
    def _allocate(self, width: int) -> None:
        self.width = width
        dev = self.device
        self.stats = {
            "n_tokens": torch.zeros((), dtype=torch.int64, device=dev),
            "n_fired": torch.zeros(width, dtype=torch.int64, device=dev),
            "sum": torch.zeros(width, dtype=torch.float64, device=dev),
            "sum_sq": torch.zeros(width, dtype=torch.float64, device=dev),
            "max": torch.full((width,), float("-inf"), dtype=torch.float32, device=dev),
            "max_doc": torch.full((width,), -1, dtype=torch.int64, device=dev),
            "max_pos": torch.full((width,), -1, dtype=torch.int64, device=dev),
        }
        if "examples" in self.red:
            n = self.red["examples"]
            for kind, fill in (("top", float("-inf")), ("random", float("nan"))):
                self.examples[f"{kind}_value"] = torch.full((n, width), fill, dtype=torch.float32, device=dev)
                self.examples[f"{kind}_doc"] = torch.full((n, width), -1, dtype=torch.int64, device=dev)
                self.examples[f"{kind}_pos"] = torch.full((n, width), -1, dtype=torch.int64, device=dev)
            self.examples["random_key"] = torch.full((n, width), _NO_KEY, dtype=torch.int64, device=dev)

    def state_tables(self) -> dict[str, pa.Table]:
        """A snapshot (copied: the live tensors keep changing) of the run-level state, for resume."""
        if self.width is None:
            return {}

        def snapshot(tensors):
            return pa.table({k: np.full(self.width, v.item()) if v.dim() == 0 else v.cpu().numpy().reshape(-1).copy()
                             for k, v in tensors.items()})

        tables = {f"stats.{self.name}.{self.layer}": snapshot(self.stats)}
        if self.examples:
            tables[f"examples.{self.name}.{self.layer}"] = snapshot(self.examples)
        return tables

    def merge(self, other: SiteLayer) -> None:
        """Fold another capture of this site layer (another rank's) into this one: both merges are exact."""
        mine, theirs = self.stats, other.stats
        for key in ("n_tokens", "n_fired", "sum", "sum_sq"):
            mine[key] += theirs[key]
        # Ties go to the first token in document order, as within one process.
        key_mine = mine["max_doc"] * (1 << 32) + mine["max_pos"]
        key_theirs = theirs["max_doc"] * (1 << 32) + theirs["max_pos"]
        seen = theirs["max_doc"] >= 0
        better = seen & ((theirs["max"] > mine["max"]) | ((theirs["max"] == mine["max"]) & (key_theirs < key_mine)))
        for key in ("max", "max_doc", "max_pos"):
            mine[key] = torch.where(better, theirs[key], mine[key])
        if self.examples:
            ex = other.examples
            # The same merge the hook applies batch by batch: top values, and smallest sample keys.
            self._merge("top", ex["top_value"], ex["top_doc"], ex["top_pos"],
                        order=self.examples["top_value"], new_order=ex["top_value"], largest=True)
            self._merge("random", ex["random_value"], ex["random_doc"], ex["random_pos"],
                        order=self.examples["random_key"], new_order=ex["random_key"], largest=False)

    def restore(self, tables: dict[str, pa.Table]) -> None:
        stats = tables.get(f"stats.{self.name}.{self.layer}")
        if stats is None:
            return
        self._allocate(stats.num_rows)
        examples = tables.get(f"examples.{self.name}.{self.layer}")
        for source, state in ((stats, self.stats), (examples, self.examples)):
            for key, target in state.items():
                column = torch.from_numpy(source.column(key).to_numpy().copy())  # Arrow buffers are read-only
                target.copy_(column[0] if target.dim() == 0 else column.reshape(target.shape))

    # -- the hook ---------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> None:
        ctx = self.ctx
        if x.dim() != 3:
            raise RuntimeError(f"site {self.name} layer {self.layer}: expected [batch, seq, units], got shape {tuple(x.shape)}")
        x = x.detach().float()
        if self.width is None:
            self._allocate(x.shape[-1])
        batch, seq, width = x.shape
        mask3 = ctx.mask[:, :seq, None]
        red = self.red
        id_dtype = torch.int16 if width <= 32767 else torch.int32
        stats = self.stats
        stats["n_tokens"] += ctx.n_valid
        if fused.usable(x, red.get("topk")):
            top, sums, abs_sums = fused.site_pass(x, ctx, self.threshold, red.get("topk"), "nag" in red, stats)
            floored = None
        else:
            # Padding only exists in some batches; the zeroed / -inf copies are made only then.
            zeroed = x if ctx.full else x * mask3
            floored = self._floored(x, mask3)
            top = x.topk(min(red["topk"], width), dim=-1) if "topk" in red else None
            sums = zeroed.sum(dim=1)  # [batch, width], float32 over at most `seq` values
            abs_sums = zeroed.abs().sum(dim=1) if "nag" in red else None
            self._update_stats(x, zeroed, floored, sums, mask3)
        if top is not None:
            self.out["topk_values"], self.out["topk_ids"] = top[0].to(VALUE_DTYPE), top[1].to(id_dtype)
        if "abstopk" in red:
            _, ids = x.abs().topk(min(red["abstopk"], width), dim=-1)
            self.out["topk_values"], self.out["topk_ids"] = x.gather(-1, ids).to(VALUE_DTYPE), ids.to(id_dtype)
        if "threshold" in red:
            hits = (x > self.threshold) & mask3
            self.out["threshold_index"] = hits.nonzero()
            self.out["threshold_values"] = x[hits]
        if "nag" in red or "mean" in red:
            self._document_sums(sums, abs_sums)
        if "last" in red:
            self.out["last"] = x[ctx.last_rows, ctx.lengths[ctx.last_rows] - 1]
        if "dense" in red:
            self.out["dense"] = x[ctx.mask[:, :seq]]
        if "examples" in red:
            floored = self._floored(x, mask3) if floored is None else floored
            self._update_examples(floored.reshape(batch * seq, width), batch * seq)

    def _floored(self, x: torch.Tensor, mask3: torch.Tensor) -> torch.Tensor:
        """x with -inf on padding, for maxima (no copy when the batch has none)."""
        return x if self.ctx.full else torch.where(mask3, x, float("-inf"))

    def _document_sums(self, sums: torch.Tensor, abs_sums: torch.Tensor | None) -> None:
        """Per-document means of a and |a| from the per-row sums [batch, width]; NAG keeps the top units of |a|."""
        ctx = self.ctx
        wanted = [("abs", abs_sums)] if "nag" in self.red else []
        wanted += [("raw", sums)] if "mean" in self.red else []
        for kind, per_row in wanted:
            sums = torch.zeros(ctx.n_segments, per_row.shape[-1], dtype=torch.float32, device=per_row.device)
            sums.index_add_(0, ctx.segment, per_row)
            if ctx.carry_in and kind in self.carry:
                sums[0] += self.carry.pop(kind)
            if ctx.carry_out:
                self.carry[kind] = sums[-1].clone()
            done = sums[ctx.finished] / ctx.finished_tokens[:, None].clamp(min=1)
            if kind == "abs":
                k = min(self.red["nag"], per_row.shape[-1])
                if fused.usable(done, k):
                    impacts, order = fused.topk(done, k)  # same order as the stable sort below
                else:
                    impacts, order = torch.sort(done, dim=-1, descending=True, stable=True)
                self.out["nag_ids"], self.out["nag_impacts"] = order[:, :k], impacts[:, :k]
            else:
                self.out["mean"] = done

    def _update_stats(self, x, zeroed, floored, row_sums, mask3) -> None:
        """Exact stats from per-row partials with torch ops (CUDA; fused.c does the same on the CPU).

        Sums reduce each row's positions in float32 and the rows in float64; the max is
        found per row first, so the tie rule (first token in document order) only ever
        looks at `batch` rows and then at one row's positions, never at [tokens, width]
        int64 keys. No host synchronisation.
        """
        ctx, stats = self.ctx, self.stats
        batch, seq, width = x.shape
        fired = x > self.threshold
        if not ctx.full:
            fired &= mask3
        # int32 per row (at most `seq` firings): the int64 bool sum is 10x slower on CPU.
        stats["n_fired"] += fired.sum(dim=1, dtype=torch.int32).sum(dim=0)
        stats["sum"] += row_sums.sum(dim=0, dtype=torch.float64)
        stats["sum_sq"] += torch.linalg.vecdot(zeroed, zeroed, dim=1).sum(dim=0, dtype=torch.float64)
        row_max = floored.amax(dim=1)                                   # [batch, width]
        batch_max = row_max.amax(dim=0)                                 # [width]
        # Ties go to the first token in document order, whatever order batches run in:
        # first the earliest row (by document, then window start) reaching the max ...
        best = torch.where(row_max == batch_max, ctx.row_rank[:, None], batch).amin(dim=0).clamp(max=batch - 1)
        row = ctx.row_order[best]                                       # [width] (NaN maxima: unused)
        # ... then the earliest position of that row reaching it.
        within = floored.gather(0, row.view(1, 1, width).expand(1, seq, width))[0]  # [seq, width]
        pos = torch.where(within == batch_max, torch.arange(seq, device=x.device)[:, None], seq).amin(dim=0)
        first = ctx.first_doc[row] * (1 << 32) + ctx.first_pos[row] + pos
        running = stats["max_doc"] * (1 << 32) + stats["max_pos"]
        better = (batch_max > stats["max"]) | ((batch_max == stats["max"]) & (first < running))
        stats["max"] = torch.where(better, batch_max, stats["max"])
        stats["max_doc"] = torch.where(better, first >> 32, stats["max_doc"])
        stats["max_pos"] = torch.where(better, first & 0xFFFFFFFF, stats["max_pos"])

    def _update_examples(self, flat: torch.Tensor, rows: int) -> None:
        ctx, ex, n = self.ctx, self.examples, self.red["examples"]
        take = min(n, rows)
        values, where = flat.topk(take, dim=0)
        self._merge("top", values, ctx.row_doc[where], ctx.row_pos[where], order=ex["top_value"], new_order=values, largest=True)
        keys = sample_keys(ctx.row_doc, ctx.row_pos, flat.shape[1])
        keys = keys.masked_fill(~(flat > self.threshold), _NO_KEY)
        batch_keys, where = keys.topk(take, dim=0, largest=False)
        self._merge("random", flat.gather(0, where), ctx.row_doc[where], ctx.row_pos[where],
                    order=ex["random_key"], new_order=batch_keys, largest=False)

    def _merge(self, kind, values, docs, positions, *, order, new_order, largest) -> None:
        ex, n = self.examples, self.red["examples"]
        all_order = torch.cat([order, new_order])
        _, pick = all_order.topk(n, dim=0, largest=largest)
        for field, new in (("value", values), ("doc", docs), ("pos", positions)):
            ex[f"{kind}_{field}"] = torch.cat([ex[f"{kind}_{field}"], new]).gather(0, pick)
        if kind == "random":
            ex["random_key"] = all_order.gather(0, pick)


def collect(site_layers: list[SiteLayer]) -> tuple[dict, object]:
    """Every site layer's batch outputs as host arrays, keyed (site, layer), and a ready event.

    On the CPU the arrays share the tensors' memory and the event is None. On CUDA each
    output is copied into pinned host memory without blocking; the arrays are valid once
    the returned event completes, which the writer thread waits for, so the model thread
    never synchronises with the device.
    """
    outputs = {}
    for sl in site_layers:
        outputs[(sl.name, sl.layer)], sl.out = sl.out, {}
    if not any(t.is_cuda for out in outputs.values() for t in out.values()):
        return {key: {k: v.numpy() for k, v in out.items()} for key, out in outputs.items()}, None
    host = {}
    for key, out in outputs.items():
        host[key] = {}
        for name, tensor in out.items():
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            pinned.copy_(tensor, non_blocking=True)
            host[key][name] = pinned.numpy()
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _first_tensor(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    raise RuntimeError("hooked module got no tensor input")


def _output_tensor(output):
    # A tuple, list or transformers ModelOutput puts the hidden states first.
    return output if isinstance(output, torch.Tensor) else output[0]


class Tap(Protocol):
    """What `hooks` attaches: a callable given one module's input ("in") or output ("out") tensor."""

    module_name: str
    hook_point: str

    def __call__(self, x: torch.Tensor) -> None: ...


@contextmanager
def hooks(model, taps: Iterable[Tap]) -> Iterator[None]:
    """Attach each tap to its module for the duration of the block; the hooks are removed however it ends."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for tap in taps:
            module = modules[tap.module_name]
            if tap.hook_point == "in":
                handles.append(module.register_forward_pre_hook(lambda m, a, k, tap=tap: tap(_first_tensor(a, k)), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(lambda m, a, o, tap=tap: tap(_output_tensor(o))))
        yield
    finally:
        for handle in handles:
            handle.remove()
