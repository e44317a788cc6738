"""`whq export neuronpedia`: the golden warehouse in Neuronpedia's import layout, each record
checked against Neuronpedia's published schema, and its values against the macros."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import pytest

import warehouse
from .cli_runner import run_cli

RUN, SITE = "g", "mlp.act"

# neuronpedia-utils' neuronpedia_utils/db_models/*.py (hijohnnylin/neuronpedia): the dataclasses
# its converters write and its importer passes to Prisma's create (which refuses unknown fields).
# Field -> type; fields without a default in the dataclass are required.
S, I, F, B, D = str, int, float, bool, datetime
L = list
SCHEMA = {
    "release.jsonl": ({"name": S, "description": S, "creatorName": S, "creatorId": S}, {
        "visibility": S, "isNewUi": B, "featured": B, "descriptionShort": Optional[S], "urls": L, "creatorEmail": Optional[S],
        "creatorNameShort": Optional[S], "defaultSourceSetName": Optional[S], "defaultSourceId": Optional[S],
        "defaultUmapSourceIds": L, "createdAt": D}),
    "model.jsonl": ({"id": S, "instruct": B, "creatorId": S}, {
        "displayNameShort": S, "displayName": S, "tlensId": Optional[S], "dimension": Optional[I], "visibility": S,
        "defaultSourceSetName": Optional[S], "defaultSourceId": Optional[S], "inferenceEnabled": B, "layers": I,
        "neuronsPerLayer": I, "createdAt": D, "owner": S, "updatedAt": D, "website": Optional[S]}),
    "sourceset.jsonl": ({"modelId": S, "name": S, "creatorId": S}, {
        "hasDashboards": B, "visibility": S, "description": S, "type": S, "creatorName": S, "urls": L,
        "creatorEmail": Optional[S], "releaseName": Optional[S], "defaultOfModelId": Optional[S], "defaultRange": I,
        "defaultShowBreaks": B, "showDfa": B, "showCorrelated": B, "showHeadAttribution": B, "showUmap": B, "createdAt": D}),
    "source.jsonl": ({"id": S, "modelId": S, "setName": S, "creatorId": S}, {
        "hasDashboards": B, "inferenceEnabled": B, "inferenceHosts": L, "saelensConfig": Optional[S],
        "saelensRelease": Optional[S], "saelensSaeId": Optional[S], "hfRepoId": Optional[S], "hfFolderId": Optional[S],
        "visibility": S, "defaultOfModelId": Optional[S], "hasUmap": B, "hasUmapLogSparsity": B, "hasUmapClusters": B,
        "num_prompts": Optional[I], "num_tokens_in_prompt": Optional[I], "dataset": Optional[S], "notes": Optional[S],
        "createdAt": D}),
    "features": ({"modelId": S, "layer": S, "index": S}, {
        "creatorId": Optional[S], "createdAt": D, "maxActApprox": Optional[F], "hasVector": B, "vector": L,
        "vectorLabel": Optional[S], "vectorDefaultSteerStrength": Optional[F], "hookName": Optional[S],
        "topkCosSimIndices": L, "topkCosSimValues": L, "neuron_alignment_indices": L, "neuron_alignment_values": L,
        "neuron_alignment_l1": L, "correlated_neurons_indices": L, "correlated_neurons_pearson": L,
        "correlated_neurons_l1": L, "correlated_features_indices": L, "correlated_features_pearson": L,
        "correlated_features_l1": L, "neg_str": L, "neg_values": L, "pos_str": L, "pos_values": L, "frac_nonzero": F,
        "freq_hist_data_bar_heights": L, "freq_hist_data_bar_values": L, "logits_hist_data_bar_heights": L,
        "logits_hist_data_bar_values": L, "decoder_weights_dist": L}),
    "activations": ({"id": S, "tokens": L, "index": S, "layer": S, "modelId": S, "maxValue": F, "maxValueTokenIndex": I,
                     "minValue": F, "values": L, "creatorId": S}, {
        "dataSource": Optional[S], "dataIndex": Optional[S], "dfaValues": L, "dfaTargetIndex": Optional[I],
        "dfaMaxValue": Optional[F], "createdAt": D, "lossValues": L, "logitContributions": Optional[S],
        "binMin": Optional[F], "binMax": Optional[F], "binContains": Optional[F], "qualifyingTokenIndex": Optional[I]}),
}


def _conforms(record: dict, kind: str) -> None:
    required, optional = SCHEMA[kind]
    fields = {**required, **optional}
    assert set(record) - set(fields) == set(), f"{kind}: fields Neuronpedia does not know"
    assert set(required) <= set(record), f"{kind}: required fields missing"
    for name, value in record.items():
        expected = fields[name]
        nullable = getattr(expected, "__origin__", None) is not None
        base = expected.__args__[0] if nullable else expected
        if value is None:
            assert nullable, (kind, name)
        elif base is D:
            datetime.fromisoformat(value)  # JSON carries the datetime as ISO 8601 text
        elif base is F:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (kind, name, value)
        else:
            assert isinstance(value, base) and not (base is I and isinstance(value, bool)), (kind, name, value)


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
    assert sorted(Path(p).relative_to(out).as_posix() for p in written) == ["tiny-qwen3/1-whq-mlp-act", "tiny-qwen3/3-whq-mlp-act"]
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
        assert len(mine) == top.height + wh.sql(
            f"SELECT count(*) FROM whq_examples('{RUN}', '{SITE}', 3, {unit}, 'random', 10, 24, 8, 0)").fetchall()[0][0]
        for row, record in zip(top.iter_rows(named=True), mine):
            assert len(record["tokens"]) == len(row["tokens"]) and "".join(record["tokens"]) in texts[row["doc_id"]]
            assert record["values"][record["qualifyingTokenIndex"]] == pytest.approx(row["value"])
            assert record["maxValue"] == max(record["values"]) == record["values"][record["maxValueTokenIndex"]]
        assert feature["maxActApprox"] == pytest.approx(top["value"][0], rel=1e-3)  # token_neurons keeps FLOAT16


def test_cli(golden_root, tmp_path, capsys, monkeypatch):
    code, stdout, err = run_cli(capsys, monkeypatch, "export", "neuronpedia", golden_root, "--run", RUN, "--site", "mlp.up",
                                "--out", tmp_path, "--layers", "0", "--set-name", "My Set")
    assert code == 0, err
    assert "wrote" in stdout and (tmp_path / "tiny-qwen3" / "0-my-set" / "features" / "batch-0.jsonl.gz").exists()
    code, _, err = run_cli(capsys, monkeypatch, "export", "neuronpedia", golden_root, "--run", RUN, "--site", "nope", "--out", tmp_path)
    assert code == 2 and "has no site 'nope'" in err and len(err.strip().splitlines()) == 1
