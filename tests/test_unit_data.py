"""Unit data (queries/units.sql, ingest/reductions.py): moments, positive part, min, histograms,
quantile examples, example windows, decoded tokens, token search and similar units.

- capture: both hook paths (fused C kernel, torch ops) against float64 numpy over the valid
  tokens, the histogram against numpy's classification by the documented edges, and the
  histogram / moments merging to the same state whatever the batching, the resume snapshot
  or the split over ranks;
- macros: a tiny Qwen3 capture against numpy on the model's own dense activations (re-run
  on the stored token ids) and on its weights, and equal to their Polars twins.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from polars.testing import assert_frame_equal

import warehouse
from queries import unit_frames as uf
from warehouse.errors import BadInput, QueryError

from . import docgen, reference
from .test_perf_paths import _batches, _context, _site_layer

# -- the documented grid, written out independently of the bit arithmetic ----------------------

EDGES = np.array([2.0 ** (-12 + i // 4) * (1 + (i % 4) / 4) for i in range(97)])


def reference_bin(v: float) -> int:
    """The bin of one value from the edges documented in capture.py (NaN aside)."""
    if v > 0:
        if v < EDGES[0]:
            return 98
        if v >= EDGES[-1]:
            return 195
        return 99 + int(np.searchsorted(EDGES, v, side="right")) - 1
    a = -v
    if a < EDGES[0]:
        return 97
    if a >= EDGES[-1]:
        return 0
    return 96 - (int(np.searchsorted(EDGES, a, side="right")) - 1)


def reference_hist(values: np.ndarray) -> np.ndarray:
    """[units, 196] counts of a [tokens, units] array."""
    counts = np.zeros((values.shape[1], 196), dtype=np.int64)
    for unit in range(values.shape[1]):
        for v in values[:, unit]:
            counts[unit, reference_bin(float(v))] += 1
    return counts


SPECIAL = np.array(
    [
        0.0,
        -0.0,
        2.0**-12,
        -(2.0**-12),
        2.0**-13,
        -(2.0**-13),
        1.25,
        -1.25,
        1.2499999,
        1.5,
        -1.75,
        4096.0,
        -4096.0,
        4095.99,
        -4095.99,
        1e5,
        -1e5,
        3e-30,
        0.75,
        -0.5,
    ],
    dtype=np.float32,
)


def _valid_values(batches) -> np.ndarray:
    return np.concatenate([x[row, :length] for x, _, _, lengths in batches for row, length in enumerate(lengths)])


def _special_batches(rng):
    batches = _batches(rng, width=24, seq=6)
    x = batches[0][0]
    x[0, :4, 3:8] = SPECIAL.reshape(4, 5)  # row 0 is valid for all 6 tokens
    x[2, :, 9] = SPECIAL[:6]
    return batches


def _capture(spec, batches):
    sl = _site_layer(spec)
    for x, docs, starts, lengths in batches:
        sl.ctx = _context(docs, starts, lengths, x.shape[1])
        sl(torch.from_numpy(x.copy()))
    return sl


def test_bins_of_the_grid_edges():
    from ingest.reductions import hist_bins

    got = hist_bins(torch.from_numpy(SPECIAL)).tolist()
    assert got == [reference_bin(float(v)) for v in SPECIAL]
    assert reference_bin(2.0**-12) == 99 and reference_bin(-(2.0**-12)) == 96 and reference_bin(4096.0) == 195
    nan = hist_bins(torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])).tolist()
    assert nan == [195, 0, 195, 0]  # NaN and infinities land in the end bins of their sign


@pytest.mark.parametrize("threshold", [0.0, 0.25])
def test_moments_min_positive_part_and_histogram_match_numpy(threshold, hook_path):
    batches = _special_batches(np.random.default_rng(3))
    sl = _capture(f"x:threshold={threshold},hist" if threshold else "x:topk=3,hist", batches)
    values = _valid_values(batches).astype(np.float64)
    got = {k: v.numpy() for k, v in sl.stats.items()}
    np.testing.assert_array_equal(got["min"], values.min(axis=0).astype(np.float32))
    np.testing.assert_allclose(got["sum_pos"], np.maximum(values, 0).sum(axis=0), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got["sum_cube"], (values**3).sum(axis=0), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(got["sum_quad"], (values**4).sum(axis=0), rtol=1e-6, atol=1e-3)
    np.testing.assert_array_equal(got["hist"], reference_hist(values.astype(np.float32)))
    assert got["hist"].sum(axis=1).tolist() == [len(values)] * values.shape[1]


def test_both_hook_paths_keep_the_same_histogram_and_moments(monkeypatch):
    from ingest import fused

    if not fused.usable(torch.zeros(1, 1, 1)):
        pytest.skip(f"the fused kernel is unavailable here: {fused.describe()}")
    batches = _special_batches(np.random.default_rng(4))
    kernel = _capture("x:topk=4,hist", batches)
    with monkeypatch.context() as patch:
        patch.setattr(fused, "usable", lambda *args, **kwargs: False)
        plain = _capture("x:topk=4,hist", batches)
    for key in ("hist", "min", "n_fired", "max"):
        assert torch.equal(kernel.stats[key], plain.stats[key]), key
    for key in ("sum_cube", "sum_quad", "sum_pos"):
        torch.testing.assert_close(kernel.stats[key], plain.stats[key], rtol=1e-6, atol=1e-4)


def _split(batches, parts):
    """The same rows dealt into `parts` groups of one-row batches (other batchings of the same tokens)."""
    groups = [[] for _ in range(parts)]
    i = 0
    for x, docs, starts, lengths in batches:
        for row in range(len(docs)):
            groups[i % parts].append((x[row : row + 1], [docs[row]], [starts[row]], [lengths[row]]))
            i += 1
    return groups


def test_histogram_and_moments_merge_whatever_the_batching_snapshot_or_ranks(hook_path):
    batches = _special_batches(np.random.default_rng(5))
    whole = _capture("x:topk=3,hist", batches)
    one_row = _capture("x:topk=3,hist", [b for group in _split(batches, 1) for b in group])
    # three "ranks", each over its own rows, merged the way rank 0 merges them
    ranks = [_capture("x:topk=3,hist", group) for group in _split(batches, 3)]
    merged = ranks[0]
    for other in ranks[1:]:
        restored = _site_layer("x:topk=3,hist")
        restored.restore(other.state_tables())  # through the resume snapshot, as ranks exchange it
        with torch.inference_mode():
            merged.merge(restored)
    for candidate in (one_row, merged):
        assert torch.equal(candidate.stats["hist"], whole.stats["hist"])
        assert torch.equal(candidate.stats["min"], whole.stats["min"])
        assert int(candidate.stats["n_tokens"]) == int(whole.stats["n_tokens"])
        for key in ("sum", "sum_sq", "sum_cube", "sum_quad", "sum_pos"):
            torch.testing.assert_close(candidate.stats[key], whole.stats[key], rtol=1e-6, atol=1e-4)


def test_examples_and_their_windows_merge_whatever_the_batching_or_ranks(hook_path):
    """Top, bottom, random, non-firing and pool examples with their window values: one-row batches, and three ranks
    merged through the resume snapshot, keep exactly what whole batches keep, ties included (_batches
    makes every token of unit 0 tie, and two of unit 1): a tie goes to the first token in document order."""
    spec = "x:topk=3,examples=4,hist,quantiles=2"
    batches = _batches(np.random.default_rng(7), width=24, seq=6)
    whole = _capture(spec, batches)
    one_row = _capture(spec, [b for group in _split(batches, 1) for b in group])
    ranks = [_capture(spec, group) for group in _split(batches, 3)]
    for other in ranks[1:]:
        restored = _site_layer(spec)
        restored.restore(other.state_tables())
        ranks[0].merge(restored)
    from ingest.reductions import _NO_KEY

    want_all = whole.examples_in_order()
    for candidate in (one_row, ranks[0]):
        got_all = candidate.examples_in_order()
        assert got_all.keys() == want_all.keys()
        for key, want in want_all.items():
            got = got_all[key]
            kind = key.split("_")[0]
            if kind in ("random", "nonfiring", "pool"):  # slots past a unit's sample (key _NO_KEY) hold no example
                filled = want_all[f"{kind}_key"] != _NO_KEY
                assert torch.equal(got_all[f"{kind}_key"] != _NO_KEY, filled)
                got, want = got[filled], want[filled]
            assert torch.equal(got.isnan(), want.isnan()), key
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), key
    for kind in ("top", "nonfiring", "pool"):
        context = want_all[f"{kind}_context"]
        assert (~context.isnan()).any() and context.isnan().any()  # windows hold values, and NaN past a row's ends


def test_fused_sample_keeps_the_torch_paths_samples(monkeypatch):
    """The fused kernel's sample (firing tokens keyed only below what the kept sample holds) keeps the
    same random, non-firing and pool entries, windows included, as keying every token with torch ops."""
    from ingest import fused
    from ingest.reductions import _NO_KEY

    if not fused.usable(torch.zeros(1, 1, 1)):
        pytest.skip(f"the fused kernel is unavailable here: {fused.describe()}")
    rng = np.random.default_rng(11)
    batches = []
    for i in range(6):  # enough batches that the kept samples fill and prune what follows
        for x, docs, starts, lengths in _batches(rng, width=24, seq=6):
            batches.append((x, [d + 10 * i for d in docs], starts, lengths))
    spec = "x:topk=3,examples=4,quantiles=2"
    fused_path = _capture(spec, batches).examples_in_order()
    monkeypatch.setattr(fused, "usable", lambda *args, **kwargs: False)
    torch_path = _capture(spec, batches).examples_in_order()
    for kind in ("random", "nonfiring", "pool"):
        filled = torch_path[f"{kind}_key"] != _NO_KEY
        assert filled.any() and torch.equal(fused_path[f"{kind}_key"] != _NO_KEY, filled)
        for field in ("key", "doc", "pos", "value", "context"):
            got, want = fused_path[f"{kind}_{field}"][filled], torch_path[f"{kind}_{field}"][filled]
            assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan()), kind


def _reference_examples(batches, n: int, kind: str) -> dict[int, list]:
    """Per unit, (doc, pos, value, window) of its n strongest firings (kind top) or n most negative
    values (kind bottom) over the valid tokens, ties to the first (doc, pos): straight from the arrays."""
    tokens = []  # (doc, pos, batch, row, t)
    for b, (_, docs, starts, lengths) in enumerate(batches):
        tokens += [(docs[r], starts[r] + t, b, r, t) for r in range(len(docs)) for t in range(lengths[r])]
    tokens.sort()
    expected = {}
    for unit in range(batches[0][0].shape[2]):
        column = np.array([batches[b][0][r, t, unit] for _, _, b, r, t in tokens])
        ranked = np.argsort(-column if kind == "top" else column, kind="stable")[:n]
        kept = [i for i in ranked if (column[i] > 0 if kind == "top" else column[i] < 0)]
        expected[unit] = []
        for i in kept:
            doc, pos, b, r, t = tokens[i]
            x, length = batches[b][0], batches[b][3][r]
            window = [x[r, t + o, unit] if 0 <= t + o < length else None for o in range(-50, 21)]
            with np.errstate(over="ignore"):  # SPECIAL's 1e5 is inf in float16, as stored
                expected[unit].append((doc, pos, column[i], [None if v is None else np.float16(v) for v in window]))
    return expected


@pytest.mark.parametrize("kind", ["top", "bottom"])
def test_stored_top_and_bottom_examples_match_numpy_ties_included(kind, hook_path):
    from ingest.finalize import neuron_examples

    batches = _special_batches(np.random.default_rng(9))  # ties (unit 0: every token; unit 1: two) and signed values
    for x, *_ in batches:
        x[:, :, 11] = np.abs(x[:, :, 11])  # unit 11 is never negative: no bottom examples
    batches[0][0][0, 1:3, 10] = batches[1][0][2, 0, 10] = -70.0  # unit 10: a three-way tie for the most negative
    stored = neuron_examples(_capture("x:topk=3,examples=4", batches)).to_pylist()
    expected = _reference_examples(batches, 4, kind)
    assert not expected[11] if kind == "bottom" else expected[11]
    assert [e[:2] for e in expected[0 if kind == "top" else 10]][:3] == (
        [(1, 0), (1, 1), (1, 2)] if kind == "top" else [(7, 1), (7, 2), (8, 0)]
    )
    for unit, want in expected.items():
        got = [r for r in stored if r["kind"] == kind and r["neuron"] == unit]
        assert [r["rank"] for r in got] == list(range(len(want)))
        assert [(r["doc"], r["pos"]) for r in got] == [w[:2] for w in want], unit
        assert [r["value"] for r in got] == [w[2] for w in want]
        assert [r["window_values"] for r in got] == [w[3] for w in want]


def _long_row_batches(rng):
    """Rows longer than one 71-token window, so non-firing candidates are whole blocks and a tail; units
    fire less and less often (unit 5 never, unit 0 on most tokens)."""
    offsets = np.array([0.0, 2.0, 2.5, 3.0, 3.5, 10.0], dtype=np.float32)
    batches = []
    for docs, lengths in (([3, 1, 4], [160, 100, 71]), ([0, 2, 5], [142, 30, 155])):
        x = rng.standard_normal((3, 160, 6)).astype(np.float32) - offsets
        for row, length in enumerate(lengths):
            x[row, length:] = 1e6  # padding fires everywhere and must be ignored
        batches.append((x, docs, [0, 0, 0], lengths))
    return batches


def _reference_nonfiring(batches, n: int) -> dict[int, list]:
    """Per unit, (doc, pos, window) of the n silent candidate windows of smallest sample key, from the arrays:
    each row's valid tokens in 71-token blocks from its start, plus the last 71 tokens of a row whose
    length is no multiple of 71; a window is centred 50 tokens into it (a shorter row: on its last token)."""
    from ingest.reductions import sample_keys

    candidates = []  # (doc, centre position, batch, row, centre index, first index, end index)
    for b, (_, docs, starts, lengths) in enumerate(batches):
        for r, length in enumerate(lengths):
            spans = [(j * 71, j * 71 + 71) for j in range(length // 71)]
            if length % 71:
                spans.append((max(0, length - 71), length))
            for first, end in spans:
                centre = first + min(50, end - 1 - first)
                candidates.append((docs[r], starts[r] + centre, b, r, centre, first, end))
    width = batches[0][0].shape[2]
    keys = sample_keys(torch.tensor([c[0] for c in candidates]), torch.tensor([c[1] for c in candidates]), width)
    expected = {}
    for unit in range(width):
        silent = [
            i
            for i, (_, _, b, r, _, first, end) in enumerate(candidates)
            if batches[b][0][r, first:end, unit].max() <= 0
        ]
        chosen = sorted(silent, key=lambda i: int(keys[i, unit]))[:n]
        expected[unit] = []
        for i in chosen:
            doc, pos, b, r, centre, _, _ = candidates[i]
            x, length = batches[b][0], batches[b][3][r]
            window = [x[r, centre + o, unit] if 0 <= centre + o < length else None for o in range(-50, 21)]
            expected[unit].append((doc, pos, [None if v is None else np.float16(v) for v in window]))
    return expected


def test_non_firing_examples_are_the_smallest_keys_of_silent_windows(hook_path):
    from ingest.finalize import neuron_examples

    batches = _long_row_batches(np.random.default_rng(4))
    expected = _reference_nonfiring(batches, 3)
    assert expected[5] and len(expected[3]) == 3 and not expected[0]  # units with all, enough and no silent windows
    stored = neuron_examples(_capture("x:topk=3,examples=3", batches)).to_pylist()
    for unit, want in expected.items():
        got = [r for r in stored if r["kind"] == "nonfiring" and r["neuron"] == unit]
        assert [(r["doc"], r["pos"]) for r in got] == [w[:2] for w in want], unit
        assert [r["window_values"] for r in got] == [w[2] for w in want], unit


def test_state_saved_without_bottom_examples_is_refused_with_the_fix():
    """A resume state written before bottom examples existed cannot continue them exactly: one line, no guess."""
    sl = _capture("x:topk=3,examples=4", _batches(np.random.default_rng(2)))
    tables = sl.state_tables()
    examples = tables["examples.x.0"]
    tables["examples.x.0"] = examples.drop_columns([c for c in examples.column_names if c.startswith("bottom_")])
    with pytest.raises(
        BadInput, match=r"lacks bottom_value, bottom_doc, bottom_pos, bottom_context .*whq gc WAREHOUSE --interrupted"
    ):
        _site_layer("x:topk=3,examples=4").restore(tables)


def test_examples_snapshot_round_trips():
    batches = _special_batches(np.random.default_rng(6))
    sl = _capture("x:topk=3,examples=4,hist", batches)
    back = _site_layer("x:topk=3,examples=4,hist")
    back.restore(sl.state_tables())
    for state, restored in ((sl.stats, back.stats), (sl.examples_in_order(), back.examples_in_order())):
        for key in state:
            assert torch.equal(state[key], restored[key]) or torch.allclose(
                state[key], restored[key], equal_nan=True
            ), key


# -- macros on a real capture -------------------------------------------------------------------

TEXTS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
    "You are all resolved rather to die than to famish? " * 3,
    "Café naïve — “quoted” ✓ text.",
    "import os\nprint(os.getcwd())",
]
SITES = ["mlp.act:topk=8,examples=3,hist,quantiles=4,similar=4", "mlp.up:topk=4"]
Q, N = 4, 3
RTOL = 1e-6


def _ingest(root, model_dir, batch_size, shard_tokens=65536):
    from ingest.pipeline import ingest
    from ingest.sources import Document

    documents = [Document(f"d{i}", text) for i, text in enumerate(TEXTS)]
    ingest(
        root,
        str(model_dir),
        sites=SITES,
        documents=documents,
        run_id="u",
        batch_size=batch_size,
        max_length=24,
        device="cpu",
        progress=False,
        shard_tokens=shard_tokens,
    )


@pytest.fixture(scope="module")
def unit_wh(tmp_path_factory, tiny_lm_dir):
    root = tmp_path_factory.mktemp("units") / "wh"
    _ingest(root, tiny_lm_dir, batch_size=3)
    wh = warehouse.open(root)
    yield wh
    wh.close()


@pytest.fixture(scope="module")
def loaded(tiny_lm_dir):
    from ingest.models import load

    return load(str(tiny_lm_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def dense(unit_wh, loaded):
    """{layer: [tokens in (doc, pos) order, units]} of mlp.act, re-run unpadded on the stored ids."""
    from ingest.sites import parse_spec, resolve

    tokens = unit_wh.pl('SELECT doc, "window", token_id FROM tokens ORDER BY doc, pos')
    windows = {}
    for (doc, _), group in tokens.group_by(["doc", "window"], maintain_order=True):
        windows.setdefault(doc, []).append(group["token_id"].to_list())
    site = resolve(parse_spec("mlp.act"), loaded.module_names, loaded.aliases)
    out = {}
    for layer, module in site.modules:
        acts = reference.dense_activations(loaded.model, module, site.hook, windows)
        out[layer] = np.concatenate([acts[d] for d in sorted(acts)]).astype(np.float64)
    return out


def rows(wh, sql):
    return wh.pl(sql).to_dicts()


def test_unit_stats_match_dense_moments(unit_wh, dense):
    for layer in (0, 2):
        a = dense[layer]
        got = rows(unit_wh, f"SELECT * FROM unit_stats('u', 'mlp.act', {layer})")
        assert [r["neuron"] for r in got] == list(range(a.shape[1]))
        mean = a.mean(axis=0)
        centred = a - mean
        var = (centred**2).mean(axis=0)
        skew = (centred**3).mean(axis=0) / var**1.5
        kurt = (centred**4).mean(axis=0) / var**2 - 3
        np.testing.assert_allclose([r["mean"] for r in got], mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose([r["std"] for r in got], np.sqrt(var), rtol=1e-3)
        np.testing.assert_allclose([r["min"] for r in got], a.min(axis=0), rtol=1e-5)
        np.testing.assert_allclose([r["max"] for r in got], a.max(axis=0), rtol=1e-5)
        np.testing.assert_allclose([r["rate"] for r in got], (a > 0).mean(axis=0), atol=1.5 / len(a))
        # float32 activations, moments from raw sums: compare where the spread is well above rounding
        clear = np.sqrt(var) > 1e-3 * np.abs(a).max(axis=0)
        np.testing.assert_allclose(np.array([r["skewness"] for r in got])[clear], skew[clear], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(np.array([r["kurtosis"] for r in got])[clear], kurt[clear], rtol=2e-3, atol=2e-2)


def test_selectivity_divides_by_the_mean_positive_part(unit_wh, dense):
    a = dense[1]
    got = {r["neuron"]: r for r in rows(unit_wh, "SELECT * FROM selectivity('u', 'mlp.act', 1)")}
    mean_pos = np.maximum(a, 0).mean(axis=0)
    for unit in range(a.shape[1]):
        assert got[unit]["selectivity"] == pytest.approx(a[:, unit].max() / mean_pos[unit], rel=1e-4)
    assert a.min() < 0, "mlp.act of a SiLU model is signed: the positive part differs from the mean"


def test_unit_histogram_matches_numpy(unit_wh, dense):
    a = dense[3].astype(np.float32)
    expected_counts = reference_hist(a[:, :12])
    for unit in range(12):
        got = rows(unit_wh, f"SELECT * FROM unit_histogram('u', 'mlp.act', 3, {unit})")
        nonzero = np.flatnonzero(expected_counts[unit])
        assert [r["bin"] for r in got] == list(range(nonzero[0], nonzero[-1] + 1))
        assert [r["count"] for r in got] == expected_counts[unit, nonzero[0] : nonzero[-1] + 1].tolist()
        for r in got:  # the macro's edges hold the bin's values
            members = np.array([v for v in a[:, unit] if reference_bin(float(v)) == r["bin"]])
            if r["bin"] >= 98:
                assert all((r["lo"] <= members) & (members < r["hi"]))
            else:
                assert all((r["lo"] < members) & (members <= r["hi"]))
    totals = rows(unit_wh, "SELECT neuron, sum(count) AS n FROM unit_histograms WHERE layer = 3 GROUP BY neuron")
    assert {r["n"] for r in totals} == {len(a)}


def test_histograms_are_the_same_whatever_the_batching(unit_wh, tiny_lm_dir, tmp_path):
    _ingest(tmp_path / "wh", tiny_lm_dir, batch_size=1, shard_tokens=40)
    with warehouse.open(tmp_path / "wh") as other:
        for query in (
            "SELECT site, layer, neuron, bin, count FROM unit_histograms ORDER BY ALL",
            "SELECT layer, neuron, rank, quantile, doc, pos FROM neuron_examples WHERE kind = 'quantile' ORDER BY ALL",
        ):
            assert other.pl(query).equals(unit_wh.pl(query))
        # A padded batch computes the model in other shapes: values move by ulps (none here crosses an edge).
        query = "SELECT layer, neuron, min FROM neuron_stats WHERE site = 'mlp.act' ORDER BY ALL"
        np.testing.assert_allclose(other.pl(query)["min"], unit_wh.pl(query)["min"], rtol=1e-5)


def test_tokens_are_stored_decoded(unit_wh, loaded):
    tokens = rows(unit_wh, "SELECT token_id, piece, text FROM tokens")
    assert all(t["text"] == loaded.tokenizer.tok.decode([t["token_id"]]) for t in tokens)
    assert any(t["piece"] == "Ġ" and t["text"] == " " for t in tokens)
    assert not any("Ġ" in t["text"] for t in tokens)


def token_key(text: str) -> str:
    """The documented match of token search: case and surrounding spaces ignored, and WordPiece's ## too."""
    key = text.strip(" ").lower()
    return key[2:] if key.startswith("##") and len(key) > 2 else key


