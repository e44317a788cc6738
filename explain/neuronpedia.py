"""`whq import explanations`: Neuronpedia's bulk explanation export onto the units of a run's site.

Neuronpedia publishes its explanations as {model}/{source}/explanations/batch-N.jsonl.gz (gzipped
JSON lines; docs.neuronpedia.org, "Exports"), one row of its Explanation table per line with the
columns queries.neuronpedia.EXPLANATION_FIELDS (neuronpedia-utils' export-data.py). Required here:
modelId, layer (Neuronpedia's source id, e.g. "20-gemmascope-res-16k"), index (the unit) and
description (the text); an explanation may carry its scores (`scores`, ExplanationScore records,
as Neuronpedia's API and `whq export neuronpedia` write them).

Each record becomes one row of `explanations` (explainer neuronpedia:<typeName>, model its
explanationModelName, the default recipe's settings so `whq score` can score it on held-out
examples, the Neuronpedia fields kept under settings.neuronpedia so an export writes it back as
read) and each score rows of `scores`. The whole file is read and checked first; one bad line stops
the import with one line naming it, and nothing is committed. The rows are committed in one step
into the run, like `whq explain`'s (explain.store.commit): a second import of the same explanations
replaces them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import math
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from queries.neuronpedia import EXPLANATION_FIELDS, IMPORTED, WHQ_TYPE
from warehouse import jsonio
from warehouse.errors import BadInput, NotFound

from . import prompts
from .pipeline import SCORERS, Recipe, _by_layer

BATCH = "neuronpedia"  # every import into a run shares one batch: a re-import replaces its rows
REQUIRED = ("modelId", "layer", "index", "description")
MAX_TEXT = 10_000  # characters of a description; Neuronpedia's are one sentence
# characters of one line: a description, a 256-float embedding and scores with their jsonDetails fit
# many times over; the bound keeps a line without end (a device, a decompression bomb) out of memory
MAX_LINE = 1_000_000
_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]{1,200}")
INT32 = 2**31 - 1  # Neuronpedia's Int columns (umap_cluster) and whq's counts are 32-bit
_SOURCE_LAYER = re.compile(r"(\d+)(?:-|$)", re.ASCII)


@dataclasses.dataclass
class Imported:
    explanations: int
    scores: int
    layers: list[int]
    other_sources: int  # records skipped by --source
    duplicates: int  # records whose explanation came earlier in the file (kept once, as Neuronpedia does)
    parts: int


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise NotFound(f"{path} does not exist: give a Neuronpedia explanations file (.jsonl.gz) or its folder")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
        if not found:
            raise BadInput(
                f"{path} holds no .jsonl or .jsonl.gz file: give Neuronpedia's explanations/ folder or a file"
            )
        return found
    if not stat.S_ISREG(path.stat().st_mode):  # a pipe or device would block or never end
        raise BadInput(f"{path} is not a regular file (a pipe or device?): copy the export to a file")
    return [path]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSON-lines file, gzipped or not (told by its first bytes)."""
    with open(path, "rb") as fh:
        zipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if zipped else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8", errors="strict") as fh:
            while line := fh.readline(MAX_LINE + 1):
                number += 1
                if len(line) > MAX_LINE:
                    raise BadInput(
                        f"{path} line {number}: over {MAX_LINE:,} characters, not one explanation: "
                        "is this Neuronpedia's explanations/ export?"
                    )
                yield number, line
    except (OSError, EOFError, zlib.error) as err:
        raise BadInput(
            f"{path}: not a readable gzip file ({err}): download it again (or gunzip it to see where it breaks)"
        ) from None
    except UnicodeDecodeError:
        raise BadInput(f"{path} line {number + 1}: not UTF-8 text: Neuronpedia's exports are UTF-8") from None


def _name(where: str, record: dict, field: str, required: bool = False) -> str | None:
    value = record.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BadInput(
            f"{where}: {field} {json.dumps(value)[:80]} must be text of 1 to 200 characters without control characters"
        )
    return value


def _text(where: str, value: object) -> str | None:
    if not isinstance(value, str):
        raise BadInput(f"{where}: description must be text, not {json.dumps(value)[:40]}")
    if len(value) > MAX_TEXT:
        raise BadInput(f"{where}: description of {len(value):,} characters (at most {MAX_TEXT:,}): not an explanation")
    bad = prompts.CONTROL.search(value)
    if bad:
        raise BadInput(
            f"{where}: description holds the control character {bad.group()!r}: remove it or the line (a damaged export?)"
        )
    return value.strip() or None


def _number(where: str, value: object, what: str = "a score's value") -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond a double
        number = math.inf
    if not math.isfinite(number):
        raise BadInput(f"{where}: {what} must be a finite number, not {_shown(value)}")
    return number


