"""Dictionary sites: every format and architecture encodes as its library does, and what a dictionary
site stores (latents, neuron_stats, examples, quality) equals a numpy encode of the same activations
captured densely in the same run."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import warehouse
from ingest import dictionary_files, encoder
from ingest.sites import parse_spec, parse_specs
from queries import frames
from warehouse.errors import BadInput, BadSpec

from . import dictionaries as dicts

D_IN = 64  # hidden size of config:llama-tiny / config:qwen3-tiny

FORMATS = {
    "saelens-standard": lambda p: dicts.saelens(p / "d", "standard"),
    "saelens-gated": lambda p: dicts.saelens(p / "d", "gated"),
    "saelens-jumprelu": lambda p: dicts.saelens(p / "d", "jumprelu"),
    "saelens-topk": lambda p: dicts.saelens(p / "d", "topk", k=7),
    "saelens-topk-legacy": lambda p: dicts.saelens(p / "d", "standard", k=6, legacy_topk=True),
    "saelens-batchtopk": lambda p: dicts.saelens(p / "d", "batchtopk"),
    "saelens-topk-rescaled": lambda p: dicts.saelens(p / "d", "topk", k=7, rescale_acts_by_decoder_norm=True),
    "saelens-batchtopk-rescaled": lambda p: dicts.saelens(p / "d", "batchtopk", rescale_acts_by_decoder_norm=True),
    "saelens-no-b_dec-input": lambda p: dicts.saelens(p / "d", "jumprelu", apply_b_dec_to_input=False),
    "saelens-constant-norm": lambda p: dicts.saelens(
        p / "d", "standard", normalize_activations="constant_norm_rescale"
    ),
    "saelens-transcoder": lambda p: dicts.saelens(p / "d", "transcoder", d_out=48),
    "saelens-jumprelu-transcoder": lambda p: dicts.saelens(p / "d", "jumprelu_transcoder"),
    "sparsify-topk": lambda p: dicts.sparsify(p / "layers.1", k=6),
    "sparsify-transcoder-skip": lambda p: dicts.sparsify(p / "layers.1", transcode=True, skip=True),
    "gemmascope": lambda p: dicts.gemmascope(p / "layer_1" / "width_1k" / "average_l0_5" / "params.npz"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_encodes_and_decodes_as_its_library(name, tmp_path):
    import torch

    path = FORMATS[name](tmp_path)
    d = dictionary_files.load(str(path)).first
    x = np.random.default_rng(1).normal(size=(2, 9, D_IN)).astype(np.float32)
    dev = encoder.DeviceDictionary(d, "cpu", "test")
    with torch.inference_mode():
        latents = dev.encode(torch.from_numpy(x))
        recon = dev.decode(latents, torch.from_numpy(x))
    expected = dicts.encode(path, x.reshape(-1, D_IN))
    assert (expected != 0).any() and (expected == 0).any(), "the test dictionary must have active and inactive latents"
    np.testing.assert_allclose(latents.reshape(-1, d.d_sae).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        recon.reshape(-1, d.d_out).numpy(), dicts.decode(path, expected, x.reshape(-1, D_IN)), rtol=1e-5, atol=1e-5
    )
    assert d.layer == 1 and len(d.sha256) == 64


def test_bfloat16_weights_are_read_exactly(tmp_path):
    """sparsify and SAELens often save bfloat16, which numpy lacks: widened bit-exactly to float32."""
    import torch
    from safetensors.torch import save_file

    folder = dicts.sparsify(tmp_path / "layers.1")
    from safetensors.numpy import load_file

    weights = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(str(folder / "sae.safetensors")).items()}
    save_file(weights, str(folder / "sae.safetensors"))
    d = dictionary_files.load(str(folder)).first
    np.testing.assert_array_equal(d.weights["W_enc"], weights["encoder.weight"].float().numpy().T)
    np.testing.assert_array_equal(d.weights["b_dec"], weights["b_dec"].float().numpy())


def test_a_folder_of_layers_and_what_it_describes(tmp_path):
    for layer in (0, 2):
        dicts.sparsify(tmp_path / "tc" / f"layers.{layer}.mlp", transcode=True, seed=layer)
    dset = dictionary_files.load(str(tmp_path / "tc"))
    assert dset.describe() == {
        "path": str(tmp_path / "tc"),
        "format": "sparsify",
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": 96,
        "transcoder": True,
        "hook": "layers.N.mlp",
        "layers": [0, 2],
        "k": 5,
    }
    assert list(dictionary_files.for_layers(dset, "s", None, [0, 1, 2, 3])) == [0, 2]
    assert list(dictionary_files.for_layers(dset, "s", (2,), [0, 1, 2, 3])) == [2]
    with pytest.raises(BadSpec, match=r"has no dictionary for layer 1 \(it has layers 0, 2\)"):
        dictionary_files.for_layers(dset, "s", "*", [0, 1, 2, 3])


def test_spec_grammar():
    spec = parse_spec("resid.out[6]+sae=path/to/sae_dir:topk=32,examples=20")
    assert (spec.name, spec.site, spec.layers, spec.kind, spec.dictionary, spec.reductions) == (
        "sae.resid.out",
        "resid.out",
        (6,),
        "sae",
        "path/to/sae_dir",
        {"topk": 32, "examples": 20, "hist": None},
    )
    spec = parse_spec("mlp.in[*]+transcoder=tc:threshold=0,nag=20")
    assert (spec.name, spec.layers, spec.reductions) == ("transcoder.mlp.in", "*", {"threshold": 0.0, "nag": 20})
    assert parse_spec("mlp.act[0-2,5]:topk=3").layers == (0, 1, 2, 5)
    assert parse_spec("resid.out+sae=d.py:ckpt:topk=3").dictionary == "d.py:ckpt"
    assert parse_spec("resid.out+sae=d.py:topk=3").dictionary == "d.py"
    assert parse_spec("mlp.act:threshold=1e+3").kind is None  # a '+' after the ':' is not a dictionary
    with pytest.raises(BadSpec, match=r"\+pca= is not a dictionary kind"):
        parse_spec("resid.out+pca=x")
    with pytest.raises(BadSpec, match=r"\[a\] is not a layer selector"):
        parse_spec("resid.out[a]:last")


def test_dictionary_names_and_options_in_the_grammar():
    spec = parse_spec("resid.out[3]+sae.wide=big:topk=32,encode_only,encode_dtype=bfloat16")
    assert (spec.name, spec.kind, spec.dictionary_name, spec.dictionary) == ("sae.wide.resid.out", "sae", "wide", "big")
    assert (spec.reductions, spec.encode_only, spec.encode_dtype) == ({"topk": 32}, True, "bfloat16")
    assert spec.reductions_text == "topk=32"  # options are not reductions
    plain = parse_spec("mlp.in+transcoder=tc:threshold=0")
    assert (plain.name, plain.encode_only, plain.encode_dtype) == ("transcoder.mlp.in", False, "float32")
    assert parse_spec("resid.out+sae=d.py:encode_only").dictionary == "d.py"  # an option is no checkpoint
    assert parse_spec("resid.out+sae=d.py:ck:encode_only").dictionary == "d.py:ck"
    names = [s.name for s in parse_specs(["resid.out+sae=a", "resid.out+sae.b=b", "resid.out:last"])]
    assert names == ["sae.resid.out", "sae.b.resid.out", "resid.out"]
    refusals = {
        "two dictionaries on one site would both be named 'sae.resid.out': give each its own name, e.g. "
        "resid.out+sae.wide=PATH (stored as site sae.wide.resid.out)": ["resid.out+sae=a", "resid.out[2]+sae=b"],
        "dictionary name 'a.b' has a '.'": ["resid.out+sae.a.b=x"],
        "+sae.= needs a name": ["resid.out+sae.=x"],
        "invalid dictionary name 'x!'": ["resid.out+sae.x!=a"],
        "encode_only is an option of dictionary sites: add": ["mlp.act:topk=3,encode_only"],
        "encode_dtype=int8 is not a dtype: use one of float32, bfloat16, float16": [
            "resid.out+sae=a:encode_dtype=int8"
        ],
        "'encode_only' takes no argument": ["resid.out+sae=a:encode_only=1"],
        "'encode_dtype' given twice": ["resid.out+sae=a:encode_dtype=float16,encode_dtype=float32"],
    }
    for message, texts in refusals.items():
        with pytest.raises((BadSpec, BadInput), match=re.escape(message)):
            parse_specs(texts)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("architecture", ["standard", "gated", "constant-norm"])
def test_the_encoder_runs_in_its_dtype(tmp_path, dtype, architecture):
    """Latents and reconstruction within the dtype's rounding of numpy's float64, every latent a value of the dtype."""
    import torch

    extra = {"normalize_activations": "constant_norm_rescale"} if architecture == "constant-norm" else {}
    path = dicts.saelens(tmp_path / "d", "standard" if extra else architecture, **extra)
    x = np.random.default_rng(1).normal(size=(18, D_IN)).astype(np.float32)
    dev = encoder.DeviceDictionary(dictionary_files.load(str(path)).first, "cpu", "test", dtype=dtype)
    with torch.inference_mode():
        latents = dev.encode(torch.from_numpy(x))
        recon = dev.decode(latents, torch.from_numpy(x))
    torch_dtype = getattr(torch, dtype)
    assert latents.dtype == recon.dtype == torch.float32
    assert torch.equal(latents.to(torch_dtype).float(), latents)
    tol = max(1e-5, 4 * torch.finfo(torch_dtype).eps)  # relative to the largest value
    expected = dicts.encode(path, x)
    np.testing.assert_allclose(latents.numpy(), expected, rtol=tol, atol=tol * np.abs(expected).max())
    expected_recon = dicts.decode(path, expected, x)
    np.testing.assert_allclose(recon.numpy(), expected_recon, rtol=tol, atol=tol * np.abs(expected_recon).max())


# -- capture ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captured(tmp_path_factory, sample_jsonl):
    """One run of llama-tiny: raw resid.out / mlp.in / mlp.down densely next to an SAE, a transcoder and a JumpReLU SAE."""
    from ingest.pipeline import ingest

    folder = tmp_path_factory.mktemp("dict")
    sae = dicts.saelens(folder / "sae", "topk", k=6)  # layer 1 from its cfg
    for layer in (0, 2):
        dicts.sparsify(folder / "tc" / f"layers.{layer}", transcode=True, skip=True, seed=layer)
    jump = dicts.gemmascope(folder / "gs" / "params.npz")
    sites = [
        "resid.out:dense",
        "mlp.in:dense",
        "mlp.down:dense",
        f"resid.out+sae={sae}:topk=4,examples=3",
        f"mlp.in+transcoder={folder / 'tc'}:threshold=0,nag=5",
        f"resid.in[3]+sae={jump}:abstopk=3,examples=2",
    ]
    ingest(
        folder / "wh",
        "config:llama-tiny",
        [str(sample_jsonl)],
        sites,
        run_id="r",
        batch_size=4,
        max_length=24,
        device="cpu",
        progress=False,
    )
    with warehouse.open(folder / "wh") as wh:
        yield wh, {"sae": sae, "tc": folder / "tc", "gs": jump}


def _dense(wh, site: str, layer: int, run: str = "r") -> tuple[np.ndarray, np.ndarray]:
    rows = wh.sql(
        "SELECT doc, pos, vec FROM vectors WHERE run_id = ? AND site = ? AND layer = ? AND pool = 'token' "
        "ORDER BY doc, pos",
        [run, site, layer],
    ).fetchall()
    return np.array([(d, p) for d, p, _ in rows]), np.array([v for _, _, v in rows], dtype=np.float32)


def _resid_in(wh, layer: int):
    """resid.in of layer L is resid.out of layer L - 1."""
    return _dense(wh, "resid.out", layer - 1)


def test_stored_latents_equal_a_numpy_encode_of_the_dense_capture(captured):
    wh, paths = captured
    keys, x = _dense(wh, "resid.out", 1)
    latents = dicts.encode(paths["sae"], x)
    # topk=4 of the latents per token: values (float16) and units.
    rows = wh.sql(
        "SELECT doc, pos, neuron, value FROM token_neurons WHERE run_id = 'r' AND site = 'sae.resid.out' AND layer = 1 "
        "ORDER BY doc, pos, value DESC, neuron"
    ).fetchall()
    by_token = {}
    for d, p, n, v in rows:
        by_token.setdefault((d, p), []).append((n, v))
    assert len(by_token) == len(keys)
    for (d, p), row in zip(keys, latents):
        stored = by_token[(d, p)]
        order = np.argsort(-row, kind="stable")[:4]
        assert sorted(n for n, _ in stored) == sorted(order.tolist())
        np.testing.assert_allclose([v for _, v in stored], np.sort(row[order])[::-1], rtol=2e-3, atol=1e-3)
    # exact neuron_stats over every token
    stats = wh.sql(
        "SELECT neuron, n_tokens, n_fired, sum, sum_sq, max FROM neuron_stats WHERE run_id = 'r' "
        "AND site = 'sae.resid.out' AND layer = 1 ORDER BY neuron"
    ).fetchnumpy()
    assert (stats["n_tokens"] == len(x)).all()
    np.testing.assert_array_equal(stats["n_fired"], (latents > 0).sum(0))
    np.testing.assert_allclose(stats["sum"], latents.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["sum_sq"], (latents**2).sum(0), rtol=1e-5, atol=1e-5)
    fired = latents.max(0) > 0
    np.testing.assert_allclose(np.asarray(stats["max"])[fired], latents.max(0)[fired], rtol=1e-5)
    # examples: per latent the 3 strongest tokens
    top = wh.sql(
        "SELECT neuron, rank, value FROM neuron_examples WHERE run_id = 'r' AND site = 'sae.resid.out' AND layer = 1 "
        "AND kind = 'top' ORDER BY neuron, rank"
    ).fetchall()
    expected = {n: np.sort(latents[:, n][latents[:, n] > 0])[::-1][:3] for n in range(latents.shape[1])}
    got: dict = {}
    for n, _, v in top:
        got.setdefault(n, []).append(v)
    assert set(got) == {n for n, e in expected.items() if len(e)}
    for n, values in got.items():
        np.testing.assert_allclose(values, expected[n], rtol=1e-5)


def test_threshold_and_abstopk_on_transcoders_and_jumprelu(captured):
    wh, paths = captured
    for layer in (0, 2):
        keys, x = _dense(wh, "mlp.in", layer)
        latents = dicts.encode(paths["tc"] / f"layers.{layer}", x)
        rows = wh.sql(
            "SELECT doc, pos, neuron, value FROM token_neurons WHERE run_id = 'r' AND site = 'transcoder.mlp.in' "
            "AND layer = ? ORDER BY doc, pos, neuron",
            [layer],
        ).fetchall()
        index = {tuple(k): i for i, k in enumerate(keys.tolist())}
        expected = sorted(
            (int(d), int(p), int(n)) for (d, p), row in zip(keys, latents) for n in np.flatnonzero(row > 0)
        )
        assert [(d, p, n) for d, p, n, _ in rows] == expected
        np.testing.assert_allclose(
            [v for *_, v in rows], [latents[index[(d, p)], n] for d, p, n, _ in rows], rtol=2e-3, atol=1e-3
        )
    keys, x = _resid_in(wh, 3)
    latents = dicts.encode(paths["gs"], x)
    stats = wh.sql(
        "SELECT n_fired, sum FROM neuron_stats WHERE run_id = 'r' AND site = 'sae.resid.in' AND layer = 3 "
        "ORDER BY neuron"
    ).fetchnumpy()
    np.testing.assert_array_equal(stats["n_fired"], (latents > 0).sum(0))
    np.testing.assert_allclose(stats["sum"], latents.sum(0), rtol=1e-5, atol=1e-5)


def _quality(latents, recon, target) -> dict:
    n = len(target)
    active = (latents != 0).sum(0)
    err = ((recon - target) ** 2).sum(-1)
    cos = (recon * target).sum(-1) / np.maximum(np.linalg.norm(recon, axis=-1) * np.linalg.norm(target, axis=-1), 1e-8)
    return {
        "n_tokens": n,
        "mean_l0": (latents != 0).sum() / n,
        "dead_share": (active == 0).mean(),
        "dense_share": (active / n > 0.1).mean(),
        "mse": err.sum() / target.size,
        "fvu": err.sum() / ((target - target.mean(0)) ** 2).sum(),
        "mean_cosine": cos.mean(),
    }


def test_quality_equals_numpy_and_polars(captured):
    wh, paths = captured
    sql = wh.pl("SELECT * FROM dictionary_quality('r')")
    twin = frames.dictionary_quality(wh, "r").collect()
    assert sql.columns == twin.columns and sql.shape == twin.shape
    for a, b in zip(sql.rows(), twin.rows()):
        for x, y in zip(a, b):
            assert x == y if x is None or isinstance(x, str) else x == pytest.approx(y, rel=1e-12)
    got = {(r["site"], r["layer"]): r for r in sql.iter_rows(named=True)}
    assert sorted(got) == [
        ("sae.resid.in", 3),
        ("sae.resid.out", 1),
        ("transcoder.mlp.in", 0),
        ("transcoder.mlp.in", 2),
    ]
    cases = [
        (("sae.resid.out", 1), paths["sae"], _dense(wh, "resid.out", 1)[1], None),
        (("sae.resid.in", 3), paths["gs"], _resid_in(wh, 3)[1], None),
    ]
    cases += [
        (
            ("transcoder.mlp.in", layer),
            paths["tc"] / f"layers.{layer}",
            _dense(wh, "mlp.in", layer)[1],
            _dense(wh, "mlp.down", layer)[1],
        )
        for layer in (0, 2)
    ]
    for key, path, x, target in cases:
        latents = dicts.encode(path, x)
        recon = dicts.decode(path, latents, x)
        expected = _quality(latents, recon, x if target is None else target.astype(np.float64))
        for column, value in expected.items():
            assert got[key][column] == pytest.approx(value, rel=1e-5, abs=1e-9), (key, column)


def test_the_dictionaries_table_records_each_layers_dictionary(captured):
    import hashlib

    wh, paths = captured
    rows = wh.pl(
        "SELECT site, layer, path, kind, format, architecture, encode_dtype, sha256, d_in, d_sae, d_out FROM dictionaries "
        "WHERE run_id = 'r' ORDER BY site, layer"
    )
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    tc = [paths["tc"] / f"layers.{i}" for i in (0, 2)]
    assert rows.rows() == [
        ("sae.resid.in", 3, str(paths["gs"]), "sae", "gemmascope", "jumprelu", "float32", sha(paths["gs"]), 64, 96, 64),
        (
            "sae.resid.out",
            1,
            str(paths["sae"]),
            "sae",
            "saelens",
            "topk",
            "float32",
            sha(paths["sae"] / "sae_weights.safetensors"),
            64,
            96,
            64,
        ),
        (
            "transcoder.mlp.in",
            0,
            str(tc[0]),
            "transcoder",
            "sparsify",
            "topk",
            "float32",
            sha(tc[0] / "sae.safetensors"),
            64,
            96,
            64,
        ),
        (
            "transcoder.mlp.in",
            2,
            str(tc[1]),
            "transcoder",
            "sparsify",
            "topk",
            "float32",
            sha(tc[1] / "sae.safetensors"),
            64,
            96,
            64,
        ),
    ]
    sites = wh.pl("SELECT site, layers, width FROM sites WHERE run_id = 'r' AND site LIKE '%.%.%' ORDER BY site").rows()
    assert sites == [("sae.resid.in", [3], 96), ("sae.resid.out", [1], 96), ("transcoder.mlp.in", [0, 2], 96)]


@pytest.fixture(scope="module")
def options_run(tmp_path_factory, sample_jsonl):
    """One run of llama-tiny with three dictionaries on resid.out[1] (one encode_only, one in bfloat16) and an
    encode_only transcoder, each stored densely next to the raw activation."""
    from ingest.pipeline import ingest

    folder = tmp_path_factory.mktemp("opts")
    paths = {
        "sae.a.resid.out": dicts.saelens(folder / "a", "topk", k=6, seed=1),
        "sae.b.resid.out": dicts.saelens(folder / "b", "jumprelu", seed=2),
        "sae.half.resid.out": dicts.saelens(folder / "c", "standard", seed=3),
        "transcoder.mlp.in": dicts.sparsify(folder / "tc" / "layers.1", transcode=True, seed=4),
    }
    sites = [
        "resid.out[1]:dense",
        "mlp.in[1]:dense",
        f"resid.out+sae.a={paths['sae.a.resid.out']}:dense",
        f"resid.out+sae.b={paths['sae.b.resid.out']}:dense,encode_only",
        f"resid.out+sae.half={paths['sae.half.resid.out']}:dense,encode_dtype=bfloat16",
        f"mlp.in+transcoder={folder / 'tc'}:dense,encode_only",
    ]
    ingest(folder / "wh", "config:llama-tiny", [str(sample_jsonl)], sites, run_id="o", batch_size=4, max_length=24,
           device="cpu", progress=False)  # fmt: skip
    with warehouse.open(folder / "wh") as wh:
        yield wh, paths


def test_two_dictionaries_on_one_site_each_store_numpys_latents(options_run):
    import torch

    wh, paths = options_run
    keys, x = _dense(wh, "resid.out", 1, "o")
    _, tc_in = _dense(wh, "mlp.in", 1, "o")
    for site, tol in (("sae.a.resid.out", 1e-5), ("sae.b.resid.out", 1e-5), ("sae.half.resid.out", 3.2e-2)):
        stored_keys, latents = _dense(wh, site, 1, "o")
        expected = dicts.encode(paths[site], x)
        assert (stored_keys == keys).all() and (expected != 0).any()
        np.testing.assert_allclose(latents, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=site)
        if site == "sae.half.resid.out":  # the bfloat16 encoder's values
            assert torch.equal(torch.from_numpy(latents).bfloat16().float(), torch.from_numpy(latents))
    _, latents = _dense(wh, "transcoder.mlp.in", 1, "o")
    expected = dicts.encode(paths["transcoder.mlp.in"], tc_in)
    np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-5)


def test_encode_only_sites_have_no_reconstruction_quality(options_run):
    wh, paths = options_run
    rows = {
        r[0]: r[1:]
        for r in wh.sql(
            "SELECT site, encode_dtype, sq_error, total_variance, cosine_sum FROM dictionaries WHERE run_id = 'o'"
        ).fetchall()
    }
    assert rows["sae.a.resid.out"][0] == "float32" and None not in rows["sae.a.resid.out"]
    assert rows["sae.b.resid.out"] == ("float32", None, None, None)
    assert rows["sae.half.resid.out"][0] == "bfloat16" and None not in rows["sae.half.resid.out"]
    assert rows["transcoder.mlp.in"] == ("float32", None, None, None)
    sql = wh.pl("SELECT * FROM dictionary_quality('o')")
    assert sql.rows() == frames.dictionary_quality(wh, "o").collect().rows()
    quality = {r["site"]: r for r in sql.iter_rows(named=True)}
    _, x = _dense(wh, "resid.out", 1, "o")
    latents = dicts.encode(paths["sae.b.resid.out"], x)
    b = quality["sae.b.resid.out"]
    assert (b["mse"], b["fvu"], b["mean_cosine"], b["delta_loss"]) == (None, None, None, None)
    assert b["mean_l0"] == pytest.approx((latents != 0).sum() / len(x), rel=1e-12)  # the encoder's figures stay
    assert quality["sae.a.resid.out"]["mse"] > 0


def test_encode_only_refuses_splice_before_the_model_loads(tmp_path, sample_jsonl, capsys, monkeypatch):
    from ingest import models
    from tests.cli_runner import run_cli

    sae = dicts.saelens(tmp_path / "d", "topk")
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model loaded"))
    code, out, err = run_cli(
        capsys, monkeypatch, "ingest", tmp_path / "wh", "--model", "config:qwen3-tiny", "--data", sample_jsonl,
        "--site", f"resid.out+sae={sae}:topk=3,encode_only", "--splice", "--quiet",
    )  # fmt: skip
    assert code == 2 and not out and err.count("\n") == 1 and "Traceback" not in err
    assert "--splice needs the decoder that" in err and "drop encode_only there, or --splice" in err
    assert not (tmp_path / "wh").exists()


@pytest.mark.parametrize("failure", ["raises", "non-finite"])
def test_a_dtype_the_device_cannot_run_is_refused_before_the_model_loads(
    tmp_path, sample_jsonl, capsys, monkeypatch, failure
):
    """No real CPU lacks float16 or bfloat16 in torch 2.13, so the device's failure is played by the encoder."""
    import torch

    from ingest import models
    from tests.cli_runner import run_cli

    real = encoder.DeviceDictionary._encode

    def device_without_float16(self, x):
        if self.dtype != torch.float16:
            return real(self, x)
        if failure == "raises":
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return real(self, x) * float("inf")

    monkeypatch.setattr(encoder.DeviceDictionary, "_encode", device_without_float16)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model loaded"))
    sae = dicts.saelens(tmp_path / "d", "standard")
    code, out, err = run_cli(
        capsys, monkeypatch, "ingest", tmp_path / "wh", "--model", "config:llama-tiny", "--data", sample_jsonl,
        "--device", "cpu", "--site", f"resid.out+sae={sae}:topk=3,encode_dtype=float16", "--quiet",
    )  # fmt: skip
    reason = "addmm_impl_cpu_" if failure == "raises" else "a trial encode gave non-finite values"
    assert code == 2 and not out and err.count("\n") == 1 and "Traceback" not in err
    assert "the cpu device cannot run the dictionary in float16 (" in err and reason in err
    assert "use encode_dtype=float32" in err
    assert not (tmp_path / "wh").exists()


