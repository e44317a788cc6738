"""`whq export neuronpedia`: the golden warehouse in Neuronpedia's import layout, each record
checked against Neuronpedia's published schema, and its values against the macros."""

from __future__ import annotations

import gzip
import json
import typing
from datetime import datetime
from pathlib import Path

import pytest

import warehouse

from .cli_runner import run_cli

RUN, SITE = "g", "mlp.act"

# neuronpedia-utils' neuronpedia_utils/db_models/*.py (hijohnnylin/neuronpedia): the dataclasses
# its converters write and its importer passes to Prisma's create (which refuses unknown fields).
# Field -> type; fields without a default in the dataclass are required.
STR, INT, NUM, BOOL, TIME, LIST = str, int, float, bool, datetime, list
SCHEMA = {
    "release.jsonl": (
        {"name": STR, "description": STR, "creatorName": STR, "creatorId": STR},
        {
            "visibility": STR,
            "isNewUi": BOOL,
            "featured": BOOL,
            "descriptionShort": STR | None,
            "urls": LIST,
            "creatorEmail": STR | None,
            "creatorNameShort": STR | None,
            "defaultSourceSetName": STR | None,
            "defaultSourceId": STR | None,
            "defaultUmapSourceIds": LIST,
            "createdAt": TIME,
        },
    ),
    "model.jsonl": (
        {"id": STR, "instruct": BOOL, "creatorId": STR},
        {
            "displayNameShort": STR,
            "displayName": STR,
            "tlensId": STR | None,
            "dimension": INT | None,
            "visibility": STR,
            "defaultSourceSetName": STR | None,
            "defaultSourceId": STR | None,
            "inferenceEnabled": BOOL,
            "layers": INT,
            "neuronsPerLayer": INT,
            "createdAt": TIME,
            "owner": STR,
            "updatedAt": TIME,
            "website": STR | None,
        },
    ),
    "sourceset.jsonl": (
        {"modelId": STR, "name": STR, "creatorId": STR},
        {
            "hasDashboards": BOOL,
            "visibility": STR,
            "description": STR,
            "type": STR,
            "creatorName": STR,
            "urls": LIST,
            "creatorEmail": STR | None,
            "releaseName": STR | None,
            "defaultOfModelId": STR | None,
            "defaultRange": INT,
            "defaultShowBreaks": BOOL,
            "showDfa": BOOL,
            "showCorrelated": BOOL,
            "showHeadAttribution": BOOL,
            "showUmap": BOOL,
            "createdAt": TIME,
        },
    ),
    "source.jsonl": (
        {"id": STR, "modelId": STR, "setName": STR, "creatorId": STR},
        {
            "hasDashboards": BOOL,
            "inferenceEnabled": BOOL,
            "inferenceHosts": LIST,
            "saelensConfig": STR | None,
            "saelensRelease": STR | None,
            "saelensSaeId": STR | None,
            "hfRepoId": STR | None,
            "hfFolderId": STR | None,
            "visibility": STR,
            "defaultOfModelId": STR | None,
            "hasUmap": BOOL,
            "hasUmapLogSparsity": BOOL,
            "hasUmapClusters": BOOL,
            "num_prompts": INT | None,
            "num_tokens_in_prompt": INT | None,
            "dataset": STR | None,
            "notes": STR | None,
            "createdAt": TIME,
        },
    ),
    "features": (
        {"modelId": STR, "layer": STR, "index": STR},
        {
            "creatorId": STR | None,
            "createdAt": TIME,
            "maxActApprox": NUM | None,
            "hasVector": BOOL,
            "vector": LIST,
            "vectorLabel": STR | None,
            "vectorDefaultSteerStrength": NUM | None,
            "hookName": STR | None,
            "topkCosSimIndices": LIST,
            "topkCosSimValues": LIST,
            "neuron_alignment_indices": LIST,
            "neuron_alignment_values": LIST,
            "neuron_alignment_l1": LIST,
            "correlated_neurons_indices": LIST,
            "correlated_neurons_pearson": LIST,
            "correlated_neurons_l1": LIST,
            "correlated_features_indices": LIST,
            "correlated_features_pearson": LIST,
            "correlated_features_l1": LIST,
            "neg_str": LIST,
            "neg_values": LIST,
            "pos_str": LIST,
            "pos_values": LIST,
            "frac_nonzero": NUM,
            "freq_hist_data_bar_heights": LIST,
            "freq_hist_data_bar_values": LIST,
            "logits_hist_data_bar_heights": LIST,
            "logits_hist_data_bar_values": LIST,
            "decoder_weights_dist": LIST,
        },
    ),
    "activations": (
        {
            "id": STR,
            "tokens": LIST,
            "index": STR,
            "layer": STR,
            "modelId": STR,
            "maxValue": NUM,
            "maxValueTokenIndex": INT,
            "minValue": NUM,
            "values": LIST,
            "creatorId": STR,
        },
        {
            "dataSource": STR | None,
            "dataIndex": STR | None,
            "dfaValues": LIST,
            "dfaTargetIndex": INT | None,
            "dfaMaxValue": NUM | None,
            "createdAt": TIME,
            "lossValues": LIST,
            "logitContributions": STR | None,
            "binMin": NUM | None,
            "binMax": NUM | None,
            "binContains": NUM | None,
            "qualifyingTokenIndex": INT | None,
        },
    ),
}


