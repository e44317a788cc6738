"""What `--data` names, opened: plain files (ingest/sources.py) and datasets (ingest/dataset_sources.py).

    source = open_input(options)
    source.identity                      # stored as the run config's data: what --resume checks
    for doc in source.documents(counter): ...

Plain .jsonl/.parquet/.txt files are read by ingest/sources.py, hashed before the run starts
(their sha256 ties --resume to the content). hf:NAME, folders and globs, and plain files
given with a dataset option (--split, --text-column, --id-column, --where, --shuffle), are
read with the `datasets` library; their identity is the dataset fingerprint
(dataset_sources.DatasetInput.identity).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from warehouse.errors import BadInput

from . import dataset_sources, sources
from .contexts import SEPARATORS

DATASET_OPTIONS = ("split", "text_column", "id_column", "where", "shuffle")


def check_options(options) -> None:
    """The dataset and context options' own values (no data read); one BadInput naming the fix."""
    for flag, value in (
        ("--max-docs", options.max_docs),
        ("--max-tokens", options.max_tokens),
        ("--shuffle-buffer", options.shuffle_buffer),
    ):
        if value is not None and value < 1:
            raise BadInput(f"{flag} must be at least 1")
    if options.pack and options.context_size is None:
        raise BadInput("--pack needs --context-size N: the tokens per packed context")
    if options.context_size is not None and not options.pack:
        raise BadInput("--context-size is the packed context length: add --pack (or use --max-length for windows)")
    if options.context_size is not None and options.context_size < 2:
        raise BadInput("--context-size must be at least 2")
    if options.separator not in SEPARATORS and not options.separator.isdigit():
        raise BadInput(f"--separator {options.separator!r}: use bos, eos, sep, none or a token id")
    if options.pack and (options.truncate or options.max_length is not None):
        raise BadInput("--pack builds contexts of --context-size tokens: drop --truncate and --max-length")
    if (options.pack or options.exclude_special) and options.splice:
        raise BadInput("--splice runs the model on whole windows: drop --pack and --exclude-special, or --splice")


def _wants_datasets(options) -> bool:
    return any(getattr(options, name) is not None for name in DATASET_OPTIONS)


def check_data(data: list[str], options=None) -> tuple[list[Path], list[dataset_sources.DatasetSpec]]:
    """(plain files, dataset specs) of the --data values, each checked to exist (nothing read yet)."""
    if not data:
        sources.check_paths([])  # its message says what --data takes
    as_dataset = options is not None and _wants_datasets(options)
    specs = [dataset_sources.parse(d) for d in data if as_dataset or dataset_sources.is_dataset(d)]
    plain = [d for d in data if not (as_dataset or dataset_sources.is_dataset(d))]
    return (sources.check_paths(plain) if plain else []), specs


@dataclass
class Input:
    """The opened --data: plain files and datasets, read in the order given."""

    paths: list[Path]
    datasets: list[dataset_sources.DatasetInput]
    order: list[object]  # each --data value's Path or DatasetInput, as given
    identity: list = field(default_factory=list)
    skip_bad: bool = False
    plain_identity: list = field(default_factory=list)  # the plain files' scan entries (--resume's sha256 check)

    def documents(self, counter: sources.SkipCounter, dataset: str | None, role: str | None) -> Iterator:
        """Every document in order. Pages and exports name a document by its doc_id, so none may be given
        twice: plain files alone were checked whole before the run (sources.scan); a dataset is a stream,
        checked as it goes by (a set of the ids' 64-bit hashes, a repeated hash confirmed by re-reading)."""
        stream = self._documents(counter, dataset, role)
        if not self.datasets:
            yield from stream
            return
        seen: set[int] = set()
        for number, doc in enumerate(stream, start=1):
            key = hash(doc.doc_id)
            if key in seen and (first := self._number_of(doc.doc_id, number, dataset, role)) is not None:
                raise BadInput(
                    f"doc_id {doc.doc_id!r} is given twice (documents {first} and {number} of --data), and pages and "
                    f"exports name documents by it: name a column of unique ids with --id-column, or leave "
                    f"--id-column out (each row is then named SOURCE:ROW)"
                )
            seen.add(key)
            yield doc

    def _documents(self, counter: sources.SkipCounter, dataset: str | None, role: str | None) -> Iterator:
        for item in self.order:
            if isinstance(item, Path):
                yield from sources.read([item], counter, dataset, role)
            else:
                yield from item.documents(counter, dataset, role)

    def _number_of(self, doc_id: str, before: int, dataset: str | None, role: str | None) -> int | None:
        """The number of the first document before document `before` whose id is `doc_id` (None: a hash collision)."""
        again = self._documents(sources.SkipCounter(self.skip_bad), dataset, role)
        for number, doc in enumerate(again, start=1):
            if number >= before:
                return None
            if doc.doc_id == doc_id:
                return number
        return None


def open_input(options) -> Input:
    """Check and open every --data value: plain files are read once (bad records refused, sha256 taken),
    datasets are loaded (split, columns and --where checked against them)."""
    paths, specs = check_data(list(options.data), options)
    opened = [
        dataset_sources.DatasetInput(
            spec,
            split=options.split,
            text_column=options.text_column,
            id_column=options.id_column,
            where=options.where,
            shuffle=options.shuffle,
            shuffle_buffer=options.shuffle_buffer,
            streaming=options.streaming,
        )
        for spec in specs
    ]
    scanned = sources.scan(paths, options.skip_bad)
    if not opened and not any(entry["documents"] for entry in scanned):
        raise BadInput("no documents to capture: the data files hold no readable documents")
    by_text = {spec.text: d for spec, d in zip(specs, opened)}
    plain = iter(zip(paths, scanned))
    order, identity = [], []
    for text in options.data:
        if text in by_text:
            order.append(by_text[text])
            identity.append(by_text[text].identity())
        else:
            path, entry = next(plain)
            order.append(path)
            identity.append(entry)
    return Input(paths, opened, order, identity, options.skip_bad, scanned)