def test_neuron_macros_on_a_dictionary_site_equal_their_twins(captured):
    wh, _ = captured
    calls = [
        ("layer_summary", ("r", "transcoder.mlp.in")),
        ("firing_rate", ("r", "sae.resid.out", 1)),
        ("selectivity", ("r", "sae.resid.out", 1)),
        ("activation_frequency", ("r", "transcoder.mlp.in")),
        ("top_contexts", ("r", "sae.resid.out", 1, "{unit}")),
        ("nag_profile", ("r", "transcoder.mlp.in")),
    ]
    unit = wh.sql(
        "SELECT min(neuron) FROM neuron_examples WHERE run_id = 'r' AND site = 'sae.resid.out' AND kind = 'top'"
    ).fetchall()[0][0]
    for name, args in calls:
        args = tuple(unit if a == "{unit}" else a for a in args)
        sql = wh.pl(f"SELECT * FROM {name}({', '.join(repr(a) for a in args)})")
        twin = getattr(frames, name)(wh, *args).collect()
        assert len(sql) > 0, name
        assert sql.columns == twin.columns, name
        for a, b in zip(sql.rows(), twin.rows()):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                if isinstance(x, float) and y is not None:
                    assert x == pytest.approx(y, rel=1e-9, nan_ok=True), name
                else:
                    assert x == y, name


