"""`whq report`: Activation Lab's CSVs, and the offline HTML rendered by headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import warehouse

from . import dictionaries as dicts
from .browser import assert_charts_drawn, render
from .cli_runner import run_cli

SUMMARY = [
    "mean_cosine",
    "std_cosine",
    "median_cosine",
    "min_cosine",
    "most_divergent_layer",
    "mean_MAE",
    "std_MAE",
    "median_MAE",
    "max_MAE_layer",
    "mean_overlap",
    "std_overlap",
    "median_overlap",
    "min_overlap",
    "min_overlap_layer",
]
LAB_COLUMNS = {  # Activation Lab's compare_runs.py
    "comparison_report": [
        "state",
        "pair",
        "run_a",
        "run_b",
        "generated_a",
        "generated_b",
        "prompt_a",
        "prompt_b",
        "source",
        *SUMMARY,
    ],
    "comparison_cosines": [
        "state",
        "pair",
        "run_a",
        "run_b",
        "generated_a",
        "generated_b",
        "source",
        "layer",
        "cosine",
        "MAE",
        "overlap",
    ],
    "intra_run_report": ["run", "generated", "prompt", "source", *SUMMARY],
    "intra_run_cosines": ["run", "source", "layer", "cosine", "MAE", "overlap"],
}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "scenarios" / "emotions.yaml"


@pytest.fixture(scope="module")
def report_wh(tmp_path_factory):
    """The example emotion scenario on the tiny random Qwen3, and on a tiny Llama via the model override."""
    from ingest.chat import run_scenario

    root = tmp_path_factory.mktemp("report") / "wh"
    run_scenario(root, EXAMPLE, run_id="emo", device="cpu", progress=False)
    run_scenario(root, EXAMPLE, run_id="emo-llama", device="cpu", progress=False, model="config:llama-tiny")
    return root


@pytest.fixture(scope="module")
def report_files(report_wh, tmp_path_factory):
    from queries.report import write_report

    folder = tmp_path_factory.mktemp("out")
    write_report(
        warehouse.open(report_wh), "emo", folder / "report.html", csv_dir=folder / "csv", compare=["emo-llama"]
    )
    return folder


def test_csvs_have_activation_labs_columns(report_files, report_wh):
    for name, columns in LAB_COLUMNS.items():
        frame = pl.read_csv(report_files / "csv" / f"{name}.csv")
        assert frame.columns == columns, name
        assert frame.height > 0, name
    intra = pl.read_csv(report_files / "csv" / "intra_run_report.csv")
    assert sorted(intra["source"]) == ["attn_out", "hidden_in", "hidden_out", "mlp_down_out"]
    drift = warehouse.open(report_wh).pl("SELECT * FROM drift('emo') WHERE source = 'hidden_out'")
    row = intra.filter(pl.col("source") == "hidden_out").row(0, named=True)
    assert row["mean_cosine"] == round(drift["cosine"].mean(), 4)
    assert row["most_divergent_layer"] == drift["most_divergent_layer"][0]
    pairs = pl.read_csv(report_files / "csv" / "comparison_report.csv")
    assert set(pairs["state"]) == {"initial", "final"} and set(pairs["pair"]) == {"emo  vs  emo-llama"}


def test_report_is_self_contained(report_files):
    page = (report_files / "report.html").read_text()
    assert "vegaEmbed" in page and page.count('class="chart"') >= 6
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page), "the report must not load anything"


def test_report_renders_in_chromium(report_files, tmp_path):
    page = (report_files / "report.html").as_uri()
    dom = render(tmp_path, page, shot="scenario_report", window="1400,3000", budget_ms=20000, min_shot_bytes=10_000)
    assert_charts_drawn(dom, (report_files / "report.html").read_text().count('class="chart"'))


def test_report_cli(report_wh, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "report",
        report_wh,
        "--run",
        "emo",
        "--out",
        tmp_path / "r.html",
        "--csv",
        tmp_path / "csv",
    )
    assert code == 0, err
    assert (tmp_path / "r.html").exists() and len(list((tmp_path / "csv").glob("*.csv"))) == 4
    code, _, err = run_cli(capsys, monkeypatch, "report", report_wh, "--run", "nope")
    assert code == 2 and "no committed run 'nope'" in err and len(err.strip().splitlines()) == 1


def test_report_refuses_a_run_without_a_scenario(minilm_wh, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "report", minilm_wh, "--run", "r", "--out", tmp_path / "r.html")
    assert code == 2 and "not a scenario run" in err


@pytest.fixture(scope="module")
def dictionary_report(tmp_path_factory):
    """The example scenario with an SAE on resid.out (layer 1) and a transcoder on mlp.in (layers 0, 2), and its report."""
    import yaml

    from ingest.chat import run_scenario
    from queries.report import write_report

    folder = tmp_path_factory.mktemp("dict-report")
    sae = dicts.saelens(folder / "sae", "topk", k=6)
    for layer in (0, 2):
        dicts.sparsify(folder / "tc" / f"layers.{layer}", transcode=True, seed=layer)
    data = yaml.safe_load(EXAMPLE.read_text())
    data["capture"]["sites"] = [f"resid.out+sae={sae}:topk=4", f"mlp.in+transcoder={folder / 'tc'}:topk=4"]
    (folder / "s.yaml").write_text(yaml.safe_dump(data))
    run_scenario(folder / "wh", folder / "s.yaml", run_id="dict", device="cpu", progress=False)
    wh = warehouse.open(folder / "wh")
    write_report(wh, "dict", folder / "report.html", csv_dir=folder / "csv")
    return wh, folder


def test_report_on_dictionary_sites(dictionary_report, tmp_path):
    from queries.report import top_latents

    wh, folder = dictionary_report
    page = (folder / "report.html").read_text()
    for site in ("sae.resid.out", "transcoder.mlp.in"):
        for section in (
            "message × reference",
            "per-layer metrics vs references",
            "drift",
            "strongest at the final step",
        ):
            assert f"<h2>Latents of {site}: {section}</h2>" in page
    # The quality section: dictionary_quality's rows, without the splice columns this run has no values for.
    quality = page.split("<h2>Dictionary quality</h2>", 1)[1].split("<h2>", 1)[0]
    assert quality.count("<tr>") == 1 + 3 and "<th>fvu</th>" in quality and "delta_loss" not in quality
    for site, layer, fvu in wh.sql("SELECT site, layer, fvu FROM dictionary_quality('dict')").fetchall():
        assert f"<td>{site}</td><td>{layer}</td>" in quality and f"<td>{fvu:.4f}</td>" in quality
    # The strongest latents are the largest values of the final state, with the tokens their lens promotes.
    doc = wh.sql("SELECT max(doc) FROM documents WHERE run_id = 'dict' AND role = 'generated'").fetchall()[0][0]
    vec = wh.sql(
        "SELECT vec FROM vectors WHERE run_id = 'dict' AND site = 'sae.resid.out' AND doc = ? AND pool = 'last' "
        "ORDER BY step DESC LIMIT 1",
        [doc],
    ).fetchall()[0][0]
    top = top_latents(wh, "dict", "sae.resid.out", doc)
    values = np.array(vec)
    order = [i for i in np.lexsort((np.arange(len(values)), -values)) if values[i] > 0][:8]
    assert top["latent"].to_list() == order and np.allclose(top["value"].to_numpy(), values[order])
    lens = dict(
        wh.sql(
            "SELECT neuron, string_agg(text, ' ' ORDER BY rank) FROM neuron_logits WHERE run_id = 'dict' "
            "AND site = 'sae.resid.out' AND direction = 'top' AND rank < 3 GROUP BY neuron"
        ).fetchall()
    )
    assert top["promotes"].to_list() == [lens[i] for i in order]
    intra = pl.read_csv(folder / "csv" / "intra_run_report.csv")
    assert {"sae.resid.out", "transcoder.mlp.in"} <= set(intra["source"])
    dom = render(tmp_path, (folder / "report.html").as_uri(), shot="scenario_report_dictionaries", window="1400,5000")
    assert_charts_drawn(dom, page.count('class="chart"'))
    assert "Dictionary quality" in dom