def _units_for_token_in_python(wh, run: str, query: str) -> list[dict]:
    tokens = rows(wh, f"SELECT doc, pos, coalesce(text, piece) AS text FROM tokens WHERE run_id = '{run}'")
    fired = rows(
        wh,
        "SELECT layer, neuron, doc, pos, value FROM token_neurons "
        f"WHERE run_id = '{run}' AND site = 'mlp.act' AND value > 0",
    )
    wanted = {(t["doc"], t["pos"]) for t in tokens if token_key(t["text"]) == token_key(query)}
    per_unit = defaultdict(list)
    for r in fired:
        if (r["doc"], r["pos"]) in wanted:
            per_unit[(r["layer"], r["neuron"])].append(r["value"])
    return sorted(
        (
            {
                "layer": layer,
                "neuron": unit,
                "n_fired": len(v),
                "n_occurrences": len(wanted),
                "share": len(v) / len(wanted),
                "mean_value": float(np.mean(v)),
            }
            for (layer, unit), v in per_unit.items()
        ),
        key=lambda r: (-r["n_fired"], -r["mean_value"], r["layer"], r["neuron"]),
    )


def test_units_for_token_matches_python(unit_wh):
    assert rows(unit_wh, "SELECT count(*) AS n FROM token_units WHERE site = 'mlp.act'")[0]["n"] > 0  # the index
    for query in ("s", " S ", "k"):
        expected = _units_for_token_in_python(unit_wh, "u", query)
        got = rows(unit_wh, f"SELECT * FROM units_for_token('u', 'mlp.act', '{query}')")
        assert [(r["layer"], r["neuron"], r["n_fired"], r["n_occurrences"]) for r in got] == [
            (r["layer"], r["neuron"], r["n_fired"], r["n_occurrences"]) for r in expected
        ]
        np.testing.assert_allclose([r["mean_value"] for r in got], [r["mean_value"] for r in expected], rtol=1e-6)
        assert got, query


