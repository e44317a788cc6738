"""Range checks that need the loaded model: K against a site's units, examples=N against memory.

Both are refused before the first forward pass.

Run-level numbers (batch size, window, shard size, ranks) are checked by `check_run_numbers`
before anything loads. Torch is imported only to ask a CUDA device its memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from warehouse.errors import BadInput, BadSpec

from .sites import ResolvedSite

# Kept per unit, layer and example slot: three float32 values (top, bottom, random) and seven
# int64 (doc and position of each, the random key) = 68 bytes. Measured on llama-tiny (CPU,
# 12 documents, before bottom examples existed): examples=10000 and 40000 raised peak RSS by
# 544 MB and 2017 MB for 246 MB and 983 MB of slots, about 2.1x (the merge concatenates, the
# resume snapshot copies); 2.5x leaves a margin: 170 bytes per slot.
# Each top, bottom and random example also keeps its window of 71 float16 values (reductions.py
# CONTEXT_*): 426 bytes, 1065 with the same margin.
BYTES_PER_EXAMPLE_SLOT = 170 + 1065
# quantiles=Q pools 2Q sampled firings per example slot (float32 value, int64 doc, position, key):
# 28 bytes each, 70 with the margin.
BYTES_PER_POOL_SLOT = 70
# Reductions whose K picks units of a token or document: more than the site's units cannot be kept.
UNIT_COUNTS = ("topk", "abstopk", "nag")


def check_run_numbers(*, max_length: int | None, rank: int, world_size: int) -> None:
    """Numbers of one ingest that the older checks in pipeline.ingest do not cover."""
    if max_length is not None and max_length < 1:
        raise BadInput(f"--max-length {max_length} must be at least 1 (omit it for the model's own window)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise BadInput(
            f"rank {rank} of world size {world_size} is out of range: the rank must be 0..world size - 1 "
            f"(torchrun sets RANK and WORLD_SIZE; use --ranks N on one machine)"
        )


def _physical_memory() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")  # a container's own limit, where there is one
    try:
        text = limit.read_text().strip()
    except OSError:
        return total
    return min(total, int(text)) if text.isdigit() else total


def memory_budget(device: str) -> tuple[int, str]:
    """(bytes, what they are) that examples=N may hold: half the host memory, and of the GPU's on CUDA."""
    budget, what = _physical_memory() // 2, "half of this machine's memory"
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_properties(torch.device(device)).total_memory // 2
        if gpu < budget:
            budget, what = gpu, f"half of {device}'s memory"
    return budget, what


def site_width(loaded, module_name: str, hook: str) -> int | None:
    """Units a hook on this module sees, when the model says: a Linear's features, or a block's hidden size."""
    module = dict(loaded.model.named_modules())[module_name]
    width = getattr(module, "in_features" if hook == "in" else "out_features", None)
    if isinstance(width, int):
        return width
    if module_name.rsplit(".", 1)[-1].isdigit():  # a block of the layer stack: the residual stream
        hidden = (loaded.config.get("model_config") or {}).get("hidden_size")
        return hidden if isinstance(hidden, int) else None
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_reductions(resolved: list[ResolvedSite], loaded, device: str) -> None:
    """BadSpec for a K larger than the site's units, or examples=N that would not fit in memory."""
    budget, what = memory_budget(device)
    held = 0  # bytes of the examples of the sites checked so far
    for site in resolved:
        widths = [site.units or site_width(loaded, name, site.hook) for _, name in site.modules]
        if None in widths:
            continue  # a custom module of unknown width: the hooks learn it on the first batch
        reductions = site.spec.reductions
        for name in UNIT_COUNTS:
            if name in reductions and reductions[name] > min(widths):
                raise BadSpec(
                    f"--site {site.spec.text!r}: {name}={reductions[name]} is more than the {min(widths)} units "
                    f"of site {site.name}: use at most {min(widths)} (or `dense` for every unit)"
                )
        if "examples" not in reductions:
            continue
        n, units = reductions["examples"], sum(widths)
        per_slot = BYTES_PER_EXAMPLE_SLOT + 2 * reductions.get("quantiles", 0) * BYTES_PER_POOL_SLOT
        needed = n * units * per_slot
        if held + needed > budget:
            most = max(0, (budget - held) // (units * per_slot))
            others = ", less what the other sites' examples hold" if held else ""
            shape = (
                f"{widths[0]} units x {len(widths)} layers"
                if len(set(widths)) == 1
                else f"{units} units over {len(widths)} layers"
            )
            raise BadSpec(
                f"--site {site.spec.text!r}: examples={n} needs about {_gb(needed)} of memory ({n} x {shape} "
                f"x {per_slot} bytes), over the {_gb(budget)} budget "
                f"({what}{others}): use examples=N with N at most {most}"
            )
        held += needed
