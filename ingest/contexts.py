"""The model inputs built from the document stream: per-document windows (the default) or packed contexts.

Windows: each document is split into windows of at most --max-length tokens, each framed by the
tokenizer's own special tokens ([CLS] .. [SEP]); positions continue across a document's windows.

Packed (`--context-size N --pack`), as SAELens's ActivationsStore builds its training contexts
(sae_lens.tokenization_and_batching.concat_and_batch_sequences, begin_sequence_token None):
documents are tokenized without special tokens and concatenated into contexts of exactly N
tokens. A context begins with BOS (--prepend-bos; not added where the context's first token is
already BOS) and, inside a context, each next document is preceded by the separator
(--separator bos|eos|sep|none|ID; not added before a document that begins with it). A document
longer than the room left continues in the next context. The last, partial context is dropped
(--keep-partial keeps it, shorter). The BOS and separators the packer inserts belong to no
document: they are model input, not stored rows.

Either way the capture sees *windows*: a window is the run of one document's tokens inside one
model input, with that input (`Window.row`) and its place in it. Every stored token keeps its
document and position in the document; `context` / `context_pos` say which model input it was
computed in. --exclude-special leaves BOS/EOS/pad and the tokenizer's other special tokens out
of the windows (SAELens's exclude_special_tokens): the model still sees them, the statistics,
examples and tables do not.

Shards hold whole documents. A packed context shared by two shards' documents is computed in
both, each keeping its own documents' windows, so a shard's activations are those of the
uninterrupted packing; a --resume re-tokenizes the documents before its first to rebuild the
packing state.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from warehouse.errors import BadInput

from .sources import Document
from .tokenize import Window, windows_of

SEPARATORS = ("bos", "eos", "sep", "none")


@dataclass(frozen=True)
class ContextPlan:
    """How the stream becomes model inputs (resolved from the options and the tokenizer)."""

    max_length: int  # window mode: tokens per window
    truncate: bool = False
    context_size: int | None = None  # packed: tokens per context
    bos_id: int | None = None  # packed: the token each context begins with
    separator_id: int | None = None  # packed: the token between documents
    keep_partial: bool = False
    exclude_special: bool = False
    max_docs: int | None = None
    max_tokens: int | None = None

    @property
    def packed(self) -> bool:
        return self.context_size is not None


def special_id(name: str, tokenizer, flag: str, notes: list[str]) -> int | None:
    """The token id --separator (or a BOS) names: bos, eos, sep, none or a number. A token the tokenizer
    lacks is none, with a note (SAELens, too, goes on without it)."""
    if name == "none":
        return None
    if name.isdigit():
        return int(name)
    found = getattr(tokenizer, f"{name}_id", None)
    if found is None:
        notes.append(f"note: this model's tokenizer has no {name.upper()} token, so {flag} inserts none")
    return found


def dictionary_prepend_bos(dictionaries: dict) -> bool | None:
    """What the SAELens dictionaries of the run were trained with (cfg.json's prepend_bos, top level or
    under metadata); None when none says."""
    said = set()
    for dset in dictionaries.values():
        for d in dset.by_layer.values():
            if d.format != "saelens":
                continue
            try:
                cfg = json.loads((Path(d.path) / "cfg.json").read_text())
            except (OSError, ValueError):
                continue
            value = cfg.get("prepend_bos", (cfg.get("metadata") or {}).get("prepend_bos"))
            if isinstance(value, bool):
                said.add(value)
    return said.pop() if len(said) == 1 else None


def resolve_prepend_bos(asked: bool | None, dictionaries: dict) -> tuple[bool, str | None]:
    """(prepend_bos, a note when it disagrees with the dictionaries' own config): --prepend-bos / --no-prepend-bos
    wins; else the dictionaries' prepend_bos; else True (SAELens's default)."""
    trained = dictionary_prepend_bos(dictionaries)
    if asked is None:
        return (True if trained is None else trained), None
    if trained is not None and trained != asked:
        flag = "--prepend-bos" if asked else "--no-prepend-bos"
        return asked, (
            f"warning: {flag} differs from the dictionary's own config (prepend_bos={str(trained).lower()}): "
            "its latents on the first positions may not match its training; drop the flag to follow it"
        )
    return asked, None


def plan(options, tokenizer, dictionaries: dict, max_length: int, positions: int | None = None):
    """(ContextPlan, the options with --prepend-bos resolved where packing uses it, notes for the user);
    `positions`: the model's, which a packed context must fit."""
    notes = []
    bos_id = separator_id = None
    if options.pack or options.exclude_special:
        transcoder = next((p for p, d in dictionaries.items() if d.first.transcoder), None)
        if transcoder is not None:
            raise BadInput(
                f"transcoder {transcoder} compares its output with the MLP's over whole windows: "
                "drop --pack and --exclude-special for this site"
            )
    if options.pack:
        if positions and options.context_size > positions:
            raise BadInput(
                f"--context-size {options.context_size} is longer than the {positions} positions this model has: "
                f"use at most {positions}"
            )
        prepend_bos, note = resolve_prepend_bos(options.prepend_bos, dictionaries)
        notes += [note] if note else []
        options = replace(options, prepend_bos=prepend_bos)
        bos_id = special_id("bos", tokenizer, "--prepend-bos", notes) if prepend_bos else None
        separator_id = special_id(options.separator, tokenizer, "--separator", notes)
    context_plan = ContextPlan(
        max_length=max_length,
        truncate=options.truncate,
        context_size=options.context_size if options.pack else None,
        bos_id=bos_id,
        separator_id=separator_id,
        keep_partial=options.keep_partial,
        exclude_special=options.exclude_special,
        max_docs=options.max_docs,
        max_tokens=options.max_tokens,
    )
    return context_plan, options, notes