def test_similar_units_by_decoder_cosine_and_coactivation(unit_wh, loaded):
    down = loaded.model.model.layers[2].mlp.down_proj.weight.detach().double().numpy()
    directions = down / np.linalg.norm(down, axis=0)
    fired = rows(
        unit_wh, "SELECT neuron, doc, pos FROM token_neurons WHERE site = 'mlp.act' AND layer = 2 AND value > 0"
    )
    sets = defaultdict(set)
    for r in fired:
        sets[r["neuron"]].add((r["doc"], r["pos"]))
    for unit in (0, 7, 50):
        got = rows(unit_wh, f"SELECT * FROM similar_units('u', 'mlp.act', 2, {unit}, k := 6)")
        decoder = [r for r in got if r["kind"] == "decoder"]
        cosine = directions.T @ directions[:, unit]
        cosine[unit] = -np.inf
        order = np.lexsort((np.arange(len(cosine)), -cosine))[:4]  # similar=4 stored
        assert [r["neuron"] for r in decoder] == order.tolist()
        np.testing.assert_allclose([r["similarity"] for r in decoder], cosine[order], rtol=1e-5)
        jaccard = {
            other: len(sets[unit] & s) / len(sets[unit] | s)
            for other, s in sets.items()
            if other != unit and sets[unit] & s
        }
        expected = sorted(jaccard, key=lambda o: (-jaccard[o], o))[:6]
        coactivation = [r for r in got if r["kind"] == "coactivation"]
        assert [r["neuron"] for r in coactivation] == expected
        np.testing.assert_allclose([r["similarity"] for r in coactivation], [jaccard[o] for o in expected], rtol=1e-12)
        assert [r["n_shared"] for r in coactivation] == [len(sets[unit] & sets[o]) for o in expected]
        assert [r["rank"] for r in coactivation] == list(range(len(expected)))