def test_exact_and_damaged_adapters_on_tiny_qwen(tmp_path, sample_jsonl):
    """An adapter whose reconstruction is exact scores FVU 0 and cosine 1; a damaged one does not."""
    from ingest.models import load
    from ingest.pipeline import ingest

    path = dicts.adapter(tmp_path / "identity.py")
    sae = dicts.sparsify(tmp_path / "sp" / "layers.1", k=4)
    loaded = load("config:qwen3-tiny", "cpu")
    ingest(
        tmp_path / "wh",
        "config:qwen3-tiny",
        [str(sample_jsonl)],
        [
            f"resid.out[2]+sae={path}:topk=3",
            f"resid.in[2]+sae={path}:damaged:topk=3",
            f"attn.o+sae={sae.parent}:topk=4",
        ],
        run_id="q",
        batch_size=4,
        max_length=16,
        device="cpu",
        progress=False,
        logit_lens=True,
        loaded=loaded,
    )
    with warehouse.open(tmp_path / "wh") as wh:
        q = {r["site"]: r for r in wh.pl("SELECT * FROM dictionary_quality('q')").iter_rows(named=True)}
        arch = wh.pl("SELECT format, architecture FROM dictionaries WHERE site = 'sae.resid.out'").row(0)
        lens = wh.pl(
            "SELECT neuron, direction, rank, token_id, logit FROM neuron_logits WHERE run_id = 'q' "
            "AND site = 'sae.attn.o' AND layer = 1 ORDER BY neuron, direction, rank"
        )
        sql = wh.pl("SELECT * FROM neuron_logit_lens('q', 'sae.attn.o', 1, 3)")
        twin = frames.neuron_logit_lens(wh, "q", "sae.attn.o", 1, 3).collect()
    assert arch == ("adapter", "identity")
    assert q["sae.resid.out"]["fvu"] == pytest.approx(0, abs=1e-12) and q["sae.resid.out"][
        "mean_cosine"
    ] == pytest.approx(1)
    assert q["sae.resid.in"]["fvu"] > 0.1 and q["sae.resid.in"]["mean_l0"] == pytest.approx(64)
    # Feature logit lens: each latent's decoder row, times the final norm's weight, through the unembedding.
    _, _, w = dicts.read(sae)
    unembed = loaded.model.get_output_embeddings().weight.detach().double().numpy()
    norm = loaded.model.model.norm.weight.detach().double().numpy()
    logits = (w["W_dec"] * norm) @ unembed.T  # [latents, vocab]
    assert lens.height == 96 * 2 * 10
    for direction, sign in (("top", -1), ("bottom", 1)):
        part = lens.filter(pl.col("direction") == direction)
        expected = np.argsort(sign * logits, axis=1, kind="stable")[:, :10]
        np.testing.assert_array_equal(part["token_id"].to_numpy().reshape(96, 10), expected)
        np.testing.assert_allclose(
            part["logit"].to_numpy().reshape(96, 10), np.take_along_axis(logits, expected, 1), rtol=1e-4, atol=1e-5
        )
    assert sql.rows() == twin.rows() and sql.height > 0


