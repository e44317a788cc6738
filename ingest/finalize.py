"""Run-level tables written at commit: runs, sites, neuron_stats, unit_histograms, neuron_examples, neuron_logits,
unit_neighbors, and the indexes over the stored top-k rows (warehouse/indexes.py: unit_coactivations, token_units,
vocabulary)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from warehouse import jsonio, schema
from warehouse.errors import BadInput
from warehouse.indexes import index_parts

from .models import down_projection, final_norm
from .reductions import _NO_KEY, SiteLayer

LOGIT_LENS_K = 10


def _table(name: str, columns: dict, width: int | None = None) -> pa.Table:
    target = schema.table(name).arrow_schema(width)
    return pa.Table.from_pydict({f.name: columns[f.name] for f in target}, schema=target)


def runs_row(loaded, resolved, writer) -> pa.Table:
    infos = writer.run_shard_info()  # every rank's shards
    config = dict(writer.config, model_config=loaded.config.get("model_config"))
    return _table(
        "runs",
        {
            "model_id": [loaded.model_id],
            "model_revision": [loaded.revision],
            "model_class": [type(loaded.model).__name__],
            "dtype": [loaded.config.get("dtype")],
            "device": [loaded.config.get("device")],
            "n_layers": [loaded.n_layers],
            "sites": [[r.spec.text for r in resolved]],
            "n_documents": [sum(i["n_docs"] for i in infos)],
            "n_tokens": [sum(i["n_tokens"] for i in infos)],
            "config": [jsonio.dumps(config)],
            "created_at": [writer.started_at.replace(tzinfo=None)],
            "status": ["committed"],
        },
    )


def sites_rows(resolved, widths: dict[str, int]) -> pa.Table:
    """One row per site; `widths`: units per site name (sites that saw no token have none)."""
    return _table(
        "sites",
        {
            "site": [r.name for r in resolved],
            "module_glob": [r.glob for r in resolved],
            "hook_point": [r.hook for r in resolved],
            "modules": [[m for _, m in r.modules] for r in resolved],
            "layers": [[layer for layer, _ in r.modules] for r in resolved],
            "width": [widths.get(r.name) for r in resolved],
            "reductions": [r.spec.reductions_text for r in resolved],
            "threshold": [r.spec.threshold for r in resolved],
        },
    )


def dictionaries_row(sl: SiteLayer) -> pa.Table:
    d = sl.encoder.d
    identity = {
        "path": d.path,
        "kind": sl.spec.kind,
        "format": d.format,
        "architecture": d.architecture,
        "encode_dtype": sl.encoder.encode_dtype,
        "sha256": d.sha256,
    }
    return _table("dictionaries", {k: [v] for k, v in {**identity, **sl.encoder.summary()}.items()})


def neuron_stats(sl: SiteLayer) -> pa.Table:
    s = {k: v.cpu().numpy() for k, v in sl.stats.items()}
    seen = s["max_doc"] >= 0
    return _table(
        "neuron_stats",
        {
            "neuron": np.arange(sl.width, dtype=np.int32),
            "n_tokens": np.full(sl.width, int(s["n_tokens"])),
            "n_fired": s["n_fired"],
            "sum": s["sum"],
            "sum_sq": s["sum_sq"],
            "max": pa.array(s["max"], mask=~seen),
            "max_doc": pa.array(s["max_doc"].astype(np.int32), mask=~seen),
            "max_pos": pa.array(s["max_pos"].astype(np.int32), mask=~seen),
            "min": pa.array(s["min"], mask=~seen),
            "sum_cube": s["sum_cube"],
            "sum_quad": s["sum_quad"],
            "sum_pos": s["sum_pos"],
        },
    )


def unit_histograms(sl: SiteLayer) -> pa.Table:
    """The non-empty bins of every unit's histogram, in (neuron, bin) order."""
    counts = sl.stats["hist"].cpu().numpy()
    units, bins = np.nonzero(counts)
    return _table(
        "unit_histograms",
        {"neuron": units.astype(np.int32), "bin": bins.astype(np.int16), "count": counts[units, bins]},
    )


