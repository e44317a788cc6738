"""`whq export neuronpedia`: one run/site in the layout Neuronpedia's importer reads.

Neuronpedia imports a source (one layer of one model's SAE or neuron set) from

    {out}/{model}/{layer}-{set}/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one record each
        features/batch-{n}.jsonl.gz                                   one Neuron record per unit that fired
        activations/batch-{n}.jsonl.gz                                one Activation record per example
        explanations/batch-{n}.jsonl.gz                               one Explanation record per explanation

(its webapp's admin import route, and neuronpedia-utils' converters that write it). Every
record carries exactly the fields of neuronpedia-utils' `db_models` dataclasses, because the
importer hands each line to Prisma's `create`, which refuses unknown fields;
tests/test_neuronpedia.py checks them against that published schema. Values come from the
pages' reads (page_data.unit_data): frac_nonzero and maxActApprox from unit_stats, pos/neg logits
from neuron_logits, the frequency histogram from unit_histograms, topkCosSim from similar_units
(output directions), activations from whq_examples (top, random) and quantile_examples (with
their bin as binMin/binMax, and binContains = the share of firing tokens up to the bin's top),
each with the unit's value at every token of its window.
Records are reproducible: ids are hashes of (run, site, layer, unit, kind, rank) and every
createdAt is the run's own creation time.

Explanations (whq explain, or imported by `whq import explanations`) are written as Neuronpedia's
bulk export writes them (neuronpedia-utils' export-data.py, `export_explanations`: the columns
EXPLANATION_FIELDS of its Explanation table), each with its scores in a `scores` list of
ExplanationScore records, the shape Neuronpedia's API gives an explanation. Neuronpedia's importer
keeps only the keys that are columns of its table, so `scores` does not stop it; `whq import
explanations` reads both, and an explanation it imported is written back as it was read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

from warehouse import jsonio
from warehouse.output import check_output_folder, output_folder

from . import page_data
from .explanation_frames import HEADLINE

CREATOR_ID = "clkht01d40000jv08hvalcvly"  # neuronpedia-utils' DEFAULT_CREATOR_ID (the local instance's default user)
BATCH = 4096

# Neuronpedia's explanation export: export-data.py's export_explanations writes these columns of its
# Explanation table (apps/webapp/prisma/schema.prisma), one row per line of explanations/batch-N.jsonl.gz.
EXPLANATION_FIELDS = (
    "id",
    "modelId",
    "layer",
    "index",
    "authorId",
    "description",
    "embedding",
    "typeName",
    "explanationModelName",
    "umap_x",
    "umap_y",
    "umap_cluster",
    "umap_log_feature_sparsity",
)
# Its ExplanationScore table's columns, as an explanation's `scores` carry them in Neuronpedia's API.
SCORE_FIELDS = (
    "id",
    "initiatedByUserId",
    "value",
    "explanationId",
    "explanationScoreTypeName",
    "explanationScoreModelName",
    "jsonDetails",
)
IMPORTED = "neuronpedia:"  # explainer and scorer names of what `whq import explanations` read
WHQ_TYPE = "whq_"  # typeName / explanationScoreTypeName of whq's own explainers and scorers


def np_name(text: str) -> str:
    """Neuronpedia ids are lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _id(*parts) -> str:
    return "c" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:24]


def _jsonl_gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as fh:
        for record in records:
            fh.write(jsonio.dumps(record, ascii=False) + "\n")


def _jsonl(path: Path, record: dict) -> None:
    path.write_text(jsonio.dumps(record, ascii=False) + "\n", encoding="utf-8")


def _activation(run, site, layer, unit, kind, index, row, model, source, created, bin_row=None) -> dict:
    values = [t["value"] if t["value"] is not None else 0.0 for t in row["tokens"]]
    return {
        "id": _id(run, site, layer, unit, kind, index),
        "tokens": [page_data.token_text(t) for t in row["tokens"]],
        "index": str(unit),
        "layer": source,
        "modelId": model,
        "maxValue": max(values),
        "maxValueTokenIndex": values.index(max(values)),
        "minValue": min(values),
        "values": values,
        "creatorId": CREATOR_ID,
        "dataSource": f"whq:{run}",
        "dataIndex": f"{row['doc_id']}:{row['pos']}",
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "createdAt": created,
        "lossValues": [],
        "logitContributions": None,
        # quantile examples: the bin's value range, and the share of firing tokens below its top
        "binMin": bin_row["lo"] if bin_row else None,
        "binMax": bin_row["hi"] if bin_row else None,
        "binContains": bin_row["share_hi"] if bin_row else None,
        "qualifyingTokenIndex": min(row["pos"], page_data.BEFORE),
    }


