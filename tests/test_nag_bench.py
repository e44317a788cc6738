"""`whq bench nag` (queries/nag_bench.py): its engines select what NAG's numpy kernel selects.

The kernel indexes dense weight arrays with a dense [N, L, K] id array; the macros join and
aggregate rows. Both read the same synthetic pool, so their selections must be the same
documents in the same order, with distances equal to 1e-12.
"""

from __future__ import annotations

import numpy as np

import warehouse
from queries import nag, nag_bench


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