def _conforms(record: dict, kind: str) -> None:
    required, optional = SCHEMA[kind]
    fields = {**required, **optional}
    assert set(record) - set(fields) == set(), f"{kind}: fields Neuronpedia does not know"
    assert set(required) <= set(record), f"{kind}: required fields missing"
    for name, value in record.items():
        expected = fields[name]
        nullable = type(None) in typing.get_args(expected)
        base = typing.get_args(expected)[0] if nullable else expected
        if value is None:
            assert nullable, (kind, name)
        elif base is TIME:
            datetime.fromisoformat(value)  # JSON carries the datetime as ISO 8601 text
        elif base is NUM:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (kind, name, value)
        else:
            assert isinstance(value, base) and not (base is INT and isinstance(value, bool)), (kind, name, value)


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def exported(golden_root, tmp_path_factory):
    from queries.neuronpedia import write_neuronpedia

    out = tmp_path_factory.mktemp("np")
    wh = warehouse.open(golden_root)
    written = write_neuronpedia(wh, RUN, SITE, out, [1, 3], model_name="tiny-qwen3")
    yield out, wh, written
    wh.close()


def test_layout_and_schema(exported):
    out, wh, written = exported
    assert sorted(Path(p).relative_to(out).as_posix() for p in written) == [
        "tiny-qwen3/1-whq-mlp-act",
        "tiny-qwen3/3-whq-mlp-act",
    ]
    for folder in written:
        folder = Path(folder)
        for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"):
            (record,) = _lines(folder / name)
            _conforms(record, name)
        features = [r for p in sorted((folder / "features").glob("*.jsonl.gz")) for r in _lines(p)]
        activations = [r for p in sorted((folder / "activations").glob("*.jsonl.gz")) for r in _lines(p)]
        assert features and activations
        for record in features:
            _conforms(record, "features")
        for record in activations:
            _conforms(record, "activations")
        source = _lines(folder / "source.jsonl")[0]
        assert {r["layer"] for r in features + activations} == {source["id"]} and source["id"] == folder.name
        assert len({r["id"] for r in activations}) == len(activations)


def test_values_are_the_macros(exported):
    out, wh, written = exported
    folder = out / "tiny-qwen3" / "3-whq-mlp-act"
    features = {r["index"]: r for r in _lines(folder / "features" / "batch-0.jsonl.gz")}
    fired = wh.pl(f"SELECT * FROM firing_rate('{RUN}', '{SITE}', 3) WHERE n_fired > 0")
    assert sorted(map(int, features)) == fired["neuron"].to_list()
    activations = _lines(folder / "activations" / "batch-0.jsonl.gz")
    texts = dict(wh.sql(f"SELECT doc_id, text FROM documents WHERE run_id = '{RUN}'").fetchall())
    for unit in (0, 7, 64):
        feature = features[str(unit)]
        assert feature["frac_nonzero"] == fired.filter(neuron=unit)["rate"][0]
        lens = wh.pl(f"SELECT * FROM neuron_logit_lens('{RUN}', '{SITE}', 3, {unit})")
        assert feature["pos_values"] == lens.filter(direction="top")["logit"].to_list()
        assert feature["neg_values"] == lens.filter(direction="bottom")["logit"].to_list()
        top = wh.pl(f"SELECT * FROM top_contexts('{RUN}', '{SITE}', 3, {unit}, k := 20, before := 24, after := 8)")
        mine = [a for a in activations if a["index"] == str(unit)]
        assert (
            len(mine)
            == top.height
            + wh.sql(
                f"SELECT count(*) FROM whq_examples('{RUN}', '{SITE}', 3, {unit}, 'random', 10, 24, 8, 0)"
            ).fetchall()[0][0]
        )
        for row, record in zip(top.iter_rows(named=True), mine):
            assert len(record["tokens"]) == len(row["tokens"]) and "".join(record["tokens"]) in texts[row["doc_id"]]
            assert record["values"][record["qualifyingTokenIndex"]] == pytest.approx(row["value"])
            assert record["maxValue"] == max(record["values"]) == record["values"][record["maxValueTokenIndex"]]
        assert feature["maxActApprox"] == pytest.approx(top["value"][0], rel=1e-3)  # token_neurons keeps FLOAT16


def test_cli(golden_root, tmp_path, capsys, monkeypatch):
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "export",
        "neuronpedia",
        golden_root,
        "--run",
        RUN,
        "--site",
        "mlp.up",
        "--out",
        tmp_path,
        "--layers",
        "0",
        "--set-name",
        "My Set",
    )
    assert code == 0, err
    assert "wrote" in stdout and (tmp_path / "tiny-qwen3" / "0-my-set" / "features" / "batch-0.jsonl.gz").exists()
    code, _, err = run_cli(
        capsys, monkeypatch, "export", "neuronpedia", golden_root, "--run", RUN, "--site", "nope", "--out", tmp_path
    )
    assert code == 2 and "has no site 'nope'" in err and len(err.strip().splitlines()) == 1
