"""Dataset sources read with the `datasets` library, streamed as Documents.

    --data hf:NAME[:CONFIG]          a Hub dataset (streamed; from the local cache with HF_DATASETS_OFFLINE=1),
                                     or hf:FOLDER, a local dataset repository (Parquet/JSONL files)
    --data FOLDER                    a `save_to_disk` folder, or a folder of .parquet/.jsonl/.txt shards
    --data 'shards/*.parquet'        a glob of shards

A plain file with a dataset option (--where, --shuffle, --text-column, ...) is read the same
way. Rows arrive in the dataset's order (or a seeded buffer shuffle of it), are filtered by
--where (a SQL boolean expression DuckDB evaluates over each Arrow batch, checked by sqlglot to
be a pure expression: columns, literals, operators and a few string functions, nothing that
reads, writes or runs code) and become Documents: the text column (or a pre-tokenized
`input_ids`/`tokens` column, kept as is), an id (the --id-column, else `<name>:<row>`, the
row's place in the stream before the filter) and the other columns as the document's meta.

`identity()` is what the run config stores as its data, the fingerprint `--resume` checks:
the source, its revision or content fingerprint, the split, filter, shuffle seed and columns.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from warehouse.errors import BadInput
from warehouse.names import document_label_problem

from .sources import ID_COLUMNS, INT32_MAX, Document, SkipCounter, id_text

HF_PREFIX = "hf:"
SHARD_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
TOKEN_COLUMNS = ("input_ids", "tokens")
TEXT_COLUMN = "text"
ROW_COLUMN = "__whq_row"  # the row's place in the (shuffled) stream, before --where
BATCH_ROWS = 1024
# save_to_disk writes these beside its Arrow files.
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a --data value's rows come from."""

    text: str  # as given
    kind: str  # hub | disk | files
    name: str  # Hub name or local repository folder (hub), folder (disk), or the glob / folder (files)
    config: str | None = None
    files: tuple[str, ...] = ()  # kind files: the shards, sorted

    @property
    def label(self) -> str:
        """The dataset label of its documents (when the rows carry none): the name, folder, or the glob's folder."""
        path = Path(self.name)
        return (path.parent.name if glob.has_magic(self.name) else path.name) or self.name


def is_dataset(text: str) -> bool:
    """A --data value read with `datasets` (not ingest/sources.py): hf:, a folder or a glob. A folder named
    like a data file (docs.jsonl/) is left to sources.py, which says it is not a file, and so is a file whose
    name holds glob characters (web[1].txt): an existing file is a file."""
    path = Path(text)
    if text.startswith(HF_PREFIX):
        return True
    if path.is_dir():
        return path.suffix not in SHARD_BUILDERS
    return glob.has_magic(text) and not path.exists()


def parse(text: str) -> DatasetSpec:
    """The spec of one --data value; a missing folder or an empty glob is one BadInput."""
    if text.startswith(HF_PREFIX):
        rest = text[len(HF_PREFIX) :]
        local = Path(rest)
        if local.is_dir():  # a folder can hold ':' in its name: it wins over NAME:CONFIG
            return DatasetSpec(text, "hub", str(local))
        name, _, config = rest.partition(":")
        if not name:
            raise BadInput(f"--data {text!r} names no dataset: use hf:NAME or hf:NAME:CONFIG")
        return DatasetSpec(text, "hub", name, config or None)
    path = Path(text)
    if path.is_dir():
        if any((path / marker).exists() for marker in DISK_MARKERS):
            return DatasetSpec(text, "disk", str(path))
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in SHARD_BUILDERS)
        if not files:
            raise BadInput(
                f"data folder {text} holds no save_to_disk dataset and no .parquet/.jsonl/.txt shards: check the path"
            )
        return DatasetSpec(text, "files", str(path), files=tuple(files))
    files = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
    if not files and not glob.has_magic(text) and path.is_file():
        files = [text]
    if not files:
        raise BadInput(f"--data {text!r} matches no file: check the path or glob")
    return DatasetSpec(text, "files", text, files=tuple(files))