# -- documents to token ids --------------------------------------------------------------


@dataclass
class Tokens:
    ids: list[int]
    offsets: list | None  # None: pre-tokenized (no character offsets)


def tokenize_document(doc: Document, tokenizer) -> Tokens:
    if doc.token_ids is not None:
        if not doc.text:
            doc.text = tokenizer.decode(doc.token_ids)
        return Tokens(list(doc.token_ids), None)
    ids, offsets = tokenizer.encode(doc.text)
    return Tokens(ids, offsets)


def cut(doc: Document, tokens: Tokens, keep: int) -> tuple[Document, Tokens]:
    """The document's first `keep` tokens (its text cut after the last of them), for --max-tokens."""
    if keep >= len(tokens.ids):
        return doc, tokens
    offsets = None if tokens.offsets is None else tokens.offsets[:keep]
    text = doc.text if offsets is None else doc.text[: offsets[-1][1] if offsets else 0]
    meta = {**doc.meta, "cut_at_token": keep}
    return replace(doc, text=text, meta=meta), Tokens(tokens.ids[:keep], offsets)


@dataclass
class Segment:
    """Documents that follow each other in the stream, and where they stand in it: a rank reads the whole
    stream as one segment, or its own parts of the input as one segment each (ingest/inputs.py)."""

    docs: Iterable[Document]
    first: int = 0  # the stream ordinal of its first document
    tokens_before: int = 0  # document tokens in the stream before it: what --max-tokens has spent


def limited(segments: Iterable[Segment], plan: ContextPlan, tokenizer) -> Iterator[tuple[int, Document, Tokens | None]]:
    """(ordinal, document, its tokens) in stream order, up to the stream's first --max-docs documents and exactly
    its first --max-tokens document tokens (the last document is cut); tokens None: not tokenized yet (no
    --max-tokens). The segments come in stream order, so the first past a limit ends them all. The limits are
    checked before the next document is read: no row after the last document kept is read."""
    for segment in segments:
        left = None if plan.max_tokens is None else plan.max_tokens - segment.tokens_before
        docs = iter(segment.docs)
        for ordinal in itertools.count(segment.first):
            if (plan.max_docs is not None and ordinal >= plan.max_docs) or (left is not None and left <= 0):
                return
            doc = next(docs, None)
            if doc is None:
                break
            if left is None:
                yield ordinal, doc, None
                continue
            tokens = tokenize_document(doc, tokenizer)
            doc, tokens = cut(doc, tokens, left)
            left -= len(tokens.ids)
            yield ordinal, doc, tokens


# -- the packer ----------------------------------------------------------------------------


@dataclass
class Context:
    """One packed model input: its token ids and where each came from (doc -1: inserted by the packer)."""

    ordinal: int
    ids: list[int]
    doc: list[int]
    pos: list[int]


