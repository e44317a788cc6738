"""The fused C hook kernel (ingest/fused.c) against plain references.

- top-k: a pure-Python sort by (value descending, index ascending, NaN first), over
  widths that are and are not multiples of k or of the vector width, ties and NaN;
- site pass: the same batches through the kernel and through torch ops give the same
  top-k rows, document means / NAG and stats;
- examples: the kernel's top and bottom tokens of a batch are the ones reductions.ranking_keys'
  top-k picks (the torch path), on ties, NaN, infinities, -0.0 and padding;
- a whole ingest: both paths commit the same token_neurons rows and neuron_stats;
- sparse pass: a sparse code (a TopK dictionary's active latents) gives, bit for bit, the top-k rows,
  row sums, stats and histogram that site_pass gives on its dense twin, and what numpy gives on it;
  a TopK dictionary site is the same counted sparse or dense;
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


def test_topk_with_a_bias_equals_reference_of_the_sum():
    rng = np.random.default_rng(11)
    x = (rng.integers(-6, 6, (9, 300)) / 4).astype(np.float32)  # ties, and sums that tie across units
    bias = (rng.integers(-3, 3, 300) / 4).astype(np.float32)
    x[2, 7] = np.nan
    for k in (1, 20, 64):
        values, ids = fused.topk(torch.from_numpy(x), k, torch.from_numpy(bias))
        want_values, want_ids = _reference_topk((torch.from_numpy(x) + torch.from_numpy(bias)).numpy(), k)
        np.testing.assert_array_equal(ids.numpy(), want_ids)
        np.testing.assert_array_equal(values.numpy(), want_values)


def _sparse_code_batches(rng, width=40, seq=7, n=5, special=False):
    """Two batches of a sparse code (ids, values [rows, seq, n], distinct ids a token, every other unit +0.0),
    rows out of document order with padding, and its dense twin [rows, seq, width]. Values are on a coarse
    grid (ties among entries and with the unlisted units' +0.0; 0.0 and -0.0 listed; negatives, so a min
    below 0); unit 0 ties at every token; unit width-1 is never listed (all +0.0); padding holds 1e6;
    `special` puts NaN, inf and -inf in the second batch."""
    batches = []
    for docs, starts, lengths in (
        ([7, 2, 5, 2], [0, 0, 0, seq], [seq, 4, seq, 3]),
        ([9, 1, 8], [0, 0, 0], [seq, seq, 2]),
    ):
        rows = len(docs)
        ids = np.stack([rng.permutation(width - 2)[: n - 1] + 1 for _ in range(rows * seq)]).reshape(rows, seq, n - 1)
        ids = np.concatenate([np.zeros((rows, seq, 1), dtype=ids.dtype), ids], axis=2).astype(np.int32)
        values = (np.round(rng.standard_normal((rows, seq, n)) * 2) / 2).astype(np.float32)
        values[:, :, 0] = 3.0
        for row, length in enumerate(lengths):
            values[row, length:] = 1e6
        if special and batches:
            values[0, 2, 3], values[1, 1, 2], values[1, 3, 4] = np.nan, np.inf, -np.inf
        dense = np.zeros((rows, seq, width), dtype=np.float32)
        np.put_along_axis(dense, ids.astype(np.int64), values, axis=2)
        batches.append((ids, values, dense, docs, starts, lengths))
    return batches


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Floats as their bits, so -0.0, 0.0 and NaN payloads compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def _same(a, b, what):
    assert torch.equal(_bits(a.contiguous()), _bits(b.contiguous())), what


def _both_passes(batches, topk, threshold, spec="x:topk=5,nag=3,mean,hist"):
    """Every batch through site_pass on its dense twin and sparse_pass on the code: outputs and stats of each."""
    dense_sl, sparse_sl = _site_layer(spec), _site_layer(spec)
    width = batches[0][2].shape[-1]
    dense_sl._allocate(width)
    sparse_sl._allocate(width)
    outs = []
    for ids, values, dense, docs, starts, lengths in batches:
        ctx = _context(docs, starts, lengths, dense.shape[1])
        got = fused.sparse_pass(
            torch.from_numpy(ids), torch.from_numpy(values), width, ctx, threshold, topk, True, sparse_sl.stats
        )
        want = fused.site_pass(torch.from_numpy(dense), ctx, threshold, topk, True, dense_sl.stats)
        outs.append((got, want))
    return outs, sparse_sl.stats, dense_sl.stats


@pytest.mark.parametrize("topk", [3, 8, 40, None])
@pytest.mark.parametrize("threshold", [0.0, -0.5, 0.25])
def test_sparse_pass_equals_the_dense_pass_bit_for_bit(topk, threshold):
    rng = np.random.default_rng(12)
    batches = _sparse_code_batches(rng, special=True)
    outs, got_stats, want_stats = _both_passes(batches, topk, threshold)
    for (got_top, *got_sums), (want_top, *want_sums) in outs:
        assert (got_top is None) == (want_top is None)
        if got_top is not None:  # every token, padding included: both top-k its values the same way
            _same(got_top[0], want_top[0], "top-k values")
            _same(got_top[1], want_top[1], "top-k ids")
        _same(got_sums[0], want_sums[0], "row sums")
        _same(got_sums[1], want_sums[1], "row |a| sums")
    assert got_stats.keys() == want_stats.keys()
    for key in got_stats:
        _same(got_stats[key], want_stats[key], key)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 0.25])
def test_sparse_pass_equals_numpy_on_the_dense_values(threshold):
    """Stats, histogram and top-k of the code against plain numpy over its dense twin: exact counts, the
    min (0.0 where a unit is unlisted somewhere, below 0 where a negative is listed) and the max with its
    first token in document order."""
    from ingest.reductions import HIST_BINS, hist_bins

    from .test_perf_paths import _simple_stats

    rng = np.random.default_rng(13)
    batches = _sparse_code_batches(rng)
    outs, stats, _ = _both_passes(batches, 8, threshold)
    dense_batches = [(dense, docs, starts, lengths) for _, _, dense, docs, starts, lengths in batches]
    ref = _simple_stats(dense_batches, threshold)
    got = {k: v.numpy() for k, v in stats.items()}
    valid = np.concatenate([dense[_valid_tokens(dense.shape[1], lengths)] for dense, _, _, lengths in dense_batches])
    assert int(got["n_tokens"]) == 0  # the hook counts tokens; the pass adds everything else
    np.testing.assert_array_equal(got["n_fired"], ref["n_fired"])
    for key in ("sum", "sum_sq"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got["sum_cube"], (valid.astype(np.float64) ** 3).sum(0), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got["sum_pos"], np.maximum(valid, 0).astype(np.float64).sum(0), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got["min"], valid.min(0))
    assert got["min"][-1] == 0 and (got["min"] < 0).any()
    for key in ("max", "max_doc", "max_pos"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    bins = hist_bins(torch.from_numpy(valid)).numpy() + np.arange(valid.shape[1]) * HIST_BINS
    want_hist = np.bincount(bins.reshape(-1), minlength=valid.shape[1] * HIST_BINS).reshape(-1, HIST_BINS)
    np.testing.assert_array_equal(got["hist"], want_hist)
    for ((top_values, top_ids), *_), _ in outs[:1]:
        dense = batches[0][2].reshape(-1, batches[0][2].shape[-1])
        want_values, want_ids = _reference_topk(dense, 8)
        np.testing.assert_array_equal(top_ids.reshape(-1, 8).numpy(), want_ids)
        np.testing.assert_array_equal(_bits(top_values.reshape(-1, 8)).numpy(), want_values.view(np.int32))


def test_a_topk_dictionary_site_is_the_same_sparse_or_dense(tmp_path, monkeypatch):
    """A TopK dictionary's site layer counted from its k active latents gives the rows and stats, bit for bit,
    that its dense latents give (DENSE_READS forces them)."""
    from ingest import dictionary_files, reductions
    from ingest.encoder import DeviceDictionary
    from ingest.reductions import SiteLayer
    from ingest.sites import ResolvedSite, parse_spec

    from . import dictionaries as dicts

    d = dictionary_files.load(str(dicts.saelens(tmp_path / "d", "topk", d_in=16, d_sae=48, k=6))).first
    rng = np.random.default_rng(14)
    inputs = [(rng.standard_normal((4, 6, 16)).astype(np.float32), [7, 2, 5, 2], [0, 0, 0, 6], [6, 4, 6, 3])]
    inputs.append((rng.standard_normal((3, 6, 16)).astype(np.float32), [9, 1, 8], [0, 0, 0], [6, 6, 2]))
    calls = []
    sparse_pass = fused.sparse_pass
    monkeypatch.setattr(fused, "sparse_pass", lambda *a, **k: calls.append(1) or sparse_pass(*a, **k))
    runs = []
    for reads in (reductions.DENSE_READS, reductions.DENSE_READS | {"topk"}):
        monkeypatch.setattr(reductions, "DENSE_READS", reads)
        spec = parse_spec("x+sae=d:topk=10,nag=4,mean,hist")
        sl = SiteLayer(ResolvedSite(spec, "x", "out", [(0, "x")]), 0, "x", "cpu", DeviceDictionary(d, "cpu", "x"))
        outs = []
        for x, docs, starts, lengths in inputs:
            sl.ctx = _context(docs, starts, lengths, x.shape[1])
            sl(torch.from_numpy(x))
            outs.append(sl.out)
            sl.out = {}
        runs.append((outs, sl.stats, sl.encoder.quality))
    assert len(calls) == len(inputs), "the first run is the sparse one"
    (sparse_outs, sparse_stats, sparse_quality), (dense_outs, dense_stats, dense_quality) = runs
    for got, want in zip(sparse_outs, dense_outs):
        assert got.keys() == want.keys() == {"topk_values", "topk_ids", "nag_ids", "nag_impacts", "mean"}
        for key in got:
            _same(got[key], want[key], key)
    for state_got, state_want in ((sparse_stats, dense_stats), (sparse_quality, dense_quality)):
        assert state_got.keys() == state_want.keys()
        for key in state_got:
            _same(state_got[key], state_want[key], key)


@pytest.mark.parametrize("d", [8, 13, 384])
def test_recon_sums_equal_numpy(d):
    """A dictionary's reconstruction sums from the kernel equal numpy's in float64 over the valid tokens,
    whatever the width (not a multiple of the kernel's eight lanes) and with non-contiguous inputs."""
    rng = np.random.default_rng(d)
    recon = rng.standard_normal((3, 5, d)).astype(np.float32)
    target = rng.standard_normal((5, 3, d)).astype(np.float32).transpose(1, 0, 2)  # a transposed view
    recon[1, 2] = 0  # a zero reconstruction: its cosine is 0, not NaN
    mask = rng.random((3, 5)) < 0.7
    quality = {name: torch.zeros((), dtype=torch.float64) for name in ("sq_error", "target_sq", "cosine_sum")}
    quality["target_sum"] = torch.zeros(d, dtype=torch.float64)
    for _ in range(2):  # the kernel adds to what is there
        fused.recon_sums(torch.from_numpy(recon), torch.from_numpy(target), torch.from_numpy(mask), quality)
    r, t = recon[mask].astype(np.float64), target[mask].astype(np.float64)
    cosine = (r * t).sum(-1) / np.sqrt(np.maximum((r * r).sum(-1) * (t * t).sum(-1), 1e-16))
    want = {
        "sq_error": ((r - t) ** 2).sum(),
        "target_sq": (t * t).sum(),
        "cosine_sum": cosine.sum(),
        "target_sum": t.sum(0),
    }
    for name, value in want.items():
        np.testing.assert_allclose(quality[name].numpy(), 2 * value, rtol=1e-12, atol=1e-12, err_msg=name)


def test_active_counts_equal_numpy():
    """A TopK code's L0 and per-latent activity from the kernel: non-zero values (NaN included, as `!= 0`
    counts it) of valid tokens alone."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, (4, 6, 5)).astype(np.int32)
    values = np.maximum(rng.standard_normal((4, 6, 5)), 0).astype(np.float32)
    values[0, 0, 0], values[1, 1, 1] = np.nan, -0.0
    mask = rng.random((4, 6)) < 0.6
    quality = {"l0_sum": torch.zeros((), dtype=torch.int64), "n_active": torch.zeros(50, dtype=torch.int64)}
    fused.active_counts(torch.from_numpy(ids), torch.from_numpy(values), torch.from_numpy(mask), quality)
    fired = (values != 0) & mask[..., None]
    assert int(quality["l0_sum"]) == fired.sum()
    np.testing.assert_array_equal(quality["n_active"].numpy(), np.bincount(ids[fired], minlength=50))


def test_dictionary_quality_is_the_same_with_the_kernel_or_torch_ops(tmp_path, monkeypatch):
    """The quality sums a TopK dictionary site keeps (L0, activity, reconstruction) are the torch ops' with
    the kernel's sums in their place: the counts exactly, the float64 sums to rounding."""
    from ingest import dictionary_files
    from ingest.encoder import DeviceDictionary

    from . import dictionaries as dicts

    d = dictionary_files.load(str(dicts.saelens(tmp_path / "d", "topk", d_in=16, d_sae=48, k=6))).first
    rng = np.random.default_rng(15)
    x = torch.from_numpy(rng.standard_normal((4, 6, 16)).astype(np.float32))
    mask = torch.from_numpy(rng.random((4, 6)) < 0.8)
    qualities, calls = [], []
    for name in ("recon_sums", "active_counts"):
        kernel_function = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, f=kernel_function, n=name: calls.append(n) or f(*a))
    for kernel in (True, False):
        if not kernel:
            assert calls == ["active_counts", "recon_sums"]
            monkeypatch.setattr(fused, "recon_sums", None)  # must not be reached
            monkeypatch.setattr(fused, "active_counts", None)
            monkeypatch.setattr(fused, "usable", lambda x, topk=None: False)
        encoder = DeviceDictionary(d, "cpu", "x")
        encoder(x, mask, dense=False)
        qualities.append(encoder.quality)
    with_kernel, with_torch = qualities
    assert with_kernel.keys() == with_torch.keys()
    for name in with_kernel:
        got, want = with_kernel[name], with_torch[name]
        if got.dtype == torch.int64:
            assert torch.equal(got, want), name
        else:
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-9, err_msg=name)
