"""Bytes of a whq scenario run vs the NPZ files Activation Lab writes for the same capture.

    python examples/scenarios/storage_ratio.py WH RUN

Activation Lab keeps, for every forward pass, the full per-token arrays (1, T, H) of
each captured tensor (np.savez_compressed at capture.store_dtype): tensors/step_NNN.npz
for the prefill (T = prompt length) and each decode step (T = 1),
conversation_snapshots/snapshot_NN_role.npz per message prefix and references/ref_label.npz
per reference. This script re-runs the run's model on the token ids the warehouse
stored (plain forward hooks, nothing of whq's capture), writes exactly those NPZ files
for the four residual-stream sources of the captured layers into a temporary folder,
and compares their size with the run's Parquet parts.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from queries.report import LAB_SOURCE

SPARSE_TABLES = {"token_neurons", "doc_neurons", "neuron_stats", "neuron_examples", "neuron_logits"}


def _full_arrays(model, modules: dict, ids: list[int]) -> dict:
    """{(source, layer): [T, H] float32} for one unpadded forward pass."""
    import torch

    captured, handles = {}, []
    named = dict(model.named_modules())
    for key, (name, hook) in modules.items():
        if hook == "in":
            handles.append(
                named[name].register_forward_pre_hook(
                    lambda m, a, k, key=key: captured.__setitem__(
                        key, (a[0] if a else k["hidden_states"])[0].float().numpy()
                    ),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(
                named[name].register_forward_hook(
                    lambda m, a, o, key=key: captured.__setitem__(
                        key, (o if isinstance(o, torch.Tensor) else o[0])[0].float().numpy()
                    )
                )
            )
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def activation_lab_bytes(wh, run: str, folder: Path) -> int:
    """Write Activation Lab's NPZ files for the run's capture under `folder`; returns their total size."""
    from ingest.models import load

    manifest = wh.manifest(run)
    config = manifest["config"]
    scenario = config["scenario"]
    store = np.dtype(
        scenario["capture"]["store_dtype"].replace("bfloat16", "float32")
    )  # numpy has no bfloat16: Lab stores float32
    loaded = load(config["model_id"], "cpu", "float32")
    sites = wh.pl("SELECT site, modules, layers, hook_point FROM sites WHERE run_id = ? AND reductions = 'last'", [run])
    modules = {
        (site, layer): (module, hook)
        for site, mods, layers, hook in sites.iter_rows()
        for module, layer in zip(mods, layers)
    }
    docs = wh.pl(
        "SELECT d.doc, d.role, d.label, d.message_index, d.message_role, d.meta, list(t.token_id ORDER BY t.pos) AS ids "
        "FROM documents d JOIN tokens t ON t.run_id = d.run_id AND t.doc = d.doc WHERE d.run_id = ? "
        "GROUP BY ALL ORDER BY d.doc",
        [run],
    )
    for sub in ("tensors", "conversation_snapshots", "references"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    def arrays(full: dict, rows: slice) -> dict:
        return {
            f"layer_{layer:02d}/{LAB_SOURCE[source]}": full[(source, layer)][None, rows].astype(store)
            for source, layer in full
        }

    for doc, role, label, index, message_role, meta, ids in docs.iter_rows():
        full = _full_arrays(loaded.model, modules, ids)
        if role == "message":
            np.savez_compressed(
                folder / "conversation_snapshots" / f"snapshot_{index:02d}_{message_role}.npz",
                **arrays(full, slice(None)),
            )
        elif role == "reference":
            np.savez_compressed(folder / "references" / f"ref_{label}.npz", **arrays(full, slice(None)))
        elif role == "generated":
            prompt = json.loads(meta)["prompt_tokens"]
            steps = folder / "tensors" / f"doc_{doc:03d}"
            steps.mkdir(exist_ok=True)
            np.savez_compressed(steps / "step_000.npz", **arrays(full, slice(0, prompt)))
            for step in range(1, len(ids) - prompt + 1):
                np.savez_compressed(
                    steps / f"step_{step:03d}.npz", **arrays(full, slice(prompt + step - 1, prompt + step))
                )
    return sum(p.stat().st_size for p in folder.rglob("*.npz"))


def storage_ratio(wh, run: str) -> dict:
    parts = wh.manifest(run)["parts"]
    whq_bytes = sum(p["bytes"] for p in parts)
    dense_bytes = sum(p["bytes"] for p in parts if p["table"] not in SPARSE_TABLES)
    with tempfile.TemporaryDirectory() as tmp:
        lab = activation_lab_bytes(wh, run, Path(tmp))
    return {
        "whq_bytes": whq_bytes,
        "whq_bytes_without_sparse_sites": dense_bytes,
        "activation_lab_npz_bytes": lab,
        "ratio": whq_bytes / lab,
        "ratio_without_sparse_sites": dense_bytes / lab,
    }


def main(argv: list[str]) -> None:
    import warehouse

    if len(argv) != 2:
        raise SystemExit("usage: python examples/scenarios/storage_ratio.py WAREHOUSE RUN")
    result = storage_ratio(warehouse.open(argv[0]), argv[1])
    for key, value in result.items():
        print(f"{key:32} {value:,.4f}" if isinstance(value, float) else f"{key:32} {value:,}")


if __name__ == "__main__":
    main(sys.argv[1:])