def _feature(model, source, unit, data, created) -> dict:
    stats, lens = data["stats"], data["lens"]
    histogram = [
        h for h in data["histogram"] if h["hi"] > 0 and h["count"]
    ]  # Neuronpedia's frequency histogram: positive values
    label = lambda r: r["token"] if r["token"] is not None else f"<{r['token_id']}>"  # noqa: E731
    return {
        "modelId": model,
        "layer": source,
        "index": str(unit),
        "creatorId": CREATOR_ID,
        "createdAt": created,
        "maxActApprox": stats["max"],
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": 10,
        "hookName": None,
        "topkCosSimIndices": [r["neuron"] for r in data["similar"]["decoder"]],
        "topkCosSimValues": [r["similarity"] for r in data["similar"]["decoder"]],
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "neg_str": [label(r) for r in lens["bottom"]],
        "neg_values": [r["logit"] for r in lens["bottom"]],
        "pos_str": [label(r) for r in lens["top"]],
        "pos_values": [r["logit"] for r in lens["top"]],
        "frac_nonzero": stats["rate"],
        "freq_hist_data_bar_heights": [h["count"] for h in histogram],
        "freq_hist_data_bar_values": [
            (max(h["lo"], 0.0) + h["hi"]) / 2 if h["hi"] != float("inf") else h["lo"] for h in histogram
        ],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
    }


def explanation_records(reader, run: str, site: str, layer: int, model: str, source: str) -> list[dict]:
    """The layer's explanations (those with a text) as Neuronpedia Explanation records with their scores.

    whq's own: typeName whq_<explainer>, explanationModelName its model, each scorer one score whose
    value is its headline metric (HEADLINE) and whose jsonDetails holds all its metrics and counts.
    Imported ones: their Neuronpedia fields and scores as read (kept in settings by the import)."""
    where = [run, site, layer]
    explanations = reader.rows(
        "SELECT neuron, explanation_id, explainer, model, text, settings FROM explanations "
        "WHERE run_id = ? AND site = ? AND layer = ? AND text IS NOT NULL ORDER BY neuron, explainer, model, explanation_id",
        where,
    )
    scores: dict[str, list[dict]] = {}
    for row in reader.rows(
        "SELECT explanation_id, scorer, model, metric, value, n_examples, n_unparsable, settings FROM scores "
        "WHERE run_id = ? AND site = ? AND layer = ? ORDER BY explanation_id, scorer, model, metric",
        where,
    ):
        scores.setdefault(row["explanation_id"], []).append(row)
    records = []
    for e in explanations:
        kept = json.loads(e["settings"] or "{}").get("neuronpedia")
        np_id = kept["id"] if kept else _id(run, site, layer, e["neuron"], "explanation", e["explanation_id"])
        record = {
            "id": np_id,
            "modelId": model,
            "layer": source,
            "index": str(e["neuron"]),
            "authorId": CREATOR_ID,
            "description": e["text"],
            "embedding": None,  # Neuronpedia's is its own 256-float model's; whq's MiniLM vector is not one
            "typeName": f"{WHQ_TYPE}{e['explainer']}",
            "explanationModelName": e["model"],
            "umap_x": None,
            "umap_y": None,
            "umap_cluster": None,
            "umap_log_feature_sparsity": None,
        }
        if kept:
            record.update({k: kept.get(k) for k in EXPLANATION_FIELDS if k not in ("id", "modelId", "layer", "index")})
            record["description"] = e["text"]
        record["scores"] = _score_records(np_id, e["explanation_id"], scores.get(e["explanation_id"], []))
        records.append(record)
    return records


