"""Document sources, streamed: .jsonl, .parquet (NAG's `web` format too) and .txt.

Each yields Document records in file order without loading the file into memory.
A bad record is an error naming the file and line, unless skip_bad counts and skips it.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from warehouse.errors import BadInput
from warehouse.names import check_documents
from warehouse.parts import file_sha256

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
    token_ids: list[int] | None = None  # a pre-tokenized document's ids, used as they are (text: for display)


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


# Columns stored as they are (documents table): their type is checked per record.
LABEL_COLUMNS = ("dataset", "role", "label", "message_role")
INT32_MAX = 2**31 - 1


def _unicode(value: str, where: str, column: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. JSON's "\ud800": Arrow cannot store it
        raise ValueError(f"{where}: column {column!r} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def id_text(value: object, column: str, where: str | None = None) -> str | None:
    """A document id read from a data column as text (None when absent). Only text and numbers are ids:
    str() of a list, a mapping or a boolean would make Python's spelling ('[1]', 'True') the id."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        place = f"{where}: " if where else ""
        raise ValueError(f"{place}column {column!r} must be text or a number, got {type(value).__name__}")
    return str(value)


def _record(row: dict, where: str, index: int, stem: str) -> Document:
    id_key = next((k for k in ID_COLUMNS if k in row), None)
    text_key = next((k for k in TEXT_COLUMNS if k in row), None)
    if text_key is None:
        raise ValueError(f"{where}: no text column (expected one of {', '.join(TEXT_COLUMNS)})")
    text = row[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: column {text_key!r} must be a string, got {type(text).__name__}")
    _unicode(text, where, text_key)
    for column in LABEL_COLUMNS:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: column {column!r} must be a string or null, got {type(value).__name__}")
        if value is not None:
            _unicode(value, where, column)
    message_index = row.get("message_index")
    if message_index is not None and (
        isinstance(message_index, bool) or not isinstance(message_index, int) or not 0 <= message_index <= INT32_MAX
    ):
        raise ValueError(
            f"{where}: column 'message_index' must be a whole number from 0 to {INT32_MAX} or null, got {message_index!r}"
        )
    given = id_text(row[id_key], id_key, where) if id_key is not None else None
    doc_id = _unicode(given, where, id_key) if given is not None else f"{stem}:{index}"
    meta = {k: v for k, v in row.items() if k not in {id_key, text_key, "dataset", "role", "label"}}
    return Document(doc_id, text, row.get("dataset"), row.get("role"), row.get("label"), meta)


def _line(raw: bytes, lineno: int) -> str:
    """One line as text; a UTF-8 byte order mark opening the file is not part of it."""
    text = raw.decode("utf-8")
    return text.removeprefix("\ufeff") if lineno == 1 else text


def _jsonl(path: Path, counter: SkipCounter) -> Iterator[Document]:
    with open(path, "rb") as fh:
        index = 0
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(_line(raw, lineno))
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object per line")
                doc = _record(row, where, index, path.stem)
            except UnicodeDecodeError:
                counter.bad(f"{where}: not UTF-8 text")
                continue
            except json.JSONDecodeError as err:
                counter.bad(f"{where}: invalid JSON ({err.msg})")
                continue
            except ValueError as err:  # ours name the line; json's own (a number too long to convert) do not
                counter.bad(str(err) if str(err).startswith(where) else f"{where}: {err}")
                continue
            index += 1
            yield doc


def _parquet(path: Path, counter: SkipCounter) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise BadInput(
            f"{path} is not a readable Parquet file ({str(err).splitlines()[0][:100]}): check the file"
        ) from None
    names = reader.schema_arrow.names
    if not any(c in names for c in TEXT_COLUMNS):
        raise BadInput(
            f"{path} has no text column (expected one of {', '.join(TEXT_COLUMNS)}; found {', '.join(names)})"
        )
    index = 0
    for rows in _row_batches(reader, path):
        for row in rows:
            try:
                doc = _record(row, f"{path} row {index}", index, path.stem)
            except ValueError as err:
                counter.bad(str(err))
                continue
            index += 1
            yield doc


def _row_batches(reader, path: Path) -> Iterator[list[dict]]:
    """The file's rows, a batch at a time; a damaged page, or a value Python cannot hold
    (a timestamp past year 9999), is one BadInput naming the file."""
    import pyarrow as pa

    batches = reader.iter_batches(batch_size=1024)
    while True:
        try:
            rows = next(batches).to_pylist()
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError, OverflowError) as err:
            raise BadInput(
                f"{path} is not a readable Parquet file ({str(err).splitlines()[0][:100]}): check the file"
            ) from None
        yield rows


def _txt(path: Path, counter: SkipCounter) -> Iterator[Document]:
    """Documents separated by blank lines; doc_id = <file stem>:<index>."""
    index, lines = 0, []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = _line(raw, lineno)
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


FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_paths(paths: list[str]) -> list[Path]:
    """The data files, each checked to be an existing, non-empty regular file of a known type."""
    if not paths:
        raise BadInput("no --data given: pass a .jsonl, .parquet or .txt file (or a --scenario)")
    out = []
    for text in paths:
        path = Path(text)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise BadInput(f"data file {path} does not exist: check the path") from None
        except OSError as err:  # a symlink loop, a path through a file, a name too long
            raise BadInput(f"data file {path} cannot be opened ({err.strerror or err}): check the path") from None
        if path.suffix not in READERS:
            raise BadInput(
                f"data file {path}: unsupported type {path.suffix or '(none)'}; use .jsonl, .parquet or .txt"
            )
        kind = next((name for test, name in FILE_KINDS if test(info.st_mode)), None)
        if kind is not None:
            # A pipe would be drained by the content hash, a directory cannot be read as records.
            raise BadInput(f"data file {path} is {kind}, not a regular file: give a .jsonl, .parquet or .txt file")
        if info.st_size == 0:
            raise BadInput(f"data file {path} is empty: give a file with at least one document")
        out.append(path)
    return out


def _count_documents(path: Path, counter: SkipCounter) -> int:
    return sum(1 for _ in READERS[path.suffix](path, counter))


def _readable(path: Path, action, *args):
    """`action(*args)`; an OS error reading `path` (permissions, I/O) is one BadInput naming the file."""
    try:
        return action(*args)
    except OSError as err:
        raise BadInput(f"cannot read data file {path} ({err.strerror or err}): check its permissions") from None


def scan(paths: list[Path], skip_bad: bool) -> list[dict]:
    """Read every file once before the run exists: its sha256 (what `--resume` checks) and every record.

    A bad record (unless skip_bad) is refused here, so a bad input never leaves an interrupted
    run behind. Returns per file its resolved path, size, sha256 and readable documents.
    """
    identity = []
    for path in paths:
        counter = SkipCounter(skip_bad)
        documents = _readable(path, _count_documents, path, counter)
        identity.append(
            {
                "path": str(path.resolve()),
                "bytes": path.stat().st_size,
                "sha256": _readable(path, file_sha256, path),
                "documents": documents,
            }
        )
    check_documents(paths, lambda path: read([path], SkipCounter(skip_bad)))
    return identity


def read(
    paths: list[Path], counter: SkipCounter, dataset: str | None = None, role: str | None = None
) -> Iterator[Document]:
    """All documents of all files in order; --dataset/--role fill what the records leave unset."""
    for path in paths:
        records = READERS[path.suffix](path, counter)
        while (doc := _readable(path, next, records, None)) is not None:
            doc.dataset = doc.dataset or dataset or path.stem
            doc.role = doc.role or role
            yield doc
