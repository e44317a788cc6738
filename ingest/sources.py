"""Document sources, streamed: .jsonl, .parquet (NAG's `web` format too) and .txt.

Each yields Document records in file order without loading the file into memory.
A bad record is an error naming the file and line, unless skip_bad counts and skips it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from warehouse.errors import BadInput

ID_COLUMNS = ("doc_id", "docid", "id")
TEXT_COLUMNS = ("text", "doc", "content")
KNOWN = {"dataset", "role", "label", "token_num"}


@dataclass
class Document:
    doc_id: str
    text: str
    dataset: str | None = None
    role: str | None = None
    label: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class SkipCounter:
    skip_bad: bool = False
    skipped: int = 0
    first_error: str | None = None

    def bad(self, message: str) -> None:
        if not self.skip_bad:
            raise BadInput(message + "; fix it, or pass --skip-bad to skip bad records")
        self.skipped += 1
        self.first_error = self.first_error or message


def _record(row: dict, where: str, index: int, stem: str) -> Document:
    id_key = next((k for k in ID_COLUMNS if k in row), None)
    text_key = next((k for k in TEXT_COLUMNS if k in row), None)
    if text_key is None:
        raise ValueError(f"{where}: no text column (expected one of {', '.join(TEXT_COLUMNS)})")
    text = row[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: column {text_key!r} must be a string, got {type(text).__name__}")
    doc_id = str(row[id_key]) if id_key is not None and row[id_key] is not None else f"{stem}:{index}"
    meta = {k: v for k, v in row.items() if k not in {id_key, text_key, "dataset", "role", "label"}}
    return Document(doc_id, text, row.get("dataset"), row.get("role"), row.get("label"), meta)


def _jsonl(path: Path, counter: SkipCounter) -> Iterator[Document]:
    with open(path, "rb") as fh:
        index = 0
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object per line")
                doc = _record(row, where, index, path.stem)
            except UnicodeDecodeError:
                counter.bad(f"{where}: not UTF-8 text")
                continue
            except json.JSONDecodeError as err:
                counter.bad(f"{where}: invalid JSON ({err.msg})")
                continue
            except ValueError as err:
                counter.bad(str(err))
                continue
            index += 1
            yield doc


def _parquet(path: Path, counter: SkipCounter) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise BadInput(f"{path} is not a readable Parquet file ({str(err).splitlines()[0][:100]}): check the file") from None
    names = reader.schema_arrow.names
    if not any(c in names for c in TEXT_COLUMNS):
        raise BadInput(f"{path} has no text column (expected one of {', '.join(TEXT_COLUMNS)}; found {', '.join(names)})")
    index = 0
    for batch in reader.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            try:
                doc = _record(row, f"{path} row {index}", index, path.stem)
            except ValueError as err:
                counter.bad(str(err))
                continue
            index += 1
            yield doc


def _txt(path: Path, counter: SkipCounter) -> Iterator[Document]:
    """Documents separated by blank lines; doc_id = <file stem>:<index>."""
    index, lines = 0, []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                counter.bad(f"{path}:{lineno}: not UTF-8 text")
                continue
            if line.strip():
                lines.append(line)
                continue
            if lines:
                yield Document(f"{path.stem}:{index}", "".join(lines).rstrip("\n"))
                index, lines = index + 1, []
    if lines:
        yield Document(f"{path.stem}:{index}", "".join(lines).rstrip("\n"))


READERS = {".jsonl": _jsonl, ".json": _jsonl, ".parquet": _parquet, ".txt": _txt}


def check_paths(paths: list[str]) -> list[Path]:
    if not paths:
        raise BadInput("no --data given: pass a .jsonl, .parquet or .txt file (or a --scenario)")
    out = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise BadInput(f"data file {path} does not exist: check the path")
        if path.suffix not in READERS:
            raise BadInput(f"data file {path}: unsupported type {path.suffix or '(none)'}; use .jsonl, .parquet or .txt")
        if path.stat().st_size == 0:
            raise BadInput(f"data file {path} is empty: give a file with at least one document")
        out.append(path)
    return out


def read(paths: list[Path], counter: SkipCounter, dataset: str | None = None, role: str | None = None) -> Iterator[Document]:
    """All documents of all files in order; --dataset/--role fill what the records leave unset."""
    for path in paths:
        for doc in READERS[path.suffix](path, counter):
            doc.dataset = doc.dataset or dataset or path.stem
            doc.role = doc.role or role
            yield doc
