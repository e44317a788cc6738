"""Run-level tables written at commit: runs, sites, neuron_stats, neuron_examples, neuron_logits."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from warehouse import schema
from warehouse.errors import BadInput

from .capture import _NO_KEY, SiteLayer

LOGIT_LENS_K = 10


def _table(name: str, columns: dict, width: int | None = None) -> pa.Table:
    target = schema.table(name).arrow_schema(width)
    return pa.Table.from_pydict({f.name: columns[f.name] for f in target}, schema=target)


def runs_row(loaded, resolved, writer) -> pa.Table:
    infos = writer.run_shard_info()  # every rank's shards
    config = dict(writer.config, model_config=loaded.config.get("model_config"))
    return _table("runs", {
        "model_id": [loaded.model_id], "model_revision": [loaded.revision],
        "model_class": [type(loaded.model).__name__], "dtype": [loaded.config.get("dtype")],
        "device": [loaded.config.get("device")], "n_layers": [loaded.n_layers],
        "sites": [[r.spec.text for r in resolved]],
        "n_documents": [sum(i["n_docs"] for i in infos)], "n_tokens": [sum(i["n_tokens"] for i in infos)],
        "config": [json.dumps(config, default=str)], "created_at": [writer.started_at.replace(tzinfo=None)],
        "status": ["committed"],
    })


def sites_rows(resolved, widths: dict[str, int]) -> pa.Table:
    """One row per site; `widths`: units per site name (sites that saw no token have none)."""
    return _table("sites", {
        "site": [r.name for r in resolved], "module_glob": [r.glob for r in resolved], "hook_point": [r.hook for r in resolved],
        "modules": [[m for _, m in r.modules] for r in resolved], "layers": [[layer for layer, _ in r.modules] for r in resolved],
        "width": [widths.get(r.name) for r in resolved], "reductions": [r.spec.reductions_text for r in resolved],
        "threshold": [r.spec.threshold for r in resolved],
    })


def neuron_stats(sl: SiteLayer) -> pa.Table:
    s = {k: v.cpu().numpy() for k, v in sl.stats.items()}
    seen = s["max_doc"] >= 0
    return _table("neuron_stats", {
        "neuron": np.arange(sl.width, dtype=np.int32), "n_tokens": np.full(sl.width, int(s["n_tokens"])),
        "n_fired": s["n_fired"], "sum": s["sum"], "sum_sq": s["sum_sq"],
        "max": pa.array(s["max"], mask=~seen), "max_doc": pa.array(s["max_doc"].astype(np.int32), mask=~seen),
        "max_pos": pa.array(s["max_pos"].astype(np.int32), mask=~seen),
    })


def neuron_examples(sl: SiteLayer) -> pa.Table:
    ex = {k: v.cpu().numpy() for k, v in sl.examples.items()}
    n, width = ex["top_value"].shape
    ranks, units = np.meshgrid(np.arange(n), np.arange(width), indexing="ij")
    keep_top = (ex["top_doc"] >= 0) & (ex["top_value"] > sl.threshold)
    keep_random = ex["random_key"] != _NO_KEY
    cols = {k: [] for k in ("neuron", "kind", "rank", "doc", "pos", "value")}
    for kind, keep in (("top", keep_top), ("random", keep_random)):
        # Kept entries are a prefix of each unit's sorted column, so ranks stay 0..m-1.
        unit_order = np.argsort(units[keep], kind="stable")
        unit = units[keep][unit_order]
        cols["neuron"].append(unit)
        cols["kind"].append(np.full(unit.size, kind))
        cols["rank"].append(ranks[keep][unit_order])
        cols["doc"].append(ex[f"{kind}_doc"][keep][unit_order])
        cols["pos"].append(ex[f"{kind}_pos"][keep][unit_order])
        cols["value"].append(ex[f"{kind}_value"][keep][unit_order])
    return _table("neuron_examples", {k: np.concatenate(v) for k, v in cols.items()}, sl.width)


def _unembedding(loaded):
    head = getattr(loaded.model, "get_output_embeddings", lambda: None)()
    return None if head is None else head.weight


def _down_projection(loaded, sl: SiteLayer):
    """W_down [hidden, units] for MLP unit sites (mlp.act/up/gate of a decoder)."""
    modules = dict(loaded.model.named_modules())
    name = sl.module_name
    for suffix in ("down_proj", "up_proj", "gate_proj"):
        if name.endswith(suffix) and (suffix == "down_proj") == (sl.site.hook == "in"):
            return modules[name[: -len(suffix)] + "down_proj"].weight
    return None


def neuron_logits(loaded, sl: SiteLayer, unembed) -> pa.Table | None:
    import torch

    down = _down_projection(loaded, sl)
    if down is None:
        return None
    cols = {k: [] for k in ("neuron", "direction", "rank", "token_id", "token", "logit")}
    with torch.inference_mode():
        for start in range(0, down.shape[1], 1024):
            logits = (unembed.float() @ down[:, start:start + 1024].float()).T  # [units, vocab]
            for direction, largest in (("top", True), ("bottom", False)):
                values, ids = logits.topk(LOGIT_LENS_K, dim=1, largest=largest)
                units = np.repeat(np.arange(start, start + logits.shape[0]), LOGIT_LENS_K)
                cols["neuron"].append(units)
                cols["direction"].append(np.full(units.size, direction))
                cols["rank"].append(np.tile(np.arange(LOGIT_LENS_K), logits.shape[0]))
                flat_ids = ids.reshape(-1).cpu().numpy()
                cols["token_id"].append(flat_ids)
                cols["token"].append(np.array(loaded.tokenizer.pieces(flat_ids.tolist()), dtype=object))
                cols["logit"].append(values.reshape(-1).cpu().numpy())
    return _table("neuron_logits", {k: np.concatenate(v) for k, v in cols.items()})


def final_parts(loaded, resolved, site_layers: list[SiteLayer], writer, logit_lens: bool, *,
                vector_widths: dict[str, int] | None = None) -> list[tuple]:
    """The run-level parts; `vector_widths`: the width of sites captured outside `site_layers` (scenario sources)."""
    widths = {**(vector_widths or {}), **{sl.name: sl.width for sl in site_layers if sl.width is not None}}
    parts = [("runs", None, None, runs_row(loaded, resolved, writer)), ("sites", None, None, sites_rows(resolved, widths))]
    for sl in site_layers:
        if sl.width is None:
            continue
        parts.append(("neuron_stats", sl.name, sl.layer, neuron_stats(sl)))
        if sl.examples:
            parts.append(("neuron_examples", sl.name, sl.layer, neuron_examples(sl)))
    if logit_lens:
        unembed = _unembedding(loaded)
        lens = [(sl, neuron_logits(loaded, sl, unembed)) for sl in site_layers] if unembed is not None else []
        lens = [(sl, t) for sl, t in lens if t is not None]
        if not lens:
            raise BadInput("--logit-lens needs a causal LM with an unembedding and an MLP unit site (mlp.act, mlp.up or mlp.gate)")
        parts.extend(("neuron_logits", sl.name, sl.layer, table) for sl, table in lens)
    return parts
