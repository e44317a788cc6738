"""On-device reductions: `SiteLayer`, the tap that turns one (site, layer)'s activation into rows.

Each (site, layer) gets a `SiteLayer` whose hook reduces the activation where it is
computed: per-token top-k / threshold entries, document sums for NAG and mean
vectors, last-token vectors, exact neuron statistics, and per-unit running top-N,
bottom-N and uniform samples. Nothing inside a hook waits for the device except `threshold`
(whose output size is data-dependent); results stay on the device until the batch
ends and `collect()` copies them to the host in one go.

Attaching the taps is ingest/hooks.py; running batches through the hooked model is
`Capture` (ingest/capture.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch

from warehouse.errors import BadInput

from . import fused
from .sites import ResolvedSite

# Reservoir sampling as a bottom-N sketch: every (doc, pos, unit) gets a fixed
# pseudo-random key and each unit keeps the N smallest keys among its firing tokens.
# That is a uniform sample, mergeable across batches, shards and ranks, and the same
# on resume.
_NO_KEY = 1 << 62
# token_neurons values are stored as float16: convert on the device, so host copies are half the size.
VALUE_DTYPE = torch.float16
# Example windows (neuron_examples.window_values): the unit's own value at every token from
# CONTEXT_BEFORE before to CONTEXT_AFTER after each top, bottom and random example, as float16 (the
# export's default window, queries/export.py BEFORE / AFTER).
CONTEXT_BEFORE, CONTEXT_AFTER = 50, 20

# Per-unit histograms (reduction `hist`) use one fixed grid for every site, unit and run,
# so counts from batches, shards and ranks merge by addition. A value's bin comes from its
# float32 bits: the exponent and the top two mantissa bits, i.e. quarter-octave steps with
# edges 2^e * (1, 1.25, 1.5, 1.75), for 2^-12 <= |a| < 2^12 (96 steps a sign). Bins, in
# value order (queries/units.sql whq_hist_lo/hi give the edges):
#   0: a <= -4096 (and -inf)    1..96: -edge(97-b) < a <= -edge(96-b)    97: -2^-12 < a <= 0
#   98: 0 < a < 2^-12           99..194: edge(b-99) <= a < edge(b-98)    195: a >= 4096 (and +inf)
# with edge(i) = 2^(-12 + i // 4) * (1 + (i % 4) / 4). NaN counts in the end bin of its sign.
# fused.c's hist_bin is the same function.
HIST_LOW = 460  # (127 - 12) * 4: float bits >> 21 of 2^-12
HIST_STEPS = 96
HIST_BINS = 2 * HIST_STEPS + 4


def hist_edges() -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of every histogram bin, as in the comment above."""
    edge = np.array([2.0 ** (-12 + i // 4) * (1 + (i % 4) / 4) for i in range(HIST_STEPS + 1)])
    lo = np.concatenate([[-np.inf], -edge[:0:-1], [-edge[0], 0.0], edge[:-1], [edge[-1]]])
    hi = np.concatenate([[-edge[-1]], -edge[-2::-1], [0.0, edge[0]], edge[1:], [np.inf]])
    return lo, hi


def hist_bins(x: torch.Tensor) -> torch.Tensor:
    """The histogram bin (int64, 0 .. HIST_BINS - 1) of every value of a float32 tensor."""
    bits = x.contiguous().view(torch.int32)
    k = ((bits & 0x7FFFFFFF) >> 21).to(torch.int64) - HIST_LOW
    inside = (k >= 0) & (k < HIST_STEPS)
    below = torch.where(inside, HIST_STEPS - k, torch.where(k < 0, HIST_STEPS + 1, 0))
    above = torch.where(inside, HIST_STEPS + 3 + k, torch.where(k < 0, HIST_STEPS + 2, 2 * HIST_STEPS + 3))
    return torch.where((bits < 0) | (bits == 0), below, above)


def ranking_keys(values: torch.Tensor, place: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys [rows, width] ordered as values [rows, width] (float32), largest or smallest first,
    ties to the lower place (each entry's place in document order, [rows, 1] or [rows, width], < 2^32),
    so one top-k keeps exactly the first tokens of a tie, on any device. NaN ranks above +inf (as
    in torch.topk) and -0.0 ties with 0.0."""
    canonical = torch.where(values.isnan(), float("nan"), torch.where(values == 0, 0.0, values))
    bits = canonical.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotonic in the value
    return (ordered << 32) | (0xFFFFFFFF - place if largest else place)


def document_places(doc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[rows, width] each entry's place (0..rows-1) in document order within its column; empty slots (doc -1) last."""
    order = torch.where(doc < 0, torch.iinfo(torch.int64).max, doc * (1 << 32) + pos).argsort(dim=0)
    places = torch.arange(doc.shape[0], device=doc.device)[:, None].expand_as(order)
    return torch.empty_like(order).scatter_(0, order, places)


def sample_keys(doc: torch.Tensor, pos: torch.Tensor, width: int) -> torch.Tensor:
    """A [rows, width] int64 hash of (doc, pos, unit), uniform on [0, 2^31)."""
    unit = torch.arange(width, device=doc.device, dtype=torch.int64)
    x = (
        doc.to(torch.int64)[:, None] * 0x9E3779B1
        + pos.to(torch.int64)[:, None] * 0x85EBCA77
        + unit[None, :] * 0xC2B2AE3D
    ) & 0x7FFFFFFF
    for mult in (0x2C1B3C6D, 0x297A2D39):
        x = ((x ^ (x >> 15)) * mult) & 0x7FFFFFFF
    return x ^ (x >> 13)


# The example kinds a site layer keeps: (kind, the field it ranks by, largest first). pool exists with quantiles=Q.
EXAMPLE_KINDS = (
    ("top", "value", True),
    ("bottom", "value", False),
    ("random", "key", False),
    ("nonfiring", "key", False),
    ("pool", "key", False),
)
WINDOW = CONTEXT_BEFORE + 1 + CONTEXT_AFTER
# The reductions that read every unit of every token; without them a TopK dictionary's latents stay sparse.
DENSE_READS = frozenset({"abstopk", "threshold", "last", "dense", "examples"})


@dataclass
class BatchContext:
    """What the hooks need to know about the batch being run (all on the device)."""

    mask: torch.Tensor  # [B, T] bool, False on padding
    lengths: torch.Tensor  # [B] valid tokens per row
    row_doc: torch.Tensor  # [B*T] doc of each flattened position
    row_pos: torch.Tensor  # [B*T] position in its document
    segment: torch.Tensor  # [B] index of the row's document within the batch
    n_segments: int
    finished: torch.Tensor  # [n_finished] segments whose last window is in this batch
    finished_tokens: torch.Tensor  # [n_finished] their total token counts (all windows)
    last_rows: torch.Tensor  # [n_finished] row holding each finished document's last window
    carry_in: bool  # segment 0 continues a document from the previous batch
    carry_out: bool  # the last segment continues into the next batch
    full: bool = False  # no padding in this batch (every mask entry True)
    # [B*T] where each window position was computed in the model's flattened [rows * seq] output; None: the
    # model's rows are the windows (ingest/contexts.py model_input)
    unpack: torch.Tensor | None = None

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
    """One (site, layer) of a capture: the tap on its module and the reductions of what flows through it.

    Called with the hooked tensor [batch, seq, units] on every forward pass (a `Tap`, see
    ingest/hooks.py), it reads the batch's `BatchContext` (`ctx`, set by the capture before
    each pass; None means the pass is not a capture, e.g. --splice's) and, on the device:

    - `out`: the batch's rows (top-k / threshold entries, NAG and mean document sums, last
      and dense vectors), handed to the host by `collect()` and emptied;
    - `stats`: the run's exact per-unit statistics (neuron_stats, histograms);
    - `examples`: each unit's running top, bottom and sampled tokens with their windows;
    - `carry`: the document sums of a document that continues into the next batch.

    `stats` and `examples` are run-level state: `state_tables()` saves them with every
    shard (resume), `restore()` reads them back and `merge_tables()` folds in another
    rank's, all exactly. A dictionary site's `encoder` (ingest/encoder.py) first turns the
    activation into latents, which every reduction then sees as its units.
    """

    def __init__(
        self,
        site: ResolvedSite,
        layer: int,
        module_name: str,
        device: str,
        encoder=None,
        target_module: str | None = None,
    ):
        self.site, self.layer, self.module_name, self.device = site, layer, module_name, device
        # A dictionary site (ingest.encoder.DeviceDictionary) encodes the hooked tensor first; its latents
        # are the units every reduction sees. A transcoder's target_module output is its reconstruction target.
        self.encoder, self.target_module = encoder, target_module
        self.spec = site.spec
        self.red = site.spec.reductions
        self.threshold = site.spec.threshold
        self.width: int | None = None
        self.ctx: BatchContext | None = None
        self.out: dict[str, torch.Tensor] = {}
        self.carry: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.examples: dict[str, torch.Tensor] = {}
        # Per example kind, [size, width]: the slot of `examples[kind_context]` holding each entry's window.
        # Windows stay in their slot while the entries are re-ranked, so a batch writes only the windows
        # of the entries it brings in (with quantiles=Q the pool's windows are most of the state).
        self.window_slots: dict[str, torch.Tensor] = {}

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
            "sum_cube": torch.zeros(width, dtype=torch.float64, device=dev),
            "sum_quad": torch.zeros(width, dtype=torch.float64, device=dev),
            "sum_pos": torch.zeros(width, dtype=torch.float64, device=dev),
            "min": torch.full((width,), float("inf"), dtype=torch.float32, device=dev),
        }
        if "hist" in self.red:
            self.stats["hist"] = torch.zeros(width, HIST_BINS, dtype=torch.int64, device=dev)
        if "examples" in self.red:
            n = self.red["examples"]
            kinds = [("top", n), ("bottom", n), ("random", n), ("nonfiring", n)]
            if "quantiles" in self.red:
                kinds.append(("pool", 2 * self.red["quantiles"] * n))
            fills = {"top": float("-inf"), "bottom": float("inf")}
            for kind, size in kinds:
                fill = fills.get(kind, float("nan"))
                self.examples[f"{kind}_value"] = torch.full((size, width), fill, dtype=torch.float32, device=dev)
                self.examples[f"{kind}_doc"] = torch.full((size, width), -1, dtype=torch.int64, device=dev)
                self.examples[f"{kind}_pos"] = torch.full((size, width), -1, dtype=torch.int64, device=dev)
                if kind not in fills:
                    self.examples[f"{kind}_key"] = torch.full((size, width), _NO_KEY, dtype=torch.int64, device=dev)
                self.examples[f"{kind}_context"] = torch.full(
                    (size, width, WINDOW), float("nan"), dtype=VALUE_DTYPE, device=dev
                )
                self.window_slots[kind] = torch.arange(size, device=dev)[:, None].expand(size, width).contiguous()

    def examples_in_order(self) -> dict[str, torch.Tensor]:
        """The examples with each kind's windows in the order of its entries (rank order)."""
        ordered = dict(self.examples)
        for kind, slots in self.window_slots.items():
            units = torch.arange(slots.shape[1], device=slots.device)
            ordered[f"{kind}_context"] = self.examples[f"{kind}_context"][slots, units]  # whole windows, not values
        return ordered

    # The unit axis of each state's tensors: stats are [width] or [width, bins]; examples [n, width]
    # or [n, width, window] (window values).
    _UNIT_AXIS = {"stats": 0, "examples": 1}

    def state_tables(self) -> dict[str, pa.Table]:
        """A snapshot (copied: the live tensors keep changing) of the run-level state, for resume.

        One row per unit: a tensor with more values per unit than one is a fixed-size list column.
        """
        if self.width is None:
            return {}

        def column(v, axis):
            if v.dim() == 0:
                return np.full(self.width, v.item())
            per_unit = v.movedim(axis, 0).reshape(self.width, -1).cpu().numpy().copy()
            if v.dim() == 1:
                return per_unit[:, 0]
            return pa.FixedSizeListArray.from_arrays(per_unit.reshape(-1), per_unit.shape[1])

        tables = {}
        for prefix, state in (("stats", self.stats), ("examples", self.examples_in_order())):
            if state:
                axis = self._UNIT_AXIS[prefix]
                tables[f"{prefix}.{self.name}.{self.layer}"] = pa.table({k: column(v, axis) for k, v in state.items()})
        if self.encoder is not None:
            tables.update(self.encoder.state_tables(f"{self.name}.{self.layer}"))
        return tables

    @property
    def state_names(self) -> list[str]:
        """The names of the state tables this site layer saves (state_tables), for resume and the ranks' merge."""
        return [f"{prefix}.{self.name}.{self.layer}" for prefix in ("stats", "examples", "quality", "quality_out")]

    def merge_tables(self, tables: dict[str, pa.Table]) -> None:
        """Fold another capture's state tables (another rank's, as state_tables wrote them) into this one:
        statistics, examples and a dictionary's quality sums, all merged exactly."""
        if self.width is None:  # this capture saw no tokens: take theirs
            self.restore(tables)
            return
        other = SiteLayer(self.site, self.layer, self.module_name, self.device)
        other.restore(tables)
        self.merge(other)
        if self.encoder is not None:
            self.encoder.merge(tables, f"{self.name}.{self.layer}")

    def merge(self, other: SiteLayer) -> None:
        """Fold another capture of this site layer (another rank's) into this one: both merges are exact."""
        mine, theirs = self.stats, other.stats
        for key in ("n_tokens", "n_fired", "sum", "sum_sq", "sum_cube", "sum_quad", "sum_pos", "hist"):
            if key in mine:
                mine[key] += theirs[key]
        mine["min"] = torch.minimum(mine["min"], theirs["min"])
        # Ties go to the first token in document order, as within one process.
        key_mine = mine["max_doc"] * (1 << 32) + mine["max_pos"]
        key_theirs = theirs["max_doc"] * (1 << 32) + theirs["max_pos"]
        seen = theirs["max_doc"] >= 0
        better = seen & ((theirs["max"] > mine["max"]) | ((theirs["max"] == mine["max"]) & (key_theirs < key_mine)))
        for key in ("max", "max_doc", "max_pos"):
            mine[key] = torch.where(better, theirs[key], mine[key])
        # The same merge the hook applies batch by batch: top and bottom values, and smallest sample keys.
        theirs = other.examples_in_order()
        for kind, by, largest in EXAMPLE_KINDS:
            fields = {k[len(kind) + 1 :]: v for k, v in theirs.items() if k.startswith(f"{kind}_")}
            if fields:
                self._merge(kind, fields, by=by, largest=largest)

    def restore(self, tables: dict[str, pa.Table]) -> None:
        stats = tables.get(f"stats.{self.name}.{self.layer}")
        if stats is None:
            return
        self._allocate(stats.num_rows)
        examples = tables.get(f"examples.{self.name}.{self.layer}")
        for prefix, source, state in (("stats", stats, self.stats), ("examples", examples, self.examples)):
            missing = [key for key in state if key not in source.column_names]
            if missing:  # e.g. bottom examples, which state saved by an older whq lacks
                raise BadInput(
                    f"the saved state of site {self.name} layer {self.layer} lacks {', '.join(missing)} (saved by an "
                    f"older whq): discard the interrupted run with `whq gc WAREHOUSE --interrupted`, then ingest it again"
                )
            for key, target in state.items():
                data = source.column(key).combine_chunks()
                if pa.types.is_fixed_size_list(data.type):
                    data = data.flatten()
                column = torch.from_numpy(data.to_numpy().copy())  # Arrow buffers are read-only
                if target.dim() == 0:
                    target.copy_(column[0])
                else:
                    moved = target.movedim(self._UNIT_AXIS[prefix], 0)
                    target.copy_(column.reshape(moved.shape).movedim(0, self._UNIT_AXIS[prefix]))
        if self.encoder is not None:
            self.encoder.restore(tables, f"{self.name}.{self.layer}")

    # -- the hook ---------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> None:
        ctx = self.ctx
        if ctx is None:
            return  # a forward that is not a capture (--splice's extra passes)
        if x.dim() != 3:
            raise RuntimeError(
                f"site {self.name} layer {self.layer}: expected [batch, seq, units], got shape {tuple(x.shape)}"
            )
        x = x.detach().float()
        if ctx.unpack is not None:
            x = x.reshape(-1, x.shape[-1])[ctx.unpack].view(*ctx.mask.shape, x.shape[-1])
        red = self.red
        if self.encoder is not None:
            # A TopK dictionary's latents stay sparse (its k active ids and values) unless a reduction reads them all.
            sparse = fused.usable(x, red.get("topk")) and not DENSE_READS & red.keys()
            x, active = self.encoder(x, ctx.mask[:, : x.shape[1]], dense=not sparse)
        if x is None:
            return self._sparse(*active)
        if self.width is None:
            self._allocate(x.shape[-1])
        batch, seq, width = x.shape
        mask3 = ctx.mask[:, :seq, None]
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
            self._update_examples(floored.reshape(batch * seq, width), batch * seq, x)

    def _sparse(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """The hook on a TopK dictionary's latents given as their active (ids, values) [batch, seq, k]: the rows
        and stats the dense latents would give (fused.sparse_pass), from k values a token instead of d_sae."""
        width, red = self.encoder.d.d_sae, self.red
        if self.width is None:
            self._allocate(width)
        self.stats["n_tokens"] += self.ctx.n_valid
        top, sums, abs_sums = fused.sparse_pass(
            ids.to(torch.int32),
            values.float(),
            width,
            self.ctx,
            self.threshold,
            red.get("topk"),
            "nag" in red,
            self.stats,
        )
        if top is not None:
            id_dtype = torch.int16 if width <= 32767 else torch.int32
            self.out["topk_values"], self.out["topk_ids"] = top[0].to(VALUE_DTYPE), top[1].to(id_dtype)
        if "nag" in red or "mean" in red:
            self._document_sums(sums, abs_sums)

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
        squares = zeroed * zeroed
        stats["sum_cube"] += torch.linalg.vecdot(squares, zeroed, dim=1).sum(dim=0, dtype=torch.float64)
        stats["sum_quad"] += torch.linalg.vecdot(squares, squares, dim=1).sum(dim=0, dtype=torch.float64)
        stats["sum_pos"] += torch.where(zeroed > 0, zeroed, 0).sum(dim=1).sum(dim=0, dtype=torch.float64)
        ceiled = x if ctx.full else torch.where(mask3, x, float("inf"))
        stats["min"] = torch.minimum(stats["min"], ceiled.amin(dim=(0, 1)))
        if "hist" in stats:
            bins = hist_bins(x) + torch.arange(width, device=x.device) * HIST_BINS
            valid = bins if ctx.full else bins[ctx.mask[:, :seq]]
            stats["hist"] += torch.bincount(valid.reshape(-1), minlength=width * HIST_BINS).view(width, HIST_BINS)
        row_max = floored.amax(dim=1)  # [batch, width]
        batch_max = row_max.amax(dim=0)  # [width]
        # Ties go to the first token in document order, whatever order batches run in:
        # first the earliest row (by document, then window start) reaching the max ...
        best = torch.where(row_max == batch_max, ctx.row_rank[:, None], batch).amin(dim=0).clamp(max=batch - 1)
        row = ctx.row_order[best]  # [width] (NaN maxima: unused)
        # ... then the earliest position of that row reaching it.
        within = floored.gather(0, row.view(1, 1, width).expand(1, seq, width))[0]  # [seq, width]
        pos = torch.where(within == batch_max, torch.arange(seq, device=x.device)[:, None], seq).amin(dim=0)
        first = ctx.first_doc[row] * (1 << 32) + ctx.first_pos[row] + pos
        running = stats["max_doc"] * (1 << 32) + stats["max_pos"]
        better = (batch_max > stats["max"]) | ((batch_max == stats["max"]) & (first < running))
        stats["max"] = torch.where(better, batch_max, stats["max"])
        stats["max_doc"] = torch.where(better, first >> 32, stats["max_doc"])
        stats["max_pos"] = torch.where(better, first & 0xFFFFFFFF, stats["max_pos"])

    def _update_examples(self, flat: torch.Tensor, rows: int, x: torch.Tensor) -> None:
        ctx, ex = self.ctx, self.examples
        seq = x.shape[1]
        ceiled = flat if ctx.full else torch.where(ctx.mask[:, :seq].reshape(-1, 1), flat, float("inf"))
        n = min(self.red["examples"], rows)
        if fused.usable(x, n):  # one pass over the batch for both kinds
            picks = fused.extremes(x, ctx, n)
        else:
            # Each token's place in document order (its row's place, then its position): ties go to the first.
            place = (ctx.row_rank[:, None] * seq + torch.arange(seq, device=x.device)).reshape(-1, 1)
            picks = [
                ranking_keys(v, place, big).topk(n, dim=0, largest=big)[1] for v, big in ((flat, True), (ceiled, False))
            ]
        for kind, values, largest, where in (("top", flat, True, picks[0]), ("bottom", ceiled, False, picks[1])):
            self._merge(
                kind,
                {"value": values.gather(0, where), "doc": ctx.row_doc[where], "pos": ctx.row_pos[where]},
                by="value",
                largest=largest,
                where=where,
                x=x,
            )
        kinds = ("random", "pool") if "pool_key" in ex else ("random",)
        if fused.usable(x, n):
            # Only keys below what a kept sample holds can enter it: the kernel hashes firing tokens
            # alone and drops the rest as it goes, instead of keying every (token, unit).
            size = max(ex[f"{kind}_key"].shape[0] for kind in kinds)
            bound = torch.stack([ex[f"{kind}_key"].amax(dim=0) for kind in kinds]).amax(dim=0)
            keys, where = fused.sample(x, ctx, self.threshold, min(size, rows), bound, _NO_KEY)
            for kind in kinds:
                kept = min(ex[f"{kind}_key"].shape[0], rows)
                self._merge_sample_picks(kind, keys[:kept], where[:kept], flat, x)
        else:
            keys = sample_keys(ctx.row_doc, ctx.row_pos, flat.shape[1])
            keys = keys.masked_fill(~(flat > self.threshold), _NO_KEY)
            for kind in kinds:
                self._merge_sample(kind, keys, torch.arange(rows, device=x.device), flat, x)
        centres, window_max = self._quiet_window_candidates(flat.view(x.shape))
        quiet_keys = sample_keys(ctx.row_doc[centres], ctx.row_pos[centres], flat.shape[1])
        self._merge_sample(
            "nonfiring", quiet_keys.masked_fill(~(window_max <= self.threshold), _NO_KEY), centres, flat, x
        )

    def _merge_sample(self, kind: str, keys: torch.Tensor, rows: torch.Tensor, flat: torch.Tensor, x) -> None:
        """Merge the entries of smallest sample key among candidate rows `rows` (flat rows of the batch,
        keys [candidates, width]) into kind's sample."""
        batch_keys, at = keys.topk(min(self.examples[f"{kind}_key"].shape[0], keys.shape[0]), dim=0, largest=False)
        self._merge_sample_picks(kind, batch_keys, rows[at], flat, x)

    def _merge_sample_picks(self, kind: str, batch_keys: torch.Tensor, where: torch.Tensor, flat, x) -> None:
        """Merge a batch's smallest sample keys [n, width] at flat rows `where` [n, width] into kind's sample."""
        ctx = self.ctx
        # A token enters the N smallest keys when it arrives or never (later keys only push it back),
        # so windows taken on arrival cover the final sample.
        self._merge(
            kind,
            {"value": flat.gather(0, where), "doc": ctx.row_doc[where], "pos": ctx.row_pos[where], "key": batch_keys},
            by="key",
            largest=False,
            where=where,
            x=x,
        )

    def _quiet_window_candidates(self, floored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(centres [c], window_max [c, width]) of the batch's candidate non-firing windows: each row's
        valid tokens cut into WINDOW-token blocks, the last block ending at the row's end. A block's
        centre is the token CONTEXT_BEFORE into it (the row's last token in a row shorter than that),
        so its stored window is exactly the block; window_max is the unit's largest value in it
        (NaN for a block that is not a candidate, so it never passes `<= threshold`)."""
        batch, seq, width = floored.shape
        lengths = self.ctx.lengths
        full = seq // WINDOW
        starts = torch.arange(full, device=floored.device) * WINDOW  # [full]
        block_max = floored[:, : full * WINDOW].reshape(batch, full, WINDOW, width).amax(dim=2)  # [batch, full, width]
        block_max = block_max.masked_fill((starts[None, :] + WINDOW > lengths[:, None])[..., None], float("-inf"))
        block_centres = starts[None, :] + CONTEXT_BEFORE  # [1, full]
        # The tail: the last WINDOW tokens of a row whose length is not a multiple of WINDOW.
        tail_start = (lengths - WINDOW).clamp(min=0)  # [batch]
        at = tail_start[:, None] + torch.arange(WINDOW, device=floored.device)  # [batch, WINDOW]
        inside = at < lengths[:, None]
        tail = floored.gather(1, at.clamp(max=seq - 1)[..., None].expand(-1, -1, width))
        tail_max = torch.where(inside[..., None], tail, float("-inf")).amax(dim=1)  # [batch, width]
        tail_max = tail_max.masked_fill((lengths % WINDOW == 0)[:, None], float("-inf"))
        tail_centre = tail_start + torch.minimum(lengths - 1 - tail_start, torch.full_like(tail_start, CONTEXT_BEFORE))
        row = torch.arange(batch, device=floored.device)[:, None] * seq
        centres = torch.cat([(row + block_centres).reshape(-1), row[:, 0] + tail_centre])
        window_max = torch.cat([block_max.reshape(-1, width), tail_max])
        # A non-candidate (-inf) must never pass `<= threshold`: NaN keeps it out.
        return centres, window_max.masked_fill(window_max == float("-inf"), float("nan"))

    def _windows(self, x: torch.Tensor, where: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """[m, CONTEXT] unit units[i]'s own values around flat row where[i] of x [batch, seq, width],
        NaN outside that token's model window (before its row's start, past its valid length)."""
        batch, seq, width = x.shape
        row = where // seq
        t = (where % seq)[:, None] + torch.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1, device=x.device)
        inside = (t >= 0) & (t < self.ctx.lengths[row][:, None])
        values = x.reshape(batch * seq, width)[row[:, None] * seq + t.clamp(0, seq - 1), units[:, None]]
        return torch.where(inside, values, float("nan")).to(VALUE_DTYPE)

    def _merge(self, kind: str, new: dict, *, by: str, largest: bool, where=None, x=None) -> None:
        """Keep the best of the kept and the `new` entries of one kind: largest `by` (top), or smallest
        (bottom, sample keys); values tie to the first token in document order.

        Window values come with `new` (another rank's examples) or, for a batch, are read from x
        for the entries that made it in (rows `where` [new, width]): most candidates of a batch do not.
        """
        ex = self.examples
        size = ex[f"{kind}_{by}"].shape[0]
        if by == "key":  # an empty new entry never displaces an empty kept one (whose window need not move)
            ranked = torch.cat([ex[f"{kind}_key"], new["key"] + (new["key"] == _NO_KEY).long()])
        else:
            ranked = torch.cat([ex[f"{kind}_{by}"], new[by]])
        if by == "value":
            place = document_places(
                torch.cat([ex[f"{kind}_doc"], new["doc"]]), torch.cat([ex[f"{kind}_pos"], new["pos"]])
            )
            ranked = ranking_keys(ranked, place, largest)
        _, pick = ranked.topk(size, dim=0, largest=largest)
        windows = new.pop("context", None)
        for field, values in new.items():
            ex[f"{kind}_{field}"] = torch.cat([ex[f"{kind}_{field}"], values]).gather(0, pick)
        self._place_windows(kind, pick, windows, where, x)  # every kind keeps windows

    def _place_windows(self, kind: str, pick: torch.Tensor, windows, where, x) -> None:
        """After a merge picked entries `pick` [size, width] (>= size: the new ones), write the new
        entries' windows into the slots the dropped entries free: from `windows` [new, width, WINDOW]
        (another rank's) or read from the batch x at flat rows `where`."""
        slots = self.window_slots[kind]
        size, width = slots.shape
        arrived = pick >= size
        kept = slots.gather(0, pick.clamp(max=size - 1))
        # Mark the slots of the entries that stay (arrived entries point at a spare row).
        taken = torch.zeros(size + 1, width, dtype=torch.bool, device=slots.device)
        taken.scatter_(0, torch.where(arrived, size, kept), True)
        # Per unit as many slots are freed as entries arrive: pair them in (unit, order) order.
        free_unit, free_slot = (~taken[:size]).T.nonzero(as_tuple=True)
        new_unit, new_rank = arrived.T.nonzero(as_tuple=True)
        kept[new_rank, new_unit] = free_slot
        self.window_slots[kind] = kept
        source = pick[new_rank, new_unit] - size
        store = self.examples[f"{kind}_context"]
        if windows is not None:
            store[free_slot, free_unit] = windows[source, new_unit]
        elif fused.usable(x):
            fused.write_windows(
                x, self.ctx, where[source, new_unit], new_unit, free_slot, CONTEXT_BEFORE, CONTEXT_AFTER, store
            )
        else:
            store[free_slot, free_unit] = self._windows(x, where[source, new_unit], new_unit)


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
