"""The checks of a capture against the loaded model, all refused before the first forward pass.

- a site's reductions: K against the site's units, examples=N against memory (`check_reductions`),
  similar=K only where units have output directions (`check_similar`);
- the options that need a kind of model: the window against its positions (`window_length`),
  --logit-lens and --splice a causal LM with an unembedding, a scenario a chat/causal model.

`ingest.prepare.ready_capture` runs the site checks for every capture (ingest, scenario runs,
`whq bench ingest`), so the three refuse the same SPECs. The numbers that need no model
(batch size, window, ranks) are checked when the options are built (ingest/options.py).
Torch is imported only to ask a CUDA device its memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from warehouse.errors import BadInput, BadSpec

from .models import down_projection
from .sites import ResolvedSite, SiteSpec

# Kept per unit, layer and example slot: four float32 values (top, bottom, random, nonfiring), and
# int64 doc, position and window slot of each and the two sample keys = 128 bytes. Peak memory grows
# by about 2.1x the slots' bytes, because the merge concatenates them and the resume snapshot copies
# them (llama-tiny on the CPU: examples=10000 and 40000 raised peak RSS by 544 MB and 2017 MB for
# 246 MB and 983 MB of slots); 2.5x leaves a margin: 320 bytes per slot.
# Each example also keeps its window of 71 float16 values (reductions.py WINDOW): 568 bytes, 1420
# with the same margin.
BYTES_PER_EXAMPLE_SLOT = 320 + 1420
# quantiles=Q pools 2Q sampled firings per example slot (float32 value, int64 doc, position, key and
# window slot, and its window): 178 bytes each, 445 with the margin.
BYTES_PER_POOL_SLOT = 445
# Reductions whose K picks units of a token or document: more than the site's units cannot be kept.
UNIT_COUNTS = ("topk", "abstopk", "nag")


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


def check_similar(loaded, resolved: list[ResolvedSite]) -> None:
    """similar=K ranks units by the cosine of their output directions: every layer of the site must have them."""
    for r in resolved:
        if "similar" in r.spec.reductions and any(
            down_projection(loaded.model, module, r.hook) is None for _, module in r.modules
        ):
            raise BadInput(
                f"--site {r.spec.text!r}: similar=K compares output directions, which only MLP unit sites have "
                "(mlp.act, mlp.up, mlp.gate): drop similar from this site"
            )


def _is_causal_lm(loaded) -> bool:
    return loaded.family == "decoder" and loaded.model.get_output_embeddings() is not None


def check_splice_sites(splice: bool, specs: list[SiteSpec]) -> None:
    """Before the model loads: --splice puts each reconstruction back, which an encode_only site cannot make."""
    encode_only = next((s.text for s in specs if s.encode_only), None)
    if splice and encode_only:
        raise BadInput(f"--splice needs the decoder that {encode_only!r} skips: drop encode_only there, or --splice")


def check_splice(splice: bool, loaded, dictionaries: dict) -> None:
    """--splice measures next-token loss, so it needs a causal LM and a dictionary to splice in."""
    if splice and (not _is_causal_lm(loaded) or not dictionaries):
        raise BadInput(
            "--splice needs a causal LM with an unembedding and a dictionary site (SITE+sae=PATH): drop --splice"
        )


def check_logit_lens(logit_lens: bool, loaded) -> None:
    if logit_lens and not _is_causal_lm(loaded):
        raise BadInput(
            "--logit-lens needs a causal LM with an unembedding (lm_head); this model has none: drop --logit-lens"
        )


def check_scenario_model(loaded, model: str) -> None:
    """A scenario generates: it needs a causal LM with a tokenizer and an lm_head."""
    if not _is_causal_lm(loaded) or loaded.hf_tokenizer is None:
        raise BadInput(
            f"model {model!r} is not a causal LM with a tokenizer and an lm_head: scenarios need a chat/causal model"
        )


def model_positions(loaded) -> int | None:
    """The positions the model has (max_position_embeddings), when its config says."""
    return (loaded.config.get("model_config") or {}).get("max_position_embeddings")


def window_length(max_length: int | None, loaded, model: str) -> int:
    """--max-length, or the model's own; checked against the model's positions and special tokens."""
    length = int(max_length or loaded.max_length)
    positions = model_positions(loaded)
    if positions and length > positions:
        raise BadInput(
            f"--max-length {length} is longer than the {positions} positions model {model!r} has: "
            f"use at most {positions} (longer documents are split into windows)"
        )
    if length <= loaded.tokenizer.n_special:
        raise BadInput(
            f"--max-length {length} leaves no room for text after {loaded.tokenizer.n_special} special tokens: raise it"
        )
    return length