def neuron_examples(sl: SiteLayer) -> pa.Table:
    ex = {k: v.cpu().numpy() for k, v in sl.examples_in_order().items()}
    n = sl.red["examples"]
    cols = {k: [] for k in ("neuron", "kind", "rank", "doc", "pos", "value", "quantile", "window_values")}

    def add(kind, keep, fields, quantile=None):
        # Kept entries are a prefix of each unit's column in rank order, so ranks stay 0..m-1.
        size, width = keep.shape
        ranks, units = np.meshgrid(np.arange(size), np.arange(width), indexing="ij")
        unit_order = np.argsort(units[keep], kind="stable")
        unit = units[keep][unit_order]
        cols["neuron"].append(unit)
        cols["kind"].append(np.full(unit.size, kind))
        cols["rank"].append(ranks[keep][unit_order])
        for field in ("doc", "pos", "value"):
            cols[field].append(fields[field][keep][unit_order])
        cols["quantile"].append(np.full(unit.size, None) if quantile is None else quantile[keep][unit_order])
        cols["window_values"].append(fields["context"][keep][unit_order])

    # Top examples are firings (value > threshold); bottom ones are negative (so a non-negative unit has none).
    kept = {
        "top": (ex["top_doc"] >= 0) & (ex["top_value"] > sl.threshold),
        "bottom": (ex["bottom_doc"] >= 0) & (ex["bottom_value"] < 0),
        "random": ex["random_key"] != _NO_KEY,
        "nonfiring": ex["nonfiring_key"] != _NO_KEY,
    }
    for kind, keep in kept.items():
        add(kind, keep, {f: ex[f"{kind}_{f}"] for f in ("doc", "pos", "value", "context")})
    if "quantiles" in sl.red:
        add("quantile", *_quantile_picks(sl, ex, n))
    columns = {k: np.concatenate(v) for k, v in cols.items()}
    # Unit-major rows (kinds in the order above within a unit): the part's small row groups
    # (warehouse/parts.py) then let a one-unit page read only its unit's windows.
    order = np.argsort(columns["neuron"], kind="stable")
    columns = {k: v[order] for k, v in columns.items()}
    columns["window_values"] = _window_lists(columns["window_values"])
    return _table("neuron_examples", columns, sl.width)


def _window_lists(windows: np.ndarray) -> pa.Array:
    """list<float16> per example [examples, window]: its window values, null outside its model window."""
    values = windows.reshape(-1).astype(np.float16)
    offsets = pa.array(np.arange(len(windows) + 1, dtype=np.int32) * windows.shape[1])
    return pa.ListArray.from_arrays(
        offsets, pa.array(values, pa.float16(), mask=np.isnan(values)), type=pa.list_(pa.float16())
    )


def quantile_bins(counts: np.ndarray, threshold: float, q: int) -> np.ndarray:
    """[units, HIST_BINS] quantile bin (0 .. q-1) of each histogram bin that holds firing values, else -1.

    Over the bins whose upper edge is above the threshold, each bin goes to the quantile
    bin of its middle rank: floor(q * (tokens in lower bins + count / 2) / total), at most
    q - 1 (units.sql quantile_examples computes the same). A quantile bin is thus whole
    histogram bins, and covers exactly the firing-token shares it reports.
    """
    from .reductions import hist_edges

    firing = np.where(hist_edges()[1] > threshold, counts, 0).astype(np.float64)
    total = firing.sum(axis=1, keepdims=True)
    before = np.cumsum(firing, axis=1) - firing
    with np.errstate(invalid="ignore", divide="ignore"):
        bins = np.minimum(q - 1, np.floor(q * (before + firing / 2) / total))
    return np.where(firing > 0, bins, -1).astype(np.int64)


def _quantile_picks(sl: SiteLayer, ex: dict, n: int):
    """(keep, fields, quantile) of kind quantile: per unit and quantile bin, the N
    smallest sample keys of the pool among its members, ranked by (bin, key)."""
    import torch

    from .reductions import hist_bins

    q = sl.red["quantiles"]
    of_bin = quantile_bins(sl.stats["hist"].cpu().numpy(), sl.threshold, q)  # [units, bins]
    pool, width = ex["pool_key"].shape
    units = np.broadcast_to(np.arange(width), (pool, width))
    quantile = of_bin[units, hist_bins(torch.from_numpy(ex["pool_value"])).numpy()]  # [pool, units], key order
    quantile = np.where(ex["pool_key"] != _NO_KEY, quantile, -1)
    onehot = quantile[:, :, None] == np.arange(q)
    within = np.take_along_axis(np.cumsum(onehot, axis=0), np.maximum(quantile, 0)[:, :, None], axis=2)[:, :, 0] - 1
    keep = (quantile >= 0) & (within < n)
    # Each unit's kept entries first, in (bin, key) order: the pool row is the key order.
    order = np.argsort(
        np.where(keep, quantile * pool + np.arange(pool)[:, None], q * pool + pool), axis=0, kind="stable"
    )
    pick = lambda a: np.take_along_axis(a, order, axis=0)  # noqa: E731
    fields = {f: pick(ex[f"pool_{f}"]) for f in ("doc", "pos", "value")}
    fields["context"] = ex["pool_context"][order, np.arange(width)]  # whole windows, not values
    return pick(keep), fields, pick(quantile)


def _unembedding(loaded):
    head = getattr(loaded.model, "get_output_embeddings", lambda: None)()
    return None if head is None else head.weight


def _feature_directions(loaded, sl: SiteLayer, unembed):
    """[hidden, latents]: a dictionary's decoder rows, scaled by the final norm's weight where the model has one.

    Only for dictionaries that write to the residual width (an SAE on resid.*, a transcoder's MLP output).
    """
    import torch

    w_dec = sl.encoder.w.get("W_dec")
    if w_dec is None or w_dec.shape[1] != unembed.shape[1]:
        return None
    norm = getattr(final_norm(loaded.model), "weight", None)
    with torch.inference_mode():
        return (w_dec * (1 if norm is None else norm.detach().float().to(w_dec.device))).T


