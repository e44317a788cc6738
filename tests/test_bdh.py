"""BDH end to end: a tiny random BDH through its adapter, ingested, and the analyze.py / analyze.sql
report (the neuron macros) read back from the warehouse equals numpy on the model's own dense activations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import warehouse
from ingest.pipeline import ingest
from ingest.sources import Document

BDH_DIR = Path(__file__).resolve().parents[1] / "examples" / "bdh"
ADAPTER = BDH_DIR / "adapter.py"
TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "\n\nPETRUCHIO:\nGood morrow, Kate; for that's your name, I hear.",
    "KATHARINA:\nWell have you heard, but something hard of hearing.",
    "You are all resolved rather to die than to famish? " * 4,
]
RUN, SITE = "bdh", "xy_sparse"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bdh_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bdh") / "wh"
    documents = [Document(f"d{i}", text) for i, text in enumerate(TEXTS)]
    ingest(
        root,
        f"{ADAPTER}:random-tiny",
        sites=[f"{SITE}:threshold=0,examples=3"],
        documents=documents,
        run_id=RUN,
        batch_size=3,
        device="cpu",
        progress=False,
    )
    wh = warehouse.open(root)
    yield wh, _dense_activations(documents)
    wh.close()


def _dense_activations(documents) -> list[np.ndarray]:
    """Per layer, [all tokens in document order, units]: each document run alone, no padding."""
    loaded = _module(ADAPTER, "bdh_adapter_test").load(device="cpu", dtype="float32", checkpoint="random-tiny")
    model = loaded["model"]
    per_layer = [[] for _ in range(loaded["n_layers"])]
    hooks = [
        marker.register_forward_hook(lambda _m, _i, out, layer=layer: per_layer[layer].append(out[0].numpy().copy()))
        for layer, marker in enumerate(model.xy_sparse)
    ]
    with torch.no_grad():
        for doc in documents:
            model(input_ids=torch.tensor([list(doc.text.encode())]))
    for hook in hooks:
        hook.remove()
    return [np.concatenate(chunks) for chunks in per_layer]


@pytest.fixture(scope="module")
def analyze():
    return _module(BDH_DIR / "analyze.py", "bdh_analyze_test")


def test_layer_summary_matches_numpy(bdh_run, analyze):
    wh, acts = bdh_run
    summary = analyze.layer_summary(wh, RUN, SITE)
    assert summary["layer"].to_list() == list(range(len(acts)))
    rates = [(a > 0).mean(axis=0) for a in acts]
    np.testing.assert_allclose(summary["mean_rate"].to_numpy(), [r.mean() for r in rates], rtol=1e-9)
    np.testing.assert_allclose(summary["median_rate"].to_numpy(), [np.median(r) for r in rates], rtol=1e-9)
    np.testing.assert_allclose(summary["rare_share"].to_numpy(), [(r < 0.01).mean() for r in rates], rtol=1e-9)
    np.testing.assert_allclose(summary["dead_share"].to_numpy(), [(r == 0).mean() for r in rates], rtol=1e-9)
    assert 0 < summary["mean_rate"].min() < 1
    per_unit = wh.pl(f"SELECT * FROM activation_frequency('{RUN}', '{SITE}')")
    np.testing.assert_allclose(per_unit["frequency"].to_numpy(), np.concatenate(rates), rtol=1e-9)
    overall = analyze.run_query(wh, "overall", RUN, SITE)
    np.testing.assert_allclose(overall["mean_rate"][0], np.mean([r.mean() for r in rates]), rtol=1e-9)


def test_selectivity_matches_numpy(bdh_run):
    wh, acts = bdh_run
    for layer, a in enumerate(acts):
        sel = wh.pl(f"SELECT * FROM selectivity('{RUN}', '{SITE}', {layer}) WHERE selectivity IS NOT NULL").sort(
            "neuron"
        )
        fired = np.flatnonzero((a > 0).any(axis=0))  # ReLU units: mean > 0 exactly when the unit fired
        assert sel["neuron"].to_list() == fired.tolist()
        a64 = a[:, fired].astype(np.float64)
        np.testing.assert_allclose(sel["selectivity"].to_numpy(), a64.max(axis=0) / a64.mean(axis=0), rtol=1e-4)


def test_strongest_activation_context_matches_text(bdh_run):
    wh, acts = bdh_run
    starts = np.cumsum([0] + [len(t.encode()) for t in TEXTS])
    for layer, a in enumerate(acts):
        flat, unit = np.unravel_index(np.argmax(a), a.shape)
        doc = int(np.searchsorted(starts, flat, side="right") - 1)
        pos = int(flat - starts[doc])
        row = wh.pl(f"SELECT * FROM neuron_contexts_bytes('{RUN}', '{SITE}', {layer}, {unit})").row(0, named=True)
        assert (row["doc_id"], row["pos"]) == (f"d{doc}", pos)
        np.testing.assert_allclose(row["value"], a[flat, unit], rtol=1e-5)
        text = TEXTS[doc]
        assert row["context"] == text[max(0, pos - 24) : pos] + "[" + text[pos] + "]" + text[pos + 1 : pos + 5]


def test_top_selective_matches_numpy(bdh_run, analyze):
    wh, acts = bdh_run
    rows = []
    for layer, a in enumerate(acts):
        a64 = a.astype(np.float64)
        n_fired = (a > 0).sum(axis=0)
        for unit in np.flatnonzero(n_fired >= 2):
            rows.append((-(a64[:, unit].max() / a64[:, unit].mean()), -a64[:, unit].max(), layer, int(unit)))
    expected = sorted(rows)[:5]
    top = analyze.top_selective(wh, RUN, SITE, k=5, min_fired=2)
    assert list(zip(top["layer"], top["neuron"])) == [(layer, unit) for _, _, layer, unit in expected]
    np.testing.assert_allclose(top["selectivity"].to_numpy(), [-s for s, *_ in expected], rtol=1e-4)
    for row in top.iter_rows(named=True):
        bytes_row = wh.pl(f"SELECT * FROM neuron_contexts_bytes('{RUN}', '{SITE}', {row['layer']}, {row['neuron']})")
        assert row["context"] == bytes_row["context"][0]


def test_histograms_and_charts(bdh_run, analyze, tmp_path):
    wh, acts = bdh_run
    rates = analyze.run_query(wh, "rate_histogram", RUN, SITE, bins=10)
    assert rates.group_by("layer").agg(pl.col("n_neurons").sum()).sort("layer")["n_neurons"].to_list() == [
        a.shape[1] for a in acts
    ]
    for layer, a in enumerate(acts):
        dead = rates.filter(layer=layer, bin=0)["n_neurons"][0]
        assert dead == int(((a > 0).sum(axis=0) == 0).sum())
    written = analyze.histograms(wh, RUN, SITE, tmp_path, bins=10)
    assert {p.name for p in written} >= {"firing_rate.html", "selectivity.html"}


def test_right_padding_leaves_real_positions_unchanged():
    model = _module(ADAPTER, "bdh_adapter_pad").load(device="cpu", dtype="float32", checkpoint="random-tiny")["model"]
    ids = torch.tensor([list(TEXTS[2].encode())])
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, with_pads = model(input_ids=ids), model(input_ids=padded, attention_mask=(padded > 0).long())
    torch.testing.assert_close(with_pads[:, : ids.shape[1]], alone, rtol=1e-5, atol=1e-5)