class Packer:
    """SAELens's concat_and_batch_sequences, keeping each token's document and position."""

    def __init__(self, context_size: int, bos_id: int | None, separator_id: int | None):
        self.size, self.bos, self.sep = context_size, bos_id, separator_id
        self.ids: list[int] | None = None
        self.doc: list[int] = []
        self.pos: list[int] = []
        self.count = 0

    def _insert(self, token: int) -> None:
        self.ids.append(token)
        self.doc.append(-1)
        self.pos.append(-1)

    def feed(self, ordinal: int, ids: list[int]) -> list[Context]:
        """Add one document; returns the contexts it completed."""
        done, offset, size = [], 0, self.size
        while len(ids) - offset > 0:
            first = ids[offset]
            if self.ids is None:
                self.ids, self.doc, self.pos = [], [], []
                if self.bos is not None and first != self.bos:
                    self._insert(self.bos)
            elif self.sep is not None and first != self.sep and len(self.ids) < size:
                self._insert(self.sep)
            take = max(size - len(self.ids), 0)
            chunk = ids[offset : offset + take]
            self.ids.extend(chunk)
            self.doc.extend([ordinal] * len(chunk))
            self.pos.extend(range(offset, offset + len(chunk)))
            offset += len(chunk)
            if len(self.ids) == size:
                done.append(self._close())
        return done

    def _close(self) -> Context:
        context = Context(self.count, self.ids, self.doc, self.pos)
        self.count += 1
        self.ids = None
        return context

    def finish(self) -> Context | None:
        """The last, partial context (None: there is none)."""
        return self._close() if self.ids else None


def context_windows(context: Context, specials: frozenset, exclude_special: bool) -> list[tuple[int, Window]]:
    """(document, window) for each run of one document's tokens in the context, in order; a token the
    packer inserted ends a run, as does (with exclude_special) a special token."""
    out, start = [], 0
    n = len(context.ids)
    while start < n:
        doc = context.doc[start]
        keep = doc >= 0 and not (exclude_special and context.ids[start] in specials)
        end = start + 1
        while (
            end < n
            and context.doc[end] == doc
            and context.pos[end] == context.pos[end - 1] + 1
            and (doc >= 0 and not (exclude_special and context.ids[end] in specials)) == keep
        ):
            end += 1
        if keep:
            ids = context.ids[start:end]
            window = Window(
                doc,
                0,
                context.pos[start],
                ids,
                [i in specials for i in ids],
                [],
                [],
                False,
                context=context.ordinal,
                context_start=start,
                row=context.ids,
            )
            out.append((doc, window))
        start = end
    return out


# -- windows without their special tokens ---------------------------------------------------


def without_special(windows: list[Window]) -> list[Window]:
    """A document's windows less their special tokens (--exclude-special in window mode): each run of
    other tokens is a window cut from the original one, which stays the model input."""
    out, before = [], 0
    for window in windows:
        start, n = 0, len(window.ids)
        while start < n:
            if window.special[start]:
                start += 1
                continue
            end = start
            while end < n and not window.special[end]:
                end += 1
            out.append(
                Window(
                    window.doc,
                    len(out),
                    window.start_pos + start,
                    window.ids[start:end],
                    window.special[start:end],
                    window.char_start[start:end],
                    window.char_end[start:end],
                    False,
                    context=-1,
                    context_start=start,
                    row=window.ids,
                    n_before=before,
                )
            )
            before += end - start
            start = end
    if out:
        out[-1].last = True
    return out


# -- shards ----------------------------------------------------------------------------------