def test_bad_dictionaries_are_one_line(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        dictionary_files.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no dictionary: expected cfg.json"):
        dictionary_files.load(str(tmp_path / "empty"))
    dicts.saelens(tmp_path / "m", "matryoshka")
    with pytest.raises(BadInput, match="unknown SAELens architecture 'matryoshka'"):
        dictionary_files.load(str(tmp_path / "m"))
    dicts.saelens(tmp_path / "ln", "standard", normalize_activations="layer_norm")
    with pytest.raises(BadInput, match="normalize_activations 'layer_norm' is not supported"):
        dictionary_files.load(str(tmp_path / "ln"))
    dicts.sparsify(tmp_path / "two" / "layers.1")
    dicts.sparsify(tmp_path / "two" / "layers.1.mlp")
    with pytest.raises(BadInput, match="two dictionaries for layer 1"):
        dictionary_files.load(str(tmp_path / "two"))
    single = dictionary_files.load(str(dicts.saelens(tmp_path / "s", "standard", hook_layer=None)))
    with pytest.raises(BadSpec, match=r"does not say its layer: give it, e.g. resid.out\[6\]"):
        dictionary_files.for_layers(single, "x", None, [0, 1])
    with pytest.raises(BadSpec, match="one dictionary .* for 4 layers"):
        dictionary_files.for_layers(single, "x", "*", [0, 1, 2, 3])


def test_dictionary_files_are_read_without_torch(tmp_path):
    """Every format is read and checked before the model loads, in a process that never imports torch."""
    paths = [str(make(tmp_path / name)) for name, make in FORMATS.items()]
    script = (
        "import sys\n"
        "from ingest import dictionary_files\n"
        f"formats = [dictionary_files.load(path).first.format for path in {paths!r}]\n"
        "print(' '.join(formats), 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [name.split("-")[0] for name in FORMATS] + ["False"]


def test_export_features_of_a_transcoder_round_trips(captured, tmp_path):
    """circuit-tracer's layout over real transcoder features: cantor ids over (layer, feature), packed = per-feature JSON."""
    from queries.export import cantor, read_feature, read_features, read_index, write_features

    wh, _ = captured
    written = write_features(wh, "r", "transcoder.mlp.in", tmp_path / "f")
    features, index = read_features(tmp_path / "f"), read_index(tmp_path / "f" / "packed")
    for layer in (0, 2):
        fired = [
            u
            for (u,) in wh.sql(
                "SELECT neuron FROM neuron_stats WHERE run_id = 'r' AND site = 'transcoder.mlp.in' "
                "AND layer = ? AND n_fired > 0 ORDER BY neuron",
                [layer],
            ).fetchall()
        ]
        assert written[layer] == len(fired) > 0
        for unit in fired:
            packed = read_feature(tmp_path / "f" / "packed", layer, unit, index)
            assert packed == features[cantor(layer, unit)] and (packed["layer"], packed["feature"]) == (layer, unit)


def _window_ce(model, x) -> float:
    import torch

    return float(
        torch.nn.functional.cross_entropy(model(input_ids=x).logits[0, :-1].double(), x[0, 1:], reduction="sum")
    )


def test_splice_delta_loss_exact_zero_and_damaged_against_torch(tmp_path, sample_jsonl):
    """--splice on tiny Qwen3: an exact reconstruction changes nothing (delta 0); a damaged one gives the delta
    that splicing it by hand into the same model gives."""
    import torch

    from ingest.models import load
    from ingest.pipeline import ingest

    path = dicts.adapter(tmp_path / "identity.py")
    loaded = load("config:qwen3-tiny", "cpu")
    ingest(
        tmp_path / "wh",
        "config:qwen3-tiny",
        [str(sample_jsonl)],
        [f"resid.out[1]+sae={path}:topk=2", f"resid.in[2]+sae={path}:damaged:topk=2"],
        run_id="s",
        batch_size=3,
        max_length=16,
        device="cpu",
        progress=False,
        splice=True,
        loaded=loaded,
    )
    with warehouse.open(tmp_path / "wh") as wh:
        q = {r["site"]: r for r in wh.pl("SELECT * FROM dictionary_quality('s')").iter_rows(named=True)}
        twin = frames.dictionary_quality(wh, "s").collect()
        windows = wh.sql(
            "SELECT doc, list(token_id ORDER BY pos) FROM tokens WHERE run_id = 's' GROUP BY doc, \"window\" "
            'ORDER BY doc, "window"'
        ).fetchall()
    assert twin.select("delta_loss").to_series().to_list() == pytest.approx(
        [q[s]["delta_loss"] for s in sorted(q)], rel=1e-9
    )
    assert q["sae.resid.out"]["delta_loss"] == pytest.approx(0, abs=1e-9)
    # by hand: each window alone (no padding), layer 2's input halved
    model = loaded.model
    clean = damaged = n = 0.0
    halve = lambda m, a, k: ((a[0] * 0.5, *a[1:]), k) if a else (a, dict(k, hidden_states=k["hidden_states"] * 0.5))  # noqa: E731
    with torch.inference_mode():
        for _, ids in windows:
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            clean += _window_ce(model, x)
            handle = model.model.layers[2].register_forward_pre_hook(halve, with_kwargs=True)
            damaged += _window_ce(model, x)
            handle.remove()
            n += len(ids) - 1
    assert q["sae.resid.in"]["n_tokens"] > 0 and q["sae.resid.in"]["ce_clean"] == pytest.approx(clean / n, rel=1e-5)
    assert q["sae.resid.in"]["delta_loss"] == pytest.approx((damaged - clean) / n, rel=1e-4, abs=1e-7)
    assert abs(q["sae.resid.in"]["delta_loss"]) > 1e-4


@pytest.mark.parametrize("transcode", [False, True])
def test_eleutherai_sparsify_itself_gives_whq_values(tmp_path, transcode):
    """Where eai-sparsify installs: its own loader and encoder on the same files give whq's latents and reconstruction."""
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install eai-sparsify)")
    import torch

    folder = dicts.sparsify(tmp_path / "layers.1", transcode=transcode, skip=transcode, k=6)
    theirs = sparsify.SparseCoder.load_from_disk(folder)
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(11, D_IN)).astype(np.float32))
    ours = encoder.DeviceDictionary(dictionary_files.load(str(folder)).first, "cpu", "test")
    with torch.inference_mode():
        encoded = theirs.encode(x)
        latents = torch.zeros(11, 96).scatter_(-1, encoded.top_indices, encoded.top_acts)
        np.testing.assert_allclose(ours.encode(x).numpy(), latents.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            ours.decode(ours.encode(x), x).numpy(), theirs(x).sae_out.numpy(), rtol=1e-5, atol=1e-5
        )