def _shown(value: object) -> str:
    """The start of `value` as JSON, for a message (an integer of thousands of digits is not spelled out)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return "an integer of more than 38 digits"
    return json.dumps(value)[:40]


def _load(where: str, text: str) -> object:
    """`text` parsed as JSON whose every string whq can store (UTF-8 has no lone surrogate, "\\ud800")."""
    value = json.loads(text)
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(
            f"{where}: text holds a lone surrogate escape (\\ud800 to \\udfff): not valid Unicode; remove the line"
        ) from None
    return value


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _score_rows(where, record, exp_id, neuron, now) -> list[dict]:
    scores = record.get("scores")
    if scores is None:
        return []
    if not isinstance(scores, list) or not all(isinstance(s, dict) for s in scores):
        raise BadInput(f"{where}: scores must be a list of ExplanationScore objects")
    rows = []
    for s in scores:
        kind = _name(where, s, "explanationScoreTypeName", required=True)
        model = _name(where, s, "explanationScoreModelName", required=True)
        score_id = _name(where, s, "id")
        details = s.get("jsonDetails", "")
        if not isinstance(details, str):
            raise BadInput(f"{where}: a score's jsonDetails must be text (JSON as a string)")
        base = dict(neuron=neuron, explanation_id=exp_id, model=model, created_at=now)
        scorer = kind[len(WHQ_TYPE) :] if kind.startswith(WHQ_TYPE) else None
        if scorer in SCORERS:  # written by `whq export neuronpedia`: every metric back
            try:
                kept = _load(where, details)
                metrics = {str(k): v for k, v in kept["metrics"].items()}
                counts = [kept.get("n_examples"), kept.get("n_unparsable")]
                if not isinstance(kept.get("settings", {}), dict) or not all(
                    c is None or (isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= INT32) for c in counts
                ):
                    raise TypeError("counts or settings of another type")
                if not all(_NAME.fullmatch(m) for m in metrics):
                    raise TypeError("a metric name that is not a name")
                stored = jsonio.dumps(kept.get("settings", {}) | {"neuronpedia": {"id": score_id}})
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
                raise BadInput(f"{where}: score {kind} has no whq metrics in its jsonDetails") from None
            for metric, v in metrics.items():
                rows.append(
                    base
                    | dict(
                        scorer=scorer,
                        metric=metric,
                        value=None if v is None else _number(where, v),
                        n_examples=kept.get("n_examples"),
                        n_unparsable=kept.get("n_unparsable"),
                        settings=stored,
                    )
                )
        else:
            kept = {
                "id": score_id or _hash(exp_id, kind, model),
                "initiatedByUserId": _name(where, s, "initiatedByUserId"),
                "jsonDetails": details,
            }
            rows.append(
                base
                | dict(
                    scorer=f"{IMPORTED}{kind}",
                    metric="value",
                    value=_number(where, s.get("value")),
                    n_examples=None,
                    n_unparsable=None,
                    settings=jsonio.dumps({"neuronpedia": kept}),
                )
            )
    return rows


def read_export(
    path: str | Path, layers: list[int], width: int, site: str, *, layer: int | None, source: str | None
) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]], int, int]:
    """Every explanation (and score) of the file(s) as (layer, row) pairs, checked; raises on the first bad line."""
    settings = Recipe().to_json()  # the split `whq score` holds out for test examples
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    explanations, scores, seen = [], [], set()
    other = duplicates = 0
    for file in _files(Path(path)):
        for number, line in _lines(file):
            if not line.strip():
                continue
            where = f"{file} line {number}"
            try:
                record = _load(where, line)
            except (ValueError, RecursionError) as err:
                why = (
                    err.msg
                    if isinstance(err, json.JSONDecodeError)
                    else "nested too deeply"
                    if isinstance(err, RecursionError)
                    else "a number of thousands of digits"
                )
                raise BadInput(f"{where}: not JSON ({why}): is this Neuronpedia's explanation export?") from None
            if not isinstance(record, dict):
                raise BadInput(f"{where}: not a JSON object: each line must be one Neuronpedia explanation")
            missing = [f for f in REQUIRED if f not in record]
            if missing:
                raise BadInput(
                    f"{where}: no {missing[0]!r} field: Neuronpedia's explanation export has {', '.join(REQUIRED)} on every line"
                )
            np_source = _name(where, record, "layer", required=True)
            _name(where, record, "modelId", required=True)
            if source is not None and np_source != source:
                other += 1
                continue
            index = record["index"]
            if isinstance(index, str) and index.isascii() and index.isdigit() and len(index) <= 20:
                index = int(index)
            if isinstance(index, bool) or not isinstance(index, int):
                raise BadInput(f"{where}: index {_shown(index)} is not a unit number")
            at = layer
            if at is None:
                found = _SOURCE_LAYER.match(np_source)
                if not found:
                    raise BadInput(f"{where}: Neuronpedia source {np_source!r} names no layer: give --layer")
                at = int(found.group(1))
            if at not in layers:
                raise BadInput(
                    f"{where}: source {np_source!r} is layer {at}, which site {site!r} does not have "
                    f"(layers {', '.join(map(str, layers))}): give --layer, or --source to import one source"
                )
            if not 0 <= index < width:
                raise BadInput(
                    f"{where}: unit {index} is not one of site {site!r}'s {width} units: is this the right --site or --source?"
                )
            text = _text(where, record["description"])
            kept = {k: record.get(k) for k in EXPLANATION_FIELDS if k not in ("embedding", "description")}
            for field in ("id", "authorId", "typeName", "explanationModelName"):
                kept[field] = _name(where, record, field)
            for field in ("umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity"):
                value = kept[field]  # kept as written: umap_cluster is an Int column in Neuronpedia
                if value is not None:
                    _number(where, value, field)
                    if field == "umap_cluster" and not (isinstance(value, int) and -INT32 - 1 <= value <= INT32):
                        raise BadInput(f"{where}: umap_cluster must be a whole number of 32 bits or null")
            kept["id"] = kept["id"] or _hash(
                record["modelId"], np_source, index, text, kept["typeName"], kept["explanationModelName"]
            )
            exp_id = _hash("neuronpedia", site, at, index, kept["id"])
            if exp_id in seen:
                duplicates += 1
                continue
            seen.add(exp_id)
            explanations.append(
                (
                    at,
                    dict(
                        neuron=index,
                        explanation_id=exp_id,
                        explainer=f"{IMPORTED}{kept['typeName'] or 'explanation'}",
                        model=kept["explanationModelName"] or "unknown",
                        text=text,
                        parsed=text is not None,
                        settings=jsonio.dumps(settings | {"neuronpedia": kept}),
                        prompt_hash=None,
                        embedding=None,
                        created_at=now,
                    ),
                )
            )
            scores += [(at, row) for row in _score_rows(where, record, exp_id, index, now)]
    if not explanations:
        which = f" of source {source!r}" if source is not None else ""
        raise BadInput(f"{path} holds no explanation{which}: check --source (the records' layer field)")
    return explanations, scores, other, duplicates


def import_explanations(
    wh,
    path: str | Path,
    run: str,
    site: str,
    *,
    layer: int | None = None,
    source: str | None = None,
    on_embedded: Callable[[int, int], None] | None = None,
) -> Imported:
    """Read a Neuronpedia explanation export (file or folder) and commit it onto `run`/`site` in one step."""
    from . import store
    from .embed import embed

    store.check_writable(wh)
    wh.manifest(run)
    rows = wh.sql(
        "SELECT layers, width FROM sites WHERE run_id = $run AND site = $site", {"run": run, "site": site}
    ).fetchall()
    if not rows:
        raise NotFound(f"run {run!r} has no site {site!r}: list its sites with `whq runs {wh.root}`")
    layers, width = list(rows[0][0]), rows[0][1]
    if layer is not None and layer not in layers:
        raise BadInput(f"--layer {layer}: site {site!r} of run {run!r} has layers {', '.join(map(str, layers))}")
    explanations, scores, other, duplicates = read_export(path, layers, width, site, layer=layer, source=source)
    texts = [(i, row["text"]) for i, (_, row) in enumerate(explanations) if row["text"] is not None]
    step = 256
    for start in range(0, len(texts), step):
        chunk = texts[start : start + step]
        for (i, _), vector in zip(chunk, embed([t for _, t in chunk])):
            explanations[i][1]["embedding"] = vector
        if on_embedded:
            on_embedded(start + len(chunk), len(texts))
    ids = [row["explanation_id"] for _, row in explanations]
    earlier = wh.sql(
        "SELECT DISTINCT explanation_id, scorer FROM scores WHERE run_id = $run AND site = $site "
        "AND list_contains($ids, explanation_id)",
        {"run": run, "site": site, "ids": ids},
    ).fetchall()
    redone = {(i, None) for i in ids} | set(earlier) | {(row["explanation_id"], row["scorer"]) for _, row in scores}
    parts = [(t, site, lay, data) for t, lay, data in _by_layer(explanations, "explanations")]
    parts += [(t, site, lay, data) for t, lay, data in _by_layer(scores, "scores")]
    written = store.commit(wh, run, BATCH, parts, redone)
    return Imported(
        explanations=len(explanations),
        scores=len(scores),
        layers=sorted({lay for lay, _ in explanations}),
        other_sources=other,
        duplicates=duplicates,
        parts=written,
    )
