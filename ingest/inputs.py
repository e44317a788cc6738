"""What `--data` names, opened: plain files (ingest/sources.py) and datasets (ingest/dataset_sources.py).

    source = open_input(options)
    source.identity                      # stored as the run config's data: what --resume checks
    for doc in source.documents(counter): ...

Plain .jsonl/.parquet/.txt files are read by ingest/sources.py, hashed before the run starts
(their sha256 ties --resume to the content). hf:NAME, folders and globs, and plain files
given with a dataset option (--split, --text-column, --id-column, --where, --shuffle), are
read with the `datasets` library; their identity is the dataset fingerprint
(dataset_sources.DatasetInput.identity).

Under several ranks the stream is cut into pieces (each plain file, each dataset part) and each
rank reads its own (Input.segments), placed in the stream by the counts the ranks exchange.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from warehouse.errors import BadInput

from . import dataset_sources, sources
from .contexts import SEPARATORS, Segment

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


@dataclass(frozen=True)
class Piece:
    """A part of the stream that one rank reads alone: a plain file, or one part of a dataset (a row range per
    Arrow file, or a shard per data file: dataset_sources.DatasetInput.parts)."""

    at: int  # the place of its --data value among them
    item: object  # that value's Path or DatasetInput
    part: object = None  # the dataset's part
    index: int = 0  # its place among its dataset's parts
    of: int = 1  # its dataset's parts


@dataclass
class Count:
    """What a piece holds: its rows before --where (a dataset's default ids number its rows on across its
    parts), its documents, and their document tokens (counted for --max-tokens only)."""

    rows: int = 0
    documents: int = 0
    tokens: int = 0
    bad: bool = False  # counting stopped at a bad row (without --skip-bad): the counts are those before it


def _reached(plan, documents: int, tokens: int) -> bool:
    """Whether the stream's first `documents` documents and `tokens` tokens reach --max-docs or --max-tokens."""
    return (plan.max_docs is not None and documents >= plan.max_docs) or (
        plan.max_tokens is not None and tokens >= plan.max_tokens
    )