def _score_records(np_id: str, explanation_id: str, rows: list[dict]) -> list[dict]:
    """One ExplanationScore per (scorer, model): an imported one as read, whq's with its headline value."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["scorer"], row["model"]), []).append(row)
    out = []
    for (scorer, model), metrics in groups.items():
        kept = json.loads(metrics[0]["settings"] or "{}").get("neuronpedia")
        if scorer.startswith(IMPORTED) and kept:
            record = {
                "id": kept["id"],
                "initiatedByUserId": kept.get("initiatedByUserId") or CREATOR_ID,
                "value": metrics[0]["value"],
                "explanationId": np_id,
                "explanationScoreTypeName": scorer[len(IMPORTED) :],
                "explanationScoreModelName": model,
                "jsonDetails": kept.get("jsonDetails", ""),
            }
        else:
            values = {m["metric"]: m["value"] for m in metrics}
            settings = json.loads(metrics[0]["settings"] or "{}")
            kept = settings.pop("neuronpedia", None)  # a whq score read back by `whq import explanations`
            details = {
                "metrics": values,
                "n_examples": metrics[0]["n_examples"],
                "n_unparsable": metrics[0]["n_unparsable"],
                "settings": settings,
            }
            record = {
                "id": kept["id"] if kept and kept.get("id") else _id(explanation_id, scorer, model),
                "initiatedByUserId": CREATOR_ID,
                "value": values.get(HEADLINE.get(scorer, "")),
                "explanationId": np_id,
                "explanationScoreTypeName": f"{WHQ_TYPE}{scorer}",
                "explanationScoreModelName": model,
                "jsonDetails": jsonio.dumps(details),
            }
        out.append(record)
    return out


def write_neuronpedia(
    wh,
    run: str,
    site: str,
    out: str | Path,
    layers: list[int] | None = None,
    model_name: str | None = None,
    set_name: str | None = None,
) -> dict:
    """Write one Neuronpedia source per layer; returns {source folder: units written}."""
    check_output_folder(out)
    reader = page_data.Reader(wh)
    try:
        info = page_data.site_info(reader, run, site, layers)
        meta = reader.rows(
            "SELECT model_id, n_layers, strftime(created_at, '%Y-%m-%dT%H:%M:%S.%f') AS created FROM runs WHERE run_id = ?",
            [run],
        )[0]
        model = np_name(model_name or Path(meta["model_id"]).name)
        set_id = np_name(set_name or f"whq-{site}")
        created = meta["created"]
        written = {}
        with output_folder(out, "whq export neuronpedia"):
            for layer in info["layers"]:
                source = f"{layer}-{set_id}"
                folder = Path(out) / model / source
                folder.mkdir(parents=True, exist_ok=True)
                _jsonl(
                    folder / "release.jsonl",
                    {
                        "name": set_id,
                        "description": f"whq run {run}, site {site}",
                        "creatorName": "whq",
                        "creatorId": CREATOR_ID,
                        "visibility": "PUBLIC",
                        "isNewUi": False,
                        "featured": False,
                        "descriptionShort": f"whq {run} {site}",
                        "urls": [],
                        "creatorEmail": None,
                        "creatorNameShort": "whq",
                        "defaultSourceSetName": set_id,
                        "defaultSourceId": source,
                        "defaultUmapSourceIds": [],
                        "createdAt": created,
                    },
                )
                _jsonl(
                    folder / "model.jsonl",
                    {
                        "id": model,
                        "instruct": False,
                        "creatorId": CREATOR_ID,
                        "displayNameShort": model,
                        "displayName": meta["model_id"],
                        "tlensId": None,
                        "dimension": None,
                        "visibility": "PUBLIC",
                        "defaultSourceSetName": set_id,
                        "defaultSourceId": source,
                        "inferenceEnabled": False,
                        "layers": meta["n_layers"],
                        "neuronsPerLayer": info["width"],
                        "createdAt": created,
                        "owner": "",
                        "updatedAt": created,
                        "website": None,
                    },
                )
                _jsonl(
                    folder / "sourceset.jsonl",
                    {
                        "modelId": model,
                        "name": set_id,
                        "creatorId": CREATOR_ID,
                        "hasDashboards": True,
                        "visibility": "PUBLIC",
                        "description": f"whq site {site} ({info['reductions']})",
                        "type": "",
                        "creatorName": "whq",
                        "urls": [],
                        "creatorEmail": None,
                        "releaseName": set_id,
                        "defaultOfModelId": None,
                        "defaultRange": 1,
                        "defaultShowBreaks": True,
                        "showDfa": False,
                        "showCorrelated": False,
                        "showHeadAttribution": False,
                        "showUmap": False,
                        "createdAt": created,
                    },
                )
                _jsonl(
                    folder / "source.jsonl",
                    {
                        "id": source,
                        "modelId": model,
                        "setName": set_id,
                        "creatorId": CREATOR_ID,
                        "hasDashboards": True,
                        "inferenceEnabled": False,
                        "inferenceHosts": [],
                        "saelensConfig": None,
                        "saelensRelease": None,
                        "saelensSaeId": None,
                        "hfRepoId": None,
                        "hfFolderId": None,
                        "visibility": "PUBLIC",
                        "defaultOfModelId": None,
                        "hasUmap": False,
                        "hasUmapLogSparsity": False,
                        "hasUmapClusters": False,
                        "num_prompts": None,
                        "num_tokens_in_prompt": None,
                        "dataset": f"whq:{run}",
                        "notes": None,
                        "createdAt": created,
                    },
                )
                with reader.scope(run, site, layer):
                    data = page_data.unit_data(reader, info, run, site, layer)
                fired = [unit for unit, d in data.items() if d["stats"]["n_fired"]]
                for batch, start in enumerate(range(0, max(len(fired), 1), BATCH)):
                    chunk = fired[start : start + BATCH]
                    _jsonl_gz(
                        folder / "features" / f"batch-{batch}.jsonl.gz",
                        [_feature(model, source, u, data[u], created) for u in chunk],
                    )
                    _jsonl_gz(
                        folder / "activations" / f"batch-{batch}.jsonl.gz",
                        [
                            _activation(
                                run,
                                site,
                                layer,
                                u,
                                kind,
                                i,
                                row,
                                model,
                                source,
                                created,
                                row if kind == "quantile" else None,
                            )
                            for u in chunk
                            for kind in ("top", "quantile", "random")
                            for i, row in enumerate(data[u]["examples"][kind])
                        ],
                    )
                if reader.explained(run, site):
                    explained = explanation_records(reader, run, site, layer, model, source)
                    for batch, start in enumerate(range(0, len(explained), BATCH)):
                        _jsonl_gz(folder / "explanations" / f"batch-{batch}.jsonl.gz", explained[start : start + BATCH])
                written[str(folder)] = len(fired)
        return written
    finally:
        reader.close()