def _builder(spec: DatasetSpec) -> str:
    kinds = {SHARD_BUILDERS.get(Path(f).suffix) for f in spec.files}
    if None in kinds or len(kinds) != 1:
        suffixes = ", ".join(sorted({Path(f).suffix or "(none)" for f in spec.files}))
        raise BadInput(
            f"--data {spec.text!r} mixes or holds unsupported shard types ({suffixes}): "
            "give shards of one type, .parquet, .jsonl or .txt"
        )
    return kinds.pop()


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _split_of(splits: list[str], split: str | None, spec: DatasetSpec) -> str:
    if split is None:
        if "train" in splits or len(splits) != 1:
            split = "train"
        else:
            split = splits[0]
    if split not in splits:
        raise BadInput(f"dataset {spec.text} has no split {split!r}: use --split with one of {', '.join(splits)}")
    return split


def load(spec: DatasetSpec, split: str | None, streaming: bool = True):
    """(dataset, split) with `datasets`: an IterableDataset when streaming, a Dataset otherwise (a save_to_disk
    folder is always a Dataset: its Arrow files are memory-mapped, and a row range of it reads only those rows)."""
    import datasets

    datasets.disable_progress_bars()  # the ingest has its own progress line
    # A repository's README.md without a YAML block is a plain dataset card: its warning was a line on stderr
    # at each of the several times `datasets` reads it, before any error's one line.
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)
    if spec.kind == "disk":
        try:
            loaded = datasets.load_from_disk(spec.name)
        except Exception as err:  # datasets raises several types for a damaged folder
            raise BadInput(f"dataset folder {spec.name} is not readable ({_one_line(err)}): check the folder") from None
        if isinstance(loaded, datasets.DatasetDict):
            split = _split_of(list(loaded), split, spec)
            loaded = loaded[split]
        elif split not in (None, "train"):
            raise BadInput(f"dataset {spec.text} has no splits (it is one dataset): drop --split {split}")
        return loaded, split or "train"
    if spec.kind == "files":
        if split not in (None, "train"):
            raise BadInput(f"shard files {spec.text} form one split, train: drop --split {split}")
        builder = _builder(spec)
        extra = {"sample_by": "paragraph"} if builder == "text" else {}  # documents end at a blank line
        if builder == "parquet":  # its default, the first row group's rows, is 0 for a shard of no rows: refused
            extra = {"batch_size": BATCH_ROWS}
        return _load_dataset(spec, builder, data_files=list(spec.files), split="train", streaming=streaming, **extra)
    try:
        import datasets

        splits = datasets.get_dataset_split_names(spec.name, spec.config)
    except Exception as err:
        raise BadInput(
            f"dataset {spec.text} cannot be opened ({_one_line(err)}): check the name, or set "
            "HF_DATASETS_OFFLINE=1 to read it from the local cache"
        ) from None
    split = _split_of(splits, split, spec)
    builder = _hub_builder(spec)
    if builder is not None and Path(spec.name).is_dir():
        _refuse_unread_shards(spec, builder)
    name = builder.name if builder is not None else None
    extra = {"batch_size": BATCH_ROWS} if name == "parquet" else {}
    if name == "text" and Path(spec.name).is_dir():  # a local repository's .txt files read as a folder's are
        extra = {"sample_by": "paragraph"}
    return _load_dataset(spec, spec.name, spec.config, split=split, streaming=streaming, **extra)


def _hub_builder(spec: DatasetSpec):
    """The builder `datasets` reads a Hub dataset or repository folder with (its name: parquet, json, ...), None
    when it cannot say: Parquet repositories are read in batches of BATCH_ROWS, as Parquet shards are."""
    import datasets

    try:
        return datasets.load_dataset_builder(spec.name, spec.config)
    except Exception:  # load_dataset then names what is wrong in one line
        return None