def test_token_search_finds_wordpiece_continuations(minilm_wh):
    with warehouse.open(minilm_wh) as wh:
        pieces = [r["piece"] for r in rows(wh, "SELECT DISTINCT piece FROM tokens WHERE piece LIKE '##_%'")]
        assert pieces, "the MiniLM capture has WordPiece continuations"
        for piece in pieces[:5]:
            expected = _units_for_token_in_python(wh, "r", piece[2:])
            got = rows(wh, f"SELECT * FROM units_for_token('r', 'mlp.act', '{piece[2:]}')")
            assert [(r["layer"], r["neuron"], r["n_fired"], r["n_occurrences"]) for r in got] == [
                (r["layer"], r["neuron"], r["n_fired"], r["n_occurrences"]) for r in expected
            ]
            texts = rows(wh, "SELECT text FROM tokens")
            assert got[0]["n_occurrences"] == sum(t["text"] in (piece, piece[2:]) for t in texts) > 0
            assert rows(wh, f"SELECT * FROM units_for_token('r', 'mlp.act', '{piece}')") == got


def test_runs_without_the_indexes_give_the_same_rows(unit_wh, tiny_lm_dir, tmp_path, monkeypatch):
    """A run written before unit_coactivations, token_units and vocabulary: the macros and twins compute
    from token_neurons and tokens, with the same results."""
    import ingest.finalize

    monkeypatch.setattr(ingest.finalize, "index_parts", lambda *args, **kwargs: [])
    _ingest(tmp_path / "wh", tiny_lm_dir, batch_size=3)
    with warehouse.open(tmp_path / "wh") as old:
        for table in ("unit_coactivations", "token_units", "vocabulary"):
            assert rows(old, f"SELECT count(*) AS n FROM {table}")[0]["n"] == 0
        for sql, twin, kwargs in (
            ("units_for_token('u', 'mlp.act', 's')", uf.units_for_token, dict(text="s")),
            ("similar_units('u', 'mlp.act', 2, 7)", uf.similar_units, dict(layer=2, unit=7)),
            ("similar_units('u', 'mlp.act', 0, 50, k := 40)", uf.similar_units, dict(layer=0, unit=50, k=40)),
        ):
            got = old.pl(f"SELECT * FROM {sql}")
            assert got.height > 0
            assert_frame_equal(got, unit_wh.pl(f"SELECT * FROM {sql}"), check_exact=False, rel_tol=1e-12)
            assert_frame_equal(got, twin(old, "u", "mlp.act", **kwargs).collect(), check_exact=False, rel_tol=RTOL)