def neuron_logits(loaded, sl: SiteLayer, unembed) -> pa.Table | None:
    import torch

    down = (
        down_projection(loaded.model, sl.module_name, sl.site.hook)
        if sl.encoder is None
        else _feature_directions(loaded, sl, unembed)
    )
    if down is None:
        return None
    cols = {k: [] for k in ("neuron", "direction", "rank", "token_id", "token", "logit", "text")}
    with torch.inference_mode():
        for start in range(0, down.shape[1], 1024):
            logits = (unembed.float() @ down[:, start : start + 1024].float()).T  # [units, vocab]
            for direction, largest in (("top", True), ("bottom", False)):
                values, ids = logits.topk(LOGIT_LENS_K, dim=1, largest=largest)
                units = np.repeat(np.arange(start, start + logits.shape[0]), LOGIT_LENS_K)
                cols["neuron"].append(units)
                cols["direction"].append(np.full(units.size, direction))
                cols["rank"].append(np.tile(np.arange(LOGIT_LENS_K), logits.shape[0]))
                flat_ids = ids.reshape(-1).cpu().numpy()
                cols["token_id"].append(flat_ids)
                cols["token"].append(np.array(loaded.tokenizer.pieces(flat_ids.tolist()), dtype=object))
                cols["text"].append(np.array(loaded.tokenizer.texts(flat_ids.tolist()), dtype=object))
                cols["logit"].append(values.reshape(-1).cpu().numpy())
    return _table("neuron_logits", {k: np.concatenate(v) for k, v in cols.items()})


def unit_neighbors(loaded, sl: SiteLayer) -> pa.Table:
    """Per unit the K others with the highest cosine of output directions (W_down columns)."""
    import torch

    down = down_projection(loaded.model, sl.module_name, sl.site.hook)
    k = min(sl.red["similar"], down.shape[1] - 1)
    with torch.inference_mode():
        directions = torch.nn.functional.normalize(down.float(), dim=0)  # [hidden, units]
        cols = {key: [] for key in ("neuron", "rank", "other", "cosine")}
        for start in range(0, directions.shape[1], 1024):
            cosine = directions[:, start : start + 1024].T @ directions  # [chunk, units]
            units = torch.arange(start, start + cosine.shape[0], device=cosine.device)
            cosine[torch.arange(cosine.shape[0]), units] = float("-inf")  # not itself
            values, others = _stable_topk(cosine, k)
            cols["neuron"].append(np.repeat(units.cpu().numpy(), k))
            cols["rank"].append(np.tile(np.arange(k), cosine.shape[0]))
            cols["other"].append(others.reshape(-1).cpu().numpy())
            cols["cosine"].append(values.reshape(-1).cpu().numpy())
    return _table("unit_neighbors", {key: np.concatenate(v) for key, v in cols.items()})


def _stable_topk(x, k: int):
    """Top-k of each row, ties to the lower index (torch.topk leaves tie order unspecified)."""
    import torch

    values, order = torch.sort(x, dim=1, descending=True, stable=True)
    return values[:, :k], order[:, :k]


def final_parts(
    loaded,
    resolved,
    site_layers: list[SiteLayer],
    writer,
    logit_lens: bool,
    *,
    vector_widths: dict[str, int] | None = None,
) -> list[tuple]:
    """The run-level parts; `vector_widths`: the width of sites captured outside `site_layers` (scenario sources)."""
    widths = {**(vector_widths or {}), **{sl.name: sl.width for sl in site_layers if sl.width is not None}}
    parts = [
        ("runs", None, None, runs_row(loaded, resolved, writer)),
        ("sites", None, None, sites_rows(resolved, widths)),
    ]
    for sl in site_layers:
        if sl.width is None:
            continue
        parts.append(("neuron_stats", sl.name, sl.layer, neuron_stats(sl)))
        if "hist" in sl.stats:
            parts.append(("unit_histograms", sl.name, sl.layer, unit_histograms(sl)))
        if sl.examples:
            parts.append(("neuron_examples", sl.name, sl.layer, neuron_examples(sl)))
        if sl.encoder is not None and sl.encoder.quality:
            parts.append(("dictionaries", sl.name, sl.layer, dictionaries_row(sl)))
        if "similar" in sl.red:  # limits.check_similar made sure the site has a down projection
            parts.append(("unit_neighbors", sl.name, sl.layer, unit_neighbors(loaded, sl)))
    parts += index_parts(writer, {r.name: r.spec.threshold for r in resolved})
    if logit_lens:
        lens = logit_lens_parts(loaded, site_layers)
        if not lens:
            raise BadInput(
                "--logit-lens needs a causal LM with an unembedding and an MLP unit site (mlp.act, mlp.up or mlp.gate) "
                "or a dictionary site that writes to the residual stream"
            )
        parts.extend(lens)
    return parts


def logit_lens_parts(loaded, site_layers: list[SiteLayer]) -> list[tuple]:
    """The neuron_logits parts of the site layers that have output directions (none without an unembedding)."""
    unembed = _unembedding(loaded)
    lens = [(sl, neuron_logits(loaded, sl, unembed)) for sl in site_layers] if unembed is not None else []
    return [("neuron_logits", sl.name, sl.layer, table) for sl, table in lens if table is not None]