def test_bench_ingest_times_a_versus_configuration_in_the_same_alternation(tmp_path):
    from ingest.bench import bench_ingest

    sae = dicts.saelens(tmp_path / "d", "topk", k=4)
    result = bench_ingest(
        "config:qwen3-tiny",
        device="cpu",
        batch_size=2,
        seq_len=8,
        repeats=2,
        shard_tokens=16,
        sites=[f"resid.out+sae={sae}:topk=4"],
        versus=[f"resid.out+sae={sae}:topk=4,encode_only"],
        root=tmp_path,
    )
    figures = result.to_dict()
    assert len(result.plain_s) == len(result.capture_s) == len(result.versus_s) == 2
    assert figures["versus_speedup"] == pytest.approx(
        float(np.median(np.array(result.capture_s) / np.array(result.versus_s)))
    )
    assert figures["versus_ratio"] > 0 and figures["versus_sites"] == [f"resid.out+sae={sae}:topk=4,encode_only"]
    assert result.token_neuron_rows == 2 * 8 * 4 * result.batches_per_block * 2  # the main capture's blocks only
    assert any(line.startswith("ratio versus / plain") for line in result.lines())
    alone = bench_ingest(
        "config:qwen3-tiny", device="cpu", batch_size=1, seq_len=4, repeats=1, shard_tokens=4, root=tmp_path
    )
    assert alone.versus_ratio is None and not any("versus" in line for line in alone.lines())