def test_coactivations_beyond_those_kept_are_computed(unit_wh):
    from warehouse.indexes import COACTIVATION_K

    kept = unit_wh.pl(f"SELECT * FROM similar_units('u', 'mlp.act', 1, 3, k := {COACTIVATION_K})")
    more = unit_wh.pl(f"SELECT * FROM similar_units('u', 'mlp.act', 1, 3, k := {COACTIVATION_K + 20})")
    coactivating = more.filter(more["kind"] == "coactivation")
    assert coactivating.height > COACTIVATION_K, "the unit shares tokens with more units than are kept"
    assert_frame_equal(more.filter(more["rank"] < COACTIVATION_K), kept)


def _firing(unit_wh, dense, layer, unit):
    """(values, (doc, pos) of each) of the unit's firing tokens, from the dense re-run."""
    owners = [(r["doc"], r["pos"]) for r in rows(unit_wh, "SELECT doc, pos FROM tokens ORDER BY doc, pos")]
    column = dense[layer][:, unit]
    fired = np.flatnonzero(column > 0)
    return column[fired].astype(np.float32), [owners[i] for i in fired]


def _reference_quantiles(values):
    """Bin of each firing value by the documented rule: histogram bins, each to the quantile of its middle rank."""
    bins = np.array([reference_bin(float(v)) for v in values])
    counts = {b: int((bins == b).sum()) for b in sorted(set(bins))}
    below, of_bin = 0, {}
    for b, c in counts.items():
        of_bin[b] = min(Q - 1, int(np.floor(Q * (below + c / 2) / len(values))))
        below += c
    return np.array([of_bin[b] for b in bins])


