"""Independent reference computations: dense activations by plain hooks, reductions in numpy.

Nothing here uses whq's capture code: the model is re-run on the token ids the
warehouse stored, one window at a time (no padding), and every reduction is
recomputed with numpy in float64.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def dense_activations(model, module_name: str, hook: str, windows_by_doc: dict) -> dict:
    """{doc: [n_tokens, width] float32} for one module, windows run unpadded, one at a time."""
    module = dict(model.named_modules())[module_name]
    captured = []
    if hook == "in":
        handle = module.register_forward_pre_hook(
            lambda m, a, k: captured.append((a[0] if a else k["hidden_states"]).detach().float()), with_kwargs=True
        )
    else:
        handle = module.register_forward_hook(
            lambda m, a, o: captured.append((o if isinstance(o, torch.Tensor) else o[0]).detach().float())
        )
    out = {}
    try:
        with torch.inference_mode():
            for doc, windows in windows_by_doc.items():
                parts = []
                for ids in windows:
                    captured.clear()
                    model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
                    parts.append(captured[0][0].numpy())
                out[doc] = np.concatenate(parts)
    finally:
        handle.remove()
    return out


def stats(acts: dict, threshold: float = 0.0) -> dict:
    docs = sorted(acts)
    stacked = np.concatenate([acts[d] for d in docs]).astype(np.float64)
    owner = np.concatenate([[(d, p) for p in range(len(acts[d]))] for d in docs])
    where = stacked.argmax(axis=0)
    return {
        "n_tokens": np.full(stacked.shape[1], len(stacked)),
        "n_fired": (stacked > threshold).sum(axis=0),
        "sum": stacked.sum(axis=0),
        "sum_sq": (stacked**2).sum(axis=0),
        "max": stacked.max(axis=0),
        "max_doc": owner[where, 0],
        "max_pos": owner[where, 1],
    }


def nag(acts: dict, k: int) -> dict:
    """{doc: (ids, impacts)}: the k units of highest mean |value|, ties to the lower id."""
    out = {}
    for doc, a in acts.items():
        impact = np.abs(a.astype(np.float64)).mean(axis=0)
        order = np.lexsort((np.arange(len(impact)), -impact))[:k]
        out[doc] = (order, impact[order])
    return out


VOLATILE_RUN_COLUMNS = ("created_at", "config")


def run_content(wh, run_id: str) -> dict:
    """Every table's rows of one run, sorted, as polars frames (run-time columns dropped)."""
    import warehouse.schema

    out = {}
    for table in warehouse.schema.tables():
        frame = wh.pl(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ?", [run_id])
        if table == "runs":
            frame = frame.drop(list(VOLATILE_RUN_COLUMNS))
        sortable = [c for c, t in frame.schema.items() if not t.is_nested()]
        out[table] = frame.sort(sortable)
    return out


def content_checksum(wh, run_id: str) -> str:
    """sha256 over every table's rows of the run (sorted, run-time columns dropped)."""
    digest = hashlib.sha256()
    for table, frame in run_content(wh, run_id).items():
        digest.update(table.encode())
        digest.update(frame.write_ndjson().encode())
    return digest.hexdigest()