def _saelens_own(sae_lens, path):
    """SAELens' own inference SAE for a folder: its loader, or for a BatchTopK training checkpoint (which it loads
    only for training) its own conversion, BatchTopKTrainingSAE.save_inference_model, then its loader."""
    import json

    import torch

    cfg = json.loads((path / "cfg.json").read_text())
    if cfg["architecture"] == "batchtopk":
        from safetensors.torch import load_file

        training = sae_lens.BatchTopKTrainingSAE(
            sae_lens.BatchTopKTrainingSAEConfig(
                d_in=cfg["d_in"],
                d_sae=cfg["d_sae"],
                k=cfg["k"],
                apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
                rescale_acts_by_decoder_norm=cfg.get("rescale_acts_by_decoder_norm", False),
            )
        )
        weights = load_file(str(path / "sae_weights.safetensors"))
        training.load_state_dict({k: v.float().reshape(training.state_dict()[k].shape) for k, v in weights.items()})
        training.save_inference_model(str(path.parent / "inference"))
        path = path.parent / "inference"
    return sae_lens.SAE.load_from_disk(str(path), device="cpu"), torch


@pytest.mark.parametrize("name", [n for n in FORMATS if n.startswith("saelens-")])
def test_sae_lens_itself_gives_whq_values(tmp_path, name):
    """SAELens' own loader and encoder (and decoder) on the same files give whq's latents and reconstruction."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[test]')")
    path = FORMATS[name](tmp_path)
    theirs, torch = _saelens_own(sae_lens, path)
    ours = encoder.DeviceDictionary(dictionary_files.load(str(path)).first, "cpu", "test")
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(11, D_IN)).astype(np.float32))
    with torch.inference_mode():
        latents = theirs.encode(x)
        assert (latents != 0).any() and (latents == 0).any()
        np.testing.assert_allclose(ours.encode(x).numpy(), latents.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            ours.decode(latents, x).numpy(), theirs.decode(latents).numpy(), rtol=1e-5, atol=1e-5
        )


def test_sae_lens_itself_encodes_the_stored_activations_to_the_stored_latents(options_run):
    """Two SAELens dictionaries on one site of one run: SAELens' encode of the stored resid.out equals each
    one's stored latents."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[test]')")
    import torch

    wh, paths = options_run
    _, x = _dense(wh, "resid.out", 1, "o")
    for site in ("sae.a.resid.out", "sae.b.resid.out"):
        theirs = sae_lens.SAE.load_from_disk(str(paths[site]), device="cpu")
        with torch.inference_mode():
            expected = theirs.encode(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_dense(wh, site, 1, "o")[1], expected, rtol=1e-5, atol=1e-5, err_msg=site)