def _refuse_unread_shards(spec: DatasetSpec, builder) -> None:
    """A repository folder without a README.md (whose `configs` would name its files) is read with the builder
    of its most common shard type: shards of another type would be left out without a word (a .txt beside
    Parquet or JSONL files is taken for a note, as `datasets` takes it)."""
    folder = Path(spec.name)
    if (folder / "README.md").is_file():
        return
    read = {Path(f).resolve() for files in (builder.config.data_files or {}).values() for f in files}
    left = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in (".parquet", ".jsonl")
        and SHARD_BUILDERS[p.suffix] != builder.name
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.resolve() not in read
    )
    if left:
        suffixes = ", ".join(sorted({p.suffix for p in left}))
        raise BadInput(
            f"--data {spec.text} mixes shard types: `datasets` would read its {builder.name} files and leave out "
            f"{len(left)} {suffixes} file(s) such as {left[0]}: give shards of one type, or name each split's "
            "files in a README.md `configs`"
        )


def _load_dataset(spec: DatasetSpec, *args, split: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, split=split, **kwargs), split
    except Exception as err:
        raise BadInput(
            f"dataset {spec.text} cannot be opened ({_one_line(err)}): check the name and files, or set "
            "HF_DATASETS_OFFLINE=1 to read it from the local cache"
        ) from None