def repeated_id(doc_id: str, first: int, second: int) -> BadInput:
    return BadInput(
        f"doc_id {doc_id!r} is given twice (documents {first} and {second} of --data), and pages and "
        f"exports name documents by it: name a column of unique ids with --id-column, or leave "
        f"--id-column out (each row is then named SOURCE:ROW)"
    )


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
        """Every document in order."""
        (whole,) = self._checked(lambda count: [Segment(self._documents(count, dataset, role))], counter)
        return iter(whole.docs)

    def _checked(self, make, counter: sources.SkipCounter) -> list[Segment]:
        """`make(counter)`'s segments. Pages and exports name a document by its doc_id, so none may be given
        twice: plain files alone were checked whole before the run (sources.scan); a dataset is a stream,
        checked as it goes by (a set of the ids' 64-bit hashes, a repeated hash confirmed by reading the
        segments again)."""
        if not self.datasets:
            return make(counter)
        seen: set[int] = set()

        def check(segment: Segment) -> Iterator:
            for number, doc in enumerate(segment.docs, start=segment.first + 1):
                key = hash(doc.doc_id)
                if key in seen and (first := self._number_of(make, doc.doc_id, number)) is not None:
                    raise repeated_id(doc.doc_id, first, number)
                seen.add(key)
                yield doc

        return [replace(segment, docs=check(segment)) for segment in make(counter)]

    def _documents(self, counter: sources.SkipCounter, dataset: str | None, role: str | None) -> Iterator:
        for item in self.order:
            if isinstance(item, Path):
                yield from sources.read([item], counter, dataset, role)
            else:
                yield from item.documents(counter, dataset, role)

    def _number_of(self, make, doc_id: str, before: int) -> int | None:
        """The number of the first document before document `before` whose id is `doc_id` (None: a hash collision)."""
        for segment in make(sources.SkipCounter(self.skip_bad)):
            for number, doc in enumerate(segment.docs, start=segment.first + 1):
                if number >= before:
                    return None
                if doc.doc_id == doc_id:
                    return number
        return None

    # -- each rank its own pieces ------------------------------------------------------------------

    def pieces(self) -> list[Piece]:
        """The stream as pieces, in order: each plain file, each dataset's parts."""
        out = []
        for at, item in enumerate(self.order):
            if isinstance(item, Path):
                out.append(Piece(at, item))
                continue
            parts = item.parts()
            out += [Piece(at, item, part, index, len(parts)) for index, part in enumerate(parts)]
        return out

    def _read(self, piece: Piece, counter, dataset, role, first_row: int = 0, read=None) -> Iterator:
        if piece.part is None:
            return sources.read([piece.item], counter, dataset, role)
        return piece.item.documents(counter, dataset, role, piece.part, first_row, read)

    def _known(self, piece: Piece, plan) -> Count | None:
        """A piece's count where no row is read: a plain file's documents (read before the run, sources.scan),
        a dataset part's rows where each is a document (no --where, no --skip-bad: a bad row stops the run).
        None: only reading it counts it, as for --max-tokens, which tokenizes."""
        if plan.max_tokens is not None:
            return None
        if piece.part is None:
            return Count(documents=dict(zip(self.paths, self.plain_identity))[piece.item]["documents"])
        if self.skip_bad or piece.item.drops_rows:
            return None
        rows = piece.item.rows_without_reading(piece.part, piece.index, piece.of)
        return None if rows is None else Count(rows, rows)

    def count_own(self, pieces: list[Piece], rank: int, world_size: int, plan, tokenizer, dataset, role) -> dict:
        """{piece index: Count} of this rank's pieces (every world_size-th, from the rank's own on), in stream
        order, reading no other piece. Counting stops once they hold --max-docs documents or --max-tokens
        tokens (every piece after follows at least as many in the stream, so none of its documents is kept),
        and at a bad row (without --skip-bad): whether the run reaches that row is known once every rank has
        counted (first_bad_piece)."""
        from .contexts import tokenize_document

        counts: dict[int, Count] = {}
        documents = tokens = 0
        for index in range(rank, len(pieces), world_size):
            if _reached(plan, documents, tokens):
                break
            count = self._known(pieces[index], plan)
            if count is None:
                count, read = Count(), dataset_sources.RowsRead()
                docs = self._read(pieces[index], sources.SkipCounter(self.skip_bad), dataset, role, read=read)
                try:
                    # The limits are checked before the next document is read, as contexts.limited does.
                    while not _reached(plan, documents + count.documents, tokens + count.tokens):
                        doc = next(docs, None)
                        if doc is None:
                            break
                        count.documents += 1
                        if plan.max_tokens is not None:
                            count.tokens += len(tokenize_document(doc, tokenizer).ids)
                except BadInput:
                    count.bad = True
                count.rows = read.rows
            counts[index] = count
            if count.bad:
                break
            documents, tokens = documents + count.documents, tokens + count.tokens
        return counts

    def _placed(self, pieces: list[Piece], counts: dict, plan) -> Iterator[tuple[int, Segment, int, Count]]:
        """(index, its segment less the documents, the row its dataset's default ids number on from, its count)
        of each piece before --max-docs and --max-tokens, in stream order, placed by every rank's counts."""
        documents, tokens, rows = 0, 0, {}
        for index, piece in enumerate(pieces):
            if _reached(plan, documents, tokens):
                return  # every piece before the limits was counted by its rank (count_own)
            count, first_row = counts[index], rows.get(piece.at, 0)
            yield index, Segment((), documents, tokens), first_row, count
            if count.bad:
                return  # the run stops at its bad row (first_bad_piece), or the limits fall before it
            documents, tokens, rows[piece.at] = (
                documents + count.documents,
                tokens + count.tokens,
                first_row + count.rows,
            )

    def first_bad_piece(self, pieces: list[Piece], counts: dict, plan) -> tuple[int, int] | None:
        """(index, first row) of the piece whose bad row the run reaches (the limits fall after it), if any."""
        for index, place, first_row, count in self._placed(pieces, counts, plan):
            if count.bad and not _reached(plan, place.first + count.documents, place.tokens_before + count.tokens):
                return index, first_row
        return None

    def own_segments(
        self, pieces: list[Piece], counts: dict, rank: int, world_size: int, plan, counter, dataset, role
    ) -> list[Segment]:
        """This rank's pieces as segments, each placed in the stream by every rank's counts (count_own): the
        ordinal of its first document, the tokens before it, and the row its dataset's default ids number on
        from; pieces past --max-docs or --max-tokens are left out."""

        def make(count_with) -> list[Segment]:
            return [
                replace(place, docs=self._read(pieces[index], count_with, dataset, role, first_row))
                for index, place, first_row, _ in self._placed(pieces, counts, plan)
                if index % world_size == rank
            ]

        return self._checked(make, counter)

    def segments(self, counter, dataset, role, *, plan, tokenizer, rank: int, world_size: int, share):
        """(this rank's segments, whether they are its own pieces). Where the stream has at least a piece per
        rank, each rank reads only its own, every world_size-th, placed in the stream by the counts every rank
        gives for its own (`share` exchanges them); a bad row the run reaches is refused on every rank now,
        named by its row in the stream. Else every rank reads the whole stream, and the caller deals its
        documents round-robin."""
        pieces = self.pieces()
        if world_size == 1 or len(pieces) < world_size:
            return [Segment(self.documents(counter, dataset, role))], False
        counts: dict[int, Count] = {}
        for found in share(lambda: self.count_own(pieces, rank, world_size, plan, tokenizer, dataset, role)):
            counts.update(found)
        bad = self.first_bad_piece(pieces, counts, plan)
        if bad is not None:
            index, first_row = bad

            def refuse() -> None:  # its rank reads it again, its rows numbered in the stream: the one-line error
                if index % world_size == rank:
                    for _ in self._read(pieces[index], sources.SkipCounter(), dataset, role, first_row):
                        pass

            share(refuse)  # raises that error on every rank
        return self.own_segments(pieces, counts, rank, world_size, plan, counter, dataset, role), True


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
