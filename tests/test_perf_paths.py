"""The fast paths give the same rows as the simple ones.

- capture stats, through the fused C kernel and through torch ops: per-row partial
  reductions (no padding copies when a batch is full, row-level tie break) vs a direct
  float64 numpy computation over the valid tokens;
- writer ordering: the packed-key stable argsort vs np.lexsort;
- host copies: compact dtypes (float16 values, int16 ids) equal the float32 results cast;
- padded batches vs each document alone (the no-copy path) give the same outputs and state;
- CUDA (skipped without it): device results equal the CPU ones.
No timing assertions: figures come from `whq bench`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ingest.reductions import BatchContext, SiteLayer, collect
from ingest.sites import ResolvedSite, parse_spec
from warehouse.parts import _lexsort, part_order


def _site_layer(spec: str, device: str = "cpu") -> SiteLayer:
    return SiteLayer(ResolvedSite(parse_spec(spec), "x", "out", [(0, "x")]), 0, "x", device)


def _context(docs, starts, lengths, seq, device="cpu", finished=None) -> BatchContext:
    """A batch of rows (doc, first position, valid length); every row is its own segment."""
    docs, starts, lengths = (np.asarray(a, dtype=np.int64) for a in (docs, starts, lengths))
    rows = len(docs)
    mask = _valid_tokens(seq, lengths)
    finished = list(range(rows)) if finished is None else finished
    t = lambda a, dtype=torch.int64: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
    return BatchContext(
        mask=t(mask, torch.bool),
        lengths=t(lengths),
        row_doc=t(np.repeat(docs, seq)),
        row_pos=t((starts[:, None] + np.arange(seq)[None, :]).reshape(-1)),
        segment=t(np.arange(rows)),
        n_segments=rows,
        finished=t(finished),
        finished_tokens=t(lengths[finished], torch.float32),
        last_rows=t(finished),
        carry_in=False,
        carry_out=False,
        full=bool(mask.all()),
    )


def _valid_tokens(seq: int, lengths) -> np.ndarray:
    """[rows, seq] True on each row's tokens, False on padding."""
    return np.arange(seq)[None, :] < np.asarray(lengths)[:, None]


def _simple_stats(batches, threshold: float) -> dict:
    """Stats straight from the valid tokens in float64; ties to the first (doc, pos)."""
    values, keys = [], []
    for x, docs, starts, lengths in batches:
        for row, (doc, start, length) in enumerate(zip(docs, starts, lengths)):
            values.append(x[row, :length].astype(np.float64))
            keys += [(doc, start + p) for p in range(length)]
    stacked = np.concatenate(values)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    in_doc_order = stacked[order]
    first_max = in_doc_order.argmax(axis=0)
    return {
        "n_tokens": len(keys),
        "n_fired": (stacked > threshold).sum(axis=0),
        "sum": stacked.sum(axis=0),
        "sum_sq": (stacked**2).sum(axis=0),
        "max": stacked.max(axis=0),
        "max_doc": np.array([keys[order[i]][0] for i in first_max]),
        "max_pos": np.array([keys[order[i]][1] for i in first_max]),
    }


def _batches(rng, width=24, seq=6):
    """Two batches: rows out of document order, padding, a document split over rows, and exact ties."""
    first = (rng.standard_normal((4, seq, width)).astype(np.float32), [7, 2, 5, 2], [0, 0, 0, 6], [6, 4, 6, 3])
    second = (rng.standard_normal((3, seq, width)).astype(np.float32), [9, 1, 8], [0, 0, 0], [6, 6, 2])
    x1, x2 = first[0], second[0]
    x1[:, :, 0] = 3.0  # unit 0: every valid token ties; the winner is doc 1 (second batch)
    x2[:, :, 0] = 3.0
    x1[0, 5, 1] = x1[3, 1, 1] = 9.0  # unit 1: tie between doc 7 pos 5 and doc 2 pos 7 -> doc 2 (a later row)
    x2[2, 4, 2] = 50.0  # unit 2: the max sits on padding and must be ignored
    x1[1, 4:, :] = 1e6  # padding of row 1 (length 4) is huge everywhere
    return [first, second]