def test_quantile_bins_report_exactly_the_shares_they_cover(unit_wh, dense):
    for unit in (0, 13, 77):
        values, _ = _firing(unit_wh, dense, 1, unit)
        quantile = _reference_quantiles(values)
        got = rows(unit_wh, f"SELECT * FROM whq_quantile_bins('u', 'mlp.act', 1, {unit})")
        assert [r["quantile"] for r in got] == sorted(set(quantile))
        for r in got:
            members = values[quantile == r["quantile"]]
            assert r["n_tokens"] == len(members)
            assert r["lo"] <= members.min() and members.max() < r["hi"]
            assert r["share_lo"] == pytest.approx((values < r["lo"]).mean(), abs=1e-12)  # exact shares of firings
            assert r["share_hi"] == pytest.approx((values < r["hi"]).mean(), abs=1e-12)
        assert got[0]["share_lo"] == 0 and got[-1]["share_hi"] == 1


def test_quantile_examples_are_the_smallest_sample_keys_of_each_bin(unit_wh, dense):
    from ingest.reductions import sample_keys

    for unit in (0, 13, 77):
        values, owners = _firing(unit_wh, dense, 1, unit)
        quantile = _reference_quantiles(values)
        docs, positions = (torch.tensor([o[i] for o in owners]) for i in (0, 1))
        keys = sample_keys(docs, positions, unit + 1)[:, unit].numpy()
        pool = np.argsort(keys, kind="stable")[: 2 * Q * N]  # the capture's uniform pool
        expected = []
        for q in range(Q):
            members = [i for i in pool if quantile[i] == q][:N]
            expected += [(q, rank, owners[i]) for rank, i in enumerate(members)]
        got = rows(unit_wh, f"SELECT * FROM quantile_examples('u', 'mlp.act', 1, {unit}, before := 3, after := 1)")
        assert [(r["quantile"], r["rank"], r["pos"]) for r in got] == [(q, rank, o[1]) for q, rank, o in expected]
        for r in got:
            assert r["lo"] <= r["value"] < r["hi"] and "«" in r["context"] and len(r["tokens"]) <= 5


