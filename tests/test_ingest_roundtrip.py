"""Every reduction, stored in the warehouse, equals numpy on the same hooked activations.

Runs on the real all-MiniLM-L6-v2 and on a tiny random Qwen3 causal LM. The
reference re-runs the model on the token ids the warehouse stored, one window at a
time without padding, so it also checks padding masking, windowing and positions.
"""

from __future__ import annotations

import numpy as np
import pytest

import warehouse
from ingest.models import load
from ingest.pipeline import ingest
from ingest.sites import parse_spec, resolve

from . import reference

SITES = [
    "mlp.act:topk=5,examples=4",
    "mlp.up:nag=6,mean",
    "resid.out:last",
    "attn.q:threshold=0.3",
    "mlp.down:abstopk=3",
]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=["minilm", "tiny-qwen3"])
def captured(request, tmp_path_factory, sample_jsonl, tiny_lm_dir):
    model = "minilm" if request.param == "minilm" else str(tiny_lm_dir)
    root = tmp_path_factory.mktemp("wh") / "wh"
    summary = ingest(
        root,
        model,
        [str(sample_jsonl)],
        SITES,
        run_id="r",
        batch_size=3,
        max_length=24,
        shard_tokens=40,
        device="cpu",
        progress=False,
    )
    wh = warehouse.open(root)
    loaded = load(model, "cpu", "float32")
    tokens = wh.pl('SELECT doc, "window", pos, token_id FROM tokens ORDER BY doc, pos')
    windows_by_doc = {}
    for (doc, _window), group in tokens.group_by(["doc", "window"], maintain_order=True):
        windows_by_doc.setdefault(doc, []).append(group["token_id"].to_list())
    acts = {}
    for text in SITES:
        site = resolve(parse_spec(text), loaded.module_names, loaded.aliases)
        for layer, module in site.modules:
            acts[(site.name, layer)] = reference.dense_activations(loaded.model, module, site.hook, windows_by_doc)
    yield wh, summary, acts
    wh.close()


def _layers(acts, site):
    return sorted(layer for name, layer in acts if name == site)


def test_run_summary_and_tokens(captured):
    wh, summary, acts = captured
    docs = wh.pl("SELECT doc, n_tokens, n_windows FROM documents ORDER BY doc")
    assert summary.documents == docs.height == 6
    per_doc = {d: len(a) for d, a in acts[("mlp.act", 0)].items()}
    assert dict(zip(docs["doc"], docs["n_tokens"])) == {d: per_doc.get(d, 0) for d in docs["doc"]}
    assert docs["n_windows"].max() > 1, "the long document must span several windows"
    positions = wh.pl("SELECT doc, list(pos ORDER BY pos) AS p FROM tokens GROUP BY doc")
    for doc, pos in zip(positions["doc"].to_list(), positions["p"].to_list()):
        assert pos == list(range(per_doc[doc]))


def test_topk_entries(captured):
    wh, _, acts = captured
    for layer in _layers(acts, "mlp.act"):
        rows = wh.pl(f"SELECT doc, pos, neuron, value FROM token_neurons WHERE site='mlp.act' AND layer={layer}")
        for doc, dense in acts[("mlp.act", layer)].items():
            mine = rows.filter(rows["doc"] == doc)
            assert mine.height == 5 * len(dense)
            for pos, group in mine.group_by("pos"):
                ref = dense[pos[0]]
                kth = np.sort(ref)[-5]
                ids = group["neuron"].to_numpy()
                np.testing.assert_allclose(group["value"].to_numpy(), ref[ids], rtol=2e-3, atol=2e-3)  # float16 storage
                assert (ref[ids] >= kth - 1e-4).all()


def test_abstopk_entries(captured):
    wh, _, acts = captured
    layer = _layers(acts, "mlp.down")[-1]
    rows = wh.pl(f"SELECT doc, pos, neuron, value FROM token_neurons WHERE site='mlp.down' AND layer={layer}")
    for doc, dense in acts[("mlp.down", layer)].items():
        for pos, group in rows.filter(rows["doc"] == doc).group_by("pos"):
            ref = dense[pos[0]]
            ids = group["neuron"].to_numpy()
            assert len(ids) == 3
            assert (np.abs(ref[ids]) >= np.sort(np.abs(ref))[-3] - 1e-4).all()
            np.testing.assert_allclose(group["value"].to_numpy(), ref[ids], rtol=2e-3, atol=2e-3)