@pytest.mark.parametrize("threshold", [0.0, -0.5, 0.25])
def test_stats_match_simple_path(threshold, hook_path):
    rng = np.random.default_rng(0)
    batches = _batches(rng)
    sl = _site_layer(f"x:threshold={threshold}" if threshold else "x:topk=3")
    for x, docs, starts, lengths in batches:
        sl.ctx = _context(docs, starts, lengths, x.shape[1])
        sl(torch.from_numpy(x.copy()))
    ref = _simple_stats(batches, threshold)
    got = {k: v.numpy() for k, v in sl.stats.items()}
    assert int(got["n_tokens"]) == ref["n_tokens"]
    np.testing.assert_array_equal(got["n_fired"], ref["n_fired"])
    np.testing.assert_allclose(got["sum"], ref["sum"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got["sum_sq"], ref["sum_sq"], rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got["max"], ref["max"].astype(np.float32))
    np.testing.assert_array_equal(got["max_doc"], ref["max_doc"])
    np.testing.assert_array_equal(got["max_pos"], ref["max_pos"])
    assert (got["max_doc"][0], got["max_pos"][0]) == (1, 0)
    assert (got["max_doc"][1], got["max_pos"][1]) == (2, 7)
    assert got["max"][2] != 50.0


def test_full_batch_skips_masking_with_same_result(hook_path):
    """A batch without padding takes the no-copy path; flagging it as padded must not change a thing."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    results = []
    for full in (True, False):
        sl = _site_layer("x:topk=4,nag=3,mean,last,examples=2")
        ctx = _context([0, 1, 2], [0, 0, 0], [5, 5, 5], 5)
        ctx.full = full
        sl.ctx = ctx
        sl(torch.from_numpy(x))
        outputs, ready = collect([sl])
        assert ready is None
        results.append(
            (
                outputs[("x", 0)],
                {k: v.clone() for k, v in sl.stats.items()},
                {k: v.clone() for k, v in sl.examples_in_order().items()},
            )
        )
    (out_a, stats_a, ex_a), (out_b, stats_b, ex_b) = results
    for key in out_a:
        np.testing.assert_array_equal(out_a[key], out_b[key])
    for a, b in ((stats_a, stats_b), (ex_a, ex_b)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)


def test_topk_outputs_are_compact_casts_of_torch_topk(hook_path):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((2, 4, 40)).astype(np.float32))
    sl = _site_layer("x:topk=5")
    sl.ctx = _context([0, 1], [0, 0], [4, 4], 4)
    sl(x)
    out, _ = collect([sl])
    values, ids = x.topk(5, dim=-1)
    got = out[("x", 0)]
    assert got["topk_values"].dtype == np.float16 and got["topk_ids"].dtype == np.int16
    np.testing.assert_array_equal(got["topk_ids"], ids.numpy())
    np.testing.assert_array_equal(got["topk_values"], values.numpy().astype(np.float16))
    assert sl.out == {}, "collect() hands the outputs over and resets them"


@pytest.mark.parametrize("high", [50, 1 << 40])
def test_packed_lexsort_equals_lexsort(high):
    rng = np.random.default_rng(3)
    n = 5000
    keys = [rng.integers(0, 30, n), rng.integers(0, 200, n), rng.integers(0, high, n)]
    np.testing.assert_array_equal(_lexsort(keys), np.lexsort(keys))
    columns = {"neuron": keys[0], "pos": keys[1], "doc": keys[2], "value": rng.random(n)}
    ordered = part_order("doc_neurons", columns)
    expected = np.lexsort(keys)
    for name, column in columns.items():
        np.testing.assert_array_equal(ordered[name], column[expected])


def test_lexsort_edge_cases():
    assert _lexsort([np.array([], dtype=np.int64)]).size == 0
    negative = [np.array([3, -1, 2]), np.array([0, 0, 0])]
    np.testing.assert_array_equal(_lexsort(negative), np.lexsort(negative))


def test_padded_batch_equals_documents_one_by_one(hook_path):
    """One padded batch (masking path) vs each document alone (no-copy path): same outputs and state."""
    rng = np.random.default_rng(5)
    lengths, width, spec = [5, 3, 4], 16, "x:topk=4,nag=3,mean,last,examples=2"
    acts = [rng.standard_normal((n, width)).astype(np.float32) for n in lengths]
    alone = _site_layer(spec)
    alone_out = []
    for doc, a in enumerate(acts):
        alone.ctx = _context([doc], [0], [len(a)], len(a))
        assert alone.ctx.full
        alone(torch.from_numpy(a[None]))
        alone_out.append(collect([alone])[0][("x", 0)])
    padded = np.full((3, max(lengths), width), 1e3, dtype=np.float32)  # garbage on padding
    for row, a in enumerate(acts):
        padded[row, : len(a)] = a
    batch = _site_layer(spec)
    batch.ctx = _context([0, 1, 2], [0, 0, 0], lengths, max(lengths))
    assert not batch.ctx.full
    batch(torch.from_numpy(padded))
    together = collect([batch])[0][("x", 0)]
    for doc, (out, n) in enumerate(zip(alone_out, lengths)):
        np.testing.assert_array_equal(together["topk_ids"][doc, :n], out["topk_ids"][0])
        np.testing.assert_array_equal(together["topk_values"][doc, :n], out["topk_values"][0])
        np.testing.assert_array_equal(together["nag_ids"][doc], out["nag_ids"][0])
        np.testing.assert_allclose(together["nag_impacts"][doc], out["nag_impacts"][0], rtol=1e-6)
        np.testing.assert_allclose(together["mean"][doc], out["mean"][0], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(together["last"][doc], out["last"][0])
    for key in alone.stats:
        torch.testing.assert_close(batch.stats[key], alone.stats[key], rtol=1e-6, atol=1e-6)
    batch_examples, alone_examples = batch.examples_in_order(), alone.examples_in_order()
    for key in alone_examples:
        torch.testing.assert_close(batch_examples[key], alone_examples[key], rtol=0, atol=0, equal_nan=True)


def test_bench_ingest_reports_figures(tmp_path):
    from ingest.bench import bench_ingest

    result = bench_ingest(
        "config:qwen3-tiny",
        device="cpu",
        batch_size=2,
        seq_len=8,
        repeats=1,
        shard_tokens=32,
        sites=["mlp.act:topk=4", "mlp.up:nag=4", "resid.out:last"],
        root=tmp_path,
    )
    figures = result.to_dict()
    assert figures["plain_tokens_per_s"] > 0 and figures["capture_tokens_per_s"] > 0
    assert result.token_neuron_rows == 2 * 8 * 4 * 4 * result.batches_per_block  # tokens x k x layers
    assert figures["bytes_per_token"] > 0 and figures["token_neurons_bytes_per_entry"] > 0
    assert figures["dense_fp16_bytes_per_token"] == 2 * 4 * (128 + 128 + 64)
    assert any("ratio capture / plain" in line for line in result.lines())


def test_bench_query_times_present_macros(tmp_path):
    from queries.bench import bench_query

    result = bench_query(tmp_path / "wh", rows=4 * 2 * 600, layers=2, width=64, k=4, repeats=1)
    figures = result.to_dict()
    assert figures["token_neuron_rows"] >= 4 * 2 * 600
    assert {"layer_summary", "firing_rate", "scan one neuron (baseline)"} <= set(figures["queries"])
    assert set(figures["queries"]) | set(figures["skipped"]) >= {
        "layer_summary",
        "firing_rate",
        "selectivity",
        "top_contexts",
        "nag_distance",
        "ref_similarity",
    }
    again = bench_query(tmp_path / "wh", rows=4 * 2 * 600, layers=2, width=64, k=4, repeats=1)
    assert again.build_s is None, "the second call reuses the committed synthetic run"
    import warehouse

    with warehouse.open(tmp_path / "wh") as wh:
        stored = wh.pl("SELECT count(*) AS n, count(DISTINCT (doc, pos)) AS tokens FROM token_neurons WHERE layer = 0")
    assert stored["n"][0] == 4 * stored["tokens"][0]


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = np.random.default_rng(4)
    batches = _batches(rng)
    results = {}
    for device in ("cpu", "cuda"):
        sl = _site_layer("x:topk=3,nag=2,last,examples=2", device)
        outs = []
        for x, docs, starts, lengths in batches:
            sl.ctx = _context(docs, starts, lengths, x.shape[1], device)
            sl(torch.from_numpy(x.copy()).to(device))
            out, ready = collect([sl])
            assert (ready is None) == (device == "cpu")
            if ready is not None:
                ready.synchronize()
            outs.append({k: v.copy() for k, v in out[("x", 0)].items()})
        results[device] = (
            outs,
            {k: v.cpu() for k, v in sl.stats.items()},
            {k: v.cpu() for k, v in sl.examples_in_order().items()},
        )
    (cpu_out, cpu_stats, cpu_ex), (gpu_out, gpu_stats, gpu_ex) = results["cpu"], results["cuda"]
    for a, b, (x, _, _, lengths) in zip(cpu_out, gpu_out, batches):
        # Padding is all-equal garbage, never written; each top-k orders such ties its own way.
        valid = _valid_tokens(x.shape[1], lengths)
        for key in a:
            got, want = (a[key][valid], b[key][valid]) if key.startswith("topk") else (a[key], b[key])
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-5, atol=1e-5)
    for key in cpu_stats:
        torch.testing.assert_close(cpu_stats[key], gpu_stats[key], rtol=1e-6, atol=1e-5)
    for key in cpu_ex:
        torch.testing.assert_close(cpu_ex[key], gpu_ex[key], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_token_neuron_parts_are_neuron_major_and_same_rows():
    rng = np.random.default_rng(6)
    n = 4000
    columns = {
        "doc": rng.integers(0, 50, n),
        "pos": rng.integers(0, 300, n),
        "neuron": rng.integers(0, 3000, n),
        "value": rng.random(n).astype(np.float16),
    }
    ordered = part_order("token_neurons", columns)
    expected = np.lexsort([columns["pos"], columns["doc"], columns["neuron"]])
    for name, column in columns.items():
        np.testing.assert_array_equal(ordered[name], column[expected])
    # As captured: each token's k rows adjacent, batches out of document order, a repeated token.
    tokens = [(d, p) for d in rng.permutation(40) for p in range(rng.integers(1, 30))]
    tokens.append(tokens[3])
    k = 5
    runs = {
        "doc": np.repeat([d for d, _ in tokens], k),
        "pos": np.repeat([p for _, p in tokens], k),
        "neuron": np.concatenate([rng.choice(3000, k, replace=False) for _ in tokens]),
        "value": rng.random(len(tokens) * k),
    }
    ordered = part_order("token_neurons", runs)
    expected = np.lexsort([runs["pos"], runs["doc"], runs["neuron"]])
    for name, column in runs.items():
        np.testing.assert_array_equal(ordered[name], column[expected])
    doc_order = part_order("doc_neurons", {"doc": columns["doc"], "neuron": columns["neuron"]})
    np.testing.assert_array_equal(doc_order["doc"], np.sort(columns["doc"], kind="stable"))


def test_bench_query_refuses_rows_beyond_the_free_disk_before_creating_anything(tmp_path):
    import shutil

    from queries.bench import BYTES_PER_ROW, build
    from queries.bench import Shape as BenchShape
    from warehouse.errors import BadInput

    too_many = shutil.disk_usage(tmp_path).free // BYTES_PER_ROW + 1
    said: list[str] = []
    with pytest.raises(
        BadInput, match=r"^--rows [\d,]+ would write about [\d,.]+ GiB of token_neurons, .* lower --rows$"
    ):
        build(tmp_path / "wh", BenchShape(rows=too_many), echo=said.append)
    assert not (tmp_path / "wh").exists()
    assert said == []  # the refusal is the command's only line