class _ShardLog(logging.Handler):
    """The file a `datasets` reader failed on: it logs its name on stderr, then raises without it."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.file: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        named = re.search(r"file '([^']+)'", record.getMessage())
        if named:
            self.file = named.group(1)


@contextlib.contextmanager
def _failed_shard() -> Iterator[_ShardLog]:
    """Keeps the readers' log lines off stderr (the error is one line) and catches the shard they name."""
    logger = logging.getLogger("datasets.packaged_modules")
    handler, propagate = _ShardLog(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@dataclass
class RowsRead:
    """Rows read from a dataset, before --where (where no row is known without reading)."""

    rows: int = 0


@dataclass
class Columns:
    """Which columns make a Document."""

    text: str | None  # None: pre-tokenized
    tokens: str | None
    id: str | None
    all: list[str]


def columns(available: list[str], text_column: str | None, id_column: str | None, where: str) -> Columns:
    """The text (or token) and id columns, checked against the dataset's columns (the id column by default
    the first of doc_id, docid, id it has)."""
    shown = ", ".join(available)
    for flag, column in (("--text-column", text_column), ("--id-column", id_column)):
        if column is not None and column not in available:
            raise BadInput(f"{flag} {column!r} is not a column of {where}: use one of {shown}")
    if id_column is None:
        id_column = next((c for c in ID_COLUMNS if c in available), None)
    if text_column in TOKEN_COLUMNS:
        return Columns(None, text_column, id_column, available)
    if text_column is not None:
        return Columns(text_column, None, id_column, available)
    tokens = next((c for c in TOKEN_COLUMNS if c in available), None)
    if TEXT_COLUMN in available:
        return Columns(TEXT_COLUMN, None, id_column, available)
    if tokens is not None:
        return Columns(None, tokens, id_column, available)
    raise BadInput(
        f"{where} has no text column and no input_ids/tokens column: name one with --text-column (columns: {shown})"
    )


class DatasetInput:
    """One dataset source with its options: its documents, its identity, its column check."""

    def __init__(
        self,
        spec: DatasetSpec,
        *,
        split: str | None = None,
        text_column: str | None = None,
        id_column: str | None = None,
        where: str | None = None,
        shuffle: int | None = None,
        shuffle_buffer: int = 10_000,
        streaming: bool = True,
    ):
        from .where import RowFilter

        self.spec = spec
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.dataset, self.split = load(spec, split, streaming)
        # Local text shards: a document is a paragraph, without the newlines around it (as ingest/sources.py
        # reads .txt); a blank line had been a document of no tokens in a repository folder.
        local = spec.kind == "files" or (spec.kind == "hub" and Path(spec.name).is_dir())
        self.paragraphs = local and self.dataset.info.builder_name == "text"
        if shuffle is not None:
            if not hasattr(self.dataset, "_ex_iterable"):  # a map-style Dataset: shuffle it as a stream
                self.dataset = self.dataset.to_iterable_dataset()
            self.dataset = self.dataset.shuffle(seed=shuffle, buffer_size=shuffle_buffer)
        available = self._column_names()
        self.columns = columns(available, text_column, id_column, spec.text)
        self.filter = RowFilter(where, available, spec.text) if where else None

    def _column_names(self) -> list[str]:
        names = self.dataset.column_names
        if names is None:  # a stream of JSON rows declares no features: read the first batch's
            first = next(self._batches(self.dataset, rows=1), None)
            names = [] if first is None else first.column_names
        return list(names)

    def identity(self) -> dict:
        """What the run config stores: the source and every option that decides which rows, in which order."""
        spec = self.spec
        identity = {
            "source": spec.text,
            "kind": spec.kind,
            "name": spec.name,
            "config": spec.config,
            "split": self.split,
            "revision": self._revision(),
            "where": self.filter.sql if self.filter else None,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer if self.shuffle is not None else None,
            "text_column": self.columns.text,
            "tokens_column": self.columns.tokens,
            "id_column": self.columns.id,
        }
        identity["fingerprint"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return identity

    def _revision(self) -> object:
        """The content the rows come from: the save_to_disk fingerprint, each shard's size and mtime, or
        the Hub dataset's cached revision (its builder hash, which names the commit it was read at)."""
        spec = self.spec
        if spec.kind == "disk":
            state = [json.loads(p.read_text()).get("_fingerprint") for p in sorted(Path(spec.name).rglob("state.json"))]
            return {"fingerprints": state}
        if spec.kind == "files":
            return {"files": [_file_identity(f) for f in spec.files]}
        if Path(spec.name).is_dir():
            files = sorted(p for p in Path(spec.name).rglob("*") if p.is_file() and ".cache" not in p.parts)
            return {"files": [_file_identity(str(f)) for f in files]}
        try:
            import datasets

            return {"builder_hash": datasets.load_dataset_builder(spec.name, spec.config).hash}
        except Exception:  # an offline cache without builder metadata: the name and config must do
            return None

    def parts(self) -> list:
        """The dataset as parts one rank can read alone, in stream order: a Dataset's row ranges, one per Arrow
        file, or a stream's shards, one per data file. A shuffled dataset is one part: its order mixes them all."""
        data = self.dataset
        if self.shuffle is not None:
            return [data]
        if not hasattr(data, "_ex_iterable"):  # a map-style Dataset (memory-mapped)
            n = max(1, len(data.cache_files))
            return [data.shard(n, index, contiguous=True) for index in range(n)]
        return [data.shard(num_shards=data.num_shards, index=index) for index in range(data.num_shards)]

    def rows_without_reading(self, part, index: int, of: int) -> int | None:
        """The rows of part `index` of `of` (parts()), where they are known without reading any row: a Dataset's
        row range, or a Parquet shard's footer (None: only reading the part counts them)."""
        if not hasattr(part, "_ex_iterable"):
            return part.num_rows
        if self.spec.kind == "files" and _builder(self.spec) == "parquet" and of == len(self.spec.files):
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.spec.files[index]).metadata.num_rows
        return None

    @property
    def drops_rows(self) -> bool:
        """Whether a row can give no document (--where, or a blank paragraph of a text shard) even where no row
        is bad."""
        return self.filter is not None or self.paragraphs

    def documents(
        self,
        counter: SkipCounter,
        dataset: str | None,
        role: str | None,
        part=None,
        first_row: int = 0,
        read: RowsRead | None = None,
    ) -> Iterator[Document]:
        """The rows in order (after --where) as Documents; a bad row is refused, or counted with --skip-bad.
        `part`: only that part (of parts()), its rows numbered on from `first_row`; `read` counts the rows read."""
        import pyarrow as pa

        label = dataset or self.spec.label
        row = first_row
        for batch in self._batches(self.dataset if part is None else part):
            batch = batch.append_column(ROW_COLUMN, pa.array(range(row, row + batch.num_rows), pa.int64()))
            row += batch.num_rows
            if read is not None:
                read.rows += batch.num_rows
            if self.filter is not None:
                batch = self.filter.apply(batch)
            for record in batch.to_pylist():
                index = record.pop(ROW_COLUMN)
                if self.paragraphs:
                    record[TEXT_COLUMN] = record[TEXT_COLUMN].strip("\n")
                    if not record[TEXT_COLUMN]:
                        continue
                try:
                    doc = self._document(record, index, label, role)
                except ValueError as err:
                    counter.bad(f"{self.spec.text} row {index}: {err}")
                    continue
                yield doc

    def _batches(self, data, rows: int = BATCH_ROWS) -> Iterator:
        """`data`'s rows in Arrow batches; a shard the reader cannot decode (a line that is not JSON, a damaged
        Parquet file, text that is not UTF-8) is refused in one line."""
        batches = iter(data.with_format("arrow").iter(batch_size=rows))
        while True:
            with _failed_shard() as failed:
                try:
                    batch = next(batches)
                    # The JSON and Parquet readers pass bytes that are not UTF-8 on as strings: rows would fail later.
                    batch.validate(full=True)
                except StopIteration:
                    return
                except Exception as err:  # datasets and pyarrow raise several types for a damaged shard
                    named = failed.file or next((f for f in self._local_files() if not _decodes(f)), None)
                    shard = f" {named}" if named else ""
                    raise BadInput(
                        f"--data {self.spec.text} is not readable ({_one_line(err)}): fix or remove the shard{shard}"
                    ) from None
            yield batch

    def _local_files(self) -> list[str]:
        """The local data files of the split, in order, to find the one a reader failed on without naming it."""
        if self.spec.kind == "files":
            return list(self.spec.files)
        if self.spec.kind != "hub" or not Path(self.spec.name).is_dir():
            return []
        import datasets

        builder = datasets.load_dataset_builder(self.spec.name, self.spec.config)
        return [str(f) for f in (builder.config.data_files or {}).get(self.split, [])]

    def _document(self, record: dict, index: int, label: str, role: str | None) -> Document:
        cols = self.columns
        doc_id = id_text(record.get(cols.id), cols.id) if cols.id else None
        doc_id = f"{self.spec.label}:{index}" if doc_id is None else doc_id
        if cols.tokens is not None:
            ids = record[cols.tokens]
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= INT32_MAX for i in ids
            ):
                raise ValueError(f"column {cols.tokens!r} must be a list of token ids (whole numbers >= 0)")
            text = record.get(TEXT_COLUMN) if isinstance(record.get(TEXT_COLUMN), str) else None
        else:
            text, ids = record[cols.text], None
            if not isinstance(text, str):
                raise ValueError(f"column {cols.text!r} must be a string, got {type(text).__name__}")
        meta = {
            k: v for k, v in record.items() if k not in {cols.text, cols.tokens, cols.id, "dataset", "role", "label"}
        }
        labels = {k: record.get(k) if isinstance(record.get(k), str) else None for k in ("dataset", "role", "label")}
        doc = Document(
            doc_id,
            text or "",
            labels["dataset"] or label,
            labels["role"] or role,
            labels["label"],
            meta,
            token_ids=ids,
        )
        # Labels reach terminals and pages: a row's are checked as a data file's are (warehouse/names.py).
        problem = document_label_problem(doc)
        if problem:
            raise ValueError(problem)
        return doc


def _decodes(path: str) -> bool:
    """Whether a local shard reads whole: a Parquet file's row groups, or a text/JSON file's bytes as UTF-8."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            shard = pq.ParquetFile(path)
            for group in range(shard.num_row_groups):
                shard.read_row_group(group).validate(full=True)
        else:
            decoder = codecs.getincrementaldecoder("utf-8")()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except Exception:  # pyarrow and the codec raise several types
        return False
    return True


def _file_identity(path: str) -> dict:
    info = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
