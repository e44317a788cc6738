"""Tokenizers behind one small interface, and the split of documents into windows.

Every position the model sees is kept (special tokens included) and windows of a
long document continue its positions, so `tokens` replays the exact model input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    doc: int  # document ordinal in the run
    index: int  # window number within the document
    start_pos: int  # position of the window's first token in the document
    ids: list[int]
    special: list[bool]
    char_start: list[int]  # -1 for special tokens
    char_end: list[int]
    last: bool  # the document's final window
    # A window is its own model input unless it was cut from a longer one (a packed context, or a
    # window whose special tokens --exclude-special leaves out): then `row` is that input, `context`
    # its ordinal in the run (-1: not a packed context), `context_start` where in it the window starts,
    # and `n_before` the document's tokens in its earlier windows (positions skip the left-out ones).
    context: int = -1
    context_start: int = 0
    row: list[int] | None = None
    n_before: int | None = None

    @property
    def model_row(self) -> list[int]:
        return self.ids if self.row is None else self.row

    @property
    def tokens_through(self) -> int:
        """The document's tokens up to and including this window."""
        return (self.start_pos if self.n_before is None else self.n_before) + len(self.ids)


class HFTokenizer:
    """A Hugging Face fast tokenizer, with char offsets and its own special tokens."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.prefix, self.suffix = _special_frame(tokenizer)
        self.n_special = len(self.prefix) + len(self.suffix)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        # The token a context or sequence begins with: BOS, or [CLS] for BERT-style tokenizers.
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else self.eos_id
        self._vocab: list[str] | None = None
        self._texts: dict[int, str] = {}

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def wrap(self, ids: list[int]) -> tuple[list[int], list[bool]]:
        full = self.prefix + list(ids) + self.suffix
        return full, [True] * len(self.prefix) + [False] * len(ids) + [True] * len(self.suffix)

    def pieces(self, ids) -> list[str]:
        # A list lookup: convert_ids_to_tokens costs ~1 µs a token, 4 ms a capture batch.
        if self._vocab is None:
            self._vocab = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
        vocab = self._vocab
        return [vocab[i] if 0 <= i < len(vocab) else self.tok.convert_ids_to_tokens(i) for i in ids]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def texts(self, ids) -> list[str]:
        """Each token as the tokenizer decodes it alone (' ass', not 'Ġass'), for display; cached per id."""
        cache = self._texts
        return [cache[i] if i in cache else cache.setdefault(i, self.tok.decode([i])) for i in ids]


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence ([CLS] .. [SEP], BOS ..)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


class ByteTokenizer:
    """UTF-8 bytes as tokens (byte-level models such as BDH): one token per byte, no specials."""

    n_special = 0
    pad_id = 0
    special_ids = frozenset()
    bos_id = eos_id = sep_id = None

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for index, char in enumerate(text):
            for byte in char.encode("utf-8"):
                ids.append(byte)
                offsets.append((index, index + 1))
        return ids, offsets

    def wrap(self, ids: list[int]) -> tuple[list[int], list[bool]]:
        return list(ids), [False] * len(ids)

    def pieces(self, ids) -> list[str]:
        return [chr(i) if i < 128 else f"<0x{i:02X}>" for i in ids]

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def texts(self, ids) -> list[str]:
        return [self.decode([i]) for i in ids]


def windows(doc: int, text: str, tokenizer, max_length: int, truncate: bool) -> list[Window]:
    """Split one document into model windows of at most max_length tokens."""
    ids, offsets = tokenizer.encode(text)
    return windows_of(doc, ids, offsets, tokenizer, max_length, truncate)


def windows_of(
    doc: int, ids: list[int], offsets: list | None, tokenizer, max_length: int, truncate: bool
) -> list[Window]:
    """Split one document's token ids into model windows of at most max_length tokens, each framed by the
    tokenizer's special tokens. offsets None: a pre-tokenized document, used as it is (no frame, no
    character offsets; its own special tokens are marked as such)."""
    if offsets is None:
        return _pretokenized_windows(doc, ids, tokenizer, max_length, truncate)
    body = max(1, max_length - tokenizer.n_special)
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
    offset_chunks = [offsets[i : i + body] for i in range(0, len(offsets), body)] or [[]]
    if truncate:
        chunks, offset_chunks = chunks[:1], offset_chunks[:1]
    out, pos = [], 0
    for index, (chunk, offs) in enumerate(zip(chunks, offset_chunks)):
        full, special = tokenizer.wrap(chunk)
        starts, ends, it = [], [], iter(offs)
        for is_special in special:
            if is_special:
                starts.append(-1)
                ends.append(-1)
            else:
                s, e = next(it)
                starts.append(s)
                ends.append(e)
        out.append(Window(doc, index, pos, full, special, starts, ends, index == len(chunks) - 1))
        pos += len(full)
    return out


def _pretokenized_windows(doc: int, ids: list[int], tokenizer, max_length: int, truncate: bool) -> list[Window]:
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)] or [[]]
    if truncate:
        chunks = chunks[:1]
    specials = tokenizer.special_ids
    return [
        Window(
            doc,
            index,
            index * max_length,
            list(chunk),
            [i in specials for i in chunk],
            [-1] * len(chunk),
            [-1] * len(chunk),
            index == len(chunks) - 1,
        )
        for index, chunk in enumerate(chunks)
    ]


def pad_batch(batch: list[Window], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad windows into (input_ids, attention_mask) arrays."""
    width = max(len(w.ids) for w in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, window in enumerate(batch):
        ids[row, : len(window.ids)] = window.ids
        mask[row, : len(window.ids)] = 1
    return ids, mask
