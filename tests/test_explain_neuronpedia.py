"""Neuronpedia's explanation export, both ways: `whq import explanations` reads it onto a run's units
(atomically, refusing bad files whole), the pages show and `whq score` scores what it read, and
`whq export neuronpedia` writes explanations and scores in the same format, so export -> import ->
export gives the same records."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import escape
from starlette.testclient import TestClient

import warehouse
from explain.neuronpedia import read_export
from queries.explanation_frames import HEADLINE
from queries.neuronpedia import EXPLANATION_FIELDS, SCORE_FIELDS
from queries.server import create_app
from warehouse.errors import BadInput

from .cli_runner import run_whq

RUN = "g"
HOSTILE = '<script>alert("x")</script> & "plural" nouns'


def np_explanation(n: int, index: int, source: str = "0-res-jb", scores: list | None = None, **changes) -> dict:
    """One line of Neuronpedia's explanation export (export-data.py's columns), with its scores as its API gives them."""
    record = {
        "id": f"cexp{n:021d}",
        "modelId": "gpt2-small",
        "layer": source,
        "index": str(index),
        "authorId": "clkht01d40000jv08hvalcvly",
        "description": f"explanation {n} of unit {index}",
        "embedding": None,
        "typeName": "oai_token-act-pair",
        "explanationModelName": "gpt-4o-mini",
        "umap_x": 0.25 * n,
        "umap_y": None,
        "umap_cluster": n,
        "umap_log_feature_sparsity": None,
        "scores": scores or [],
    }
    return record | changes


def np_score(n: int, explanation_id: str, value: float) -> dict:
    return {
        "id": f"cscore{n:019d}",
        "initiatedByUserId": "clkht01d40000jv08hvalcvly",
        "value": value,
        "explanationId": explanation_id,
        "explanationScoreTypeName": "eleuther_fuzz",
        "explanationScoreModelName": "claude-4-5-haiku",
        "jsonDetails": json.dumps([{"text": "a b", "prediction": True}]),
    }


def fixture_records() -> list[dict]:
    records = [
        np_explanation(1, 5, scores=[np_score(1, "cexp000000000000000000001", 0.75)]),
        np_explanation(2, 5, explanationModelName="claude-4-5-haiku"),
        np_explanation(3, 17, description=HOSTILE),
        np_explanation(4, 127, typeName="eleuther_acts_top20"),
        np_explanation(5, 9, source="1-res-jb"),
    ]
    return records


def write_jsonl(path: Path, records: list[dict], zipped: bool = True) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if zipped else text.encode())
    return path


def read_jsonl(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl.gz")) for line in gzip.open(f, "rt")]


def whq(*args) -> str:
    code, out, err = run_whq(*args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def imported(golden_root, tmp_path_factory):
    """A copy of the golden warehouse: the fixture export imported onto site mlp.up, and 3 units of
    mlp.act layer 0 explained by top-tokens and scored by embedding."""
    folder = tmp_path_factory.mktemp("np-import")
    root = folder / "wh"
    shutil.copytree(golden_root, root)
    export = write_jsonl(folder / "explanations" / "batch-0.jsonl.gz", fixture_records())
    out = whq("import", "explanations", root, export.parent, "--run", RUN, "--site", "mlp.up", "-q")
    whq("explain", root, "--run", RUN, "--site", "mlp.act", "--layers", "0", "--limit", "3", "-q")
    whq("score", root, "--run", RUN, "--site", "mlp.act", "--layers", "0", "--scorer", "embedding", "-q")
    return root, folder, out


def test_import_puts_each_record_on_its_unit(imported):
    root, _, out = imported
    assert out == "imported 5 explanations and 1 scores onto run g, site mlp.up, layers 0, 1\n"
    wh = warehouse.open(root)
    rows = wh.sql(
        "SELECT layer, neuron, explainer, model, text, parsed, len(embedding), settings FROM explanations "
        "WHERE site = 'mlp.up' ORDER BY layer, neuron, model"
    ).fetchall()
    expected = sorted(
        (int(r["layer"].split("-")[0]), int(r["index"]), f"neuronpedia:{r['typeName']}", r["explanationModelName"])
        + (r["description"],)
        for r in fixture_records()
    )
    assert [r[:5] for r in rows] == expected
    assert all(r[5] and r[6] == 384 for r in rows)
    kept = json.loads(rows[0][7])
    assert kept["n_explain"] == 20 and kept["neuronpedia"]["id"] == "cexp000000000000000000002"
    scores = wh.sql("SELECT neuron, scorer, model, metric, value FROM scores WHERE site = 'mlp.up'").fetchall()
    assert scores == [(5, "neuronpedia:eleuther_fuzz", "claude-4-5-haiku", "value", 0.75)]
    wh.close()


def test_import_again_replaces_and_source_selects(imported, tmp_path):
    root, folder, _ = imported
    copy = tmp_path / "wh"
    shutil.copytree(root, copy)
    out = whq(
        "import", "explanations", copy, folder / "explanations" / "batch-0.jsonl.gz", "--run", RUN,
        "--site", "mlp.up", "--source", "1-res-jb", "--layer", "2", "-q",
    )  # fmt: skip
    assert (
        out == "imported 1 explanations and 0 scores onto run g, site mlp.up, layers 2 (4 of other sources skipped)\n"
    )
    whq("import", "explanations", copy, folder / "explanations", "--run", RUN, "--site", "mlp.up", "-q")
    wh = warehouse.open(copy)
    counts = wh.sql(
        "SELECT layer, count(*) FROM explanations WHERE site = 'mlp.up' GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert counts == [(0, 4), (1, 1), (2, 1)]  # the second import of the file replaced the first's rows
    assert wh.sql("SELECT count(*) FROM scores WHERE site = 'mlp.up'").fetchall() == [(1,)]
    wh.close()
    assert whq("check", copy).endswith("all verify\n")


def test_a_bad_line_commits_nothing(imported, tmp_path):
    root, _, _ = imported
    copy = tmp_path / "wh"
    shutil.copytree(root, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*.parquet"))
    bad = write_jsonl(tmp_path / "bad.jsonl.gz", [np_explanation(9, 3), np_explanation(10, 500)])
    code, _, err = run_whq("import", "explanations", copy, bad, "--run", RUN, "--site", "mlp.act", "-q")
    assert (code, err) == (
        2,
        f"error: {bad} line 2: unit 500 is not one of site 'mlp.act''s 128 units: is this the right --site or --source?\n",
    )
    assert sorted(p.relative_to(copy) for p in copy.rglob("*.parquet")) == before


def test_imported_explanations_show_on_the_pages_as_text(imported):
    root, _, _ = imported
    wh = warehouse.open(root)
    with TestClient(create_app(wh, token="t"), base_url="http://127.0.0.1:8050") as client:
        page = client.get(f"/{RUN}/mlp.up/0/17").text
        assert "<script>alert" not in page and str(escape(HOSTILE)) in page
        assert "neuronpedia:oai_token-act-pair" in page
        page = client.get(f"/{RUN}/mlp.up/0/5").text
        assert "neuronpedia:eleuther_fuzz" in page and "explanation 1 of unit 5" in page
    wh.close()


def test_imported_explanations_are_scored_on_held_out_examples(imported, tmp_path):
    root, _, _ = imported
    copy = tmp_path / "wh"
    shutil.copytree(root, copy)
    whq(
        "score", copy, "--run", RUN, "--site", "mlp.up", "--layers", "0",
        "--explainer", "neuronpedia:oai_token-act-pair", "--scorer", "embedding", "-q",
    )  # fmt: skip
    wh = warehouse.open(copy)
    scored = wh.sql(
        "SELECT e.neuron, s.n_examples FROM scores s JOIN explanations e USING (explanation_id) "
        "WHERE s.scorer = 'embedding' AND e.site = 'mlp.up' ORDER BY ALL"
    ).fetchall()
    assert [n for n, _ in scored] == [5, 5, 17] and all(k > 0 for _, k in scored)
    wh.close()


def _export(root: Path, site: str, out: Path, layers=("0",)) -> dict[str, dict]:
    args = [a for layer in layers for a in ("--layers", layer)]
    whq("export", "neuronpedia", root, "--run", RUN, "--site", site, "--out", out, *args,
        "--model-name", "gpt2-small", "--set-name", "res-jb")  # fmt: skip
    records = read_jsonl(out / "gpt2-small" / "0-res-jb" / "explanations")
    return {r["id"]: r for r in records}


def test_export_writes_explanations_and_scores_in_neuronpedia_format(imported, tmp_path):
    root, _, _ = imported
    records = _export(root, "mlp.act", tmp_path / "out")
    wh = warehouse.open(root)
    explanations = wh.sql(
        "SELECT neuron, explanation_id, explainer, model, text FROM explanations WHERE site = 'mlp.act' AND layer = 0"
    ).fetchall()
    assert len(records) == len(explanations) == 3
    by_unit = {int(r["index"]): r for r in records.values()}
    for neuron, explanation_id, explainer, model, text in explanations:
        record = by_unit[neuron]
        assert list(record) == [*EXPLANATION_FIELDS, "scores"]
        assert (record["modelId"], record["layer"], record["description"]) == ("gpt2-small", "0-res-jb", text)
        assert (record["typeName"], record["explanationModelName"]) == (f"whq_{explainer}", model)
        metrics = dict(
            wh.sql(
                "SELECT metric, value FROM scores WHERE explanation_id = ? AND scorer = 'embedding'", [explanation_id]
            ).fetchall()
        )
        (score,) = record["scores"]
        assert list(score) == list(SCORE_FIELDS) and score["explanationId"] == record["id"]
        assert (score["explanationScoreTypeName"], score["explanationScoreModelName"]) == ("whq_embedding", "minilm")
        assert (
            score["value"] == metrics[HEADLINE["embedding"]] and json.loads(score["jsonDetails"])["metrics"] == metrics
        )
    wh.close()


def test_export_import_export_gives_the_same_records(imported, tmp_path):
    root, _, _ = imported
    first = _export(root, "mlp.act", tmp_path / "first")
    copy = tmp_path / "wh"
    shutil.copytree(root, copy)
    whq("import", "explanations", copy, tmp_path / "first" / "gpt2-small" / "0-res-jb" / "explanations",
        "--run", RUN, "--site", "mlp.up", "-q")  # fmt: skip
    again = _export(copy, "mlp.up", tmp_path / "again")
    whq_made = {k: v for k, v in again.items() if v["typeName"] == "whq_top-tokens"}
    assert whq_made == first
    wh = warehouse.open(copy)
    assert sorted(
        wh.sql("SELECT neuron, text FROM explanations WHERE site = 'mlp.act' AND layer = 0").fetchall()
    ) == sorted(
        wh.sql(
            "SELECT neuron, text FROM explanations WHERE site = 'mlp.up' AND explainer = 'neuronpedia:whq_top-tokens'"
        ).fetchall()
    )
    wh.close()


def test_imported_records_are_exported_as_read(imported, tmp_path):
    root, _, _ = imported
    exported = _export(root, "mlp.up", tmp_path / "out")
    fixture = {r["id"]: r for r in fixture_records() if r["layer"] == "0-res-jb"}
    assert exported == fixture


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = [*EXPLANATION_FIELDS, "scores"]


@settings(max_examples=150, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=4),
    score=st.dictionaries(st.sampled_from([*SCORE_FIELDS, "jsonDetails"]), _VALUES, max_size=4),
    dropped=st.sets(st.sampled_from(_FIELDS), max_size=2),
)
def test_any_malformed_record_is_refused_in_one_line_or_read(tmp_path_factory, changes, score, dropped):
    """Whatever a line holds, reading it either yields rows or refuses the file in one BadInput line."""
    good = np_score(1, "cexp000000000000000000001", 0.5) | {"explanationScoreTypeName": "whq_fuzz"} | score
    record = np_explanation(1, 5, scores=[good]) | changes
    for field in dropped:
        record.pop(field, None)
    path = write_jsonl(tmp_path_factory.mktemp("fuzz") / "x.jsonl.gz", [record])
    try:
        explanations, scores, _, _ = read_export(path, [0, 1], 128, "s", layer=None, source=None)
    except BadInput as err:
        assert "\n" not in str(err) and str(err).startswith(str(path))
    else:
        assert len(explanations) == 1 and all(0 <= row["neuron"] < 128 for _, row in explanations)
        assert all(isinstance(row["value"], float | None) for _, row in scores)


def _whq_score(details: str) -> dict:
    return np_score(1, "cexp000000000000000000001", 0.5) | {
        "explanationScoreTypeName": "whq_fuzz",
        "jsonDetails": details,
    }


_HOSTILE_LINES = [
    (
        json.dumps(np_explanation(1, 5)).replace('"explanation 1 of unit 5"', '"a\\ud800b"'),
        "text holds a lone surrogate escape (\\ud800 to \\udfff): not valid Unicode; remove the line",
    ),
    (
        json.dumps(np_explanation(1, 5, scores=[np_score(1, "c", 0.5) | {"jsonDetails": "x\ud800"}])),
        "text holds a lone surrogate escape (\\ud800 to \\udfff): not valid Unicode; remove the line",
    ),
    (
        json.dumps(np_explanation(1, 5, scores=[_whq_score('{"metrics": {"\\ud800": 1}}')])),
        "text holds a lone surrogate escape (\\ud800 to \\udfff): not valid Unicode; remove the line",
    ),
    (
        json.dumps(np_explanation(1, 5, scores=[np_score(1, "c", 10**400)])),
        "a score's value must be a finite number, not an integer of more than 38 digits",
    ),
    (
        json.dumps(np_explanation(1, 5, scores=[_whq_score(json.dumps({"metrics": {"a": 10**400}}))])),
        "a score's value must be a finite number, not an integer of more than 38 digits",
    ),
    (
        json.dumps(np_explanation(1, 5) | {"index": "9" * 5000}),
        'index "' + "9" * 39 + " is not a unit number",
    ),
    (
        json.dumps(np_explanation(1, 5)).replace('"5"', "9" * 5000, 1),
        "not JSON (a number of thousands of digits): is this Neuronpedia's explanation export?",
    ),
    (
        json.dumps(np_explanation(1, 5, umap_cluster=2**31)),
        "umap_cluster must be a whole number of 32 bits or null",
    ),
    (
        json.dumps(np_explanation(1, 5, source="\u0663-res-jb")),
        "Neuronpedia source '\u0663-res-jb' names no layer: give --layer",
    ),
    (
        json.dumps(np_explanation(1, 5, scores=[np_score(1, "c", 0.5) | {"id": "\x1b[2J"}])),
        'id "\\u001b[2J" must be text of 1 to 200 characters without control characters',
    ),
    (
        json.dumps(np_explanation(1, 5, scores=[_whq_score(json.dumps({"metrics": {"a": 1}, "n_examples": 2**31}))])),
        "score whq_fuzz has no whq metrics in its jsonDetails",
    ),
    (
        json.dumps(np_explanation(1, 5, scores=[_whq_score(json.dumps({"metrics": {"<b>\x1b[31m": 1}}))])),
        "score whq_fuzz has no whq metrics in its jsonDetails",
    ),
    (
        json.dumps(
            np_explanation(
                1, 5, scores=[_whq_score('{"metrics": {"a": 1}, "settings": {"x": ' + "[" * 900 + "]" * 900 + "}}")]
            )
        ),
        "score whq_fuzz has no whq metrics in its jsonDetails",
    ),
]


@pytest.mark.parametrize(("line", "message"), _HOSTILE_LINES)
def test_hostile_values_are_refused_before_anything_is_stored(tmp_path, line, message):
    """Values JSON holds but whq cannot store (a lone surrogate, an integer beyond a double or 32 bits, a
    deep nesting), or may not show (a control character in an id or metric name), stop in one line."""
    path = tmp_path / "x.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(BadInput) as refused:
        read_export(path, [0, 1, 3], 128, "s", layer=None, source=None)
    assert str(refused.value) == f"{path} line 1: {message}"


def test_non_finite_settings_of_a_whq_score_are_stored_as_strict_json(tmp_path):
    details = '{"metrics": {"balanced_accuracy": 0.5}, "settings": {"seed": NaN}}'
    path = write_jsonl(tmp_path / "x.jsonl.gz", [np_explanation(1, 5, scores=[_whq_score(details)])])
    _, scores, _, _ = read_export(path, [0], 128, "s", layer=None, source=None)
    assert [json.loads(row["settings"], parse_constant=pytest.fail) for _, row in scores] == [
        {"seed": None, "neuronpedia": {"id": "cscore0000000000000000001"}}
    ]


def test_a_pipe_a_device_and_an_endless_line_are_refused_in_bounded_memory(tmp_path):
    import os
    import tracemalloc

    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it would wait for a writer for ever
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")  # one line without end
    for name in ("pipe.jsonl", "zero.jsonl"):
        with pytest.raises(BadInput, match=f"^{tmp_path / name} is not a regular file"):
            read_export(tmp_path / name, [0], 128, "s", layer=None, source=None)
    bomb = tmp_path / "bomb.jsonl.gz"  # 256 KB compressed, 256 MB of one line uncompressed
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(b'{"description": "')
        for _ in range(256):
            fh.write(b"a" * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(BadInput, match="line 1: over 1,000,000 characters"):
            read_export(bomb, [0], 128, "s", layer=None, source=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # the line was never held whole
