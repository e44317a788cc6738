"""The fused C hook kernel (ingest/fused.c) against plain references.

- top-k: a pure-Python sort by (value descending, index ascending, NaN first), over
  widths that are and are not multiples of k or of the vector width, ties and NaN;
- site pass: the same batches through the kernel and through torch ops give the same
  top-k rows, document means / NAG and stats;
- examples: the kernel's top and bottom tokens of a batch are the ones reductions.ranking_keys'
  top-k picks (the torch path), on ties, NaN, infinities, -0.0 and padding;
- a whole ingest: both paths commit the same token_neurons rows and neuron_stats;
- building: cached per source and CPU, and a missing compiler falls back to torch.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from ingest import fused

from .test_perf_paths import _batches, _context, _site_layer, _valid_tokens

pytestmark = pytest.mark.skipif(
    not fused.usable(torch.zeros(1, 1, 1)), reason=f"fused kernel unavailable: {fused.describe()}"
)


@pytest.fixture(autouse=True, scope="module")
def every_core():
    """The kernel's rows split across threads (tests/conftest.py runs the rest of the suite on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(threads)


def _reference_topk(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [
        sorted(range(len(row)), key=lambda j: (0, 0.0, j) if math.isnan(row[j]) else (1, -row[j], j))[:k]
        for row in rows
    ]
    ids = np.array(ids, dtype=np.int64)
    return np.take_along_axis(rows, ids, axis=1), ids


@pytest.mark.parametrize(
    "rows,width,k", [(9, 1536, 20), (5, 40, 40), (7, 17, 1), (6, 100, 7), (3, 5, 3), (4, 333, 20), (2, 3072, 64)]
)
def test_topk_equals_reference(rows, width, k):
    rng = np.random.default_rng(width + k)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    values, ids = fused.topk(torch.from_numpy(x), k)
    want_values, want_ids = _reference_topk(x, k)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_array_equal(values.numpy(), want_values)


@pytest.mark.parametrize("n", [1, 4, 30, 35])
def test_extremes_pick_what_the_torch_path_picks(n):
    from ingest.reductions import ranking_keys

    x = np.random.default_rng(n).integers(-3, 4, (5, 7, 40)).astype(np.float32)  # every value repeats often
    x[0, :, 3] = np.nan  # a NaN column: the first tokens of the top, the last of the bottom
    x[1, 2, 5] = x[3, 0, 5] = np.nan
    x[:, :, 6] = np.where(np.arange(7) % 2, 0.0, -0.0)  # -0.0 ties with 0.0
    x[:, 3:, 7] = np.inf
    x[4, 1:, 8] = -np.inf
    x[1, 5:, :] = 9.0  # padding of row 1 (length 5) would win everywhere
    docs, starts, lengths = [4, 1, 3, 1, 0], [0, 0, 0, 7, 0], [7, 5, 7, 2, 6]  # rows out of document order
    ctx = _context(docs, starts, lengths, 7)
    top, bottom = fused.extremes(torch.from_numpy(x), ctx, n)
    valid = torch.from_numpy(_valid_tokens(7, lengths).reshape(-1, 1))
    flat = torch.from_numpy(x.reshape(35, 40))
    place = (ctx.row_rank[:, None] * 7 + torch.arange(7)).reshape(-1, 1)
    floored, ceiled = flat.masked_fill(~valid, -np.inf), flat.masked_fill(~valid, np.inf)
    assert torch.equal(top, ranking_keys(floored, place, True).topk(n, dim=0)[1])
    assert torch.equal(bottom, ranking_keys(ceiled, place, False).topk(n, dim=0, largest=False)[1])


def test_topk_ties_nan_and_infinities():
    rng = np.random.default_rng(7)
    ties = rng.integers(0, 4, (6, 300)).astype(np.float32)  # every value repeats ~75 times
    ties[1, :] = 2.0  # a constant row
    ties[2, [5, 250, 17]] = np.nan  # NaN ranks first, in index order
    ties[3, :] = -np.inf
    ties[3, 299] = 0.0
    ties[4, [0, 299]] = np.inf
    for k in (1, 10, 300):
        values, ids = fused.topk(torch.from_numpy(ties), k)
        want_values, want_ids = _reference_topk(ties, k)
        np.testing.assert_array_equal(ids.numpy(), want_ids)
        np.testing.assert_array_equal(values.numpy(), want_values)  # NaN compares equal in assert_array_equal


def test_topk_equals_stable_descending_sort():
    """The NAG path swaps torch.sort(stable, descending)[:k] for the kernel: same rows on ties."""
    done = torch.from_numpy(np.random.default_rng(8).integers(0, 50, (12, 500)).astype(np.float32) / 7)
    values, ids = fused.topk(done, 16)
    sorted_values, order = torch.sort(done, dim=-1, descending=True, stable=True)
    torch.testing.assert_close(values, sorted_values[:, :16], rtol=0, atol=0)
    assert torch.equal(ids.long(), order[:, :16])


def _run(spec: str, batches, use_kernel: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if not use_kernel:
            patch.setattr(fused, "usable", lambda *args, **kwargs: False)
        sl = _site_layer(spec)
        outs = []
        for x, docs, starts, lengths in batches:
            sl.ctx = _context(docs, starts, lengths, x.shape[1])
            sl(torch.from_numpy(x.copy()))
            outs.append({k: v.clone() for k, v in sl.out.items()})
            sl.out = {}
        return outs, {k: v.clone() for k, v in sl.stats.items()}


@pytest.mark.parametrize("spec", ["x:topk=5,nag=4,mean,last", "x:nag=3,threshold=0.3", "x:topk=24"])
def test_site_pass_equals_torch_ops(spec, monkeypatch):
    rng = np.random.default_rng(9)
    batches = _batches(rng, width=24, seq=6) + _batches(rng, width=24, seq=6)
    kernel_out, kernel_stats = _run(spec, batches, True, monkeypatch)
    torch_out, torch_stats = _run(spec, batches, False, monkeypatch)
    for got, want, (x, _, _, lengths) in zip(kernel_out, torch_out, batches):
        assert got.keys() == want.keys()
        # Padding is all-equal garbage (ties torch.topk orders its own way) and is never written.
        valid = torch.as_tensor(_valid_tokens(x.shape[1], lengths))
        for key in got:
            a, b = (got[key][valid], want[key][valid]) if key.startswith("topk") else (got[key], want[key])
            torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-6, atol=1e-6)
    for key in ("n_tokens", "n_fired", "max", "max_doc", "max_pos"):
        assert torch.equal(kernel_stats[key], torch_stats[key]), key
    for key in ("sum", "sum_sq"):
        torch.testing.assert_close(kernel_stats[key], torch_stats[key], rtol=1e-6, atol=1e-5)


def test_ingest_commits_the_same_rows_either_way(tmp_path, monkeypatch, sample_jsonl):
    import warehouse
    from ingest.pipeline import ingest

    sites = ["mlp.act:topk=6", "mlp.up:nag=5", "resid.out:last"]
    for name in ("kernel", "torch"):
        with monkeypatch.context() as patch:
            if name == "torch":
                patch.setattr(fused, "usable", lambda *args, **kwargs: False)
            ingest(
                tmp_path / name,
                "config:qwen3-tiny",
                [str(sample_jsonl)],
                sites,
                run_id="r",
                batch_size=3,
                max_length=16,
                device="cpu",
                progress=False,
            )
    tables = {}
    for name in ("kernel", "torch"):
        with warehouse.open(tmp_path / name) as wh:
            tables[name] = {
                "token_neurons": wh.pl("SELECT layer, doc, pos, neuron, value FROM token_neurons ORDER BY ALL"),
                "doc_neurons": wh.pl("SELECT layer, doc, rank, neuron, impact FROM doc_neurons ORDER BY ALL"),
                "neuron_stats": wh.pl(
                    "SELECT site, layer, neuron, n_tokens, n_fired, sum, sum_sq, max, max_doc, max_pos "
                    "FROM neuron_stats ORDER BY site, layer, neuron"
                ),
            }
    kernel, plain = tables["kernel"], tables["torch"]
    assert kernel["token_neurons"].height > 0
    assert kernel["token_neurons"].equals(plain["token_neurons"])
    assert (
        kernel["doc_neurons"]
        .select("layer", "doc", "rank", "neuron")
        .equals(plain["doc_neurons"].select("layer", "doc", "rank", "neuron"))
    )
    np.testing.assert_allclose(kernel["doc_neurons"]["impact"], plain["doc_neurons"]["impact"], rtol=1e-5)
    exact = ["site", "layer", "neuron", "n_tokens", "n_fired", "max", "max_doc", "max_pos"]
    assert kernel["neuron_stats"].select(exact).equals(plain["neuron_stats"].select(exact))
    for column in ("sum", "sum_sq"):
        np.testing.assert_allclose(kernel["neuron_stats"][column], plain["neuron_stats"][column], rtol=1e-5, atol=1e-5)


def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("WHQ_CACHE", str(tmp_path))
    compiler = [fused.shutil.which("cc") or fused.shutil.which("gcc")]
    first = fused._build(compiler)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert fused._build(compiler) == first and first.stat().st_mtime_ns == stamp, "a second build reuses the library"
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no temporary files are left behind"


@pytest.mark.parametrize(
    "env,reason", [({"WHQ_FUSED": "0"}, "disabled by WHQ_FUSED=0"), ({"CC": "/nonexistent/cc"}, "build failed")]
)
def test_unavailable_kernel_falls_back_to_torch(env, reason, tmp_path, monkeypatch):
    monkeypatch.setenv("WHQ_CACHE", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fused._library.cache_clear()
    try:
        assert not fused.usable(torch.zeros(1, 1, 1))
        assert reason in fused.describe() and "torch ops" in fused.describe()
        sl = _site_layer("x:topk=3,nag=2")
        x, docs, starts, lengths = _batches(np.random.default_rng(10))[0]
        sl.ctx = _context(docs, starts, lengths, x.shape[1])
        sl(torch.from_numpy(x.copy()))
        assert sl.out["topk_ids"].shape == (4, 6, 3)
    finally:
        fused._library.cache_clear()
