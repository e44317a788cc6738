"""`whq export neuronpedia`: one run/site in the layout Neuronpedia's importer reads.

Neuronpedia imports a source (one layer of one model's SAE or neuron set) from

    {out}/{model}/{layer}-{set}/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one record each
        features/batch-{n}.jsonl.gz                                   one Neuron record per unit that fired
        activations/batch-{n}.jsonl.gz                                one Activation record per example

(its webapp's admin import route, and neuronpedia-utils' converters that write it). Every
record carries exactly the fields of neuronpedia-utils' `db_models` dataclasses, because the
importer hands each line to Prisma's `create`, which refuses unknown fields;
tests/test_neuronpedia.py checks them against that published schema. Values come from the
macros: frac_nonzero from firing_rate, pos/neg logits from neuron_logit_lens, activations
from whq_examples (top and random examples, the unit's value at every token of the window).
Records are reproducible: ids are hashes of (run, site, layer, unit, kind, rank) and every
createdAt is the run's own creation time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

from . import pages

CREATOR_ID = "clkht01d40000jv08hvalcvly"  # neuronpedia-utils' DEFAULT_CREATOR_ID (the local instance's default user)
BATCH = 4096
TOP_K, N_RANDOM = 20, 10
BEFORE, AFTER = 24, 8


def np_name(text: str) -> str:
    """Neuronpedia ids are lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _id(*parts) -> str:
    return "c" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:24]


def _jsonl_gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _jsonl(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")


def _activations(reader: pages.Reader, run, site, layer, model, source, created) -> dict[int, list[dict]]:
    per_unit: dict[int, list[dict]] = {}
    for kind, count in (("top", TOP_K), ("random", N_RANDOM)):
        for row in reader.rows("SELECT * FROM whq_examples(?, ?, ?, NULL, ?, ?, ?, ?, 0)", [run, site, layer, kind, count, BEFORE, AFTER]):
            values = [t["value"] if t["value"] is not None else 0.0 for t in row["tokens"]]
            at = min(row["pos"], BEFORE)
            per_unit.setdefault(row["neuron"], []).append({
                "id": _id(run, site, layer, row["neuron"], kind, row["rank"]),
                "tokens": [pages.token_text(t) for t in row["tokens"]],
                "index": str(row["neuron"]), "layer": source, "modelId": model,
                "maxValue": max(values), "maxValueTokenIndex": values.index(max(values)), "minValue": min(values),
                "values": values, "creatorId": CREATOR_ID,
                "dataSource": f"whq:{run}", "dataIndex": f"{row['doc_id']}:{row['pos']}",
                "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": created,
                "lossValues": [], "logitContributions": None, "binMin": None, "binMax": None, "binContains": None,
                "qualifyingTokenIndex": at,
            })
    return per_unit


def _feature(model, source, unit, rate, max_value, lens, created) -> dict:
    top = [r for r in lens if r["direction"] == "top"]
    bottom = [r for r in lens if r["direction"] == "bottom"]
    return {
        "modelId": model, "layer": source, "index": str(unit), "creatorId": CREATOR_ID, "createdAt": created,
        "maxActApprox": max_value, "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10,
        "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "neg_str": [r["token"] if r["token"] is not None else f"<{r['token_id']}>" for r in bottom],
        "neg_values": [r["logit"] for r in bottom],
        "pos_str": [r["token"] if r["token"] is not None else f"<{r['token_id']}>" for r in top],
        "pos_values": [r["logit"] for r in top],
        "frac_nonzero": rate, "freq_hist_data_bar_heights": [], "freq_hist_data_bar_values": [],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
    }


def write_neuronpedia(wh, run: str, site: str, out: str | Path, layers: list[int] | None = None,
                      model_name: str | None = None, set_name: str | None = None) -> dict:
    """Write one Neuronpedia source per layer; returns {source folder: units written}."""
    reader = pages.Reader(wh)
    try:
        info = pages.site_info(reader, run, site, layers)
        meta = reader.rows("SELECT model_id, n_layers, strftime(created_at, '%Y-%m-%dT%H:%M:%S.%f') AS created FROM runs WHERE run_id = ?", [run])[0]
        model = np_name(model_name or Path(meta["model_id"]).name)
        set_id = np_name(set_name or f"whq-{site}")
        created = meta["created"]
        written = {}
        for layer in info["layers"]:
            source = f"{layer}-{set_id}"
            folder = Path(out) / model / source
            folder.mkdir(parents=True, exist_ok=True)
            _jsonl(folder / "release.jsonl", {
                "name": set_id, "description": f"whq run {run}, site {site}", "creatorName": "whq", "creatorId": CREATOR_ID,
                "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": f"whq {run} {site}", "urls": [],
                "creatorEmail": None, "creatorNameShort": "whq", "defaultSourceSetName": set_id, "defaultSourceId": source,
                "defaultUmapSourceIds": [], "createdAt": created})
            _jsonl(folder / "model.jsonl", {
                "id": model, "instruct": False, "creatorId": CREATOR_ID, "displayNameShort": model, "displayName": meta["model_id"],
                "tlensId": None, "dimension": None, "visibility": "PUBLIC", "defaultSourceSetName": set_id,
                "defaultSourceId": source, "inferenceEnabled": False, "layers": meta["n_layers"], "neuronsPerLayer": info["width"],
                "createdAt": created, "owner": "", "updatedAt": created, "website": None})
            _jsonl(folder / "sourceset.jsonl", {
                "modelId": model, "name": set_id, "creatorId": CREATOR_ID, "hasDashboards": True, "visibility": "PUBLIC",
                "description": f"whq site {site} ({info['reductions']})", "type": "", "creatorName": "whq", "urls": [],
                "creatorEmail": None, "releaseName": set_id, "defaultOfModelId": None, "defaultRange": 1,
                "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
                "showUmap": False, "createdAt": created})
            _jsonl(folder / "source.jsonl", {
                "id": source, "modelId": model, "setName": set_id, "creatorId": CREATOR_ID, "hasDashboards": True,
                "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
                "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC", "defaultOfModelId": None,
                "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": None,
                "num_tokens_in_prompt": None, "dataset": f"whq:{run}", "notes": None, "createdAt": created})
            rates = reader.rows("SELECT f.neuron, f.n_fired, f.rate, s.max FROM firing_rate(?, ?, ?) f "
                                "JOIN neuron_stats s ON s.run_id = ? AND s.site = ? AND s.layer = ? AND s.neuron = f.neuron ORDER BY f.neuron",
                                [run, site, layer, run, site, layer])
            lens: dict[int, list[dict]] = {}
            for row in reader.rows("SELECT neuron, direction, rank, token_id, token, logit FROM neuron_logits "
                                   "WHERE run_id = ? AND site = ? AND layer = ? ORDER BY neuron, direction DESC, rank", [run, site, layer]):
                lens.setdefault(row["neuron"], []).append(row)
            activations = _activations(reader, run, site, layer, model, source, created)
            fired = [r for r in rates if r["n_fired"]]
            for batch, start in enumerate(range(0, max(len(fired), 1), BATCH)):
                chunk = fired[start:start + BATCH]
                _jsonl_gz(folder / "features" / f"batch-{batch}.jsonl.gz",
                          [_feature(model, source, r["neuron"], r["rate"], r["max"], lens.get(r["neuron"], []), created) for r in chunk])
                _jsonl_gz(folder / "activations" / f"batch-{batch}.jsonl.gz",
                          [a for r in chunk for a in activations.get(r["neuron"], [])])
            written[str(folder)] = len(fired)
        return written
    finally:
        reader.close()
