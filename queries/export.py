"""Feature exports for viewers: transcoder-adapters' per-feature JSON and circuit-tracer's packed layout.

`write_features` writes, for one run and site, under OUT:

    features/{cantor_id}.json   one file per unit that fired: top and random examples with
                                per-token activations, activation frequency, logit lens
    feature_metadata.json       total tokens, tokens per dataset, and per unit its activation
                                count, frequency and per-dataset density / fraction
    packed/layer_{l}.bin        the same JSON per unit, gzip-compressed, each entry a 4-byte
                                little-endian length then the gzip bytes, in unit order
    packed/index.json.gz        per layer its file name and n_units + 1 byte offsets (unit f
                                spans offsets[f]..offsets[f+1]; equal offsets: never fired)

cantor_id = (l + f)(l + f + 1) / 2 + f for layer l, unit f. The data come from the macros
(whq_examples, firing_rate, activation_frequency_by_dataset, neuron_logits); the files are
written and read with the standard library only (`read_feature`, `read_index`).
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import duckdb

from warehouse import jsonio
from warehouse.errors import BadInput, sql_error
from warehouse.names import check_name
from warehouse.output import check_output_folder, output_folder

TOP_K = 20
N_RANDOM = 10
BEFORE, AFTER = 50, 20
_LENGTH = struct.Struct("<I")


def cantor(layer: int, feature: int) -> int:
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def _rows(wh, query: str, params: list) -> list[dict]:
    rel = wh.sql(query, params)
    try:
        return [dict(zip(rel.columns, row)) for row in rel.fetchall()]
    except duckdb.Error as err:  # macros check their arguments when the rows are fetched
        raise sql_error(err) from None


def _examples(wh, run, site, layer, kind, count, before, after, seed) -> dict[int, list[dict]]:
    """Per unit, its examples in the circuit-tracer shape; a value not stored in token_neurons is 0."""
    per_unit: dict[int, list[dict]] = {}
    for row in _rows(
        wh,
        "SELECT * FROM whq_examples(?, ?, ?, NULL, ?, ?, ?, ?, ?)",
        [run, site, layer, kind, count, before, after, seed],
    ):
        per_unit.setdefault(row["neuron"], []).append(
            {
                "tokens": [t["text"] for t in row["tokens"]],  # as the tokenizer decodes each token
                "tokens_acts_list": [t["value"] if t["value"] is not None else 0.0 for t in row["tokens"]],
                # Every position of a document is stored, so the window starts at max(0, pos - before).
                "train_token_ind": min(row["pos"], before),
                "is_repeated_datapoint": False,
            }
        )
    return per_unit


def _logit_lens(wh, run, site, layer) -> dict[int, dict[str, list[str]]]:
    lens: dict[int, dict[str, list[str]]] = {}
    for row in _rows(
        wh,
        "SELECT neuron, direction, coalesce(text, token) AS token FROM neuron_logits "
        "WHERE run_id = ? AND site = ? AND layer = ? ORDER BY neuron, direction, rank",
        [run, site, layer],
    ):
        lens.setdefault(row["neuron"], {"top": [], "bottom": []})[row["direction"]].append(row["token"] or "")
    return lens


def feature_documents(
    wh,
    run: str,
    site: str,
    layer: int,
    *,
    k: int = TOP_K,
    n_random: int = N_RANDOM,
    before: int = BEFORE,
    after: int = AFTER,
    seed: int = 0,
) -> dict[int, dict]:
    """{unit: transcoder-adapters feature JSON} for the units of one layer that fired."""
    rates = _rows(wh, "SELECT * FROM firing_rate(?, ?, ?)", [run, site, layer])
    top = _examples(wh, run, site, layer, "top", k, before, after, 0)
    sample = _examples(wh, run, site, layer, "random", n_random, before, after, seed)
    lens = _logit_lens(wh, run, site, layer)
    documents = {}
    for rate in rates:
        unit = rate["neuron"]
        if rate["n_fired"] == 0:
            continue
        examples = top.get(unit, []) + sample.get(unit, [])
        acts = [a for example in examples for a in example["tokens_acts_list"]]
        documents[unit] = {
            "top_logits": lens.get(unit, {}).get("top", []),
            "bottom_logits": lens.get(unit, {}).get("bottom", []),
            "act_min": min(acts) if acts else 0.0,
            "act_max": max(acts) if acts else 1.0,
            "examples_quantiles": [
                {"quantile_name": "Top activations", "examples": top.get(unit, [])},
                {"quantile_name": "Random samples", "examples": sample.get(unit, [])},
            ],
            "activation_frequency": rate["rate"],
            "layer": layer,
            "feature": unit,
        }
    return documents


def _metadata(wh, run: str, site: str, layers: list[int]) -> dict:
    datasets = _rows(
        wh,
        "SELECT dataset, CAST(sum(n_tokens) AS BIGINT) AS n FROM documents WHERE run_id = ? "
        "GROUP BY dataset ORDER BY dataset",
        [run],
    )
    by_dataset: dict[tuple[int, int], list[dict]] = {}
    for row in _rows(wh, "SELECT * FROM activation_frequency_by_dataset(?, ?)", [run, site]):
        by_dataset.setdefault((row["layer"], row["neuron"]), []).append(row)
    features = []
    for layer in layers:
        for row in _rows(wh, "SELECT * FROM firing_rate(?, ?, ?)", [run, site, layer]):
            unit = row["neuron"]
            if row["n_fired"] == 0:
                continue
            per = by_dataset.get((layer, unit), [])
            features.append(
                {
                    "layer": layer,
                    "feature": unit,
                    "cantor_id": cantor(layer, unit),
                    "activation_count": row["n_fired"],
                    "activation_freq": row["rate"],
                    "domain_density": {str(r["dataset"]): r["density"] for r in per},
                    "domain_fraction": {str(r["dataset"]): r["fraction"] for r in per},
                }
            )
    total = _rows(wh, "SELECT n_tokens FROM runs WHERE run_id = ?", [run])[0]["n_tokens"]
    return {
        "run_id": run,
        "site": site,
        "total_tokens": total,
        "tokens_per_domain": {str(r["dataset"]): r["n"] for r in datasets},
        "features": features,
    }


def pack_entry(document: dict) -> bytes:
    data = gzip.compress(jsonio.dumps(document, compact=True).encode(), mtime=0)
    return _LENGTH.pack(len(data)) + data


def write_features(wh, run: str, site: str, out: str | Path, layers: list[int] | None = None, **options) -> dict:
    """Write the per-unit JSON, the metadata and the packed layout; returns counts per layer."""
    check_name("run id", run)
    check_name("site", site)
    check_output_folder(out)
    site_rows = _rows(
        wh,
        "SELECT layers, width FROM sites WHERE whq_known_site(?, ?) AND run_id = ? AND site = ?",
        [run, site, run, site],
    )
    captured, width = site_rows[0]["layers"], site_rows[0]["width"] or 0  # NULL: the run held no token
    layers = list(captured) if not layers else list(layers)
    missing = sorted(set(layers) - set(captured))
    if missing:
        raise BadInput(
            f"site {site!r} of run {run!r} has no layer {missing[0]}: its layers are {', '.join(map(str, captured))}"
        )
    with output_folder(out, "whq export features") as out:
        features_dir, packed_dir = out / "features", out / "packed"
        features_dir.mkdir(exist_ok=True)
        packed_dir.mkdir(exist_ok=True)
        index: dict = {"version": "1.0", "format": "variable_chunks"}
        written = {}
        for layer in layers:
            documents = feature_documents(wh, run, site, layer, **options)
            offsets = [0]
            with open(packed_dir / f"layer_{layer}.bin", "wb") as packed:
                for unit in range(width):
                    if unit in documents:
                        (features_dir / f"{cantor(layer, unit)}.json").write_text(jsonio.dumps(documents[unit]))
                        packed.write(pack_entry(documents[unit]))
                    offsets.append(packed.tell())
            index[str(layer)] = {"filename": f"layer_{layer}.bin", "offsets": offsets}
            written[layer] = len(documents)
        with gzip.open(packed_dir / "index.json.gz", "wt") as fh:
            fh.write(jsonio.dumps(index))
        jsonio.write(out / "feature_metadata.json", _metadata(wh, run, site, layers))
    return written


# -- reading ------------------------------------------------------------------------------------


def read_index(packed_dir: str | Path) -> dict:
    with gzip.open(Path(packed_dir) / "index.json.gz", "rt") as fh:
        return json.load(fh)


def read_feature(packed_dir: str | Path, layer: int, feature: int, index: dict | None = None) -> dict | None:
    """One unit's JSON from the packed layout; None for a unit that never fired."""
    index = index or read_index(packed_dir)
    entry = index[str(layer)]
    start, end = entry["offsets"][feature], entry["offsets"][feature + 1]
    if start == end:
        return None
    with open(Path(packed_dir) / entry["filename"], "rb") as fh:
        fh.seek(start)
        chunk = fh.read(end - start)
    (length,) = _LENGTH.unpack_from(chunk)
    return json.loads(gzip.decompress(chunk[_LENGTH.size : _LENGTH.size + length]))


def read_features(out: str | Path) -> dict[int, dict]:
    """{cantor_id: feature JSON} from a features/ folder."""
    return {int(path.stem): json.loads(path.read_text()) for path in (Path(out) / "features").glob("*.json")}
