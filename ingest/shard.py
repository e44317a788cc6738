"""A shard: whole documents captured and committed together, the unit of resume.

`Shard` holds the documents with their windows, orders them into batches for the capture
(`Capture.shard`, ingest/capture.py), and gives the documents and tokens tables committed
with the shard's rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa

import warehouse
from warehouse import jsonio

from .sources import Document
from .tokenize import Window


@dataclass
class Shard:
    """Whole documents captured and committed together (the unit of resume)."""

    docs: list[tuple[int, Document, list[Window]]]  # (ordinal, document, its windows in order)
    next_doc: int  # ordinal after the shard's last document
    packed: bool = False  # the windows are cut from packed contexts (ingest/contexts.py)

    @cached_property
    def doc_tokens(self) -> list[int]:
        """Each document's token count (the tokens of its windows), in `docs` order."""
        return [sum(len(w.ids) for w in wins) for _, _, wins in self.docs]

    @property
    def n_tokens(self) -> int:
        return sum(self.doc_tokens)

    def batches(self, batch_size: int) -> Iterator[list[Window]]:
        """The windows in batches, shortest documents first: batches of similar length waste little
        on padding. A document's windows stay consecutive and in order (the capture relies on it).
        Packed windows come in context order instead, whole contexts a batch."""
        if self.packed:
            from .contexts import packed_batches

            yield from packed_batches(self.docs, batch_size)
            return
        by_length = sorted(zip(self.doc_tokens, self.docs), key=lambda pair: pair[0])
        live = [w for _, (_, _, wins) in by_length for w in wins if w.ids]
        for i in range(0, len(live), batch_size):
            yield live[i : i + batch_size]

    def documents_table(self) -> pa.Table:
        cols = {
            k: []
            for k in (
                "doc",
                "doc_id",
                "dataset",
                "role",
                "label",
                "message_index",
                "message_role",
                "n_tokens",
                "n_windows",
                "text",
                "meta",
            )
        }
        for (ordinal, doc, wins), n_tokens in zip(self.docs, self.doc_tokens):
            cols["doc"].append(ordinal)
            cols["doc_id"].append(doc.doc_id)
            cols["dataset"].append(doc.dataset)
            cols["role"].append(doc.role)
            cols["label"].append(doc.label)
            cols["message_index"].append(doc.meta.get("message_index"))
            cols["message_role"].append(doc.meta.get("message_role"))
            cols["n_tokens"].append(n_tokens)
            cols["n_windows"].append(len(wins))
            cols["text"].append(doc.text)
            cols["meta"].append(jsonio.dumps(doc.meta) if doc.meta else None)
        return pa.Table.from_pydict(cols, schema=warehouse.schema.table("documents").arrow_schema())

    def tokens_table(self, tokenizer) -> pa.Table:
        ids, pieces, texts, docs, pos, win, starts, ends, special = [], [], [], [], [], [], [], [], []
        contexts, context_pos = [], []
        for ordinal, _, wins in self.docs:
            for w in wins:
                n = len(w.ids)
                ids.extend(w.ids)
                pieces.extend(tokenizer.pieces(w.ids))
                texts.extend(tokenizer.texts(w.ids))
                docs.extend([ordinal] * n)
                pos.extend(range(w.start_pos, w.start_pos + n))
                win.extend([w.index] * n)
                starts.extend(None if s < 0 else s for s in w.char_start)
                ends.extend(None if e < 0 else e for e in w.char_end)
                special.extend(w.special)
                contexts.extend([w.context if w.context >= 0 else None] * n)
                context_pos.extend(range(w.context_start, w.context_start + n))
        cols = {
            "doc": docs,
            "pos": pos,
            "window": win,
            "token_id": ids,
            "piece": pieces,
            "char_start": starts,
            "char_end": ends,
            "special": special,
            "text": texts,
            "context": contexts,
            "context_pos": context_pos,
        }
        return pa.Table.from_pydict(cols, schema=warehouse.schema.table("tokens").arrow_schema())