def test_threshold_entries(captured):
    wh, _, acts = captured
    for layer in _layers(acts, "attn.q"):
        rows = wh.pl(
            f"SELECT doc, pos, neuron, value FROM token_neurons WHERE site='attn.q' AND layer={layer} ORDER BY doc, pos, neuron"
        )
        certain, possible = set(), set()
        for doc, dense in acts[("attn.q", layer)].items():
            certain |= {(doc, p, u) for p, u in zip(*np.nonzero(dense > 0.3 + 1e-4))}
            possible |= {(doc, p, u) for p, u in zip(*np.nonzero(dense > 0.3 - 1e-4))}
        stored = set(zip(rows["doc"], rows["pos"], rows["neuron"]))
        assert certain <= stored <= possible  # only values within float noise of the threshold may differ


def test_nag_top_k(captured):
    wh, _, acts = captured
    for layer in _layers(acts, "mlp.up"):
        rows = wh.pl(
            "SELECT doc, list(neuron ORDER BY rank) AS neurons, list(impact ORDER BY rank) AS impacts FROM doc_neurons "
            f"WHERE site='mlp.up' AND layer={layer} GROUP BY doc ORDER BY doc"
        )
        ref = reference.nag(acts[("mlp.up", layer)], 6)
        assert rows["doc"].to_list() == sorted(ref)
        for doc, neurons, impacts in rows.iter_rows():
            ids, impact = ref[doc]
            np.testing.assert_allclose(impacts, impact, **TOL)
            assert sorted(neurons) == sorted(ids.tolist()) or np.allclose(np.sort(impacts), np.sort(impact), rtol=1e-5)
            assert list(neurons[:3]) == ids[:3].tolist()


def test_last_and_mean_vectors(captured):
    wh, _, acts = captured
    for site, pool in (("resid.out", "last"), ("mlp.up", "mean")):
        for layer in _layers(acts, site):
            rows = wh.pl(
                f"SELECT doc, pos, vec FROM vectors WHERE site='{site}' AND layer={layer} AND pool='{pool}' ORDER BY doc"
            )
            for doc, pos, vec in rows.iter_rows():
                dense = acts[(site, layer)][doc]
                expected = dense[-1] if pool == "last" else dense.astype(np.float64).mean(axis=0)
                np.testing.assert_allclose(np.array(vec), expected, **TOL)
                assert pos == (len(dense) - 1 if pool == "last" else None)


@pytest.mark.parametrize("site", ["mlp.act", "attn.q"])
def test_neuron_stats_every_column(captured, site):
    wh, _, acts = captured
    threshold = 0.3 if site == "attn.q" else 0.0
    for layer in _layers(acts, site):
        rows = wh.pl(f"SELECT * FROM neuron_stats WHERE site='{site}' AND layer={layer} ORDER BY neuron")
        ref = reference.stats(acts[(site, layer)], threshold)
        assert (rows["n_tokens"].to_numpy() == ref["n_tokens"]).all()
        assert np.abs(rows["n_fired"].to_numpy() - ref["n_fired"]).max() <= 1
        np.testing.assert_allclose(rows["sum"].to_numpy(), ref["sum"], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(rows["sum_sq"].to_numpy(), ref["sum_sq"], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(rows["max"].to_numpy(), ref["max"], **TOL)
        clear = np.sort(np.concatenate(list(acts[(site, layer)].values())), axis=0)
        unique_max = (clear[-1] - clear[-2]) > 1e-4
        assert (rows["max_doc"].to_numpy()[unique_max] == ref["max_doc"][unique_max]).all()
        assert (rows["max_pos"].to_numpy()[unique_max] == ref["max_pos"][unique_max]).all()


def test_examples_top_and_random(captured):
    wh, _, acts = captured
    layer = _layers(acts, "mlp.act")[0]
    rows = wh.pl(f"SELECT * FROM neuron_examples WHERE site='mlp.act' AND layer={layer} ORDER BY neuron, kind, rank")
    dense = acts[("mlp.act", layer)]
    flat = np.concatenate([dense[d] for d in sorted(dense)])
    owner = [(d, p) for d in sorted(dense) for p in range(len(dense[d]))]
    for unit in (0, 7, 100):
        top = rows.filter((rows["neuron"] == unit) & (rows["kind"] == "top"))
        fired = flat[:, unit] > 0
        expected = np.sort(flat[fired, unit])[::-1][:4]
        np.testing.assert_allclose(top["value"].to_numpy(), expected, **TOL)
        for doc, pos, value in zip(top["doc"], top["pos"], top["value"]):
            assert abs(flat[owner.index((doc, pos)), unit] - value) < 1e-4
        sample = rows.filter((rows["neuron"] == unit) & (rows["kind"] == "random"))
        assert sample.height == min(4, int(fired.sum()))
        for doc, pos in zip(sample["doc"], sample["pos"]):
            assert flat[owner.index((doc, pos)), unit] > 0
