"""`whq export features`: transcoder-adapters' per-feature JSON and circuit-tracer's packed layout,
written from the committed golden warehouse and read back with queries.export's stdlib reader."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import warehouse
from queries.export import cantor, read_feature, read_features, read_index

from .cli_runner import run_cli

RUN, SITE = "g", "mlp.act"


@pytest.fixture(scope="module")
def exported(golden_root, tmp_path_factory) -> tuple[Path, warehouse.Warehouse]:
    from queries.export import write_features

    out = tmp_path_factory.mktemp("export") / "out"
    wh = warehouse.open(golden_root)
    write_features(wh, RUN, SITE, out, [1, 3], k=5, n_random=3, before=6, after=2, seed=1)
    yield out, wh
    wh.close()


def test_cantor_ids_are_unique_and_invertible():
    ids = {cantor(layer, feature): (layer, feature) for layer in range(40) for feature in range(300)}
    assert len(ids) == 40 * 300
    assert cantor(0, 0) == 0 and cantor(1, 0) == 1 and cantor(0, 1) == 2 and cantor(3, 5) == 41


def test_packed_layout_round_trips(exported):
    out, wh = exported
    features = read_features(out)
    index = read_index(out / "packed")
    assert (
        index["version"] == "1.0"
        and index["format"] == "variable_chunks"
        and set(index) - {"version", "format"} == {"1", "3"}
    )
    width = wh.sql("SELECT width FROM sites WHERE run_id = ? AND site = ?", [RUN, SITE]).fetchall()[0][0]
    fired = dict(
        ((layer, unit), n)
        for layer, unit, n in wh.sql(
            "SELECT layer, neuron, n_fired FROM neuron_stats WHERE run_id = ? AND site = ?", [RUN, SITE]
        ).fetchall()
    )
    for layer in (1, 3):
        assert len(index[str(layer)]["offsets"]) == width + 1
        for unit in range(width):
            packed = read_feature(out / "packed", layer, unit, index)
            if fired[(layer, unit)] == 0:
                assert packed is None and cantor(layer, unit) not in features
            else:
                assert packed == features[cantor(layer, unit)]
                assert (packed["layer"], packed["feature"]) == (layer, unit)
    assert {doc["layer"] for doc in features.values()} == {1, 3}
    # the binary entries are exactly the stdlib format: <u32 length><gzip(json)>
    raw = (out / "packed" / "layer_1.bin").read_bytes()
    start, end = index["1"]["offsets"][0], index["1"]["offsets"][1]
    length = int.from_bytes(raw[start : start + 4], "little")
    assert end - start == length + 4
    assert json.loads(gzip.decompress(raw[start + 4 : end])) == features[cantor(1, 0)] or fired[(1, 0)] == 0


def test_feature_json_holds_the_macros_answers(exported):
    out, wh = exported
    features = read_features(out)
    for unit in (0, 7, 64):
        doc = features.get(cantor(3, unit))
        if doc is None:
            continue
        assert set(doc) == {
            "top_logits",
            "bottom_logits",
            "act_min",
            "act_max",
            "examples_quantiles",
            "activation_frequency",
            "layer",
            "feature",
        }
        top = wh.pl(
            f"SELECT * FROM top_contexts('{RUN}', '{SITE}', 3, {unit}, k := 5, before := 6, after := 2)"
        ).to_dicts()
        sample = wh.pl(f"SELECT * FROM whq_examples('{RUN}', '{SITE}', 3, {unit}, 'random', 3, 6, 2, 1)").to_dicts()
        quantiles = {q["quantile_name"]: q["examples"] for q in doc["examples_quantiles"]}
        for rows, examples in ((top, quantiles["Top activations"]), (sample, quantiles["Random samples"])):
            assert len(examples) == len(rows)
            for row, example in zip(rows, examples):
                assert example["tokens"] == [t["text"] for t in row["tokens"]]
                assert example["tokens_acts_list"] == [t["value"] or 0.0 for t in row["tokens"]]
                assert example["tokens_acts_list"][example["train_token_ind"]] == row["value"]
                assert example["is_repeated_datapoint"] is False
        acts = [a for e in quantiles["Top activations"] + quantiles["Random samples"] for a in e["tokens_acts_list"]]
        assert (doc["act_min"], doc["act_max"]) == (min(acts), max(acts))
        rate = wh.sql(f"SELECT rate FROM firing_rate('{RUN}', '{SITE}', 3) WHERE neuron = {unit}").fetchall()[0][0]
        assert doc["activation_frequency"] == rate
        lens = wh.pl(f"SELECT * FROM neuron_logit_lens('{RUN}', '{SITE}', 3, {unit})")
        assert doc["top_logits"] == [t or "" for t in lens.filter(direction="top")["token"].to_list()]
        assert doc["bottom_logits"] == [t or "" for t in lens.filter(direction="bottom")["token"].to_list()]


def test_feature_metadata(exported):
    out, wh = exported
    meta = json.loads((out / "feature_metadata.json").read_text())
    assert meta["total_tokens"] == wh.sql("SELECT n_tokens FROM runs WHERE run_id = ?", [RUN]).fetchall()[0][0]
    assert meta["tokens_per_domain"] == dict(
        wh.sql(
            "SELECT dataset, sum(n_tokens)::BIGINT FROM documents WHERE run_id = ? GROUP BY dataset", [RUN]
        ).fetchall()
    )
    by_dataset = wh.pl(f"SELECT * FROM activation_frequency_by_dataset('{RUN}', '{SITE}')")
    assert {f["layer"] for f in meta["features"]} == {1, 3}
    for feature in meta["features"][:50]:
        assert feature["cantor_id"] == cantor(feature["layer"], feature["feature"])
        rows = by_dataset.filter(layer=feature["layer"], neuron=feature["feature"])
        assert feature["domain_density"] == dict(zip(rows["dataset"], rows["density"]))
        assert feature["domain_fraction"] == dict(zip(rows["dataset"], rows["fraction"]))
        # a threshold capture holds every firing: the per-dataset counts add up to the exact count
        assert rows["n_fired"].sum() == feature["activation_count"]


def test_cli_export_and_its_errors(golden_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    code, stdout, _ = run_cli(
        capsys,
        monkeypatch,
        "export",
        "features",
        golden_root,
        "--run",
        RUN,
        "--site",
        "mlp.up",
        "--out",
        out,
        "--layers",
        "0",
        "--top",
        "2",
        "--random",
        "1",
    )
    assert code == 0 and "wrote" in stdout and "layer 0" in stdout
    assert read_index(out / "packed").keys() == {"version", "format", "0"}
    code, _, err = run_cli(
        capsys, monkeypatch, "export", "features", golden_root, "--run", "nope", "--site", SITE, "--out", out
    )
    assert code == 2 and "error: no committed run 'nope'" in err
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "export",
        "features",
        golden_root,
        "--run",
        RUN,
        "--site",
        SITE,
        "--out",
        out,
        "--layers",
        "9",
    )
    assert code == 2 and "has no layer 9" in err