def shards(
    segments: Iterable[Segment],
    tokenizer,
    plan: ContextPlan,
    *,
    start: int,
    shard_tokens: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator:
    """The segments' documents from ordinal `start` on, as model windows, in shards of whole documents of at
    least `shard_tokens` tokens. `rank` of `world_size`: keep only the documents dealt to this rank,
    round-robin by ordinal (where every rank reads the whole stream); each rank packs its own documents."""
    from .shard import Shard

    mine = (item for item in limited(segments, plan, tokenizer) if item[0] % world_size == rank)
    docs, tokens, last = [], 0, -1
    made = _packed(mine, tokenizer, plan, start) if plan.packed else _windowed(mine, tokenizer, plan, start)
    for ordinal, doc, wins in made:
        docs.append((ordinal, doc, wins))
        tokens += sum(len(w.ids) for w in wins)
        last = ordinal
        if tokens >= shard_tokens:
            yield Shard(docs, ordinal + 1, packed=plan.packed)
            docs, tokens = [], 0
    if docs:
        yield Shard(docs, last + 1, packed=plan.packed)


def _windowed(items, tokenizer, plan: ContextPlan, start: int):
    for ordinal, doc, tokens in items:
        if ordinal < start:
            continue
        tokens = tokens or tokenize_document(doc, tokenizer)
        wins = windows_of(ordinal, tokens.ids, tokens.offsets, tokenizer, plan.max_length, plan.truncate)
        yield ordinal, doc, without_special(wins) if plan.exclude_special else wins


def _packed(items, tokenizer, plan: ContextPlan, start: int):
    """(ordinal, document, windows) once every context holding the document's tokens is complete."""
    packer = Packer(plan.context_size, plan.bos_id, plan.separator_id)
    specials = tokenizer.special_ids
    pending: deque = deque()  # [ordinal, document, windows, offsets, tokens not yet in a complete context]
    by_ordinal: dict[int, list] = {}

    def place(context: Context) -> None:
        for ordinal, window in context_windows(context, specials, plan.exclude_special):
            entry = by_ordinal.get(ordinal)
            if entry is not None:  # None: a document before `start`, packed only to rebuild the state
                entry[2].append(window)
        for ordinal in set(context.doc) - {-1}:
            if ordinal in by_ordinal:
                by_ordinal[ordinal][4] -= context.doc.count(ordinal)

    def ready():
        while pending and pending[0][4] == 0:
            ordinal, doc, wins, offsets, _ = pending.popleft()
            del by_ordinal[ordinal]
            yield ordinal, doc, _finish(wins, offsets)

    for ordinal, doc, tokens in items:
        tokens = tokens or tokenize_document(doc, tokenizer)
        if ordinal >= start:
            entry = [ordinal, doc, [], tokens.offsets, len(tokens.ids)]
            pending.append(entry)
            by_ordinal[ordinal] = entry
        for context in packer.feed(ordinal, tokens.ids):
            place(context)
        yield from ready()
    partial = packer.finish()
    if partial is not None and plan.keep_partial:
        place(partial)
    for entry in pending:
        entry[4] = 0  # what is left was in the dropped partial context
    yield from ready()


def _finish(wins: list[Window], offsets: list | None) -> list[Window]:
    """Number a document's windows, mark its last, fill character offsets and tokens-before counts."""
    before = 0
    for index, window in enumerate(wins):
        window.index, window.n_before = index, before
        span = range(window.start_pos, window.start_pos + len(window.ids))
        window.char_start = [offsets[p][0] for p in span] if offsets is not None else [-1] * len(span)
        window.char_end = [offsets[p][1] for p in span] if offsets is not None else [-1] * len(span)
        before += len(window.ids)
    if wins:
        wins[-1].last = True
    return wins


def packed_batches(docs: list, batch_size: int) -> Iterator[list[Window]]:
    """A packed shard's windows in context order, `batch_size` contexts a batch (a context's windows stay in
    one batch, and a document's windows stay consecutive and in order)."""
    batch, rows = [], set()
    for _, _, wins in docs:
        for window in wins:
            if window.context not in rows and len(rows) == batch_size:
                yield batch
                batch, rows = [], set()
            rows.add(window.context)
            batch.append(window)
    if batch:
        yield batch


def model_input(batch: list[Window], pad_id: int):
    """(model ids, model mask, window mask, unpack) for one batch: the model runs on the distinct model
    inputs; unpack [windows * width] indexes the flattened [inputs * seq] positions each window's tokens
    were computed at (None: every window is its own input, the layout the hooks see already)."""
    from .tokenize import pad_batch

    if all(w.row is None for w in batch):
        ids, mask = pad_batch(batch, pad_id)
        return ids, mask, mask, None
    row_of: dict[int, int] = {}
    rows: list[list[int]] = []
    for w in batch:
        key = id(w.model_row)
        if key not in row_of:
            row_of[key] = len(rows)
            rows.append(w.model_row)
    seq = max(len(r) for r in rows)
    ids = np.full((len(rows), seq), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), seq), dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    width = max(len(w.ids) for w in batch)
    window_mask = np.zeros((len(batch), width), dtype=np.int64)
    unpack = np.zeros((len(batch), width), dtype=np.int64)
    for b, w in enumerate(batch):
        n = len(w.ids)
        window_mask[b, :n] = 1
        unpack[b, :n] = row_of[id(w.model_row)] * seq + w.context_start + np.arange(n)
    return ids, mask, window_mask, unpack.reshape(-1)
