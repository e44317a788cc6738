"""`whq bench nag` (queries/nag_bench.py): its engines select what NAG's numpy kernel selects.

The kernel indexes dense weight arrays with a dense [N, L, K] id array; the macros join and
aggregate rows. Both read the same synthetic pool, so their selections must be the same
documents in the same order, with distances equal to 1e-12.
"""

from __future__ import annotations

import numpy as np
import polars as pl

import warehouse
from queries import nag, nag_bench, nag_frames


def test_engines_select_what_the_numpy_kernel_selects(tmp_path):
    run = nag_bench.build(tmp_path / "wh", 3000, n_layers=3, k=5, width=64, seed=1)
    with warehouse.open(tmp_path / "wh") as wh:
        kernel_docs, kernel_distance = nag_bench.numpy_select(wh, run, fraction=0.3)
        roles = dict(target_role="target", pool_role="pool")
        from_sql = nag.select(wh, run, run, nag_bench.SITE, fraction=0.3, **roles)
        from_polars = nag.select(wh, run, run, nag_bench.SITE, fraction=0.3, engine="polars", **roles)
    assert len(kernel_docs) > 100
    assert from_sql["doc"].to_list() == kernel_docs.tolist()
    np.testing.assert_allclose(from_sql["distance"].to_numpy(), kernel_distance, rtol=0, atol=1e-12)
    assert from_sql.equals(from_polars)


def test_bench_reports_every_engine_and_the_scan_bound(tmp_path):
    lines = []
    timings = nag_bench.run_bench(tmp_path / "wh", 400, echo=lines.append)
    rows = (400 + nag_bench.TARGET_DOCS) * 28 * 20
    scans = [t for t in timings if t.step == "scan"]
    assert [t.engine for t in scans] == ["sql", "polars"] and all(t.rows == rows for t in scans)
    assert {(t.engine, t.step) for t in timings} >= {
        ("sql-staged", "select"),
        ("polars", "select"),
        ("numpy", "select"),
    }
    assert lines[-1].startswith("selections identical across engines: True")


def _laid_out_as_no_capture_writes(layer_rows):
    """The bench's layer rows, with layers 0-3 out of the block layout the Polars twin sums fast.

    Rows are dropped from pool documents only: the targets keep K units per layer, so
    every layer's profile has the same total, as the numpy kernel assumes."""
    layers = iter(range(100))

    def rows(rng, n_docs, width, k, popularity):
        table = layer_rows(rng, n_docs, width, k, popularity)
        layer, order = next(layers), np.arange(table.num_rows)
        shuffle = np.random.default_rng(layer).permutation
        pool = order // k >= nag_bench.TARGET_DOCS
        if layer == 0:  # whole documents, out of document order
            order = (shuffle(n_docs)[:, None] * k + np.arange(k)).reshape(-1)
        elif layer == 1:  # every row out of order
            order = shuffle(table.num_rows)
        elif layer == 2:  # every 7th pool document with fewer than K rows
            order = order[~pool | (order % k != k - 1) | (order // k % 7 != 0)]
        elif layer == 3:  # every 5th pool document without rows, the rest in blocks of K
            order = order[~pool | (order // k % 5 != 0)]
        return table.take(order)

    return rows


def test_engines_agree_whatever_the_layout_of_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(nag_bench, "_layer_rows", _laid_out_as_no_capture_writes(nag_bench._layer_rows))
    run = nag_bench.build(tmp_path / "wh", 3000, n_layers=6, k=5, width=64, seed=2)
    summed, block_sums = [], nag_frames._block_sums

    def counted(*args):
        blocks = block_sums(*args)
        summed.append(blocks is not None)
        return blocks

    monkeypatch.setattr(nag_frames, "_block_sums", counted)
    roles = dict(target_role="target", pool_role="pool")
    with warehouse.open(tmp_path / "wh") as wh:
        kernel_docs, kernel_distance = nag_bench.numpy_select(wh, run, fraction=0.3)
        from_sql = nag.select(wh, run, run, nag_bench.SITE, fraction=0.3, **roles)
        from_polars = nag.select(wh, run, run, nag_bench.SITE, fraction=0.3, engine="polars", **roles)
        assert sorted(summed) == [False] * 2 + [True] * 4  # layers 1-2 by rows, the others by blocks
        assert from_sql["doc"].to_list() == kernel_docs.tolist()
        np.testing.assert_allclose(from_sql["distance"].to_numpy(), kernel_distance, rtol=0, atol=1e-12)
        assert from_sql.equals(from_polars)
        for named in (
            dict(layers=[1, 3, 4], pool_dataset="web-a"),
            dict(layers=[0, 5], power=2.0),
            dict(layers=[4, 5], target_role=None, target_dataset="target"),
        ):
            named = {**roles, **named}
            from_sql = nag.select(wh, run, run, nag_bench.SITE, fraction=0.5, **named)
            from_polars = nag.select(wh, run, run, nag_bench.SITE, fraction=0.5, engine="polars", **named)
            assert from_sql.height > 100 and from_sql.equals(from_polars), named


def test_block_sums_only_where_each_block_is_one_document():
    units = pl.Series("units", [0.0, 1.0, 10.0, 100.0])
    doc = pl.Series("doc", [4, 4, 7, 7, 9, 9], dtype=pl.Int32)
    neuron = pl.Series("neuron", [1, 2, 3, 0, 1, 1], dtype=pl.Int32)
    first, sums = nag_frames._block_sums(doc, neuron, units, 2)
    assert first.to_list() == [4, 7, 9] and sums.to_list() == [11.0, 100.0, 2.0]
    assert nag_frames._block_sums(doc, neuron, units, 3) is None  # a block of 4, 4, 7
    first, sums = nag_frames._block_sums(doc.reverse(), neuron.reverse(), units, 2)  # out of document order
    assert first.to_list() == [9, 7, 4] and sums.to_list() == [2.0, 100.0, 11.0]
    assert nag_frames._block_sums(doc.gather([0, 2, 1, 3, 4, 5]), neuron, units, 2) is None  # 4, 7 and 4, 7
    assert nag_frames._block_sums(doc.head(5), neuron.head(5), units, 2) is None  # a short last document