def test_layer_wide_forms_equal_the_one_unit_macros(unit_wh):
    """whq_quantile_bins, whq_quantile_examples and whq_similar_units with a NULL unit (the static
    export's one statement a layer) answer, unit by unit, what the one-unit macros answer."""
    units = [
        r["neuron"]
        for r in rows(
            unit_wh,
            "SELECT neuron FROM neuron_stats WHERE run_id = 'u' AND site = 'mlp.act' AND layer = 1 AND n_fired > 0 ORDER BY neuron",
        )
    ]
    assert len(units) > 10
    layer_bins = rows(unit_wh, "SELECT * FROM whq_quantile_bins('u', 'mlp.act', 1, NULL)")
    layer_examples = rows(unit_wh, "SELECT * FROM whq_quantile_examples('u', 'mlp.act', 1, NULL, 3, 1)")
    layer_similar = rows(unit_wh, "SELECT * FROM whq_similar_units('u', 'mlp.act', 1, NULL, 10)")
    # eight units spread over the layer, the first and the last among them (three macro calls a unit)
    for unit in sorted({*units[:: max(1, len(units) // 7)], units[-1]}):
        bins = rows(unit_wh, f"SELECT * FROM whq_quantile_bins('u', 'mlp.act', 1, {unit})")
        assert [r for r in layer_bins if r["neuron"] == unit] == bins
        one = rows(unit_wh, f"SELECT * FROM quantile_examples('u', 'mlp.act', 1, {unit}, before := 3, after := 1)")
        assert [{k: v for k, v in r.items() if k != "neuron"} for r in layer_examples if r["neuron"] == unit] == one
        similar = rows(unit_wh, f"SELECT * FROM similar_units('u', 'mlp.act', 1, {unit})")
        assert [
            {k: v for k, v in r.items() if k != "of_unit"} for r in layer_similar if r["of_unit"] == unit
        ] == similar
    assert {r["neuron"] for r in layer_examples} <= set(units) and layer_examples and layer_similar
    # k above the 32 co-activations kept at commit: both forms compute them from token_neurons
    live = rows(unit_wh, "SELECT * FROM whq_similar_units('u', 'mlp.act', 1, NULL, 50)")
    for unit in units[:5]:
        similar = rows(unit_wh, f"SELECT * FROM similar_units('u', 'mlp.act', 1, {unit}, k := 50)")
        assert any(r["kind"] == "coactivation" for r in similar)
        assert [{k: v for k, v in r.items() if k != "of_unit"} for r in live if r["of_unit"] == unit] == similar


def test_example_windows_hold_the_units_own_values(unit_wh, dense):
    tokens = rows(unit_wh, 'SELECT doc, pos, "window" FROM tokens ORDER BY doc, pos')
    index = {(t["doc"], t["pos"]): (i, t["window"]) for i, t in enumerate(tokens)}
    examples = rows(
        unit_wh,
        "SELECT neuron, kind, doc, pos, value, window_values FROM neuron_examples WHERE site = 'mlp.act' AND layer = 1",
    )
    checked = 0
    assert {e["kind"] for e in examples} == {"top", "bottom", "random", "quantile", "nonfiring"}
    for e in examples:
        assert len(e["window_values"]) == 71
        row, window = index[(e["doc"], e["pos"])]
        for offset, got in zip(range(-50, 21), e["window_values"]):
            where = index.get((e["doc"], e["pos"] + offset))
            if where is None or where[1] != window:  # outside the document or the example's model window
                assert got is None
            else:
                assert got == pytest.approx(dense[1][where[0], e["neuron"]], rel=2e-3, abs=2e-4)
                checked += 1
                if e["kind"] == "nonfiring":  # the unit is silent over the whole window
                    assert dense[1][where[0], e["neuron"]] <= 0
        assert e["window_values"][50] == pytest.approx(e["value"], rel=1e-3, abs=1e-5)
    assert checked > 1000


def test_contexts_and_exports_use_the_captured_window_values(unit_wh, dense, tmp_path):
    from queries.export import feature_documents

    tokens = rows(unit_wh, 'SELECT doc, pos, "window" FROM tokens ORDER BY doc, pos')
    row_of = {(t["doc"], t["pos"]): (i, t["window"]) for i, t in enumerate(tokens)}
    doc_of = {r["doc_id"]: r["doc"] for r in rows(unit_wh, "SELECT doc, doc_id FROM documents")}
    got = rows(unit_wh, "SELECT * FROM top_contexts('u', 'mlp.act', 1, 13, k := 3, before := 6, after := 2)")
    for r in got:
        doc = doc_of[r["doc_id"]]
        window = row_of[(doc, r["pos"])][1]
        positions = [p for p in range(r["pos"] - 6, r["pos"] + 3) if (doc, p) in row_of]
        for p, token in zip(positions, r["tokens"]):
            if row_of[(doc, p)][1] == window:  # in the example's model window: its exact value, not a top-k gap
                assert token["value"] == pytest.approx(dense[1][row_of[(doc, p)][0], 13], rel=2e-3, abs=2e-4)
    documents = feature_documents(unit_wh, "u", "mlp.act", 1, k=3, n_random=2, before=6, after=2)
    top = documents[13]["examples_quantiles"][0]["examples"]
    assert [e["tokens_acts_list"] for e in top] == [[t["value"] or 0.0 for t in r["tokens"]] for r in got]


def test_similar_needs_an_mlp_unit_site(tmp_path, tiny_lm_dir):
    from ingest.pipeline import ingest
    from ingest.sources import Document

    with pytest.raises(BadInput, match="similar=K compares output directions, which only MLP unit sites have"):
        ingest(
            tmp_path / "wh",
            str(tiny_lm_dir),
            sites=["resid.out:last,similar=3"],
            documents=[Document("d", "hi")],
            run_id="s",
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "wh" / "runs").exists() or not list((tmp_path / "wh" / "runs").glob("*.json"))


def test_quantiles_need_examples_and_a_histogram(unit_wh):
    from ingest.sites import parse_spec
    from warehouse.errors import BadSpec

    assert parse_spec("mlp.act:examples=5,quantiles=4").reductions_text == "examples=5,quantiles=4,hist"
    assert "hist" not in parse_spec("mlp.act:examples=5,nohist").reductions
    for text in ("mlp.act:quantiles=4", "mlp.act:examples=5,nohist,quantiles=4"):
        with pytest.raises(BadSpec, match="add examples=N without nohist"):
            parse_spec(text)
    with pytest.raises(BadSpec, match="use it with examples=N, without hist"):
        parse_spec("mlp.act:topk=3,nohist")
    with pytest.raises(
        QueryError, match="kept no quantile examples: re-ingest with --site mlp.up:examples=20,hist,quantiles=10"
    ):
        unit_wh.pl("SELECT * FROM quantile_examples('u', 'mlp.up', 0, 1)")


TWIN_CALLS = [
    ("unit_stats", "1", dict(layer=1)),
    ("unit_histogram", "3, 5", dict(layer=3, unit=5)),
    ("units_for_token", "'s'", dict(text="s")),
    ("similar_units", "2, 7", dict(layer=2, unit=7)),
    ("similar_units", "0, 3, k := 2", dict(layer=0, unit=3, k=2)),
    ("similar_units", "1, 3, k := 50", dict(layer=1, unit=3, k=50)),
    ("quantile_examples", "2, 9", dict(layer=2, unit=9)),
    ("quantile_examples", "0, 1, before := 2, after := 0", dict(layer=0, unit=1, before=2, after=0)),
]


@pytest.mark.parametrize("name,args,kwargs", TWIN_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(TWIN_CALLS)])
def test_macro_equals_polars_twin(unit_wh, name, args, kwargs):
    if name == "quantile_examples":
        bins = unit_wh.pl(
            f"SELECT * FROM whq_quantile_bins('u', 'mlp.act', {args.split(',')[0]}, {args.split(',')[1]})"
        )
        assert_frame_equal(bins, uf.quantile_bins(unit_wh, "u", "mlp.act", kwargs["layer"], kwargs["unit"]).collect())
    sql = unit_wh.pl(f"SELECT * FROM {name}('u', 'mlp.act', {args})")
    assert_frame_equal(
        sql, getattr(uf, name)(unit_wh, "u", "mlp.act", **kwargs).collect(), check_exact=False, rel_tol=RTOL
    )
    assert sql.height > 0


def test_histogram_needs_a_capture_that_kept_it(unit_wh):
    with pytest.raises(QueryError, match="kept no histograms: re-ingest with --site mlp.up:topk=4,hist"):
        unit_wh.pl("SELECT * FROM unit_histogram('u', 'mlp.up', 0, 1)")
    with pytest.raises(BadInput, match="re-ingest with --site mlp.up:topk=4,hist"):
        uf.unit_histogram(unit_wh, "u", "mlp.up", 0, 1)
    with pytest.raises(QueryError, match="run 'u' has no site 'mlp.nope'"):
        unit_wh.pl("SELECT * FROM similar_units('u', 'mlp.nope', 0, 1)")


def test_every_unit_macro_is_documented(unit_wh):
    comments = dict(
        unit_wh.sql(
            "SELECT function_name, comment FROM duckdb_functions() WHERE function_type IN ('table_macro', 'macro')"
        ).fetchall()
    )
    for name in docgen.macro_names(["units.sql"]):  # parsed from queries/*.sql, so a new macro or file is covered
        assert comments.get(name), name


def _indexed_run(tmp_path, rows_of_layer: dict[int, list[list[tuple[int, float]]]], token_ids: list[int]):
    """index_parts over one shard written by a RunWriter: per layer, each token's (unit, value) rows."""
    from warehouse.indexes import index_parts
    from warehouse.parts import part_order, to_arrow
    from warehouse.runwriter import RunWriter

    wh = warehouse.open_or_init(tmp_path / "wh")
    writer = RunWriter(wh.layout, "x", {"test": True})
    n = len(token_ids)
    tokens = {
        "doc": np.zeros(n, dtype=np.int64),
        "pos": np.arange(n),
        "window": np.zeros(n, dtype=np.int64),
        "token_id": np.array(token_ids),
        "piece": [f"p{i}" for i in token_ids],
        "char_start": np.zeros(n, dtype=np.int64),
        "char_end": np.zeros(n, dtype=np.int64),
        "special": np.zeros(n, dtype=bool),
        "text": [f"t{i}" for i in token_ids],
        "context": [None] * n,
        "context_pos": np.arange(n),
    }
    parts = [("tokens", None, None, to_arrow("tokens", tokens, None))]
    for layer, per_token in rows_of_layer.items():
        cols = {
            "doc": np.array([0 for pos, rows in enumerate(per_token) for _ in rows]),
            "pos": np.array([pos for pos, rows in enumerate(per_token) for _ in rows]),
            "neuron": np.array([u for rows in per_token for u, _ in rows]),
            "value": np.array([v for rows in per_token for _, v in rows], dtype=np.float16),
        }
        parts.append(("token_neurons", "s", layer, to_arrow("token_neurons", part_order("token_neurons", cols), 200)))
    writer.commit_shard(parts)
    out = {(t, layer): table.to_pydict() for t, _, layer, table in index_parts(writer, {"s": 0.0}, k=3)}
    writer.close()
    return out


def test_index_parts_match_python_and_skip_dense_layers(tmp_path):
    rng = np.random.default_rng(5)
    sparse = [
        [(int(u), float(rng.choice([-1.0, 0.5, 1.5]))) for u in rng.choice(12, 4, replace=False)] for _ in range(60)
    ]
    dense = [[(u, 1.0) for u in range(130)] for _ in range(3)]  # 130 firing units a token: above MAX_MEAN_COFIRING
    token_ids = rng.integers(0, 5, 60).tolist()
    got = _indexed_run(tmp_path, {0: sparse, 1: dense + sparse[3:]}, token_ids)
    assert ("unit_coactivations", 1) not in got and ("token_units", 1) in got

    fired = defaultdict(set)
    for pos, rows_ in enumerate(sparse):
        for u, v in rows_:
            if v > 0:
                fired[u].add(pos)
    c = got[("unit_coactivations", 0)]
    for unit in fired:
        jaccard = {
            o: len(fired[unit] & s) / len(fired[unit] | s) for o, s in fired.items() if o != unit and fired[unit] & s
        }
        expected = sorted(jaccard, key=lambda o: (-jaccard[o], o))[:3]
        mine = [i for i, u in enumerate(c["neuron"]) if u == unit]
        assert [c["other"][i] for i in mine] == expected
        assert [c["rank"][i] for i in mine] == list(range(len(expected)))
        assert [c["jaccard"][i] for i in mine] == [jaccard[o] for o in expected]  # the same float division
        assert [c["n_shared"][i] for i in mine] == [len(fired[unit] & fired[o]) for o in expected]
    assert set(c["kept"]) == {3}

    t = got[("token_units", 0)]
    expected = defaultdict(lambda: [0, 0.0])
    for pos, rows_ in enumerate(sparse):
        for u, v in rows_:
            if v > 0:
                expected[(token_ids[pos], u)][0] += 1
                expected[(token_ids[pos], u)][1] += v
    assert sorted(zip(t["token_id"], t["neuron"])) == list(zip(t["token_id"], t["neuron"]))  # the lookup order
    assert {(i, u): [n, s] for i, u, n, s in zip(t["token_id"], t["neuron"], t["n_fired"], t["value_sum"])} == dict(
        expected
    )
    vocabulary = got[("vocabulary", None)]
    assert dict(zip(vocabulary["token_id"], vocabulary["n_tokens"])) == {i: token_ids.count(i) for i in set(token_ids)}
    assert vocabulary["text"] == [f"t{i}" for i in vocabulary["token_id"]]


def test_index_parts_are_the_same_in_blocks_of_units_and_chunks_of_pairs(tmp_path, monkeypatch):
    """Wide layers count pairs a block of units at a time, and expand pairs a chunk at a time."""
    from warehouse import indexes

    rng = np.random.default_rng(6)
    per_token = [[(int(u), 1.0) for u in rng.choice(12, 5, replace=False)] for _ in range(40)]
    whole = _indexed_run(tmp_path / "a", {0: per_token}, [0] * 40)
    monkeypatch.setattr(indexes, "_BLOCK_CELLS", 3 * 12)  # blocks of 3 units
    monkeypatch.setattr(indexes, "_CHUNK_PAIRS", 7)
    assert _indexed_run(tmp_path / "b", {0: per_token}, [0] * 40) == whole
